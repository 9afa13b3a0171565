//! `kiln install` on the host against disk image files: dry runs planned from a saved
//! hardware inventory write nothing, a saved inventory cannot drive a real install, bad input
//! fails clearly without writing, a real run (`--disk-image`, the image probed live) writes a
//! valid disk and reports progress as JSON lines, a crash point leaves no table.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const KILN: &str = env!("CARGO_BIN_EXE_kiln");
/// Big enough for the small layout the test spec asks for.
const DISK: u64 = 288 << 20;

struct Node {
    dir: tempfile::TempDir,
    disk: PathBuf,
    spec: PathBuf,
    inventory: PathBuf,
    image: PathBuf,
}

/// A sparse disk holding `fill` in its first bytes, a spec with small partitions,
/// and an inventory naming the disk file.
fn node(disk_bytes: u64, fill: &[u8], extra_disk_json: &str) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    std::fs::write(&disk, fill).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&disk)
        .unwrap()
        .set_len(disk_bytes)
        .unwrap();
    let spec = dir.path().join("kiln.yaml");
    std::fs::write(
        &spec,
        "apiVersion: kiln.dev/v1alpha1\nkind: Appliance\nmetadata:\n  name: cli-test\n\
         spec:\n  profile: test\n  hostname: cli-node\n  install:\n    espSize: 64MiB\n\
         \x20   slotSize: 64MiB\n    stateSize: 64MiB\n",
    )
    .unwrap();
    let inventory = dir.path().join("hw.json");
    std::fs::write(
        &inventory,
        format!(
            r#"{{"firmware":"uefi","disks":[{{"devPath":"{}","sizeBytes":{disk_bytes},
            "model":"QEMU HARDDISK","serial":"disk-1","transport":"virtio"{}}}{extra_disk_json}],
            "nics":[{{"name":"ens3","mac":"52:54:00:ab:cd:ef"}}]}}"#,
            disk.display(),
            if fill.is_empty() {
                ""
            } else {
                r#","partitionTable":{"kind":"gpt","partitions":[{"number":1,"name":"DATA","sizeBytes":1048576}]}"#
            }
        ),
    )
    .unwrap();
    let live = dir.path().join("live");
    std::fs::create_dir_all(&live).unwrap();
    let image = live.join("rootfs.squashfs");
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/os-release"), "ID=kiln\n").unwrap();
    let out = Command::new("mksquashfs")
        .args([&root, &image])
        .args(["-noappend", "-quiet", "-no-progress"])
        .output()
        .expect("mksquashfs (squashfs-tools) must be installed");
    assert!(out.status.success(), "{out:?}");
    std::fs::write(live.join("vmlinuz"), b"kernel").unwrap();
    std::fs::write(live.join("initrd.img"), b"initrd").unwrap();
    Node {
        dir,
        disk,
        spec,
        inventory,
        image,
    }
}

/// `kiln install --disk-image DISK`: planned from the image file itself, written for real.
fn install(n: &Node, extra: &[&str], env: &[(&str, &str)]) -> Output {
    kiln_install(
        n,
        &[OsStr::new("--disk-image"), n.disk.as_os_str()],
        extra,
        env,
    )
}

/// `kiln install --inventory SNAPSHOT`: planned from the saved hardware inventory.
fn install_from_snapshot(n: &Node, extra: &[&str]) -> Output {
    kiln_install(
        n,
        &[OsStr::new("--inventory"), n.inventory.as_os_str()],
        extra,
        &[],
    )
}

fn kiln_install(n: &Node, source: &[&OsStr], extra: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(KILN)
        .arg("install")
        .arg("--spec")
        .arg(&n.spec)
        .args(source)
        .arg("--image")
        .arg(&n.image)
        .args(extra)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

#[test]
fn dry_run_prints_the_plan_and_writes_nothing() {
    let n = node(DISK, b"", "");
    let before = sha256(&n.disk);
    let out = install_from_snapshot(&n, &["--dry-run"]);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(
        all.contains(&format!("install to {}", n.disk.display())),
        "{all}"
    );
    assert!(all.contains("host name cli-node"), "{all}");
    assert!(all.contains("write the GPT on"), "{all}");
    assert!(!all.contains("kiln-install: [wipe]"), "{all}");
    assert_eq!(sha256(&n.disk), before, "dry run changed the disk");

    let out = install(&n, &["--dry-run", "--output", "json"], &[]);
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["disk"]["devPath"], n.disk.display().to_string());
    assert_eq!(plan["bootLoader"]["kind"], "systemd-boot");
    assert_eq!(sha256(&n.disk), before, "dry run changed the disk");
}

#[test]
fn a_saved_inventory_drives_only_dry_runs() {
    let n = node(DISK, b"", "");
    let before = sha256(&n.disk);
    let out = install_from_snapshot(&n, &[]);
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(all.contains("may only drive --dry-run"), "{all}");
    assert!(all.contains("nothing was written"), "{all}");
    assert_eq!(sha256(&n.disk), before);
}

#[test]
fn install_writes_the_disk_with_json_progress() {
    let n = node(DISK, b"", "");
    let out = install(&n, &["--progress", "json", "--output", "json"], &[]);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("{\"event\""))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let steps: Vec<&str> = events
        .iter()
        .filter(|e| e["event"] == "step-done")
        .map(|e| e["step"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        ["wipe", "slot-write", "esp", "state", "partition-table"]
    );
    assert_eq!(events.last().unwrap()["event"], "done");
    assert!(all.contains("kiln-install: done"), "{all}");
    let v = Command::new("sgdisk")
        .arg("-v")
        .arg(&n.disk)
        .output()
        .unwrap();
    assert!(text(&v).contains("No problems found"), "{}", text(&v));
}

#[test]
fn a_disk_with_data_is_refused_without_consent_and_erased_with_it() {
    let n = node(DISK, b"precious data", "");
    let before = sha256(&n.disk);
    let out = install(&n, &[], &[]);
    let all = text(&out);
    assert!(!out.status.success());
    assert!(all.contains("refusing to erase"), "{all}");
    assert!(all.contains("unrecognised data at offset 0x0"), "{all}");
    assert!(all.contains("--wipe="), "{all}");
    assert!(all.contains("kiln-install: failed"), "{all}");
    assert_eq!(sha256(&n.disk), before);

    let out = install(&n, &[&format!("--wipe={}", n.disk.display())], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert_ne!(sha256(&n.disk), before);
}

#[test]
fn too_small_and_unmatched_disks_fail_clearly_and_write_nothing() {
    let n = node(DISK / 2, b"", "");
    let before = sha256(&n.disk);
    let out = install(&n, &[], &[]);
    let all = text(&out);
    assert!(!out.status.success());
    assert!(all.contains("is too small"), "{all}");
    assert!(all.contains("nothing was written"), "{all}");
    assert_eq!(sha256(&n.disk), before);

    let n = node(DISK, b"", "");
    let before = sha256(&n.disk);
    let out = install_from_snapshot(&n, &["--dry-run", "--disk-serial", "S3Z9*"]);
    let all = text(&out);
    assert!(!out.status.success());
    assert!(all.contains("no disk matches the install rules"), "{all}");
    assert!(
        all.contains(r#"serial "disk-1" does not match "S3Z9*""#),
        "{all}"
    );
    assert_eq!(sha256(&n.disk), before);
}

#[test]
fn a_crash_point_leaves_the_disk_unbootable_and_says_so() {
    let n = node(DISK, b"", "");
    let out = install(&n, &[], &[("KILN_FAILPOINT", "after-esp")]);
    let all = text(&out);
    assert!(!out.status.success());
    assert!(all.contains("failpoint after-esp reached"), "{all}");
    assert!(
        all.contains("left without a partition table and will not boot"),
        "{all}"
    );
    let bytes = std::fs::read(&n.disk).unwrap();
    assert!(bytes[..1 << 20].iter().all(|&b| b == 0));
    assert!(bytes[bytes.len() - (1 << 20)..].iter().all(|&b| b == 0));
    let _ = &n.dir;
}

/// A loop device over `n.disk`, detached when dropped.
struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).output();
        let _ = Command::new("losetup").args(["-d", &self.0]).output();
    }
}

#[test]
fn a_mounted_disk_is_refused_at_write_time_even_with_consent() {
    let n = node(DISK, b"", "");
    let ok = |cmd: &mut Command| {
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{cmd:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let files = n.dir.path().join("files");
    std::fs::create_dir(&files).unwrap();
    std::fs::write(files.join("keep.txt"), b"still here").unwrap();
    ok(Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-d"])
        .arg(&files)
        .arg(&n.disk));
    let before = sha256(&n.disk);
    // Read-only, so unmounting leaves every byte as it was.
    let dev = Loop(ok(Command::new("losetup")
        .args(["--find", "--show", "--read-only"])
        .arg(&n.disk)));
    let mnt = n.dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    ok(Command::new("mount")
        .args(["-o", "ro,noload"])
        .arg(&dev.0)
        .arg(&mnt));

    let out = kiln_install(
        &n,
        &[OsStr::new("--disk-image"), OsStr::new(&dev.0)],
        &[&format!("--wipe={}", dev.0)],
        &[],
    );
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(all.contains("is in use by the system"), "{all}");
    assert!(all.contains("nothing was written"), "{all}");
    assert_eq!(std::fs::read(mnt.join("keep.txt")).unwrap(), b"still here");
    drop(dev);
    assert_eq!(
        sha256(&n.disk),
        before,
        "the refused install changed the disk"
    );
}
