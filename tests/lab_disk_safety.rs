//! End to end on real firmware (SeaBIOS) under QEMU: the `test` profile ISO boots its
//! unattended install on a machine whose every disk holds something made by the real tool for
//! it (LUKS, XFS, Btrfs, bcache, NTFS, a Ceph BlueStore OSD, a GPT
//! whose only header left is the backup, bytes nothing recognises) plus a disk the VM cannot
//! read. The live system's own libblkid must see each of them, the install must refuse with a
//! message naming the disk and what is on it, and every disk must be byte-identical afterwards.

mod lab_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kiln_lab::qemu::{Disk, Firmware, Nic, Vm};
use lab_support::{disk_fingerprint, test_iso};

/// Every disk is big enough for the test profile's layout (2.9 GiB), so only its contents
/// stop kiln.
const DISK_BYTES: u64 = 3 << 30;
/// Generous: a live boot under software emulation takes well under a minute.
const TIMEOUT: Duration = Duration::from_secs(600);

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (scripts/install-deps.sh installs it)"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sparse(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(format!("{name}.raw"));
    std::fs::File::create(&path)
        .unwrap()
        .set_len(DISK_BYTES)
        .unwrap();
    path
}

/// A Ceph BlueStore OSD made by `ceph-osd --mkfs` (Debian's ceph-osd) on `block`.
fn bluestore(dir: &Path, block: &Path) {
    let data = dir.join("osd-data");
    std::fs::create_dir_all(&data).unwrap();
    let conf = dir.join("ceph.conf");
    std::fs::write(
        &conf,
        format!(
            "[global]\nfsid = 6b696c6e-0000-4000-8000-00000000cef0\n\
             auth_cluster_required = none\nauth_service_required = none\n\
             auth_client_required = none\n[osd]\nosd_objectstore = bluestore\n\
             bluestore_block_path = {}\nbluestore_block_create = false\n",
            block.display()
        ),
    )
    .unwrap();
    run(Command::new("ceph-osd")
        .args(["--cluster", "ceph", "-i", "0", "--mkfs", "--no-mon-config"])
        .arg("-c")
        .arg(&conf)
        .arg("--osd-data")
        .arg(&data)
        .args(["--osd-uuid", "6b696c6e-0000-4000-8000-0000000051d0"]));
}

#[test]
fn unattended_install_refuses_every_disk_that_holds_anything() {
    let iso = test_iso();
    let work = tempfile::Builder::new()
        .prefix("kiln-disk-safety-")
        .tempdir()
        .unwrap();
    let dir = work.path();

    // (serial, disk, what the live system must report for it)
    let mut disks: Vec<(&str, PathBuf, String)> = Vec::new();
    let mut add = |serial: &'static str, expect: &str, make: &dyn Fn(&Path)| {
        let disk = sparse(dir, serial);
        make(&disk);
        disks.push((serial, disk, expect.to_string()));
    };
    let key = dir.join("luks.key");
    std::fs::write(&key, b"not a real secret").unwrap();
    add("luks", "crypto_LUKS at offset 0x0", &|d| {
        run(Command::new("cryptsetup")
            .args(["luksFormat", "-q", "--pbkdf", "pbkdf2"])
            .args(["--pbkdf-force-iterations", "1000", "--key-file"])
            .arg(&key)
            .arg(d));
    });
    add("xfs", "xfs labelled \"projects\" at offset 0x0", &|d| {
        run(Command::new("mkfs.xfs")
            .args(["-q", "-L", "projects"])
            .arg(d));
    });
    add("btrfs", "btrfs at offset 0x10040", &|d| {
        run(Command::new("mkfs.btrfs").arg("-q").arg(d));
    });
    add("bcache", "bcache at offset 0x1018", &|d| {
        run(Command::new("make-bcache").arg("-B").arg(d));
    });
    add("ntfs", "ntfs at offset 0x3", &|d| {
        run(Command::new("mkntfs").args(["-Q", "-F", "-q"]).arg(d));
    });
    add(
        "backup-gpt",
        // The table is read from the backup header.
        "GPT with 1 partition(s): 1 data (64.0 MiB)",
        &|d| {
            run(Command::new("sgdisk")
                .args(["-n", "1:2048:+64M", "-c", "1:data"])
                .arg(d));
            // The protective MBR, the primary header and its entries: only the backup is left.
            use std::os::unix::fs::FileExt;
            let f = std::fs::File::options().write(true).open(d).unwrap();
            f.write_all_at(&[0u8; 34 * 512], 0).unwrap();
        },
    );
    add("data", "unrecognised data at offset 0x100000", &|d| {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::options().write(true).open(d).unwrap();
        f.write_all_at(b"a database page, not a file system", 1 << 20)
            .unwrap();
    });
    add("bluestore", "ceph_bluestore at offset 0x0", &|d| {
        bluestore(dir, d)
    });
    // A disk whose every read fails (QEMU's blkdebug injects EIO).
    let unreadable = sparse(dir, "unreadable");
    let blkdebug = dir.join("blkdebug.conf");
    std::fs::write(
        &blkdebug,
        "[inject-error]\nevent = \"read_aio\"\nerrno = \"5\"\n",
    )
    .unwrap();

    let before: Vec<String> = disks
        .iter()
        .map(|(_, d, _)| disk_fingerprint(d))
        .chain([disk_fingerprint(&unreadable)])
        .collect();

    let mut builder = Vm::builder()
        .name(format!("disk-safety-{}", std::process::id()))
        .firmware(Firmware::Bios)
        .memory_mib(2048)
        .cdrom(&iso, Some(1))
        .nic(Nic::User {
            mac: "52:54:00:4b:49:4d".into(),
            hostfwd: Vec::new(),
            bootindex: None,
            isolated: true,
        })
        .work_dir(dir.join("vm"))
        .no_reboot(true);
    for (serial, disk, _) in &disks {
        builder = builder.disk(Disk::new(disk).serial(*serial));
    }
    builder = builder.extra_args([
        "-drive".to_string(),
        format!(
            "if=none,id=bad0,format=raw,file=blkdebug:{}:{}",
            blkdebug.display(),
            unreadable.display()
        ),
        "-device".to_string(),
        "virtio-blk-pci,drive=bad0,serial=unreadable".to_string(),
    ]);
    let mut vm = builder.spawn().expect("starting QEMU");

    let failed = vm
        .wait_for_console("kiln-install: failed", TIMEOUT)
        .unwrap_or_else(|e| panic!("the unattended install must stop: {e}"));
    let console = std::fs::read_to_string(vm.serial_log()).unwrap();
    let line_of = |serial: &str| {
        console
            .lines()
            .find(|l| l.contains("kiln-install: disk ") && l.contains(&format!("serial {serial})")))
            .unwrap_or_else(|| panic!("no line for disk {serial}:\n{}", vm.console_tail(80)))
            .to_string()
    };
    let mut wrong = Vec::new();
    let expected = disks
        .iter()
        .map(|(serial, _, expect)| (*serial, expect.as_str()))
        .chain([("unreadable", "unreadable (")]);
    for (serial, expect) in expected {
        let line = line_of(serial);
        eprintln!("{}", line.trim());
        if !line.contains(&format!("in use: {expect}")) && !line.contains(&format!("; {expect}")) {
            wrong.push(format!("disk {serial}: expected {expect:?} in\n  {line}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // The planner picked a disk (the first in device order) and refused to erase it, naming it
    // and what is on it.
    assert!(
        failed.contains("refusing to erase /dev/vd") && failed.contains("unattended install"),
        "{failed}"
    );
    assert!(
        !console.contains("kiln-install: [wipe]"),
        "a write step started"
    );
    let _ = vm.quit();

    let after: Vec<String> = disks
        .iter()
        .map(|(_, d, _)| disk_fingerprint(d))
        .chain([disk_fingerprint(&unreadable)])
        .collect();
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        let name = disks.get(i).map_or("unreadable", |d| d.0);
        assert_eq!(b, a, "disk {name} changed");
    }
}
