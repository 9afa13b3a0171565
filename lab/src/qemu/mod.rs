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

mod boot_split;
mod builder;
mod console;
mod hardware;
mod vm;

pub use boot_split::{BootSplit, stamped_marker};
pub use builder::VmBuilder;
pub use console::{ConsoleLog, ConsolePattern};
pub use hardware::{Accel, DirectBoot, Disk, DiskBus, Firmware, Nic};
pub use vm::Vm;

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
    use super::hardware::cpu_has_hw_virt;
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
            .nice(5)
            .netns("ns1")
            .extra_args(["-device", "isa-ipmi-kcs,bmc=bmc0"]);
        let line = shell_quote(&b.command_line(Path::new("/w")));
        let golden = "nice -n 5 ip netns exec ns1 qemu-system-x86_64 -name node1 -machine q35 \
            -accel tcg,thread=multi -cpu max -m 2048 -smp 2 -display none -vga none -nodefaults \
            -serial file:/w/serial.log -qmp unix:/w/qmp.sock,server=on,wait=off \
            -device virtio-rng-pci -no-reboot \
            -drive if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd \
            -drive if=pflash,format=raw,unit=1,file=/w/OVMF_VARS.fd \
            -fw_cfg name=opt/org.tianocore/IPv6Support,string=no \
            -drive if=none,id=disk0,format=raw,file=/d/disk.raw,cache=unsafe \
            -device virtio-blk-pci,drive=disk0,serial=SN1,bootindex=2 \
            -drive if=none,id=disk1,format=raw,file=/d/data.raw,cache=unsafe \
            -device ide-hd,drive=disk1,bus=ide.0,model=BIGDISK \
            -drive if=none,id=cd0,media=cdrom,readonly=on,file=/d/kiln.iso \
            -device ide-cd,drive=cd0,bus=ide.1,bootindex=1 \
            -netdev tap,id=net0,ifname=tap0,script=no,downscript=no \
            -device virtio-net-pci,netdev=net0,id=nic0,mac=52:54:00:00:00:01,bootindex=3 \
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
