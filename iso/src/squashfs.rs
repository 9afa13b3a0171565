//! The rootfs as a zstd squashfs (mksquashfs keeps owners, modes and extended attributes).

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use indicatif::ProgressBar;

use crate::error::{BuildError, Result};
use crate::progress::MKSQUASHFS;

/// Every file's modification time in the image: the same bytes for the same tree.
pub const FILE_TIME: u32 = 0;

pub fn mksquashfs_args(root: &Path, out: &Path) -> Vec<String> {
    vec![
        root.display().to_string(),
        out.display().to_string(),
        "-comp".into(),
        "zstd".into(),
        // Measured on the test profile's 286 MB tree (2 cores): level 10 takes 5.6 s for
        // 93 MiB, mksquashfs's default 15 takes 42-64 s for 88 MiB.
        "-Xcompression-level".into(),
        "10".into(),
        "-noappend".into(),
        // Same bytes for the same tree: no build time in the superblock, no owner surprises.
        "-mkfs-time".into(),
        "0".into(),
        "-all-time".into(),
        FILE_TIME.to_string(),
    ]
}

/// A Python bytecode cache's 16-byte header with the source modification time set to
/// [`FILE_TIME`], when it is a timestamp-checked cache (flags 0) of a source of `source_len`
/// bytes; `None` for hash-checked caches and caches of other sources.
pub fn restamped_pyc_header(header: [u8; 16], source_len: u64) -> Option<[u8; 16]> {
    let flags = u32::from_le_bytes(header[4..8].try_into().ok()?);
    let size = u32::from_le_bytes(header[12..16].try_into().ok()?);
    // Python compares the size modulo 2^32.
    if flags != 0 || u64::from(size) != source_len & 0xffff_ffff {
        return None;
    }
    let mut out = header;
    out[8..12].copy_from_slice(&FILE_TIME.to_le_bytes());
    Some(out)
}

/// The bytecode caches Debian compiled at install time (`__pycache__/NAME.TAG.pyc`) record
/// their source's modification time, which the image then sets to [`FILE_TIME`]: Python would
/// take every one as stale, compile each module again at every start and write new caches onto
/// the node, where a power cut can leave one torn (and the module unloadable). Each cache is
/// stamped with the image's time instead. Returns how many were.
pub fn restamp_bytecode(root: &Path) -> Result<usize> {
    let mut stamped = 0;
    for entry in walkdir::WalkDir::new(root) {
        let entry = entry.map_err(|e| BuildError::Io {
            what: format!("walking {}", root.display()),
            source: e.into(),
        })?;
        let path = entry.path();
        let (Some(name), Some(cache_dir)) =
            (path.file_name().and_then(|n| n.to_str()), path.parent())
        else {
            continue;
        };
        if !entry.file_type().is_file()
            || !name.ends_with(".pyc")
            || cache_dir.file_name().is_none_or(|d| d != "__pycache__")
        {
            continue;
        }
        let module = name.split('.').next().unwrap_or_default();
        let Some(source) = cache_dir.parent().map(|d| d.join(format!("{module}.py"))) else {
            continue;
        };
        let Ok(source_len) = std::fs::symlink_metadata(&source).map(|m| m.len()) else {
            continue;
        };
        let restamp = || -> std::io::Result<bool> {
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)?;
            let mut header = [0u8; 16];
            if file.read_exact(&mut header).is_err() {
                return Ok(false);
            }
            let Some(new) = restamped_pyc_header(header, source_len) else {
                return Ok(false);
            };
            file.seek(SeekFrom::Start(0))?;
            file.write_all(&new)?;
            Ok(true)
        };
        if restamp().map_err(BuildError::io(format!("restamping {}", path.display())))? {
            stamped += 1;
        }
    }
    Ok(stamped)
}

/// `(done, total)` from one redraw of mksquashfs's progress bar (`[===/  ] 1234/5678  21%`).
pub fn parse_progress(line: &str) -> Option<(u64, u64)> {
    let after_bar = line.rsplit_once(']')?.1;
    let (done, total) = after_bar.split_whitespace().next()?.split_once('/')?;
    Some((done.parse().ok()?, total.parse().ok()?))
}

pub fn mksquashfs(root: &Path, out: &Path, pb: &ProgressBar) -> Result<()> {
    let mut cmd = MKSQUASHFS.command();
    cmd.args(mksquashfs_args(root, out));
    MKSQUASHFS.run(cmd, "compressing the rootfs", |line| {
        if let Some((done, total)) = parse_progress(line) {
            pb.set_length(total);
            pb.set_position(done);
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines() {
        assert_eq!(
            parse_progress("[===========-    ] 1234/5678  21%"),
            Some((1234, 5678))
        );
        assert_eq!(
            parse_progress("[====================] 5678/5678 100%"),
            Some((5678, 5678))
        );
        assert_eq!(
            parse_progress("Parallel mksquashfs: Using 2 processors"),
            None
        );
        assert_eq!(parse_progress("[] x/y"), None);
    }

    fn header(flags: u32, mtime: u32, size: u32) -> [u8; 16] {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&[0xa7, 0x0d, 0x0d, 0x0a]);
        h[4..8].copy_from_slice(&flags.to_le_bytes());
        h[8..12].copy_from_slice(&mtime.to_le_bytes());
        h[12..16].copy_from_slice(&size.to_le_bytes());
        h
    }

    #[test]
    fn only_timestamp_caches_of_their_source_are_restamped() {
        assert_eq!(
            restamped_pyc_header(header(0, 1_708_975_269, 120), 120),
            Some(header(0, FILE_TIME, 120))
        );
        // Hash-checked (and unchecked) caches do not look at the time.
        assert_eq!(restamped_pyc_header(header(1, 0, 0), 120), None);
        assert_eq!(restamped_pyc_header(header(3, 0, 0), 120), None);
        // A cache of another version of the source stays stale.
        assert_eq!(restamped_pyc_header(header(0, 5, 121), 120), None);
        assert_eq!(
            restamped_pyc_header(header(0, 5, 4), (1 << 32) + 4),
            Some(header(0, FILE_TIME, 4))
        );
    }

    /// Python itself, after the image's times: it loads the restamped cache as it is.
    #[test]
    fn python_loads_a_restamped_cache_without_compiling_again() {
        let t = tempfile::tempdir().unwrap();
        let lib = t.path().join("usr/lib/python3/dist-packages");
        std::fs::create_dir_all(&lib).unwrap();
        let source = lib.join("kiln_probe.py");
        std::fs::write(&source, "VALUE = 42\n").unwrap();
        let python = |args: &[&str]| {
            let out = std::process::Command::new("python3")
                .args(args)
                .env("PYTHONPATH", &lib)
                .env_remove("PYTHONDONTWRITEBYTECODE")
                .output()
                .expect("python3 (Debian package python3)");
            assert!(out.status.success(), "{out:?}");
            String::from_utf8(out.stdout).unwrap()
        };
        python(&["-m", "compileall", "-q", lib.to_str().unwrap()]);
        // As mksquashfs -all-time leaves it.
        std::fs::File::options()
            .write(true)
            .open(&source)
            .unwrap()
            .set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(FILE_TIME.into()))
            .unwrap();
        assert_eq!(restamp_bytecode(t.path()).unwrap(), 1);
        let cache = std::fs::read_dir(lib.join("__pycache__"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let before = std::fs::read(&cache).unwrap();
        let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
        let ino = inode(&cache);
        let out = python(&["-c", "import kiln_probe; print(kiln_probe.VALUE)"]);
        assert_eq!(out.trim(), "42");
        // A stale cache would have been compiled again and replaced (a new inode).
        assert_eq!(inode(&cache), ino, "python wrote a new cache");
        assert_eq!(std::fs::read(&cache).unwrap(), before);
        assert_eq!(restamp_bytecode(t.path()).unwrap(), 1, "idempotent");
    }
}
