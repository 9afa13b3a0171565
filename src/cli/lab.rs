//! `kiln lab …`: the local virtual rack. `kiln lab install` boots an ISO in QEMU with a blank
//! disk, lets the unattended installer write it, then boots the installed disk alone and waits
//! for the node agent, timing each stage.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kiln_lab::qemu::{self, Disk, Firmware, Nic, Regex, Vm};
use kiln_spec::size::ByteSize;
use serde::Serialize;

use super::install::{DONE_MARKER, FAILED_MARKER, START_MARKER};
use super::output::OutputArgs;

#[derive(Debug, clap::Subcommand)]
pub enum LabCmd {
    /// Install an ISO into a QEMU VM and boot the installed disk until the agent is ready
    Install(LabInstallArgs),
}

#[derive(Debug, clap::Args)]
pub struct LabInstallArgs {
    /// The hybrid ISO built by `kiln build`
    #[arg(long, value_name = "FILE")]
    iso: PathBuf,
    /// Raw disk image to install onto; created (sparse) when missing
    #[arg(long, value_name = "FILE")]
    disk: PathBuf,
    /// Machine firmware
    #[arg(long, value_enum, default_value_t = FirmwareArg::Uefi)]
    firmware: FirmwareArg,
    /// Size of a newly created disk
    #[arg(long, value_name = "SIZE", default_value = "8GiB")]
    disk_size: ByteSize,
    /// VM memory in MiB
    #[arg(long, value_name = "MIB", default_value_t = 2048)]
    memory: u32,
    /// Time limit of each stage (live boot + install; installed boot), e.g. 15m
    #[arg(long, value_name = "DURATION", default_value = "15m", value_parser = super::parse_duration)]
    timeout: Duration,
    /// Directory for the console logs [default: next to the disk]
    #[arg(long, value_name = "DIR")]
    logs: Option<PathBuf>,
    #[command(flatten)]
    output: OutputArgs,
}

/// The lab node's NIC (user-mode network): its MAC names the host (`kiln-{mac}`).
const LAB_MAC: &str = "52:54:00:4b:49:4c";

fn lab_nic() -> Nic {
    Nic::User {
        mac: LAB_MAC.into(),
        hostfwd: Vec::new(),
        bootindex: None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum FirmwareArg {
    Bios,
    Uefi,
}

impl From<FirmwareArg> for Firmware {
    fn from(f: FirmwareArg) -> Firmware {
        match f {
            FirmwareArg::Bios => Firmware::Bios,
            FirmwareArg::Uefi => Firmware::Uefi,
        }
    }
}

/// The timings of one lab install, seconds from each VM's power-on.
#[derive(Debug, Serialize)]
pub struct LabInstallSummary {
    pub firmware: String,
    pub node: String,
    pub slot: String,
    /// Live VM power-on → the installer starts.
    pub live_boot_seconds: f64,
    /// Installer start → disk written (`kiln-install: done`).
    pub install_seconds: f64,
    /// Installed VM power-on → `kiln-agent ready`.
    pub installed_boot_seconds: f64,
    pub total_seconds: f64,
    pub install_console: PathBuf,
    pub installed_console: PathBuf,
}

pub fn run(cmd: LabCmd) -> anyhow::Result<()> {
    match cmd {
        LabCmd::Install(a) => {
            let summary = lab_install(&a)?;
            a.output.emit(&summary, summary_text)
        }
    }
}

fn summary_text(s: &LabInstallSummary) -> String {
    format!(
        "installed and booted {} ({} firmware, slot {})\n\
         \x20 live boot      {:>7.1}s  power-on → installer start\n\
         \x20 install        {:>7.1}s  installer start → disk written\n\
         \x20 installed boot {:>7.1}s  power-on → kiln-agent ready\n\
         \x20 total          {:>7.1}s\n\
         console logs: {}, {}\n",
        s.node,
        s.firmware,
        s.slot,
        s.live_boot_seconds,
        s.install_seconds,
        s.installed_boot_seconds,
        s.total_seconds,
        s.install_console.display(),
        s.installed_console.display(),
    )
}

fn lab_install(a: &LabInstallArgs) -> anyhow::Result<LabInstallSummary> {
    if !a.iso.exists() {
        bail!(
            "{} does not exist (build one with `kiln build --out DIR`)",
            a.iso.display()
        );
    }
    if !a.disk.exists() {
        eprintln!("creating {} ({}, sparse)", a.disk.display(), a.disk_size);
        qemu::create_sparse_disk(&a.disk, a.disk_size.bytes())?;
    }
    let logs = match &a.logs {
        Some(d) => d.clone(),
        None => a.disk.parent().unwrap_or(Path::new(".")).to_path_buf(),
    };
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let stem = a
        .disk
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "disk".into());
    let firmware = Firmware::from(a.firmware);
    let install_log = logs.join(format!("{stem}.{firmware}.install-console.log"));
    let boot_log = logs.join(format!("{stem}.{firmware}.boot-console.log"));
    let total = Instant::now();

    // Stage 1: the live ISO with the blank disk; the installer's reboot ends QEMU.
    eprintln!(
        "booting {} ({firmware}) with {}",
        a.iso.display(),
        a.disk.display()
    );
    let mut live = Vm::builder()
        .name(format!("kiln-lab-install-{firmware}"))
        .firmware(firmware)
        .memory_mib(a.memory)
        .cdrom(&a.iso, Some(1))
        .disk(Disk::new(&a.disk).bootindex(2).serial("kiln-lab-disk"))
        .nic(lab_nic())
        .no_reboot(true)
        .serial_log(&install_log)
        .spawn()?;
    live.wait_for_console(START_MARKER, a.timeout)
        .context("waiting for the installer to start in the live system")?;
    let live_boot = live.uptime();
    eprintln!("installer started after {:.1}s", live_boot.as_secs_f64());
    let install_start = Instant::now();
    let pattern = Regex::new(r"kiln-install: ").expect("static regex");
    loop {
        let left = a.timeout.saturating_sub(live.uptime());
        let line = live
            .wait_for_console(&pattern, left)
            .context("waiting for the install to finish")?;
        eprintln!("  {line}");
        if line.contains(FAILED_MARKER) {
            bail!(
                "the installer failed in the VM:\n{line}\nconsole: {}",
                install_log.display()
            );
        }
        if line.contains(DONE_MARKER) {
            break;
        }
    }
    let install = install_start.elapsed();
    live.wait_exit(Duration::from_secs(120))
        .context("waiting for the live system to reboot after the install")?;
    drop(live);

    // Stage 2: the installed disk alone.
    eprintln!("booting the installed disk ({firmware})");
    let mut node = Vm::builder()
        .name(format!("kiln-lab-node-{firmware}"))
        .firmware(firmware)
        .memory_mib(a.memory)
        .disk(Disk::new(&a.disk).bootindex(1).serial("kiln-lab-disk"))
        .nic(lab_nic())
        .serial_log(&boot_log)
        .spawn()?;
    let ready = Regex::new(r"kiln-agent ready node=(\S+) slot=(\S+)").expect("static regex");
    let line = node
        .wait_for_console(&ready, a.timeout)
        .context("waiting for the installed node's agent")?;
    let installed_boot = node.uptime();
    let caps = ready.captures(&line).expect("the line matched");
    let summary = LabInstallSummary {
        firmware: firmware.to_string(),
        node: caps[1].to_string(),
        slot: caps[2].to_string(),
        live_boot_seconds: live_boot.as_secs_f64(),
        install_seconds: install.as_secs_f64(),
        installed_boot_seconds: installed_boot.as_secs_f64(),
        total_seconds: total.elapsed().as_secs_f64(),
        install_console: install_log,
        installed_console: boot_log,
    };
    // The node has nothing to save: stop it at once.
    let _ = node.quit();
    Ok(summary)
}
