//! `kiln build`: an appliance spec becomes a hybrid ISO, a PXE bundle and a manifest.

use std::path::PathBuf;

use anyhow::{Context, bail};
use kiln_image::{BuildInputs, BuildReport, Cache, OverlayFile};
use kiln_spec::{Appliance, ProfileName};

use crate::cli::output::{OutputArgs, OutputFormat};

#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// Spec file [default: the embedded default spec]
    #[arg(long, value_name = "FILE", conflicts_with = "profile")]
    pub spec: Option<PathBuf>,
    /// Build a built-in profile: test or appliance
    #[arg(long, value_name = "NAME")]
    pub profile: Option<ProfileName>,
    /// Output directory (an earlier build there is replaced)
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Build cache [default: $KILN_CACHE or ~/.cache/kiln]
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Sign manifest.json with this ed25519 key (PEM, from `kiln key generate`) and put its
    /// public half into the image as a trusted key
    #[arg(long, value_name = "FILE")]
    pub sign_key: Option<PathBuf>,
    /// The kiln binary to put into the image [default: this program]; its stage-1,
    /// `kiln-init`, is taken from beside it
    #[arg(long, value_name = "FILE", hide = true)]
    pub kiln_binary: Option<PathBuf>,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// kiln's stage-1, the initramfs's `/init`: built beside `kiln` (src/bin/kiln-init.rs).
const INIT_BINARY: &str = "kiln-init";

pub fn run(args: BuildArgs) -> anyhow::Result<()> {
    let (appliance, spec_yaml) = load_spec(&args)?;
    let kiln_binary = match &args.kiln_binary {
        Some(p) => p.clone(),
        None => std::env::current_exe().context("finding the kiln binary")?,
    };
    let init_binary = kiln_binary.with_file_name(INIT_BINARY);
    if !init_binary.is_file() {
        bail!(
            "{} is missing: the initramfs needs kiln's stage-1 from beside {} \
             (`cargo build` builds both binaries; install them together)",
            init_binary.display(),
            kiln_binary.display()
        );
    }
    let cache = Cache::locate(args.cache.clone());
    // Before the long build: a key that does not load fails now.
    let signing_key = args
        .sign_key
        .as_deref()
        .map(super::key::load_signing_key)
        .transpose()?;
    let inputs = BuildInputs {
        signing_key,
        ..resolve(
            &appliance,
            spec_yaml,
            kiln_binary,
            init_binary,
            cache.root(),
        )?
    };
    tracing::info!(
        "building {} ({} packages) into {} with cache {}",
        appliance.metadata.name,
        inputs.package_list().len(),
        args.out.display(),
        cache.root().display()
    );
    let report = kiln_image::build(&inputs, &args.out, &cache)
        .with_context(|| format!("building {}", args.out.display()))?;
    args.output.emit(&report, summary)?;
    if args.output.output == OutputFormat::Text {
        eprintln!(
            "kiln: built {} in {:.1} s",
            report.out.display(),
            report.seconds
        );
    }
    Ok(())
}

/// The spec to build and its text as embedded on the ISO.
fn load_spec(args: &BuildArgs) -> anyhow::Result<(Appliance, String)> {
    match (&args.spec, args.profile) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let appliance = Appliance::from_yaml(&text)
                .with_context(|| format!("loading {}", path.display()))?;
            Ok((appliance, text))
        }
        (None, Some(profile)) => Ok((Appliance::profile(profile), profile.yaml().to_string())),
        (None, None) => {
            let a = Appliance::default_spec();
            let yaml = a.to_yaml();
            Ok((a, yaml))
        }
    }
}

/// Build inputs from a validated spec and its rendered overlays.
fn resolve(
    a: &Appliance,
    spec_yaml: String,
    kiln_binary: PathBuf,
    init_binary: PathBuf,
    cache: &std::path::Path,
) -> anyhow::Result<BuildInputs> {
    let rendered = kiln_overlays::render(a, None).context("rendering the overlays")?;
    let kubernetes = if a.spec.features.contains(&kiln_spec::Feature::Kubernetes) {
        tracing::info!(
            "checking kiln's Kubernetes build in {} (the first build takes 20-40 CPU-minutes)",
            cache.display()
        );
        Some(
            kiln_image::kubernetes::ensure_binaries(cache)
                .context("building the Kubernetes components for the kubernetes feature")?,
        )
    } else {
        None
    };
    let os = &a.spec.os;
    Ok(BuildInputs {
        suite: os.suite.clone(),
        mirror: match &os.mirror {
            Some(m) => m.clone(),
            None => {
                kiln_image::rootfs::mirror_from_sources(&kiln_image::rootfs::host_apt_sources())
                    .context(
                        "spec.os.mirror is not set and the build host's apt sources name no Debian \
                     archive (a deb entry whose URI ends in /debian); set spec.os.mirror",
                    )?
            }
        },
        packages: os.packages.clone(),
        kernel_args: rendered.kernel_args,
        minimal_modules: a.spec.profile == Some(ProfileName::Test),
        spec_yaml,
        files: rendered
            .files
            .into_iter()
            .map(|f| OverlayFile {
                path: f.path,
                contents: f.content,
                mode: f.mode,
            })
            .collect(),
        units_enabled: rendered.units_enabled,
        kiln_binary,
        init_binary,
        kubernetes,
        signing_key: None,
    })
}

fn summary(r: &BuildReport) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "base rootfs: {} ({})\n",
        if r.rootfs_cache_hit {
            "cache hit"
        } else {
            "cache miss, built"
        },
        r.manifest.rootfs_cache_key
    ));
    s.push_str("steps:\n");
    for t in &r.timings {
        s.push_str(&format!(
            "  {:<10} {:>7.1} s  {}\n",
            t.step, t.seconds, t.note
        ));
    }
    s.push_str(&format!("  {:<10} {:>7.1} s\n", "total", r.seconds));
    s.push_str("artifacts:\n");
    for a in &r.manifest.artifacts {
        s.push_str(&format!(
            "  {:<20} {:>8.1} MiB  sha256 {}\n",
            a.path,
            a.size as f64 / (1024.0 * 1024.0),
            a.sha256
        ));
    }
    s.push_str(&format!(
        "kernel {}, {} packages, spec sha256 {}\n",
        r.manifest.kernel,
        r.manifest.packages.len(),
        r.manifest.spec_sha256
    ));
    if let Some(key) = &r.signed_by {
        s.push_str(&format!(
            "manifest.json signed by {key} ({})\n",
            kiln_spec::signing::SIGNATURE_FILE
        ));
    }
    s
}
