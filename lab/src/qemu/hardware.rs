//! What a machine is made of: firmware, accelerator, disks, NICs, direct kernel boot.

use super::*;

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

pub(super) fn cpu_has_hw_virt(cpuinfo: &str) -> bool {
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
        /// Nothing the guest sends leaves QEMU (`restrict=on`): no host, no outside world.
        /// QEMU's own DHCP and the `hostfwd` entries still work.
        isolated: bool,
    },
}

/// The MAC of `kiln lab install`'s node: the `test` profile names the host after it
/// (`kiln-5254004b494c`), and each later boot of the installed disk keeps that identity.
const LAB_MAC: &str = "52:54:00:4b:49:4c";

impl Nic {
    /// The lab node's NIC: QEMU's user-mode network, isolated (nothing it sends leaves QEMU),
    /// with [`LAB_MAC`] and the `hostfwd` entries given.
    pub fn lab(hostfwd: Vec<String>) -> Nic {
        Nic::User {
            mac: LAB_MAC.into(),
            hostfwd,
            bootindex: None,
            isolated: true,
        }
    }
}

/// Direct kernel boot, bypassing the firmware's boot devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectBoot {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub append: String,
}
