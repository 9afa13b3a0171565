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

/// A fingerprint of a (sparse) disk image that changes with any byte of it and with nothing
/// else: the sha256 of the offset and bytes of every non-zero 4 KiB block. The extent map itself
/// is not part of it: on ext4 a range the guest zeroed (an unwritten extent) turns from hole to
/// data in `SEEK_DATA` once its pages are merely read. Visiting only allocated extents keeps
/// multi-GiB sparse disks cheap to compare.
pub fn disk_fingerprint(path: &Path) -> String {
    use nix::unistd::{Whence, lseek};
    use sha2::Digest;
    use std::io::{Read, Seek, SeekFrom};
    use std::os::fd::AsFd;
    const BLOCK: usize = 4096;
    let mut f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len();
    let mut hasher = sha2::Sha256::new();
    let mut pos = 0u64;
    let mut buf = vec![0u8; BLOCK];
    while pos < len {
        let Ok(start) = lseek(f.as_fd(), pos as i64, Whence::SeekData) else {
            break; // nothing but holes from here on
        };
        let end = lseek(f.as_fd(), start, Whence::SeekHole).unwrap() as u64;
        // Extents start on filesystem block boundaries; align down anyway so blocks are the same
        // whatever the map looks like.
        let mut block = start as u64 / BLOCK as u64 * BLOCK as u64;
        f.seek(SeekFrom::Start(block)).unwrap();
        while block < end {
            let want = (len - block).min(BLOCK as u64) as usize;
            f.read_exact(&mut buf[..want])
                .unwrap_or_else(|e| panic!("reading {} at {block}: {e}", path.display()));
            if buf[..want].iter().any(|&b| b != 0) {
                hasher.update(block.to_le_bytes());
                hasher.update(&buf[..want]);
            }
            block += want as u64;
        }
        pos = end.max(block);
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
