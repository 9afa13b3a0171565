//! Trimming the rootfs: documentation, manuals, translations, apt caches, and for the small
//! profile every kernel module a virtual machine does not use.

use std::collections::BTreeSet;
use std::path::Path;

use kiln_spec::kmod::{ModulesDep, module_name};

use crate::error::{BuildError, Result};
use crate::progress::DEPMOD;
use crate::rootfs::Kernel;

/// Modules the minimal image keeps: QEMU's disks, CD-ROM, USB storage, NICs and consoles, and
/// the file systems kiln boots from and installs (with their dependencies).
pub const VM_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "virtio_net",
    "virtio_rng",
    "virtio_console",
    "virtio_balloon",
    "virtio_input",
    "sd_mod",
    "sr_mod",
    "ahci",
    "ata_piix",
    "ata_generic",
    "usb_storage",
    "uas",
    "xhci_pci",
    "ehci_pci",
    "uhci_hcd",
    "ohci_pci",
    "usbhid",
    "hid_generic",
    "isofs",
    "squashfs",
    "overlay",
    "loop",
    "ext4",
    "vfat",
    "nls_utf8",
    "nls_cp437",
    "nls_ascii",
    "nls_iso8859_1",
    "efivarfs",
    "e1000",
    "e1000e",
    "crc32c_generic",
    "crc32c_intel",
    "qemu_fw_cfg",
    "ipmi_si",
    "ipmi_devintf",
    "evdev",
    "tun",
    "bridge",
    "8021q",
    "bonding",
    "nvme",
];

/// Whether a path (relative to the rootfs, `/`-separated) is removed by the trim. Copyright
/// files stay: they are the licence notices of what the image ships.
pub fn is_trimmed(rel: &str) -> bool {
    let under = |dir: &str| rel.strip_prefix(dir).is_some_and(|r| r.starts_with('/'));
    if under("usr/share/doc") {
        return !rel.ends_with("/copyright");
    }
    under("usr/share/man")
        || under("usr/share/info")
        || under("usr/share/lintian")
        || (under("usr/share/locale") && rel != "usr/share/locale/locale.alias")
        || under("var/cache/apt")
        || under("var/lib/apt/lists")
        || (under("var/log") && rel.ends_with(".log"))
}

/// The module files (paths relative to the release directory) that `wanted` needs. Names built
/// into the kernel need no file; names that are neither are an error (a typo in the list).
pub fn modules_to_keep(
    deps: &ModulesDep,
    builtin: &BTreeSet<String>,
    wanted: &[&str],
) -> Result<BTreeSet<String>> {
    let (files, missing): (Vec<&str>, Vec<&str>) = wanted
        .iter()
        .copied()
        .filter(|m| !builtin.contains(&m.replace('-', "_")))
        .partition(|m| deps.contains(m));
    if !missing.is_empty() {
        return Err(BuildError::Rootfs(format!(
            "no kernel module named {}",
            missing.join(", ")
        )));
    }
    Ok(deps.load_order(files)?.into_iter().collect())
}

/// Names of the modules in `modules.builtin`.
pub fn builtin_names(modules_builtin: &str) -> BTreeSet<String> {
    modules_builtin.lines().map(module_name).collect()
}

/// What the trim removed.
#[derive(Debug, Default, Clone, Copy)]
pub struct TrimStats {
    pub files: u64,
    pub bytes: u64,
}

/// Removes the trimmed files from `root`; with `keep` (a minimal image), also every module
/// outside it and their dependencies, then regenerates the module indexes.
pub fn trim(root: &Path, kernel: &Kernel, keep: Option<&[&str]>) -> Result<TrimStats> {
    let mut stats = TrimStats::default();
    let keep_modules = if let Some(wanted) = keep {
        let read = |name: &str| {
            let p = kernel.modules.join(name);
            std::fs::read_to_string(&p).map_err(BuildError::io(format!("reading {}", p.display())))
        };
        let deps = ModulesDep::parse(&read("modules.dep")?)?;
        Some(modules_to_keep(
            &deps,
            &builtin_names(&read("modules.builtin")?),
            wanted,
        )?)
    } else {
        None
    };
    let module_dir = kernel.modules.join("kernel");
    for entry in walkdir::WalkDir::new(root)
        .into_iter()
        .filter_map(|e| e.ok())
    {
        if entry.file_type().is_dir() {
            continue;
        }
        let path = entry.path();
        let rel = path
            .strip_prefix(root)
            .expect("walk stays under root")
            .to_string_lossy();
        let drop = is_trimmed(&rel)
            || keep_modules.as_ref().is_some_and(|keep| {
                path.strip_prefix(&kernel.modules)
                    .ok()
                    .filter(|_| path.starts_with(&module_dir))
                    .is_some_and(|m| !keep.contains(m.to_string_lossy().as_ref()))
            });
        if drop {
            stats.files += 1;
            stats.bytes += entry.metadata().map(|m| m.len()).unwrap_or(0);
            std::fs::remove_file(path)
                .map_err(BuildError::io(format!("removing {}", path.display())))?;
        }
    }
    // Directories the trim emptied go too (children first, so nested ones empty out).
    for entry in walkdir::WalkDir::new(root)
        .contents_first(true)
        .into_iter()
        .filter_map(|e| e.ok())
    {
        let path = entry.path();
        if !entry.file_type().is_dir() {
            continue;
        }
        let rel = path
            .strip_prefix(root)
            .expect("walk stays under root")
            .to_string_lossy();
        let trimmed_area = is_trimmed(&rel) || (keep.is_some() && path.starts_with(&module_dir));
        if trimmed_area
            && path != module_dir
            && std::fs::read_dir(path).is_ok_and(|mut d| d.next().is_none())
        {
            std::fs::remove_dir(path)
                .map_err(BuildError::io(format!("removing {}", path.display())))?;
        }
    }
    if keep.is_some() {
        let mut cmd = DEPMOD.command();
        cmd.arg("-b").arg(root).arg(&kernel.release);
        DEPMOD.output(cmd, "indexing the kept kernel modules")?;
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trimmed_paths() {
        for p in [
            "usr/share/doc/bash/README.gz",
            "usr/share/man/man1/ls.1.gz",
            "usr/share/locale/de/LC_MESSAGES/apt.mo",
            "var/cache/apt/pkgcache.bin",
            "var/lib/apt/lists/mirror.example_debian_dists_bookworm_InRelease",
        ] {
            assert!(is_trimmed(p), "{p}");
        }
        for p in [
            "usr/share/doc/bash/copyright",
            "usr/share/locale/locale.alias",
            "usr/share/documentation",
            "usr/bin/man",
            "var/lib/dpkg/status",
            "usr/lib/modules/6.1.0-9-amd64/kernel/fs/ext4/ext4.ko",
        ] {
            assert!(!is_trimmed(p), "{p}");
        }
    }

    #[test]
    fn trim_removes_files_and_the_directories_it_empties() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        for f in [
            "usr/share/man/cs/man1/ls.1.gz",
            "usr/share/doc/bash/README.gz",
            "usr/share/doc/bash/copyright",
            "usr/share/doc/nolicence/NEWS.gz",
            "usr/bin/ls",
        ] {
            std::fs::create_dir_all(root.join(f).parent().unwrap()).unwrap();
            std::fs::write(root.join(f), b"x").unwrap();
        }
        let kernel = Kernel {
            release: "r".into(),
            vmlinuz: root.join("boot/vmlinuz-r"),
            modules: root.join("usr/lib/modules/r"),
        };
        let stats = trim(root, &kernel, None).unwrap();
        assert_eq!((stats.files, stats.bytes), (3, 3));
        assert!(root.join("usr/share/doc/bash/copyright").is_file());
        assert!(root.join("usr/bin/ls").is_file());
        assert!(!root.join("usr/share/man/cs").exists());
        assert!(!root.join("usr/share/doc/nolicence").exists());
        assert!(
            root.join("usr/share/man").is_dir(),
            "the trimmed area itself stays"
        );
    }

    #[test]
    fn kept_modules_include_dependencies_and_skip_builtins() {
        let deps = ModulesDep::parse(
            "kernel/fs/isofs/isofs.ko: kernel/drivers/cdrom/cdrom.ko\n\
             kernel/drivers/cdrom/cdrom.ko:\n\
             kernel/drivers/gpu/big.ko:\n",
        )
        .unwrap();
        let builtin = builtin_names("kernel/net/packet/af_packet.ko\n");
        let keep = modules_to_keep(&deps, &builtin, &["isofs", "af_packet"]).unwrap();
        assert_eq!(
            keep.into_iter().collect::<Vec<_>>(),
            ["kernel/drivers/cdrom/cdrom.ko", "kernel/fs/isofs/isofs.ko"]
        );
        let err = modules_to_keep(&deps, &builtin, &["isofs", "nosuch", "other"]).unwrap_err();
        assert!(
            err.to_string()
                .contains("no kernel module named nosuch, other"),
            "{err}"
        );
    }
}
