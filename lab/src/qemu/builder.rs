//! [`VmBuilder`]: a machine described, turned into QEMU's command line (pure) and started.

use super::*;

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
    nice: Option<i32>,
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
            nice: None,
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
    /// Runs QEMU at this scheduling niceness: on a host emulating several machines, the one
    /// others depend on (a control plane) keeps the larger share of the cores.
    pub fn nice(mut self, nice: i32) -> Self {
        self.nice = Some(nice);
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

    /// Where a machine started with `work_dir` listens for QMP.
    pub fn qmp_path(work_dir: &Path) -> PathBuf {
        work_dir.join("qmp.sock")
    }

    pub(super) fn vars_path(work_dir: &Path) -> PathBuf {
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
                // The lab's boot networks are IPv4. Without this, a machine that iPXE hands
                // back to the firmware (an installed node booting from its disk) first sits
                // through minutes of OVMF's PXE and HTTP boot attempts over IPv6.
                "-fw_cfg",
                "name=opt/org.tianocore/IPv6Support,string=no",
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
                    isolated,
                } => {
                    let restrict = if *isolated { ",restrict=on" } else { "" };
                    let fwd: String = hostfwd.iter().map(|f| format!(",hostfwd={f}")).collect();
                    (format!("user,id=net{n}{restrict}{fwd}"), mac, bootindex)
                }
            };
            push(&[
                "-netdev",
                &netdev,
                "-device",
                &format!(
                    "virtio-net-pci,netdev=net{n},id=nic{n},mac={mac}{rom}{}",
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

    /// The program and arguments that start this machine (`nice` and `ip netns exec` first
    /// if needed).
    pub fn command_line(&self, work_dir: &Path) -> Vec<String> {
        let mut argv = Vec::new();
        if let Some(n) = self.nice {
            argv.extend(["nice".to_string(), "-n".into(), n.to_string()]);
        }
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
