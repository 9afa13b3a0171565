//! End to end, on real firmware (OVMF and SeaBIOS) under QEMU: the `test` profile ISO installs
//! onto a blank virtual disk with `kiln lab install`, the installed disk boots until the node
//! agent is ready, the disk's GPT is exactly kiln's layout, and a second install onto the now
//! used disk without wipe consent refuses and leaves every byte as it was.

mod lab_support;

use std::path::Path;
use std::process::Command;

use kiln_spec::layout::{self, PartitionRole, Slot};
use lab_support::{lab_install, sgdisk_field, test_iso, text};

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

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

fn install_and_boot(firmware: &str) {
    let iso = test_iso();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");

    let out = lab_install(&iso, &disk, firmware);
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
    let before = sha256(&disk);
    let out = lab_install(&iso, &disk, firmware);
    let all = text(&out);
    assert!(!out.status.success(), "a second install succeeded:\n{all}");
    assert!(all.contains("refusing to erase"), "{all}");
    assert_eq!(
        sha256(&disk),
        before,
        "the refused install changed the disk"
    );
}

#[test]
fn iso_installs_and_boots_under_uefi() {
    install_and_boot("uefi");
}

#[test]
fn iso_installs_and_boots_under_bios() {
    install_and_boot("bios");
}
