//! End to end, on real firmware (OVMF and SeaBIOS) under QEMU: the `test` profile ISO installs
//! onto a blank virtual disk with `kiln lab install`, the installed disk boots until the node
//! agent is ready, the disk's GPT is exactly kiln's layout, and a second install onto the now
//! used disk without wipe consent refuses and leaves every byte as it was.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};

use kiln_spec::layout::{self, PartitionRole, Slot};

const KILN: &str = env!("CARGO_BIN_EXE_kiln");

/// The `test` profile ISO, built once per test process (kiln's build cache makes a rebuild of
/// unchanged inputs fast) into `$KILN_CACHE/lab-install-iso`.
fn test_iso() -> PathBuf {
    static ISO: OnceLock<Mutex<Option<PathBuf>>> = OnceLock::new();
    let mut iso = ISO.get_or_init(|| Mutex::new(None)).lock().unwrap();
    if let Some(p) = iso.as_ref() {
        return p.clone();
    }
    let cache = std::env::var_os("KILN_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/kiln"));
    let out = cache.join("lab-install-iso");
    let status = Command::new(KILN)
        .args(["build", "--profile", "test", "--out"])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "kiln build --profile test failed");
    let path = out.join("kiln.iso");
    *iso = Some(path.clone());
    path
}

fn lab_install(iso: &Path, disk: &Path, firmware: &str) -> Output {
    Command::new(KILN)
        .args(["lab", "install", "--output", "json", "--firmware", firmware])
        .arg("--iso")
        .arg(iso)
        .arg("--disk")
        .arg(disk)
        .args(["--disk-size", "4GiB", "--timeout", "12m"])
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

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
    let out = Command::new("sgdisk")
        .arg(format!("-i{n}"))
        .arg(disk)
        .output()
        .expect("sgdisk (gdisk) must be installed");
    let t = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |prefix: &str| {
        t.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("sgdisk -i{n}: no {prefix:?} in\n{t}"))
            .trim()
            .to_string()
    };
    let guid = field("Partition GUID code:");
    (
        field("Partition name:").trim_matches('\'').to_string(),
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
