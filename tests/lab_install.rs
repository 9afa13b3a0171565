//! End to end, on real firmware (OVMF and SeaBIOS) under QEMU: the `test` profile ISO installs
//! onto a blank virtual disk with `kiln lab install`, the installed disk boots until the node
//! agent is ready, the disk's GPT is exactly kiln's layout, and a second install onto the now
//! used disk without wipe consent refuses and leaves every byte as it was. On BIOS, a clone of
//! the installed disk (another kiln disk in the same machine, found first) is booted beside
//! it: the node runs from, and writes to, only the disk it was installed to. Then each node
//! goes through the A/B upgrade run of [`lab_support::upgrade`].

mod lab_support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kiln_lab::qemu::{Disk, Firmware, Nic, Vm};
use kiln_spec::layout::{self, PartitionRole, Slot};
use lab_support::{disk_fingerprint, lab_install, sgdisk_field, test_iso, text, upgrade};

/// `sgdisk -i N`: (name, type GUID).
fn sgdisk_partition(disk: &Path, n: u32) -> (String, String) {
    let guid = sgdisk_field(disk, n, "Partition GUID code:");
    (
        sgdisk_field(disk, n, "Partition name:")
            .trim_matches('\'')
            .to_string(),
        guid.split_whitespace().next().unwrap().to_string(),
    )
}

/// Boots a machine holding a clone of the installed `disk` (new GPT GUIDs, first in device
/// order and first in boot order) and `disk` itself: stage-1 must take the slot and
/// `KILN_STATE` from `disk`, the one named on the kernel command line, and leave the clone
/// untouched.
fn boots_only_from_its_own_disk(disk: &Path) {
    let dir = disk.parent().unwrap();
    let clone = dir.join("clone.raw");
    let out = Command::new("cp")
        .arg("--sparse=always")
        .arg(disk)
        .arg(&clone)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let out = Command::new("sgdisk")
        .arg("-G")
        .arg(&clone)
        .output()
        .unwrap();
    assert!(out.status.success(), "sgdisk -G: {}", text(&out));
    let (clone_before, disk_before) = (disk_fingerprint(&clone), disk_fingerprint(disk));

    let mut vm = Vm::builder()
        .name(format!("two-kiln-disks-{}", std::process::id()))
        .firmware(Firmware::Bios)
        .memory_mib(2048)
        .disk(Disk::new(&clone).bootindex(1).serial("clone"))
        .disk(Disk::new(disk).bootindex(2).serial("kiln-lab-disk"))
        .nic(Nic::User {
            mac: "52:54:00:4b:49:4c".into(),
            hostfwd: Vec::new(),
            bootindex: None,
            isolated: true,
        })
        .work_dir(dir.join("two-disks-vm"))
        .spawn()
        .expect("starting QEMU");
    let found = vm
        .wait_for_console("kiln-stage1: found KILN_A on", Duration::from_secs(600))
        .unwrap_or_else(|e| panic!("stage-1 finds the slot: {e}"));
    assert!(
        found.contains("on /dev/vdb"),
        "slot A taken from the wrong disk: {found}"
    );
    vm.wait_for_console("kiln-agent ready", Duration::from_secs(600))
        .unwrap_or_else(|e| panic!("the node boots with two kiln disks: {e}"));
    let _ = vm.quit();
    assert_eq!(
        disk_fingerprint(&clone),
        clone_before,
        "the other kiln disk was written"
    );
    assert_ne!(
        disk_fingerprint(disk),
        disk_before,
        "the node kept no state on its own disk"
    );
}

/// The lines of a console log a boot split is read from, for a failure message.
fn split_lines(console: &str) -> String {
    let text = std::fs::read(console).unwrap_or_default();
    String::from_utf8_lossy(&text)
        .lines()
        .filter(|l| {
            [
                "Run /init",
                "systemd[1]: systemd ",
                "kiln-install: ",
                "kiln-agent ready",
            ]
            .iter()
            .any(|k| l.contains(k))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn install_and_boot(firmware: &str) {
    let iso = test_iso();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");

    let out = lab_install(&iso, &disk, firmware, "4GiB");
    assert!(
        out.status.success(),
        "kiln lab install ({firmware}):\n{}",
        text(&out)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("summary is not JSON ({e}):\n{}", text(&out)));
    assert_eq!(summary["slot"], "A");
    assert_eq!(summary["firmware"], firmware);
    // The test profile names hosts kiln-{mac}; the lab NIC is 52:54:00:4b:49:4c.
    assert_eq!(summary["node"], "kiln-5254004b494c");
    // Where each boot's time went, read from its console: every step took some time.
    for (boot, console) in [
        ("live_split", "install_console"),
        ("installed_split", "installed_console"),
    ] {
        for step in ["firmware_loader", "kernel", "stage1", "userspace"] {
            let seconds = summary[boot][step].as_f64();
            assert!(
                seconds.is_some_and(|s| s > 0.0),
                "{boot}.{step} in {summary}\nthe console lines the split reads:\n{}",
                split_lines(summary[console].as_str().unwrap_or_default())
            );
        }
    }
    eprintln!("{firmware}: {}", serde_json::to_string(&summary).unwrap());

    // A clean GPT with exactly kiln's names and types, in order.
    let v = Command::new("sgdisk")
        .arg("-v")
        .arg(&disk)
        .output()
        .unwrap();
    assert!(
        text(&v).contains("No problems found"),
        "sgdisk -v:\n{}",
        text(&v)
    );
    let roles = [
        PartitionRole::BiosBoot,
        PartitionRole::Esp,
        PartitionRole::Slot(Slot::A),
        PartitionRole::Slot(Slot::B),
        PartitionRole::State,
    ];
    for (i, role) in roles.iter().enumerate() {
        assert_eq!(
            sgdisk_partition(&disk, i as u32 + 1),
            (role.gpt_name().to_string(), role.type_guid().to_string()),
            "partition {}",
            i + 1
        );
    }
    let table = kiln_installer::hardware::read_gpt(&disk, 512).expect("a GPT");
    let names: Vec<String> = table
        .partitions
        .iter()
        .map(|p| p.name.clone().unwrap_or_default())
        .collect();
    assert_eq!(names, layout::KILN_NAMES);
    let types: Vec<String> = table
        .partitions
        .iter()
        .map(|p| p.type_id.clone().unwrap_or_default())
        .collect();
    assert_eq!(types, roles.map(|r| r.type_guid().to_string()));
    let fs: Vec<Option<String>> = table
        .partitions
        .iter()
        .map(|p| p.filesystem.clone())
        .collect();
    assert_eq!(
        fs,
        [
            None,
            Some("vfat".into()),
            Some("squashfs".into()),
            None,
            Some("ext4".into())
        ]
    );

    // Again, without consent to erase: refused, and not one byte changed.
    let before = disk_fingerprint(&disk);
    let out = lab_install(&iso, &disk, firmware, "4GiB");
    let all = text(&out);
    assert!(!out.status.success(), "a second install succeeded:\n{all}");
    assert!(all.contains("refusing to erase"), "{all}");
    assert_eq!(
        disk_fingerprint(&disk),
        before,
        "the refused install changed the disk"
    );
    // systemd-boot counts boots by renaming entries on the ESP it booted from, so only a
    // BIOS boot leaves the clone it boots through byte-identical.
    if firmware == "bios" {
        boots_only_from_its_own_disk(&disk);
    }
    // Day 2 on the same disk: upgrades, power cuts (on UEFI), an image that cannot boot.
    let fw: Firmware = firmware.parse().unwrap();
    upgrade::upgrade_and_fall_back(&disk, fw, fw == Firmware::Uefi);
}

#[test]
fn iso_installs_and_boots_under_uefi() {
    install_and_boot("uefi");
}

#[test]
fn iso_installs_and_boots_under_bios() {
    install_and_boot("bios");
}
