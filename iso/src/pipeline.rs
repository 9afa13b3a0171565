//! The whole build, step by step, into a staging directory beside `--out` that is renamed into
//! place only when every artifact and the manifest are written: a failed build leaves nothing.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use kiln_spec::kmod::ModulesDep;
use serde::Serialize;

use crate::cache::{Cache, rootfs_key};
use crate::error::{BuildError, Result};
use crate::initramfs::{self, STAGE1_MODULES};
use crate::inputs::{BuildInputs, OverlayFile};
use kiln_spec::bootargs::{self, BootDigests};
use kiln_spec::signing::{SIGNATURE_FILE, TRUSTED_KEYS_DIR};

use crate::manifest::{self, Manifest};
use crate::progress::{Reporter, StepTiming};
use crate::{LIVE_LABEL, iso, overlay, pxe, rootfs, squashfs, trim};

/// Artifacts relative to the output directory, in manifest order.
pub const ARTIFACTS: &[&str] = &[
    "kiln.iso",
    "pxe/vmlinuz",
    "pxe/initrd.img",
    "pxe/rootfs.squashfs",
    "pxe/boot.ipxe",
];

/// The spec the build was made from, beside the manifest (which records its sha256 as
/// `spec_sha256`): `kiln pxe serve --artifacts OUT/pxe` renders each node's spec from it.
pub const SPEC_FILE: &str = "spec.yaml";

#[derive(Debug, Clone, Serialize)]
pub struct BuildReport {
    pub out: PathBuf,
    pub manifest: Manifest,
    /// Whether the base rootfs came from the cache (mmdebstrap did not run).
    pub rootfs_cache_hit: bool,
    /// The fingerprint of the key that signed `manifest.json` (and that the image trusts).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signed_by: Option<String>,
    pub timings: Vec<StepTiming>,
    pub seconds: f64,
}

/// The directories of one build, inside the staging directory that becomes `--out`.
struct Dirs {
    /// The staging directory: the artifacts and the manifest.
    stage: PathBuf,
    /// Scratch space, removed before the manifest is written.
    work: PathBuf,
    /// The unpacked rootfs tree.
    root: PathBuf,
    /// The PXE bundle.
    pxe: PathBuf,
}

pub fn build(inputs: &BuildInputs, out: &Path, cache: &Cache) -> Result<BuildReport> {
    let started = Instant::now();
    check_out(out)?;
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)
        .map_err(BuildError::io(format!("creating {}", parent.display())))?;
    let staging = tempfile::Builder::new()
        .prefix(".kiln-build-")
        .tempdir_in(parent)
        .map_err(BuildError::io(format!(
            "creating a build directory in {}",
            parent.display()
        )))?;
    let stage = staging.path().to_path_buf();
    let work = stage.join(".work");
    let dirs = Dirs {
        root: work.join("rootfs"),
        pxe: stage.join("pxe"),
        work,
        stage,
    };
    std::fs::create_dir_all(&dirs.pxe).map_err(BuildError::io("creating the pxe directory"))?;
    let mut rep = Reporter::default();

    let (tarball, key, hit) = base_rootfs(inputs, cache, &mut rep)?;
    let kernel = unpack(&tarball, &dirs, &mut rep)?;
    trim_rootfs(inputs, &dirs, &kernel, &mut rep)?;
    apply_overlays(inputs, &dirs, &mut rep)?;
    let kubernetes = kubernetes_payload(inputs, &dirs, &mut rep)?;
    initramfs(inputs, &dirs, &kernel, &mut rep)?;
    let packages = installed_packages(&dirs.root)?;
    squashfs(&dirs, &mut rep)?;
    make_iso(inputs, &dirs, &mut rep)?;
    let manifest = write_manifest(inputs, &dirs, &kernel, key, packages, kubernetes, &mut rep)?;

    publish(staging, out)?;
    Ok(BuildReport {
        out: out.to_path_buf(),
        manifest,
        rootfs_cache_hit: hit,
        signed_by: inputs
            .signing_key
            .as_ref()
            .map(|k| k.public().fingerprint()),
        timings: rep.timings,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Step 1: The base rootfs tarball, from the cache when the same inputs built one before:
/// (tarball, cache key, cache hit).
fn base_rootfs(
    inputs: &BuildInputs,
    cache: &Cache,
    rep: &mut Reporter,
) -> Result<(PathBuf, String, bool)> {
    let t = Instant::now();
    let pb = rep.spinner("rootfs");
    let packages = inputs.package_list();
    let options = rootfs::mmdebstrap_options(&packages);
    let key = rootfs_key(&inputs.suite, &inputs.mirror, &packages, &options);
    let entry = format!("{key}.tar");
    let (tarball, hit) = match cache.get("rootfs", &entry) {
        Some(p) => (p, true),
        None => {
            let p = cache.put_with("rootfs", &entry, |tmp| {
                rootfs::bootstrap(&options, &inputs.suite, &inputs.mirror, tmp, &pb)
            })?;
            (p, false)
        }
    };
    let note = if hit {
        format!("cache hit {key}")
    } else {
        format!("cache miss {key}: built with mmdebstrap")
    };
    rep.done(&pb, "rootfs", t, note);
    Ok((tarball, key, hit))
}

/// The tarball unpacked into the rootfs tree; its kernel.
fn unpack(tarball: &Path, dirs: &Dirs, rep: &mut Reporter) -> Result<rootfs::Kernel> {
    let t = Instant::now();
    let pb = rep.spinner("unpack");
    rootfs::extract(tarball, &dirs.root, &pb)?;
    let kernel = rootfs::find_kernel(&dirs.root)?;
    rep.done(&pb, "unpack", t, format!("kernel {}", kernel.release));
    Ok(kernel)
}

/// Step 2: Documentation, locales, caches and (for minimal profiles) unneeded kernel modules out.
fn trim_rootfs(
    inputs: &BuildInputs,
    dirs: &Dirs,
    kernel: &rootfs::Kernel,
    rep: &mut Reporter,
) -> Result<()> {
    let t = Instant::now();
    let pb = rep.spinner("trim");
    let keep: Option<Vec<&str>> = inputs.minimal_modules.then(|| {
        let node = inputs
            .kubernetes
            .is_some()
            .then_some(crate::kubernetes::NODE_MODULES);
        trim::VM_MODULES
            .iter()
            .chain(node.into_iter().flatten())
            .copied()
            .collect()
    });
    let stats = trim::trim(&dirs.root, kernel, keep.as_deref())?;
    rep.done(
        &pb,
        "trim",
        t,
        format!("removed {} files, {} MiB", stats.files, stats.bytes >> 20),
    );
    Ok(())
}

/// Step 3: The overlays and the kiln binary.
fn apply_overlays(inputs: &BuildInputs, dirs: &Dirs, rep: &mut Reporter) -> Result<()> {
    let t = Instant::now();
    let pb = rep.spinner("overlay");
    let mut files = inputs.files.clone();
    if let Some(key) = &inputs.signing_key {
        let public = key.public();
        files.push(OverlayFile {
            path: format!("{TRUSTED_KEYS_DIR}/{}", public.file_name()),
            contents: public.to_pem().into_bytes(),
            mode: 0o644,
        });
    }
    overlay::apply(&dirs.root, &files, &inputs.units_enabled)?;
    overlay::install_stripped(&inputs.kiln_binary, &dirs.root.join("usr/bin/kiln"))?;
    rep.done(
        &pb,
        "overlay",
        t,
        format!(
            "{} files, {} units",
            files.len(),
            inputs.units_enabled.len()
        ),
    );
    Ok(())
}

/// Step 3b: kiln's Kubernetes binaries and the airgap images, when the spec asks for them.
fn kubernetes_payload(
    inputs: &BuildInputs,
    dirs: &Dirs,
    rep: &mut Reporter,
) -> Result<Option<manifest::KubernetesManifest>> {
    let Some(bins) = &inputs.kubernetes else {
        return Ok(None);
    };
    let t = Instant::now();
    let pb = rep.spinner("kubernetes");
    let m = crate::kubernetes::install(&dirs.root, bins)?;
    rep.done(
        &pb,
        "kubernetes",
        t,
        format!(
            "Kubernetes {}, etcd {}, {} images",
            m.kubernetes_version,
            m.etcd_version,
            m.images.len()
        ),
    );
    Ok(Some(m))
}

/// Step 4: The initramfs and the kernel into the PXE bundle; a copy of the initramfs goes into the
/// image so an installer or upgrade finds kernel and initramfs inside the slot it writes.
fn initramfs(
    inputs: &BuildInputs,
    dirs: &Dirs,
    kernel: &rootfs::Kernel,
    rep: &mut Reporter,
) -> Result<()> {
    let t = Instant::now();
    let pb = rep.spinner("initramfs");
    let init = dirs.work.join("init");
    overlay::install_stripped(&inputs.init_binary, &init)?;
    let initrd = dirs.pxe.join("initrd.img");
    let module_count = build_initramfs(&init, kernel, &initrd)?;
    let in_image = dirs
        .root
        .join("boot")
        .join(format!("initrd.img-{}", kernel.release));
    std::fs::copy(&initrd, &in_image).map_err(BuildError::io(format!(
        "copying the initramfs to {}",
        in_image.display()
    )))?;
    std::fs::copy(&kernel.vmlinuz, dirs.pxe.join("vmlinuz"))
        .map_err(BuildError::io("copying the kernel"))?;
    rep.done(&pb, "initramfs", t, format!("{module_count} modules"));
    Ok(())
}

/// The Debian packages the image carries, from its dpkg status.
fn installed_packages(root: &Path) -> Result<Vec<manifest::Package>> {
    let status_path = root.join("var/lib/dpkg/status");
    let status = std::fs::read_to_string(&status_path)
        .map_err(BuildError::io(format!("reading {}", status_path.display())))?;
    Ok(manifest::parse_dpkg_status(&status))
}

/// Step 5: The rootfs tree into `rootfs.squashfs` (Python's bytecode caches stamped for its
/// file times); the tree is removed.
fn squashfs(dirs: &Dirs, rep: &mut Reporter) -> Result<()> {
    let t = Instant::now();
    let pb = rep.bar("squashfs", 100);
    let stamped = squashfs::restamp_bytecode(&dirs.root)?;
    squashfs::mksquashfs(&dirs.root, &dirs.pxe.join("rootfs.squashfs"), &pb)?;
    std::fs::remove_dir_all(&dirs.root).map_err(BuildError::io("removing the rootfs tree"))?;
    let note = match stamped {
        0 => "zstd".to_string(),
        n => format!("zstd, {n} Python bytecode caches stamped with the image's time"),
    };
    rep.done(&pb, "squashfs", t, note);
    Ok(())
}

/// Step 6: The hybrid ISO: GRUB menu, embedded spec, and the PXE bundle's files (hard links).
fn make_iso(inputs: &BuildInputs, dirs: &Dirs, rep: &mut Reporter) -> Result<()> {
    let t = Instant::now();
    let pb = rep.spinner("iso");
    let tree = dirs.work.join("iso");
    for d in ["boot/grub", "live", "kiln"] {
        std::fs::create_dir_all(tree.join(d))
            .map_err(BuildError::io(format!("creating {d} on the ISO tree")))?;
    }
    let write = |rel: &str, data: &[u8]| {
        std::fs::write(tree.join(rel), data)
            .map_err(BuildError::io(format!("writing {rel} on the ISO tree")))
    };
    write(
        "boot/grub/grub.cfg",
        iso::grub_cfg(LIVE_LABEL, &inputs.kernel_args).as_bytes(),
    )?;
    write(iso::SPEC_PATH, inputs.spec_yaml.as_bytes())?;
    for name in ["vmlinuz", "initrd.img", "rootfs.squashfs"] {
        let dest = tree.join("live").join(name);
        std::fs::hard_link(dirs.pxe.join(name), &dest)
            .map_err(BuildError::io(format!("linking {}", dest.display())))?;
    }
    iso::make_iso(&tree, &dirs.stage.join("kiln.iso"), LIVE_LABEL, &pb)?;
    rep.done(&pb, "iso", t, format!("label {LIVE_LABEL}"));
    Ok(())
}

/// Step 7: Digests of the artifacts, the PXE script carrying the boot files' digests, the
/// spec, and `manifest.json`.
fn write_manifest(
    inputs: &BuildInputs,
    dirs: &Dirs,
    kernel: &rootfs::Kernel,
    rootfs_cache_key: String,
    packages: Vec<manifest::Package>,
    kubernetes: Option<manifest::KubernetesManifest>,
    rep: &mut Reporter,
) -> Result<Manifest> {
    std::fs::remove_dir_all(&dirs.work).map_err(BuildError::io("removing the work directory"))?;
    let t = Instant::now();
    let pb = rep.spinner("manifest");
    let hash = |a: &&str| {
        pb.set_message(format!("sha256 {a}"));
        manifest::artifact(&dirs.stage, a)
    };
    let (scripts, files): (Vec<&str>, Vec<&str>) =
        ARTIFACTS.iter().partition(|a| **a == pxe::SCRIPT_PATH);
    let mut artifacts = files.iter().map(hash).collect::<Result<Vec<_>>>()?;
    let digest = |path: &str| {
        artifacts
            .iter()
            .find(|a| a.path == path)
            .map(|a| a.sha256.clone())
            .expect("the PXE files are artifacts")
    };
    let digests = BootDigests {
        rootfs: digest(bootargs::PXE_ROOTFS),
        kernel: digest(bootargs::PXE_KERNEL),
        initrd: digest(bootargs::PXE_INITRD),
    };
    std::fs::write(
        dirs.stage.join(pxe::SCRIPT_PATH),
        pxe::boot_ipxe(&inputs.kernel_args, &digests),
    )
    .map_err(BuildError::io("writing boot.ipxe"))?;
    artifacts.extend(scripts.iter().map(hash).collect::<Result<Vec<_>>>()?);
    artifacts.sort_by_key(|a| ARTIFACTS.iter().position(|p| *p == a.path));
    let manifest = Manifest {
        kiln_version: env!("CARGO_PKG_VERSION").to_string(),
        spec_sha256: manifest::sha256_hex(inputs.spec_yaml.as_bytes()),
        suite: inputs.suite.clone(),
        mirror: inputs.mirror.clone(),
        kernel: kernel.release.clone(),
        kernel_args: inputs.kernel_args.clone(),
        rootfs_cache_key,
        artifacts,
        packages,
        kubernetes,
    };
    std::fs::write(dirs.stage.join(SPEC_FILE), &inputs.spec_yaml)
        .map_err(BuildError::io(format!("writing {SPEC_FILE}")))?;
    let json = serde_json::to_string_pretty(&manifest).expect("manifest serialises") + "\n";
    std::fs::write(dirs.stage.join("manifest.json"), &json)
        .map_err(BuildError::io("writing manifest.json"))?;
    if let Some(key) = &inputs.signing_key {
        std::fs::write(dirs.stage.join(SIGNATURE_FILE), key.sign(json.as_bytes()))
            .map_err(BuildError::io(format!("writing {SIGNATURE_FILE}")))?;
    }
    rep.done(
        &pb,
        "manifest",
        t,
        format!("{} packages", manifest.packages.len()),
    );
    Ok(manifest)
}

/// `--out` may be missing, empty, or an earlier build (replaced); anything else is refused.
fn check_out(out: &Path) -> Result<()> {
    match std::fs::read_dir(out) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(BuildError::Io {
            what: format!("reading {}", out.display()),
            source: e,
        }),
        Ok(mut entries) => {
            if entries.next().is_none() || out.join("manifest.json").is_file() {
                Ok(())
            } else {
                Err(BuildError::OutNotEmpty(out.to_path_buf()))
            }
        }
    }
}

/// Moves the finished staging directory to `out`, replacing an earlier build.
fn publish(staging: tempfile::TempDir, out: &Path) -> Result<()> {
    let stage = staging.keep();
    let old = out.exists().then(|| {
        let mut name = out.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".old-{}", std::process::id()));
        out.with_file_name(name)
    });
    if let Some(old) = &old {
        std::fs::rename(out, old).map_err(BuildError::io(format!(
            "moving the earlier {} aside",
            out.display()
        )))?;
    }
    std::fs::rename(&stage, out).map_err(BuildError::io(format!(
        "moving the build to {}",
        out.display()
    )))?;
    if let Some(old) = old {
        std::fs::remove_dir_all(&old)
            .map_err(BuildError::io(format!("removing {}", old.display())))?;
    }
    Ok(())
}

/// Writes kiln's initramfs to `out`; returns how many module files it holds.
fn build_initramfs(init: &Path, kernel: &rootfs::Kernel, out: &Path) -> Result<usize> {
    let read = |name: &str| {
        let p = kernel.modules.join(name);
        std::fs::read_to_string(&p).map_err(BuildError::io(format!("reading {}", p.display())))
    };
    let full_dep = read("modules.dep")?;
    let deps = ModulesDep::parse(&full_dep)?;
    let builtin = trim::builtin_names(&read("modules.builtin")?);
    let modules: BTreeSet<String> = trim::modules_to_keep(&deps, &builtin, STAGE1_MODULES)?;
    let libs = initramfs::shared_libraries(init)?;
    let dep = initramfs::subset_modules_dep(&full_dep, &modules);
    // depmod writes a modules.softdep beside every modules.dep; a hand-made tree may lack it.
    let softdep_path = kernel.modules.join("modules.softdep");
    let full_softdep = match std::fs::read_to_string(&softdep_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => {
            return Err(BuildError::io(format!(
                "reading {}",
                softdep_path.display()
            ))(e));
        }
    };
    let softdep = initramfs::subset_softdep(&full_softdep, &modules);
    let entries = initramfs::plan(
        init,
        &libs,
        &kernel.release,
        &kernel.modules,
        &modules,
        &[("modules.dep", &dep), ("modules.softdep", &softdep)],
    );
    tracing::debug!("initramfs:\n{}", initramfs::listing(&entries));
    initramfs::write(&entries, out)?;
    Ok(modules.len())
}
