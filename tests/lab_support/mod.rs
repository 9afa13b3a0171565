//! Shared by the QEMU lab tests: the `test` profile ISO fixture, `kiln lab install`, and
//! reading a disk image's GPT with `sgdisk`.

#![allow(dead_code)] // each test file uses its own subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};

pub const KILN: &str = env!("CARGO_BIN_EXE_kiln");

/// The `test` profile ISO, built once per test process (kiln's build cache makes a rebuild of
/// unchanged inputs fast) into `$KILN_CACHE/lab-install-iso`.
pub fn test_iso() -> PathBuf {
    static ISO: OnceLock<Mutex<Option<PathBuf>>> = OnceLock::new();
    let mut iso = ISO.get_or_init(|| Mutex::new(None)).lock().unwrap();
    if let Some(p) = iso.as_ref() {
        return p.clone();
    }
    let cache = kiln_spec::paths::cache_dir();
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

/// `kiln lab install` of `iso` onto `disk` (4 GiB when created), with a JSON summary.
pub fn lab_install(iso: &Path, disk: &Path, firmware: &str) -> Output {
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

/// A fingerprint of a (sparse) disk image that changes with any byte of it: its data extents
/// (`SEEK_DATA`/`SEEK_HOLE`) and the sha256 of what they hold; holes read as zeros. Hashing
/// only what is allocated keeps multi-GiB sparse disks cheap to compare.
pub fn disk_fingerprint(path: &Path) -> String {
    use nix::unistd::{Whence, lseek};
    use sha2::Digest;
    use std::io::{Read, Seek, SeekFrom};
    use std::os::fd::AsFd;
    let mut f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len();
    let mut hasher = sha2::Sha256::new();
    let mut pos = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    while pos < len {
        let Ok(start) = lseek(f.as_fd(), pos as i64, Whence::SeekData) else {
            break; // nothing but holes from here on
        };
        let end = lseek(f.as_fd(), start, Whence::SeekHole).unwrap() as u64;
        let start = start as u64;
        hasher.update(format!("{start}-{end};"));
        f.seek(SeekFrom::Start(start)).unwrap();
        let mut left = end - start;
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let n = f.read(&mut buf[..want]).unwrap();
            assert!(n > 0, "{} shrank while hashing", path.display());
            hasher.update(&buf[..n]);
            left -= n as u64;
        }
        pos = end;
    }
    format!("{len}:{}", hex::encode(hasher.finalize()))
}

/// A command's stdout and stderr, for assertion messages.
pub fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

/// One field of `sgdisk -i N`, e.g. `"Partition name:"` → `'KILN_A'`.
pub fn sgdisk_field(disk: &Path, n: u32, prefix: &str) -> String {
    let out = Command::new("sgdisk")
        .arg(format!("-i{n}"))
        .arg(disk)
        .output()
        .expect("sgdisk (gdisk) must be installed");
    let t = String::from_utf8_lossy(&out.stdout).into_owned();
    t.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("sgdisk -i{n}: no {prefix:?} in\n{t}"))
        .trim()
        .to_string()
}
