//! `kiln install`: on the node (live system), collect the hardware, plan, print the plan,
//! and unless `--dry-run`, write the disk; unattended installs then reboot or power off.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use kiln_installer::apply::{self, ApplyOptions, FAILPOINT_ENV, Progress};
use kiln_installer::plan::{self, Artifact, ImageSource, InstallPlan, PlanOptions, WipeConsent};
use kiln_installer::{hardware, source};
use kiln_spec::Appliance;
use kiln_spec::appliance::AfterInstall;
use kiln_spec::hardware::HardwareInventory;
use kiln_spec::size::ByteSize;

use super::output::OutputFormat;

/// The console markers the lab harness and operators watch for.
pub const DONE_MARKER: &str = "kiln-install: done";
pub const FAILED_MARKER: &str = "kiln-install: failed";
pub const START_MARKER: &str = "kiln-install: starting";

#[derive(Debug, clap::Args)]
pub struct InstallArgs {
    /// Appliance spec [default: the live medium's embedded spec, else kiln.config=URL]
    #[arg(long, value_name = "FILE")]
    spec: Option<PathBuf>,
    /// Root image to install; kernel and initrd are read from the same directory
    #[arg(long, value_name = "PATH", default_value_os_t = source::medium_image())]
    image: PathBuf,
    /// Kernel for the installed slot [default: vmlinuz next to the image]
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initrd for the installed slot [default: initrd.img next to the image]
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Expected sha256 of the image; the written slot is verified against it
    #[arg(long, value_name = "HEX")]
    image_sha256: Option<String>,
    /// Consent to erase the selected disk when it holds data (or only DISK, by path or by-id)
    #[arg(long, value_name = "DISK", num_args = 0..=1, require_equals = true, default_missing_value = "")]
    wipe: Option<String>,
    /// Disk rule override: glob on the disk model
    #[arg(long, value_name = "GLOB")]
    disk_model: Option<String>,
    /// Disk rule override: glob on the disk serial number
    #[arg(long, value_name = "GLOB")]
    disk_serial: Option<String>,
    /// Disk rule override: glob on the /dev/disk/by-id links
    #[arg(long, value_name = "GLOB")]
    disk_by_id: Option<String>,
    /// Disk rule override: minimum disk size (e.g. 16GiB)
    #[arg(long, value_name = "SIZE")]
    disk_min_size: Option<ByteSize>,
    /// Plan against a saved hardware inventory (JSON) instead of this machine's
    #[arg(long, value_name = "FILE")]
    inventory: Option<PathBuf>,
    /// Print the plan and write nothing
    #[arg(long)]
    dry_run: bool,
    /// No questions; reboot or power off afterwards as the spec says (implied by
    /// kiln.install=auto on the kernel command line)
    #[arg(long)]
    unattended: bool,
    /// Plan output format
    #[arg(long, short = 'o', value_enum, default_value_t = OutputFormat::Text)]
    output: OutputFormat,
    /// Progress format on stdout
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    progress: OutputFormat,
}

pub fn run(args: InstallArgs) -> anyhow::Result<()> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let unattended = args.unattended || source::unattended_requested(&cmdline);
    status(START_MARKER);
    let result = install(&args, &cmdline);
    match &result {
        Ok(Some(after)) => {
            status(DONE_MARKER);
            if unattended {
                finish(*after)?;
            }
        }
        Ok(None) => {}
        Err(e) => status(&format!("{FAILED_MARKER}: {e:#}")),
    }
    result.map(drop)
}

/// Plans and (unless dry-run) applies; returns what the spec wants done afterwards when it
/// installed.
fn install(args: &InstallArgs, cmdline: &str) -> anyhow::Result<Option<AfterInstall>> {
    let mut spec = load_spec(args, cmdline)?;
    override_rules(&mut spec, args);
    let hw: HardwareInventory = match &args.inventory {
        Some(p) => HardwareInventory::from_json(
            &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        )
        .with_context(|| format!("parsing {}", p.display()))?,
        None => hardware::collect(),
    };
    let image = image_source(args)?;
    let opts = PlanOptions {
        image,
        wipe: match args.wipe.as_deref() {
            None => WipeConsent::None,
            Some("") => WipeConsent::Any,
            Some(d) => WipeConsent::Disk(d.to_string()),
        },
        node_name: None,
    };
    let plan =
        plan::plan(&spec, &hw, &opts).context("planning the install (nothing was written)")?;
    match args.output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&plan)?),
        OutputFormat::Text => print!("{}", plan_text(&plan)),
    }
    if args.dry_run {
        return Ok(None);
    }
    let apply_opts = ApplyOptions {
        target: None,
        failpoint: std::env::var(FAILPOINT_ENV).ok(),
    };
    let started = Instant::now();
    let mut render = ProgressRender::new(args.progress);
    let report = apply::apply(&plan, &apply_opts, &mut |p| render.show(p))?;
    status(&format!(
        "kiln-install: installed {} on {} in {:.1}s (image {:.1} MiB/s)",
        plan.hostname,
        plan.disk.dev_path,
        started.elapsed().as_secs_f64(),
        report.image_bytes as f64 / f64::from(1 << 20) / report.image_seconds.max(1e-9)
    ));
    Ok(Some(plan.after_install))
}

fn load_spec(args: &InstallArgs, cmdline: &str) -> anyhow::Result<Appliance> {
    let src = source::spec_source(
        args.spec.as_deref(),
        source::medium_spec().exists(),
        cmdline,
    )?;
    let (text, from) = match src {
        source::SpecSource::File(p) => (
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?,
            p.display().to_string(),
        ),
        source::SpecSource::Url(u) => (source::fetch_text(&u)?, u),
    };
    Appliance::from_yaml(&text).with_context(|| format!("loading {from}"))
}

fn override_rules(spec: &mut Appliance, args: &InstallArgs) {
    let rules = &mut spec.spec.install.disk;
    if let Some(m) = &args.disk_model {
        rules.model = Some(m.clone());
    }
    if let Some(s) = &args.disk_serial {
        rules.serial = Some(s.clone());
    }
    if let Some(b) = &args.disk_by_id {
        rules.by_id_path = Some(b.clone());
    }
    if let Some(s) = args.disk_min_size {
        rules.min_size = Some(s);
    }
}

fn artifact(path: &Path, sha256: Option<String>) -> anyhow::Result<Artifact> {
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Artifact {
        path: path.display().to_string(),
        size_bytes: meta.len(),
        sha256,
    })
}

fn image_source(args: &InstallArgs) -> anyhow::Result<ImageSource> {
    let dir = args.image.parent().unwrap_or(Path::new("."));
    let kernel = args.kernel.clone().unwrap_or_else(|| dir.join("vmlinuz"));
    let initrd = args
        .initrd
        .clone()
        .unwrap_or_else(|| dir.join("initrd.img"));
    Ok(ImageSource {
        rootfs: artifact(&args.image, args.image_sha256.clone())?,
        kernel: artifact(&kernel, None)?,
        initrd: artifact(&initrd, None)?,
    })
}

/// The plan as a person reads it.
pub fn plan_text(plan: &InstallPlan) -> String {
    let mut s = String::new();
    let d = &plan.disk;
    s.push_str(&format!(
        "install to {} ({}{}{})\n",
        d.dev_path,
        ByteSize(d.size_bytes).human(),
        d.model
            .as_deref()
            .map(|m| format!(", {m}"))
            .unwrap_or_default(),
        d.serial
            .as_deref()
            .map(|m| format!(", serial {m}"))
            .unwrap_or_default(),
    ));
    for r in &d.reasons {
        s.push_str(&format!("  - {r}\n"));
    }
    for r in &plan.rejected {
        s.push_str(&format!(
            "  not {} ({}): {}\n",
            r.dev_path,
            ByteSize(r.size_bytes).human(),
            r.reasons.join("; ")
        ));
    }
    s.push_str(&format!(
        "host name {}, {} firmware, kernel arguments: {}\n",
        plan.hostname,
        plan.firmware.as_str(),
        plan.kernel_args.join(" ")
    ));
    s.push_str("steps:\n");
    for (i, step) in plan.steps.iter().enumerate() {
        s.push_str(&format!("  {}. {step}\n", i + 1));
    }
    s
}

/// Progress as JSON lines on stdout, or text on stderr; the image write reports every 10%.
struct ProgressRender {
    format: OutputFormat,
    last_percent: u64,
}

impl ProgressRender {
    fn new(format: OutputFormat) -> Self {
        ProgressRender {
            format,
            last_percent: 0,
        }
    }

    fn show(&mut self, p: &Progress) {
        if self.format == OutputFormat::Json {
            if let Ok(line) = serde_json::to_string(p) {
                println!("{line}");
            }
            return;
        }
        let text = match p {
            Progress::StepStarted { step, message } => {
                self.last_percent = 0;
                format!("kiln-install: [{}] {message}", step.as_str())
            }
            Progress::Bytes { step, done, total } => {
                let percent = if *total == 0 { 100 } else { done * 100 / total };
                if percent < self.last_percent + 10 && done != total {
                    return;
                }
                self.last_percent = percent;
                format!(
                    "kiln-install: [{}] {percent}% ({} of {})",
                    step.as_str(),
                    ByteSize(*done).human(),
                    ByteSize(*total).human()
                )
            }
            Progress::StepDone { step, seconds } => {
                format!("kiln-install: [{}] done in {seconds:.1}s", step.as_str())
            }
            Progress::Done { seconds, .. } => {
                format!("kiln-install: disk written in {seconds:.1}s")
            }
            Progress::Failed {
                step,
                error,
                disk_left,
            } => format!(
                "kiln-install: [{}] FAILED: {error} (disk left {disk_left})",
                step.as_str()
            ),
        };
        status(&text);
    }
}

/// Status lines go to stderr: stdout carries the plan and JSON progress. The install unit
/// sends stderr to the console, where the lab and remote operators watch it.
fn status(text: &str) {
    eprintln!("{text}");
}

fn finish(after: AfterInstall) -> anyhow::Result<()> {
    kiln_installer::power::after_install(after).context("rebooting after the install")?;
    if after != AfterInstall::Stay {
        bail!("the machine did not reboot");
    }
    Ok(())
}
