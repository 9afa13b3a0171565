//! QEMU machines: firmware, disks, NICs, serial console capture.
//!
//! The one launcher every lab user shares: `Vm::builder()` describes a machine, `spawn()` starts
//! it in a private work directory (serial log, QMP socket, the writable UEFI variable store) and
//! returns a [`Vm`] handle that waits on console lines or the exit and kills QEMU on drop.
//! [`VmBuilder::args`] is the pure half (builder → argv), so callers that let another process
//! start QEMU (a BMC simulator's `startcmd`) use exactly the same command line.

use std::collections::VecDeque;
use std::fmt;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub use regex::Regex;

/// The QEMU binary; `KILN_QEMU` overrides it.
const QEMU: &str = "qemu-system-x86_64";
/// OVMF firmware (Debian `ovmf`): read-only code plus a variable store template.
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// How many console lines an error message carries.
const TAIL_LINES: usize = 40;
const POLL: Duration = Duration::from_millis(100);

/// Everything that can go wrong starting, watching or stopping a machine.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("{what} not found at {path} (install the Debian package {package})")]
    Missing {
        what: &'static str,
        path: PathBuf,
        package: &'static str,
    },
    #[error("starting {program}: {source}")]
    Spawn { program: String, source: io::Error },
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    #[error(
        "VM {vm}: no console line matching {pattern} within {waited:?}; last console lines:\n{tail}"
    )]
    ConsoleTimeout {
        vm: String,
        pattern: String,
        waited: Duration,
        tail: String,
    },
    #[error(
        "VM {vm}: QEMU exited ({status}) before a console line matched {pattern}; last console lines:\n{tail}"
    )]
    ExitedBeforeMatch {
        vm: String,
        pattern: String,
        status: ExitStatus,
        tail: String,
    },
    #[error("VM {vm}: still running after {waited:?}; last console lines:\n{tail}")]
    ExitTimeout {
        vm: String,
        waited: Duration,
        tail: String,
    },
    #[error("VM {vm}: QMP command {command}: {reason}")]
    Qmp {
        vm: String,
        command: String,
        reason: String,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> QemuError {
    let context = context.into();
    move |source| QemuError::Io { context, source }
}

/// Machine firmware.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Firmware {
    /// SeaBIOS, QEMU's default.
    #[default]
    Bios,
    /// OVMF with a per-VM writable copy of the variable store.
    Uefi,
}

impl std::str::FromStr for Firmware {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bios" => Ok(Firmware::Bios),
            "uefi" => Ok(Firmware::Uefi),
            other => Err(format!(
                "unknown firmware {other:?} (expected bios or uefi)"
            )),
        }
    }
}

impl fmt::Display for Firmware {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Firmware::Bios => "bios",
            Firmware::Uefi => "uefi",
        })
    }
}

/// CPU virtualisation backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accel {
    /// KVM where it can run an unmodified guest, software emulation otherwise.
    #[default]
    Auto,
    Tcg,
    Kvm,
}

impl Accel {
    /// Resolves `Auto`. `KILN_QEMU_ACCEL=kvm|tcg` forces a choice. Otherwise KVM is used only
    /// when the host CPU advertises hardware virtualisation (vmx/svm): a nested, paravirtual
    /// `/dev/kvm` without those flags fails on OVMF and Linux guests (see LAB.md).
    pub fn resolve(self) -> Accel {
        static DETECTED: OnceLock<Accel> = OnceLock::new();
        match self {
            Accel::Tcg | Accel::Kvm => self,
            Accel::Auto => *DETECTED.get_or_init(|| {
                match std::env::var("KILN_QEMU_ACCEL").as_deref() {
                    Ok("kvm") => return Accel::Kvm,
                    Ok("tcg") => return Accel::Tcg,
                    _ => {}
                }
                let kvm_usable = fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/kvm")
                    .is_ok();
                let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
                if kvm_usable && cpu_has_hw_virt(&cpuinfo) {
                    Accel::Kvm
                } else {
                    Accel::Tcg
                }
            }),
        }
    }
}

fn cpu_has_hw_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// How a disk is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DiskBus {
    #[default]
    Virtio,
    /// SATA on the q35 AHCI controller (`ide-hd`).
    Sata,
    Nvme,
}

/// A raw disk image attached to the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub path: PathBuf,
    pub bus: DiskBus,
    pub bootindex: Option<u32>,
    /// Serial number the guest sees (`/sys/block/*/serial`, by-id names).
    pub serial: Option<String>,
    /// Model string (SATA only; virtio has none).
    pub model: Option<String>,
    pub read_only: bool,
}

impl Disk {
    pub fn new(path: impl Into<PathBuf>) -> Disk {
        Disk {
            path: path.into(),
            bus: DiskBus::Virtio,
            bootindex: None,
            serial: None,
            model: None,
            read_only: false,
        }
    }
    pub fn bus(mut self, bus: DiskBus) -> Disk {
        self.bus = bus;
        self
    }
    pub fn bootindex(mut self, index: u32) -> Disk {
        self.bootindex = Some(index);
        self
    }
    pub fn serial(mut self, serial: impl Into<String>) -> Disk {
        self.serial = Some(serial.into());
        self
    }
    pub fn model(mut self, model: impl Into<String>) -> Disk {
        self.model = Some(model.into());
        self
    }
    pub fn read_only(mut self, read_only: bool) -> Disk {
        self.read_only = read_only;
        self
    }
}

/// A network interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Nic {
    /// A tap device that already exists (in the namespace QEMU runs in).
    Tap {
        ifname: String,
        mac: String,
        bootindex: Option<u32>,
    },
    /// QEMU's user-mode network (NAT, no root); `hostfwd` entries like `tcp::2222-:22`.
    User {
        mac: String,
        hostfwd: Vec<String>,
        bootindex: Option<u32>,
    },
}

/// Direct kernel boot, bypassing the firmware's boot devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectBoot {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub append: String,
}

/// Describes one machine; `spawn()` starts it.
#[derive(Debug, Clone)]
pub struct VmBuilder {
    name: String,
    firmware: Firmware,
    accel: Accel,
    memory_mib: u32,
    cpus: u32,
    disks: Vec<Disk>,
    cdrom: Option<(PathBuf, Option<u32>)>,
    usb_sticks: Vec<(PathBuf, Option<u32>)>,
    direct_boot: Option<DirectBoot>,
    nics: Vec<Nic>,
    extra_args: Vec<String>,
    no_reboot: bool,
    netns: Option<String>,
    work_dir: Option<PathBuf>,
    serial_log: Option<PathBuf>,
}

impl Default for VmBuilder {
    fn default() -> Self {
        VmBuilder {
            name: "kiln-vm".into(),
            firmware: Firmware::Bios,
            accel: Accel::Auto,
            memory_mib: 1536,
            cpus: 2,
            disks: Vec::new(),
            cdrom: None,
            usb_sticks: Vec::new(),
            direct_boot: None,
            nics: Vec::new(),
            extra_args: Vec::new(),
            no_reboot: false,
            netns: None,
            work_dir: None,
            serial_log: None,
        }
    }
}

impl VmBuilder {
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }
    pub fn firmware(mut self, firmware: Firmware) -> Self {
        self.firmware = firmware;
        self
    }
    pub fn accel(mut self, accel: Accel) -> Self {
        self.accel = accel;
        self
    }
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }
    pub fn cpus(mut self, cpus: u32) -> Self {
        self.cpus = cpus;
        self
    }
    pub fn disk(mut self, disk: Disk) -> Self {
        self.disks.push(disk);
        self
    }
    /// An ISO as a CD-ROM (SATA), optionally first in the boot order.
    pub fn cdrom(mut self, iso: impl Into<PathBuf>, bootindex: Option<u32>) -> Self {
        self.cdrom = Some((iso.into(), bootindex));
        self
    }
    /// A raw image as a USB mass-storage stick on an xHCI controller.
    pub fn usb_stick(mut self, image: impl Into<PathBuf>, bootindex: Option<u32>) -> Self {
        self.usb_sticks.push((image.into(), bootindex));
        self
    }
    pub fn direct_boot(mut self, boot: DirectBoot) -> Self {
        self.direct_boot = Some(boot);
        self
    }
    pub fn nic(mut self, nic: Nic) -> Self {
        self.nics.push(nic);
        self
    }
    /// Raw QEMU arguments appended last (e.g. an `ipmi-bmc-extern` chardev and device).
    pub fn extra_args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.extra_args.extend(args.into_iter().map(Into::into));
        self
    }
    /// `-no-reboot`: a guest reboot ends QEMU instead (how an installer's reboot is observed).
    pub fn no_reboot(mut self, no_reboot: bool) -> Self {
        self.no_reboot = no_reboot;
        self
    }
    /// Runs QEMU inside an existing network namespace (`ip netns exec NAME …`).
    pub fn netns(mut self, name: impl Into<String>) -> Self {
        self.netns = Some(name.into());
        self
    }
    /// Directory for the serial log, QMP socket and UEFI variables; a private temporary
    /// directory (removed with the `Vm`) when unset.
    pub fn work_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.work_dir = Some(dir.into());
        self
    }
    /// Where the serial console is captured; `<work dir>/serial.log` when unset.
    pub fn serial_log(mut self, path: impl Into<PathBuf>) -> Self {
        self.serial_log = Some(path.into());
        self
    }

    /// The serial log path for a given work directory.
    pub fn serial_log_path(&self, work_dir: &Path) -> PathBuf {
        self.serial_log
            .clone()
            .unwrap_or_else(|| work_dir.join("serial.log"))
    }

    fn qmp_path(work_dir: &Path) -> PathBuf {
        work_dir.join("qmp.sock")
    }

    fn vars_path(work_dir: &Path) -> PathBuf {
        work_dir.join("OVMF_VARS.fd")
    }

    /// The QEMU argv (without the program) for a machine whose work directory is `work_dir`.
    /// Pure: nothing is checked or created; `prepare_work_dir` does that.
    pub fn args(&self, work_dir: &Path) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
        push(&["-name", &self.name, "-machine", "q35"]);
        match self.accel.resolve() {
            Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
            _ => push(&["-accel", "tcg,thread=multi", "-cpu", "max"]),
        }
        push(&["-m", &self.memory_mib.to_string()]);
        push(&["-smp", &self.cpus.to_string()]);
        push(&["-display", "none", "-vga", "none", "-nodefaults"]);
        push(&[
            "-serial",
            &format!("file:{}", self.serial_log_path(work_dir).display()),
        ]);
        push(&[
            "-qmp",
            &format!(
                "unix:{},server=on,wait=off",
                Self::qmp_path(work_dir).display()
            ),
        ]);
        // Entropy, or mkfs and key generation stall in the guest.
        push(&["-device", "virtio-rng-pci"]);
        if self.no_reboot {
            push(&["-no-reboot"]);
        }
        if self.firmware == Firmware::Uefi {
            push(&[
                "-drive",
                &format!("if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"),
                "-drive",
                &format!(
                    "if=pflash,format=raw,unit=1,file={}",
                    Self::vars_path(work_dir).display()
                ),
            ]);
        }
        let boot = |i: Option<u32>| i.map(|i| format!(",bootindex={i}")).unwrap_or_default();
        let mut sata_port = 0;
        for (n, d) in self.disks.iter().enumerate() {
            let ro = if d.read_only { ",readonly=on" } else { "" };
            push(&[
                "-drive",
                &format!(
                    "if=none,id=disk{n},format=raw,file={},cache=unsafe{ro}",
                    d.path.display()
                ),
            ]);
            let serial = d
                .serial
                .as_ref()
                .map(|s| format!(",serial={s}"))
                .unwrap_or_default();
            let device = match d.bus {
                DiskBus::Virtio => {
                    format!("virtio-blk-pci,drive=disk{n}{serial}{}", boot(d.bootindex))
                }
                DiskBus::Sata => {
                    let model = d
                        .model
                        .as_ref()
                        .map(|m| format!(",model={m}"))
                        .unwrap_or_default();
                    let port = sata_port;
                    sata_port += 1;
                    format!(
                        "ide-hd,drive=disk{n},bus=ide.{port}{serial}{model}{}",
                        boot(d.bootindex)
                    )
                }
                DiskBus::Nvme => {
                    let serial = d.serial.clone().unwrap_or_else(|| format!("kiln-nvme{n}"));
                    format!("nvme,drive=disk{n},serial={serial}{}", boot(d.bootindex))
                }
            };
            push(&["-device", &device]);
        }
        if let Some((iso, index)) = &self.cdrom {
            push(&[
                "-drive",
                &format!(
                    "if=none,id=cd0,media=cdrom,readonly=on,file={}",
                    iso.display()
                ),
                "-device",
                &format!("ide-cd,drive=cd0,bus=ide.{sata_port}{}", boot(*index)),
            ]);
        }
        if !self.usb_sticks.is_empty() {
            push(&["-device", "qemu-xhci,id=xhci"]);
            for (n, (img, index)) in self.usb_sticks.iter().enumerate() {
                push(&[
                    "-drive",
                    &format!("if=none,id=usb{n},format=raw,file={}", img.display()),
                    "-device",
                    &format!("usb-storage,bus=xhci.0,drive=usb{n}{}", boot(*index)),
                ]);
            }
        }
        for (n, nic) in self.nics.iter().enumerate() {
            // A NIC nobody boots from needs no PXE option ROM (it only slows the firmware).
            let rom = match nic {
                Nic::User {
                    bootindex: None, ..
                } => ",romfile=",
                _ => "",
            };
            let (netdev, mac, index) = match nic {
                Nic::Tap {
                    ifname,
                    mac,
                    bootindex,
                } => (
                    format!("tap,id=net{n},ifname={ifname},script=no,downscript=no"),
                    mac,
                    bootindex,
                ),
                Nic::User {
                    mac,
                    hostfwd,
                    bootindex,
                } => {
                    let fwd: String = hostfwd.iter().map(|f| format!(",hostfwd={f}")).collect();
                    (format!("user,id=net{n}{fwd}"), mac, bootindex)
                }
            };
            push(&[
                "-netdev",
                &netdev,
                "-device",
                &format!(
                    "virtio-net-pci,netdev=net{n},mac={mac}{rom}{}",
                    boot(*index)
                ),
            ]);
        }
        if let Some(b) = &self.direct_boot {
            push(&["-kernel", &b.kernel.display().to_string()]);
            if let Some(initrd) = &b.initrd {
                push(&["-initrd", &initrd.display().to_string()]);
            }
            push(&["-append", &b.append]);
        }
        a.extend(self.extra_args.iter().cloned());
        a
    }

    /// The program and arguments that start this machine (`ip netns exec` first if needed).
    pub fn command_line(&self, work_dir: &Path) -> Vec<String> {
        let mut argv = Vec::new();
        if let Some(ns) = &self.netns {
            argv.extend(["ip".to_string(), "netns".into(), "exec".into(), ns.clone()]);
        }
        argv.push(std::env::var("KILN_QEMU").unwrap_or_else(|_| QEMU.to_string()));
        argv.extend(self.args(work_dir));
        argv
    }

    /// Checks that the referenced files exist and creates what QEMU needs in `work_dir`: the
    /// writable UEFI variable store and an empty serial log.
    pub fn prepare_work_dir(&self, work_dir: &Path) -> Result<(), QemuError> {
        fs::create_dir_all(work_dir).map_err(io_err(format!("creating {}", work_dir.display())))?;
        if self.firmware == Firmware::Uefi {
            for f in [OVMF_CODE, OVMF_VARS] {
                if !Path::new(f).exists() {
                    return Err(QemuError::Missing {
                        what: "OVMF firmware",
                        path: f.into(),
                        package: "ovmf",
                    });
                }
            }
            let vars = Self::vars_path(work_dir);
            if !vars.exists() {
                fs::copy(OVMF_VARS, &vars).map_err(io_err(format!("copying {OVMF_VARS}")))?;
            }
        }
        let files = self
            .disks
            .iter()
            .map(|d| &d.path)
            .chain(self.cdrom.iter().map(|c| &c.0))
            .chain(self.usb_sticks.iter().map(|u| &u.0))
            .chain(self.direct_boot.iter().map(|b| &b.kernel))
            .chain(self.direct_boot.iter().filter_map(|b| b.initrd.as_ref()));
        for f in files {
            if !f.exists() {
                return Err(QemuError::Io {
                    context: format!("VM {}: {}", self.name, f.display()),
                    source: io::Error::from(io::ErrorKind::NotFound),
                });
            }
        }
        let log = self.serial_log_path(work_dir);
        fs::File::create(&log).map_err(io_err(format!("creating {}", log.display())))?;
        Ok(())
    }

    /// Starts QEMU. Its stdout and stderr go to `<work dir>/qemu.log`.
    pub fn spawn(self) -> Result<Vm, QemuError> {
        let (work_dir, temp) = match &self.work_dir {
            Some(d) => (d.clone(), None),
            None => {
                let t = tempfile::Builder::new()
                    .prefix(&format!("{}-", self.name))
                    .tempdir()
                    .map_err(io_err("creating a VM work directory"))?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        self.prepare_work_dir(&work_dir)?;
        // QEMU must not outlive the thread that owns the `Vm`, even when this process is
        // killed and `Drop` never runs: util-linux `setpriv` sets its parent-death signal.
        let mut argv = vec!["setpriv".to_string(), "--pdeathsig".into(), "KILL".into()];
        argv.extend(self.command_line(&work_dir));
        let qemu_log_path = work_dir.join("qemu.log");
        let qemu_log = fs::File::create(&qemu_log_path)
            .map_err(io_err(format!("creating {}", qemu_log_path.display())))?;
        let qemu_err = qemu_log
            .try_clone()
            .map_err(io_err("duplicating a log handle"))?;
        tracing::debug!(vm = %self.name, argv = ?argv, "starting QEMU");
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(qemu_log)
            .stderr(qemu_err)
            .spawn()
            .map_err(|source| QemuError::Spawn {
                program: argv[0].clone(),
                source,
            })?;
        Ok(Vm {
            name: self.name.clone(),
            console: ConsoleLog::new(self.serial_log_path(&work_dir)),
            qmp: Self::qmp_path(&work_dir),
            qemu_log: qemu_log_path,
            child,
            started: Instant::now(),
            _temp: temp,
        })
    }
}

/// What a console line must contain: a plain substring or a regular expression.
#[derive(Debug, Clone)]
pub enum ConsolePattern {
    Substring(String),
    Regex(Regex),
}

impl ConsolePattern {
    fn matches(&self, line: &str) -> bool {
        match self {
            ConsolePattern::Substring(s) => line.contains(s.as_str()),
            ConsolePattern::Regex(r) => r.is_match(line),
        }
    }
}

impl fmt::Display for ConsolePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConsolePattern::Substring(s) => write!(f, "{s:?}"),
            ConsolePattern::Regex(r) => write!(f, "/{}/", r.as_str()),
        }
    }
}

impl From<&str> for ConsolePattern {
    fn from(s: &str) -> Self {
        ConsolePattern::Substring(s.to_string())
    }
}

impl From<String> for ConsolePattern {
    fn from(s: String) -> Self {
        ConsolePattern::Substring(s)
    }
}

impl From<Regex> for ConsolePattern {
    fn from(r: Regex) -> Self {
        ConsolePattern::Regex(r)
    }
}

impl From<&Regex> for ConsolePattern {
    fn from(r: &Regex) -> Self {
        ConsolePattern::Regex(r.clone())
    }
}

/// A serial log file read incrementally: each match consumes the log up to the matched line,
/// so consecutive waits see consecutive events.
#[derive(Debug)]
pub struct ConsoleLog {
    path: PathBuf,
    offset: u64,
    partial: String,
    /// Complete lines read but not yet looked at (a read can bring several matches).
    pending: VecDeque<String>,
}

impl ConsoleLog {
    pub fn new(path: impl Into<PathBuf>) -> ConsoleLog {
        ConsoleLog {
            path: path.into(),
            offset: 0,
            partial: String::new(),
            pending: VecDeque::new(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues complete new lines (a trailing partial line is kept back).
    fn read_new_lines(&mut self) -> io::Result<()> {
        let mut f = match fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        f.seek(SeekFrom::Start(self.offset))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        self.offset += buf.len() as u64;
        self.partial.push_str(&String::from_utf8_lossy(&buf));
        while let Some(nl) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=nl).collect();
            self.pending.push_back(clean_console_line(&line));
        }
        Ok(())
    }

    /// The last `n` lines of the whole log, for error messages.
    pub fn tail(&self, n: usize) -> String {
        let Ok(f) = fs::File::open(&self.path) else {
            return format!("(no console log at {})", self.path.display());
        };
        let mut last: VecDeque<String> = VecDeque::with_capacity(n);
        for line in BufReader::new(f).split(b'\n').map_while(Result::ok) {
            if last.len() == n {
                last.pop_front();
            }
            last.push_back(clean_console_line(&String::from_utf8_lossy(&line)));
        }
        last.into_iter().collect::<Vec<_>>().join("\n")
    }

    /// Waits for the next line matching `pattern`, for a machine this process did not start
    /// (e.g. one a BMC simulator's `startcmd` runs with [`VmBuilder::command_line`]); `vm`
    /// names it in errors.
    pub fn wait_for_line(
        &mut self,
        vm: &str,
        pattern: impl Into<ConsolePattern>,
        timeout: Duration,
    ) -> Result<String, QemuError> {
        self.wait_for(vm, &pattern.into(), timeout, || None)
    }

    /// Polls until a line matches, `alive` reports an exit, or `timeout` passes.
    fn wait_for(
        &mut self,
        vm: &str,
        pattern: &ConsolePattern,
        timeout: Duration,
        mut alive: impl FnMut() -> Option<ExitStatus>,
    ) -> Result<String, QemuError> {
        let start = Instant::now();
        loop {
            // Check the exit before reading, so the last lines a dying VM wrote are still seen.
            let exited = alive();
            self.read_new_lines()
                .map_err(io_err(format!("reading {}", self.path.display())))?;
            while let Some(line) = self.pending.pop_front() {
                if pattern.matches(&line) {
                    return Ok(line);
                }
            }
            if let Some(status) = exited {
                return Err(QemuError::ExitedBeforeMatch {
                    vm: vm.to_string(),
                    pattern: pattern.to_string(),
                    status,
                    tail: self.tail(TAIL_LINES),
                });
            }
            if start.elapsed() >= timeout {
                return Err(QemuError::ConsoleTimeout {
                    vm: vm.to_string(),
                    pattern: pattern.to_string(),
                    waited: timeout,
                    tail: self.tail(TAIL_LINES),
                });
            }
            std::thread::sleep(POLL);
        }
    }
}

/// Strips carriage returns and terminal escape sequences firmware and kernels print.
fn clean_console_line(raw: &str) -> String {
    static ESCAPES: OnceLock<Regex> = OnceLock::new();
    let re =
        ESCAPES.get_or_init(|| Regex::new(r"\x1b\[[0-9;?=]*[A-Za-z]|\x1b[()][A-Z0-9]|\r").unwrap());
    re.replace_all(raw.trim_end_matches('\n'), "").into_owned()
}

/// A running machine. Dropping it kills QEMU.
#[derive(Debug)]
pub struct Vm {
    name: String,
    console: ConsoleLog,
    qmp: PathBuf,
    qemu_log: PathBuf,
    child: Child,
    started: Instant,
    _temp: Option<tempfile::TempDir>,
}

impl Vm {
    pub fn builder() -> VmBuilder {
        VmBuilder::default()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Time since QEMU was started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn serial_log(&self) -> &Path {
        self.console.path()
    }

    /// Waits for the next console line matching `pattern` and returns it. Fails early when
    /// QEMU exits; every failure carries the last console lines.
    pub fn wait_for_console(
        &mut self,
        pattern: impl Into<ConsolePattern>,
        timeout: Duration,
    ) -> Result<String, QemuError> {
        let pattern = pattern.into();
        let child = &mut self.child;
        let qemu_log = &self.qemu_log;
        let result = self.console.wait_for(&self.name, &pattern, timeout, || {
            child.try_wait().ok().flatten()
        });
        result.map_err(|e| with_qemu_output(e, qemu_log))
    }

    /// The last lines of the console.
    pub fn console_tail(&self, lines: usize) -> String {
        self.console.tail(lines)
    }

    /// Waits for QEMU to exit (a guest poweroff, or a reboot under `-no-reboot`).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, QemuError> {
        let start = Instant::now();
        loop {
            if let Some(status) = self
                .child
                .try_wait()
                .map_err(io_err(format!("waiting for VM {}", self.name)))?
            {
                return Ok(status);
            }
            if start.elapsed() >= timeout {
                return Err(QemuError::ExitTimeout {
                    vm: self.name.clone(),
                    waited: timeout,
                    tail: self.console.tail(TAIL_LINES),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// Sends one QMP command (after the capabilities handshake) and returns its `return` value.
    pub fn qmp(&self, command: &str) -> Result<serde_json::Value, QemuError> {
        let fail = |reason: String| QemuError::Qmp {
            vm: self.name.clone(),
            command: command.to_string(),
            reason,
        };
        let stream = UnixStream::connect(&self.qmp)
            .map_err(|e| fail(format!("connecting {}: {e}", self.qmp.display())))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| fail(e.to_string()))?;
        let mut writer = stream.try_clone().map_err(|e| fail(e.to_string()))?;
        let mut reader = BufReader::new(stream);
        // Greeting, then each command's reply; asynchronous events in between are skipped.
        let read_reply =
            |reader: &mut BufReader<UnixStream>| -> Result<serde_json::Value, QemuError> {
                loop {
                    let mut line = String::new();
                    if reader
                        .read_line(&mut line)
                        .map_err(|e| fail(e.to_string()))?
                        == 0
                    {
                        return Err(fail("connection closed".into()));
                    }
                    let v: serde_json::Value = serde_json::from_str(&line)
                        .map_err(|e| fail(format!("bad reply {line:?}: {e}")))?;
                    if let Some(r) = v.get("return") {
                        return Ok(r.clone());
                    }
                    if let Some(e) = v.get("error") {
                        return Err(fail(e.to_string()));
                    }
                    if v.get("QMP").is_some() {
                        return Ok(v);
                    }
                }
            };
        read_reply(&mut reader)?;
        for cmd in ["qmp_capabilities", command] {
            writeln!(writer, "{}", serde_json::json!({ "execute": cmd }))
                .map_err(|e| fail(e.to_string()))?;
            let reply = read_reply(&mut reader)?;
            if cmd == command {
                return Ok(reply);
            }
        }
        unreachable!("the loop returns on the last command")
    }

    /// ACPI power button (the guest shuts down if it handles it).
    pub fn powerdown(&self) -> Result<(), QemuError> {
        self.qmp("system_powerdown").map(|_| ())
    }

    /// Asks QEMU to quit immediately and reaps it.
    pub fn quit(mut self) -> Result<ExitStatus, QemuError> {
        // The connection may drop as QEMU exits; the exit is what counts.
        let _ = self.qmp("quit");
        self.wait_exit(Duration::from_secs(10))
    }

    /// Kills QEMU (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// QEMU's own complaints (bad arguments, missing firmware) explain an early exit best.
fn with_qemu_output(e: QemuError, qemu_log: &Path) -> QemuError {
    match e {
        QemuError::ExitedBeforeMatch {
            vm,
            pattern,
            status,
            tail,
        } => {
            let out = fs::read_to_string(qemu_log).unwrap_or_default();
            let tail = if out.trim().is_empty() {
                tail
            } else {
                format!("{tail}\nQEMU said:\n{}", out.trim())
            };
            QemuError::ExitedBeforeMatch {
                vm,
                pattern,
                status,
                tail,
            }
        }
        other => other,
    }
}

/// Creates a sparse raw disk image of `size` bytes (or grows a smaller one).
pub fn create_sparse_disk(path: &Path, size: u64) -> Result<(), QemuError> {
    let f = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(path)
        .map_err(io_err(format!("creating {}", path.display())))?;
    let len = f
        .metadata()
        .map_err(io_err(format!("reading {}", path.display())))?
        .len();
    if len < size {
        f.set_len(size)
            .map_err(io_err(format!("sizing {}", path.display())))?;
    }
    Ok(())
}

/// The argv as one shell-quoted line, for logs and scripts (e.g. an `ipmi_sim` startcmd).
pub fn shell_quote(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=,:+@%".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uefi_machine_with_disk_cdrom_and_tap_builds_the_expected_argv() {
        let b = Vm::builder()
            .name("node1")
            .firmware(Firmware::Uefi)
            .accel(Accel::Tcg)
            .memory_mib(2048)
            .disk(Disk::new("/d/disk.raw").bootindex(2).serial("SN1"))
            .disk(Disk::new("/d/data.raw").bus(DiskBus::Sata).model("BIGDISK"))
            .cdrom("/d/kiln.iso", Some(1))
            .nic(Nic::Tap {
                ifname: "tap0".into(),
                mac: "52:54:00:00:00:01".into(),
                bootindex: Some(3),
            })
            .no_reboot(true)
            .netns("ns1")
            .extra_args(["-device", "isa-ipmi-kcs,bmc=bmc0"]);
        let line = shell_quote(&b.command_line(Path::new("/w")));
        let golden = "ip netns exec ns1 qemu-system-x86_64 -name node1 -machine q35 \
            -accel tcg,thread=multi -cpu max -m 2048 -smp 2 -display none -vga none -nodefaults \
            -serial file:/w/serial.log -qmp unix:/w/qmp.sock,server=on,wait=off \
            -device virtio-rng-pci -no-reboot \
            -drive if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd \
            -drive if=pflash,format=raw,unit=1,file=/w/OVMF_VARS.fd \
            -drive if=none,id=disk0,format=raw,file=/d/disk.raw,cache=unsafe \
            -device virtio-blk-pci,drive=disk0,serial=SN1,bootindex=2 \
            -drive if=none,id=disk1,format=raw,file=/d/data.raw,cache=unsafe \
            -device ide-hd,drive=disk1,bus=ide.0,model=BIGDISK \
            -drive if=none,id=cd0,media=cdrom,readonly=on,file=/d/kiln.iso \
            -device ide-cd,drive=cd0,bus=ide.1,bootindex=1 \
            -netdev tap,id=net0,ifname=tap0,script=no,downscript=no \
            -device virtio-net-pci,netdev=net0,mac=52:54:00:00:00:01,bootindex=3 \
            -device isa-ipmi-kcs,bmc=bmc0";
        // The QEMU binary may be overridden by the environment; compare the rest.
        assert_eq!(
            line.replacen(&std::env::var("KILN_QEMU").unwrap_or(QEMU.into()), QEMU, 1),
            golden
        );
    }

    #[test]
    fn hardware_virtualisation_flags_are_detected() {
        assert!(cpu_has_hw_virt("flags\t\t: fpu vme vmx sse\n"));
        assert!(!cpu_has_hw_virt(
            "flags\t\t: fpu vme hypervisor sse\nvmx: no\n"
        ));
    }

    #[test]
    fn console_log_matches_lines_in_order_and_strips_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        fs::write(
            &path,
            "\x1b[2Jboot\r\nkiln-install: start\nkiln-install: done\npartial",
        )
        .unwrap();
        let mut log = ConsoleLog::new(&path);
        let none = || None;
        let line = log
            .wait_for("t", &"kiln-install".into(), Duration::from_secs(1), none)
            .unwrap();
        assert_eq!(line, "kiln-install: start");
        // The second match arrived in the same read: it is not lost.
        let line = log
            .wait_for("t", &"kiln-install".into(), Duration::from_secs(1), none)
            .unwrap();
        assert_eq!(line, "kiln-install: done");
        // A partial line is not matched until its newline arrives.
        let err = log
            .wait_for("t", &"partial".into(), Duration::from_millis(200), none)
            .unwrap_err();
        assert!(matches!(err, QemuError::ConsoleTimeout { .. }));
        assert!(
            err.to_string()
                .contains("boot\nkiln-install: start\nkiln-install: done\npartial")
        );
        fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b" line\n")
            .unwrap();
        let re = Regex::new(r"^partial (\w+)$").unwrap();
        let line = log.wait_for_line("t", &re, Duration::from_secs(1)).unwrap();
        assert_eq!(line, "partial line");
    }

    #[test]
    fn uefi_firmware_boots_to_its_shell_and_quits_over_qmp() {
        let mut vm = Vm::builder()
            .name("ovmf-shell")
            .firmware(Firmware::Uefi)
            .memory_mib(256)
            .cpus(1)
            .spawn()
            .expect("qemu-system-x86 and ovmf must be installed");
        let line = vm
            .wait_for_console(
                Regex::new(r"UEFI Interactive Shell v[0-9.]+").unwrap(),
                Duration::from_secs(120),
            )
            .unwrap();
        assert!(line.starts_with("UEFI Interactive Shell"), "{line:?}");
        assert_eq!(vm.qmp("query-status").unwrap()["status"], "running");
        vm.quit().unwrap();
    }

    #[test]
    fn a_vm_that_exits_early_reports_qemu_output_and_console() {
        let mut vm = Vm::builder()
            .name("broken")
            .extra_args(["-no-such-option"])
            .spawn()
            .expect("qemu-system-x86_64 must be installed (Debian package qemu-system-x86)");
        let err = vm
            .wait_for_console("never", Duration::from_secs(30))
            .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, QemuError::ExitedBeforeMatch { .. }), "{msg}");
        assert!(msg.contains("no-such-option"), "{msg}");
    }
}
