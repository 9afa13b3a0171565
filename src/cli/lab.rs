//! `kiln lab …`: the local virtual rack. `kiln lab install` boots an ISO in QEMU with a blank
//! disk, lets the unattended installer write it, then boots the installed disk alone and waits
//! for the node agent, timing each stage. `kiln lab rack up|down|exec` keeps a rack of
//! powered-off machines behind IPMI BMCs running for fleet rollouts.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kiln_lab::qemu::{self, BootSplit, Disk, Firmware, Nic, Regex, Vm};
use kiln_lab::rack::{self, RackFirmware, RackSpec, RackState};
use kiln_spec::size::ByteSize;
use serde::Serialize;

use super::install::{DONE_MARKER, FAILED_MARKER, START_MARKER};
use super::output::OutputArgs;

#[derive(Debug, clap::Subcommand)]
pub enum LabCmd {
    /// Install an ISO into a QEMU VM and boot the installed disk until the agent is ready
    Install(LabInstallArgs),
    /// A local rack of powered-off QEMU machines behind IPMI BMCs, with its fleet inventory
    #[command(subcommand)]
    Rack(RackCmd),
}

#[derive(Debug, clap::Subcommand)]
pub enum RackCmd {
    /// Create the machines, their BMCs and boot network in a namespace; write fleet.yaml
    Up(RackUpArgs),
    /// Stop the rack's machines, BMCs and network; disks and logs stay unless --purge
    Down(RackDownArgs),
    /// Run a command inside the rack's network namespace (BMCs, boot network)
    Exec(RackExecArgs),
    /// Send router advertisements on the rack's bridge (started by `up`)
    #[command(hide = true)]
    Advertise { netns: String, bridge: String },
}

#[derive(Debug, clap::Args)]
pub struct RackUpArgs {
    /// Number of machines (node-01 is the control plane)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=rack::MAX_NODES as i64))]
    nodes: u16,
    /// Machine firmware; mixed alternates BIOS and UEFI, starting with BIOS
    #[arg(long, value_enum, default_value_t = RackFirmwareArg::Mixed)]
    firmware: RackFirmwareArg,
    /// Each machine's disks (sparse), comma-separated; the first is the boot disk
    #[arg(
        long,
        value_name = "SIZE,...",
        value_delimiter = ',',
        default_value = "8GiB"
    )]
    disks: Vec<ByteSize>,
    /// Memory of each machine in MiB
    #[arg(long, value_name = "MIB", default_value_t = 2048)]
    memory: u32,
    /// Directory for disks, console logs, BMC passwords, fleet.yaml and rack.json
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, clap::Args)]
pub struct RackDownArgs {
    /// The rack's directory (as given to `up`)
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// Also remove the disks, logs, secrets and inventory
    #[arg(long)]
    purge: bool,
}

#[derive(Debug, clap::Args)]
pub struct RackExecArgs {
    /// The rack's directory (as given to `up`)
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// The command and its arguments, after `--`
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<OsString>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum RackFirmwareArg {
    Mixed,
    Bios,
    Uefi,
}

impl From<RackFirmwareArg> for RackFirmware {
    fn from(f: RackFirmwareArg) -> RackFirmware {
        match f {
            RackFirmwareArg::Mixed => RackFirmware::Mixed,
            RackFirmwareArg::Bios => RackFirmware::Bios,
            RackFirmwareArg::Uefi => RackFirmware::Uefi,
        }
    }
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
    /// Disk written → the live VM is off (the installer's reboot).
    pub reboot_seconds: f64,
    /// Installed VM power-on → `kiln-agent ready`.
    pub installed_boot_seconds: f64,
    /// Where the live boot's time went, from its console; None when the console lacks a step.
    pub live_split: Option<BootSplit>,
    /// Where the installed boot's time went.
    pub installed_split: Option<BootSplit>,
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
        LabCmd::Rack(c) => run_rack(c),
    }
}

fn run_rack(cmd: RackCmd) -> anyhow::Result<()> {
    match cmd {
        RackCmd::Up(a) => {
            let exe = std::env::current_exe().context("finding the kiln binary")?;
            let spec = RackSpec {
                dir: a.dir.clone(),
                nodes: a.nodes.into(),
                firmware: a.firmware.into(),
                disks: a.disks.iter().map(|d| d.bytes()).collect(),
                memory_mib: a.memory,
                advertiser: vec![exe.into(), "lab".into(), "rack".into(), "advertise".into()],
            };
            let state = rack::up(&spec)
                .with_context(|| format!("bringing up the rack in {}", a.dir.display()))?
                .detach();
            a.output.emit(&state, rack_summary)
        }
        RackCmd::Down(a) => {
            let report = rack::down(&a.dir, a.purge)
                .with_context(|| format!("taking down the rack in {}", a.dir.display()))?;
            if !report.found {
                println!("no rack in {} (nothing to do)", a.dir.display());
                return Ok(());
            }
            if report.stopped.is_empty() && report.netns_deleted.is_none() {
                println!("the rack in {} is already down", a.dir.display());
            }
            for stopped in &report.stopped {
                println!("stopped {stopped}");
            }
            if let Some(ns) = &report.netns_deleted {
                println!("deleted namespace {ns}");
            }
            if report.purged {
                println!("removed disks, logs, secrets and inventory");
            } else {
                println!("disks and logs kept in {}", a.dir.display());
            }
            Ok(())
        }
        RackCmd::Exec(a) => {
            let status = rack::exec(&a.dir, &a.command).with_context(|| {
                format!(
                    "running {} in the rack of {}",
                    a.command[0].to_string_lossy(),
                    a.dir.display()
                )
            })?;
            if status.success() {
                return Ok(());
            }
            // The command's own status, as a shell reports it.
            std::process::exit(
                status
                    .code()
                    .or_else(|| status.signal().map(|s| 128 + s))
                    .unwrap_or(1),
            )
        }
        RackCmd::Advertise { netns, bridge } => match rack::advertise(&netns, &bridge)? {},
    }
}

fn rack_summary(s: &RackState) -> String {
    let dir = s.dir.display();
    let mut t = format!(
        "rack up in {dir}: namespace {}, bridge {} ({}), {} powered off\n\n",
        s.netns,
        s.bridge,
        s.provisioner_cidr,
        match s.nodes.len() {
            1 => "1 machine".to_string(),
            n => format!("{n} machines"),
        }
    );
    let _ = writeln!(
        t,
        "{:<9} {:<8} {:<17}  {:<15}  CONSOLE",
        "NODE", "FIRMWARE", "MAC", "BMC"
    );
    for n in &s.nodes {
        let _ = writeln!(
            t,
            "{:<9} {:<8} {:<17}  127.0.0.1:{:<5}  {}",
            n.name,
            n.firmware.to_string(),
            n.mac,
            n.bmc_port,
            n.console_log.display()
        );
    }
    let inventory = s.inventory_path();
    let inventory = inventory.display();
    let _ = write!(
        t,
        "\ninventory: {inventory} (BMC user {user}, passwords in {dir}/secrets)\n\
         The BMCs listen inside the rack's namespace; next, try:\n\
         \x20 kiln lab rack exec --dir {dir} -- kiln bmc power status --inventory {inventory} --nodes '*'\n\
         \x20 kiln lab rack exec --dir {dir} -- kiln fleet rollout --inventory {inventory} \\\n\
         \x20     --artifacts BUILD_DIR --state {dir}/fleet\n\
         \x20 kiln lab rack down --dir {dir} [--purge]\n",
        user = rack::BMC_USER,
    );
    t
}

fn summary_text(s: &LabInstallSummary) -> String {
    let split = |b: &Option<BootSplit>| match b {
        Some(b) => format!(
            "\n\x20   firmware + loader {:>5.1}s, kernel {:>4.1}s, stage-1 {:>4.1}s, systemd {:>5.1}s",
            b.firmware_loader, b.kernel, b.stage1, b.userspace
        ),
        None => String::new(),
    };
    format!(
        "installed and booted {} ({} firmware, slot {})\n\
         \x20 live boot      {:>7.1}s  power-on → installer start{}\n\
         \x20 install        {:>7.1}s  installer start → disk written\n\
         \x20 reboot         {:>7.1}s  disk written → live system off\n\
         \x20 installed boot {:>7.1}s  power-on → kiln-agent ready{}\n\
         \x20 total          {:>7.1}s\n\
         console logs: {}, {}\n",
        s.node,
        s.firmware,
        s.slot,
        s.live_boot_seconds,
        split(&s.live_split),
        s.install_seconds,
        s.reboot_seconds,
        s.installed_boot_seconds,
        split(&s.installed_split),
        s.total_seconds,
        s.install_console.display(),
        s.installed_console.display(),
    )
}

/// The installed node's agent prints this once it has converged and serves its API.
const AGENT_READY: &str = "kiln-agent ready";

/// The agent's ready line, captures node and slot. The kernel may print into the middle of
/// the line (a loaded run read the slot as `A[`), so it matches only a node name and a slot
/// letter; a line cut before them is skipped for the journal's copy.
fn agent_ready_line() -> Regex {
    Regex::new(&format!(r"{AGENT_READY} node=([a-z0-9.-]+) slot=([AB])")).expect("static regex")
}

/// A finished boot's split, from its console log.
fn boot_split(console: &Path, marker: &str, seen_at: Duration) -> Option<BootSplit> {
    let text = std::fs::read(console).ok()?;
    BootSplit::from_console(&String::from_utf8_lossy(&text), marker, seen_at)
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
        .nic(Nic::lab(Vec::new()))
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
    let reboot = install_start.elapsed() - install;
    drop(live);

    // Stage 2: the installed disk alone.
    eprintln!("booting the installed disk ({firmware})");
    let mut node = Vm::builder()
        .name(format!("kiln-lab-node-{firmware}"))
        .firmware(firmware)
        .memory_mib(a.memory)
        .disk(Disk::new(&a.disk).bootindex(1).serial("kiln-lab-disk"))
        .nic(Nic::lab(Vec::new()))
        .serial_log(&boot_log)
        .spawn()?;
    let ready = agent_ready_line();
    let line = node
        .wait_for_console(&ready, a.timeout)
        .context("waiting for the installed node's agent")?;
    let installed_boot = node.uptime();
    let caps = ready.captures(&line).expect("the line matched");
    // The console shows the line as the agent prints it and again, stamped by the kernel, from
    // the journal; the boot split reads the stamped copy, so give it a moment to arrive.
    let stamped = qemu::stamped_marker(AGENT_READY);
    if !stamped.is_match(&line) {
        let _ = node.wait_for_console(&stamped, Duration::from_secs(10));
    }
    let summary = LabInstallSummary {
        firmware: firmware.to_string(),
        node: caps[1].to_string(),
        slot: caps[2].to_string(),
        live_boot_seconds: live_boot.as_secs_f64(),
        install_seconds: install.as_secs_f64(),
        reboot_seconds: reboot.as_secs_f64(),
        installed_boot_seconds: installed_boot.as_secs_f64(),
        live_split: boot_split(&install_log, START_MARKER, live_boot),
        installed_split: boot_split(&boot_log, AGENT_READY, installed_boot),
        total_seconds: total.elapsed().as_secs_f64(),
        install_console: install_log,
        installed_console: boot_log,
    };
    // The node has nothing to save: stop it at once.
    let _ = node.quit();
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ready_line_survives_kernel_messages_printed_into_it() {
        let ready = agent_ready_line();
        let caps = |line: &str| {
            ready
                .captures(line)
                .map(|c| (c[1].to_string(), c[2].to_string()))
        };
        let whole = ("kiln-5254004b494c".to_string(), "A".to_string());
        assert_eq!(
            caps("kiln-agent ready node=kiln-5254004b494c slot=A"),
            Some(whole.clone())
        );
        assert_eq!(
            caps(
                "kiln-agent ready node=kiln-5254004b494c slot=A[   41.203] random: crng init done"
            ),
            Some(whole.clone())
        );
        assert_eq!(
            caps("[   42.001] kiln-agent[311]: kiln-agent ready node=kiln-5254004b494c slot=A"),
            Some(whole)
        );
        assert_eq!(
            caps("kiln-agent ready node=kiln-52540[   41.203] virtio_net: x slot=B"),
            None
        );
        assert_eq!(caps("kiln-agent ready node=kiln-1 slot=[   41.2] x"), None);
    }
}
