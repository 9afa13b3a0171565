//! `kiln install`: on the node (live system), collect the hardware, plan, print the plan,
//! and unless `--dry-run`, write the disk; unattended installs then reboot or power off. With
//! `kiln.phone-home=URL` on the kernel command line, each stage is reported to the
//! provisioner; a report that cannot be delivered is only a warning.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use kiln_installer::apply::{self, ApplyOptions, FAILPOINT_ENV, Progress};
use kiln_installer::hardware;
use kiln_installer::live;
use kiln_installer::phonehome::{self, PhoneHome};
use kiln_installer::plan::{
    self, Artifact, ImageSource, InstallPlan, PlanOptions, SelectedDisk, WipeConsent,
};
use kiln_installer::source::{self, NetbootImage};
use kiln_spec::Appliance;
use kiln_spec::appliance::AfterInstall;
use kiln_spec::enrol::{HardwareSummary, Phase, Report};
use kiln_spec::hardware::{Firmware, HardwareInventory};
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
    /// Root image to install; kernel and initrd are read from the same directory [default:
    /// the live medium's, or on a netbooted system the verified image it booted]
    #[arg(long, value_name = "PATH")]
    image: Option<PathBuf>,
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
    /// Plan against a saved hardware inventory (JSON) instead of this machine's; only with
    /// --dry-run, since a real install always plans from the live hardware
    #[arg(long, value_name = "FILE", conflicts_with = "disk_image")]
    inventory: Option<PathBuf>,
    /// Install into this disk image file instead of a disk of this machine (it is probed
    /// like a disk: anything on it needs --wipe)
    #[arg(long, value_name = "FILE")]
    disk_image: Option<PathBuf>,
    /// Firmware the disk image will boot with
    #[arg(long, value_enum, default_value_t = ImageFirmware::Uefi, requires = "disk_image")]
    firmware: ImageFirmware,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ImageFirmware {
    Bios,
    Uefi,
}

pub fn run(args: InstallArgs) -> anyhow::Result<()> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let unattended = args.unattended || source::unattended_requested(&cmdline);
    status(START_MARKER);
    if source::uses_network(&cmdline) {
        status("kiln-install: waiting for the network");
        if let Err(e) = live::wait_for_network() {
            status(&format!("kiln-install: warning: {e}"));
        }
    }
    // A dry run changes nothing, so the provisioner hears nothing of it.
    let reports = if args.dry_run {
        Reports(None)
    } else {
        Reports::from_cmdline(&cmdline)
    };
    reports.send(phonehome::report(Phase::InstallerStarted, None));
    let result = install(&args, &cmdline, unattended, &reports);
    match &result {
        Ok(Some(after)) => {
            status(DONE_MARKER);
            if unattended {
                finish(*after)?;
            }
        }
        Ok(None) => {}
        Err(e) => {
            let why = format!("{e:#}");
            status(&format!("{FAILED_MARKER}: {why}"));
            reports.send(phonehome::report(Phase::Failed, Some(&why)));
        }
    }
    result.map(drop)
}

/// Reports to the provisioner, when the kernel command line asks for them.
struct Reports(Option<PhoneHome>);

impl Reports {
    fn from_cmdline(cmdline: &str) -> Reports {
        match PhoneHome::from_cmdline(cmdline) {
            Ok(p) => Reports(p),
            Err(e) => {
                status(&format!("kiln-install: warning: {e}"));
                Reports(None)
            }
        }
    }

    fn send(&self, report: Report) {
        if let Some(p) = &self.0
            && let Err(e) = p.send(&report)
        {
            status(&format!("kiln-install: warning: {e}"));
        }
    }
}

/// Plans and (unless dry-run) applies; returns what the spec wants done afterwards when it
/// installed.
fn install(
    args: &InstallArgs,
    cmdline: &str,
    unattended: bool,
    reports: &Reports,
) -> anyhow::Result<Option<AfterInstall>> {
    if args.inventory.is_some() && !args.dry_run {
        bail!(
            "--inventory plans against a saved snapshot, which may only drive --dry-run: a real \
             install plans from this machine's live hardware (nothing was written)"
        );
    }
    let mut spec = load_spec(args, cmdline)?;
    override_rules(&mut spec, args);
    let hw: HardwareInventory = match (&args.inventory, &args.disk_image) {
        (Some(p), _) => HardwareInventory::from_json(
            &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        )
        .with_context(|| format!("parsing {}", p.display()))?,
        (None, Some(img)) => {
            let firmware = match args.firmware {
                ImageFirmware::Bios => Firmware::Bios,
                ImageFirmware::Uefi => Firmware::Uefi,
            };
            hardware::collect_for_image(img, firmware)
                .with_context(|| format!("probing {}", img.display()))?
        }
        (None, None) => hardware::collect(),
    };
    for line in disk_lines(&hw) {
        status(&line);
    }
    let netboot = match &args.image {
        Some(_) => None,
        None => source::netboot_image(cmdline).context("finding the image to install")?,
    };
    let image = image_source(args, netboot.as_ref()).context("finding the image to install")?;
    // An unattended netboot install leaves the installed node what it needs to report
    // agent-ready for the image the provisioner served.
    let enrolment = netboot
        .as_ref()
        .filter(|_| unattended)
        .and_then(|net| reports.0.as_ref()?.enrolment(&net.digests.rootfs));
    let opts = PlanOptions {
        image,
        wipe: match (args.wipe.as_deref(), source::wipe_consent(cmdline)) {
            (Some(""), _) => WipeConsent::Any,
            (Some(d), _) => WipeConsent::Disk(d.to_string()),
            (None, Some(d)) => WipeConsent::Disk(d),
            (None, None) => WipeConsent::None,
        },
        node_name: None,
        disk_guid: uuid::Uuid::new_v4().to_string(),
        unattended,
        enrolment,
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
    reports.send(Report {
        hardware: Some(HardwareSummary::of(&hw)),
        ..phonehome::report(Phase::Planned, Some(&disk_summary(&plan.disk)))
    });
    let apply_opts = ApplyOptions {
        target: args.disk_image.clone(),
        failpoint: std::env::var(FAILPOINT_ENV).ok(),
    };
    let started = Instant::now();
    let mut render = ProgressRender::new(args.progress);
    let report = apply::apply(&plan, &apply_opts, &mut |p| {
        // Step starts only: byte progress would flood the provisioner.
        if let Progress::StepStarted { step, .. } = p {
            reports.send(phonehome::report(Phase::Installing, Some(step.as_str())));
        }
        render.show(p)
    })?;
    status(&format!(
        "kiln-install: installed {} on {} in {:.1}s (image {:.1} MiB/s)",
        plan.hostname,
        plan.disk.dev_path,
        started.elapsed().as_secs_f64(),
        report.image_bytes as f64 / f64::from(1 << 20) / report.image_seconds.max(1e-9)
    ));
    reports.send(Report {
        image_sha256: Some(report.image_sha256),
        ..phonehome::report(
            Phase::Installed,
            Some(&format!("{} on {}", plan.hostname, plan.disk.dev_path)),
        )
    });
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
        source::SpecSource::Url(u) => (
            source::fetch_text(
                &u,
                source::token(cmdline).as_deref(),
                kiln_installer::FETCH_PATIENCE,
            )?,
            u,
        ),
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

/// The image to install: `--image` (kernel and initrd beside it), else on a netbooted live
/// system (`netboot`) the root image stage-1 verified plus the kernel and initrd fetched and
/// verified now, else the live medium's.
fn image_source(args: &InstallArgs, netboot: Option<&NetbootImage>) -> anyhow::Result<ImageSource> {
    if let Some(net) = netboot {
        let dir = Path::new(source::FETCHED_DIR);
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut fetched = Vec::new();
        for (name, sha256) in [
            ("vmlinuz", &net.digests.kernel),
            ("initrd.img", &net.digests.initrd),
        ] {
            let url = format!("{}/{name}", net.base_url);
            status(&format!("kiln-install: fetching {url}"));
            source::fetch_verified(
                &url,
                sha256,
                &dir.join(name),
                kiln_installer::FETCH_PATIENCE,
            )?;
            fetched.push(artifact(&dir.join(name), Some(sha256.clone()))?);
        }
        let initrd = fetched.pop().expect("two files");
        let kernel = fetched.pop().expect("two files");
        return Ok(ImageSource {
            rootfs: artifact(
                Path::new(source::NETBOOT_ROOTFS),
                Some(net.digests.rootfs.clone()),
            )?,
            kernel,
            initrd,
        });
    }
    let image = args.image.clone().unwrap_or_else(source::medium_image);
    let dir = image.parent().unwrap_or(Path::new("."));
    let kernel = args.kernel.clone().unwrap_or_else(|| dir.join("vmlinuz"));
    let initrd = args
        .initrd
        .clone()
        .unwrap_or_else(|| dir.join("initrd.img"));
    Ok(ImageSource {
        rootfs: artifact(&image, args.image_sha256.clone())?,
        kernel: artifact(&kernel, None)?,
        initrd: artifact(&initrd, None)?,
    })
}

/// One line per disk saying what the installer found on it, before any decision: what an
/// operator at the console (or reading the serial log) checks first.
pub fn disk_lines(hw: &HardwareInventory) -> Vec<String> {
    let mut lines: Vec<String> = hw
        .disks
        .iter()
        .map(|d| {
            let what = if d.holds_boot_medium {
                "the boot medium".to_string()
            } else if d.is_blank() {
                "blank".to_string()
            } else {
                format!("in use: {}", d.contents().join("; "))
            };
            format!(
                "kiln-install: disk {} ({}{}): {what}",
                d.dev_path,
                ByteSize(d.size_bytes).human(),
                d.serial
                    .as_deref()
                    .map(|s| format!(", serial {s}"))
                    .unwrap_or_default()
            )
        })
        .collect();
    if let Some(why) = &hw.boot_medium_unresolved {
        lines.push(format!(
            "kiln-install: the live medium could not be traced to a disk: {why}"
        ));
    }
    lines
}

/// `/dev/vda (20.0 GiB, model, serial S1)`.
fn disk_summary(d: &SelectedDisk) -> String {
    format!(
        "{} ({}{}{})",
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
    )
}

/// The plan as a person reads it.
pub fn plan_text(plan: &InstallPlan) -> String {
    let mut s = String::new();
    let d = &plan.disk;
    s.push_str(&format!("install to {}\n", disk_summary(d)));
    for r in &d.reasons {
        s.push_str(&format!("  - {r}\n"));
    }
    let not = |s: &mut String, what: &str, r: &kiln_installer::plan::DiskVerdict| {
        s.push_str(&format!(
            "  not {what}{} ({}): {}\n",
            r.dev_path,
            ByteSize(r.size_bytes).human(),
            r.reasons.join("; ")
        ))
    };
    for r in &plan.rejected {
        not(&mut s, "", r);
    }
    for d in &plan.data_disks {
        s.push_str(&format!(
            "data disk {} ({}, {}): {}, recorded in the node config; nothing is written to it\n",
            d.dev_path,
            d.stable_path,
            ByteSize(d.size_bytes).human(),
            kiln_spec::serde_name(&d.usage)
        ));
    }
    for r in &plan.data_rejected {
        not(&mut s, "data ", r);
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
    live::start_full_system().map_err(|e| anyhow::anyhow!("starting the live system: {e}"))
}
