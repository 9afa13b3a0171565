//! The install target: a whole block device (on the node) or a regular file (host tests, disk
//! images). Everything is written at byte offsets on the whole target, never through partition
//! devices, so the same code runs where the kernel parses no partition tables and before the
//! partition table exists at all.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Chunk size for streaming the image; large writes keep the device busy.
const CHUNK: usize = 4 << 20;
pub const MIB: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BlockDevError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(
        "{path} is in use by the system (a partition is mounted, or it is swap or part of a \
         device-mapper, LVM, RAID or multipath device); nothing was written"
    )]
    Busy { path: PathBuf },
    #[error(
        "image {image} is {image_len} bytes, larger than the {slot_len}-byte slot it must go into"
    )]
    ImageTooLarge {
        image: PathBuf,
        image_len: u64,
        slot_len: u64,
    },
    #[error("image {image}: sha256 is {actual}, expected {expected}")]
    ImageDigest {
        image: PathBuf,
        expected: String,
        actual: String,
    },
    #[error(
        "verifying {path} at offset {offset}: read back sha256 {actual}, wrote {expected} (the disk does not hold what was written)"
    )]
    ReadBack {
        path: PathBuf,
        offset: u64,
        expected: String,
        actual: String,
    },
}

/// An open install target.
#[derive(Debug)]
pub struct Target {
    path: PathBuf,
    file: File,
    size: u64,
    is_block_device: bool,
}

/// What a verified image write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenImage {
    pub bytes: u64,
    pub sha256: String,
}

impl Target {
    /// Opens a block device or an existing regular file for writing. A block device must
    /// first open exclusively (`O_EXCL`): the kernel refuses while it or a partition of it is
    /// mounted, or claimed by device-mapper, md or swap. The claim is not held: mkfs.vfat and
    /// mke2fs claim the device themselves while they format their partitions.
    pub fn open(path: &Path) -> Result<Target, BlockDevError> {
        use std::os::unix::fs::OpenOptionsExt;
        let io = |what| {
            move |source| BlockDevError::Io {
                what,
                path: path.to_path_buf(),
                source,
            }
        };
        let is_block_device = std::fs::metadata(path)
            .map_err(io("reading metadata of"))?
            .file_type()
            .is_block_device();
        if is_block_device {
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_EXCL)
                .open(path)
                .map_err(|source| {
                    if source.raw_os_error() == Some(libc::EBUSY) {
                        BlockDevError::Busy {
                            path: path.to_path_buf(),
                        }
                    } else {
                        io("opening")(source)
                    }
                })?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io("opening"))?;
        // Seeking to the end measures block devices and files alike.
        let size = file.seek(SeekFrom::End(0)).map_err(io("measuring"))?;
        Ok(Target {
            path: path.to_path_buf(),
            file,
            size,
            is_block_device,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn is_block_device(&self) -> bool {
        self.is_block_device
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// The block device's directory in sysfs (`/sys/devices/…/block/vda`); `None` for files.
    pub fn sysfs_dir(&self) -> Option<PathBuf> {
        use std::os::unix::fs::MetadataExt;
        if !self.is_block_device {
            return None;
        }
        let rdev = self.file.metadata().ok()?.rdev();
        std::fs::canonicalize(format!(
            "/sys/dev/block/{}:{}",
            nix::sys::stat::major(rdev),
            nix::sys::stat::minor(rdev)
        ))
        .ok()
    }

    /// The logical sector size the kernel reports for a block device; 512 for files.
    pub fn logical_sector_size(&self) -> u32 {
        self.sysfs_dir()
            .and_then(|d| std::fs::read_to_string(d.join("queue/logical_block_size")).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(512)
    }

    fn io(&self, what: &'static str) -> impl FnOnce(io::Error) -> BlockDevError + '_ {
        move |source| BlockDevError::Io {
            what,
            path: self.path.clone(),
            source,
        }
    }

    /// Writes zeros over `[offset, offset + len)`.
    pub fn zero(&self, offset: u64, len: u64) -> Result<(), BlockDevError> {
        let zeros = vec![0u8; CHUNK.min(len as usize)];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.file
                .write_all_at(&zeros[..n], offset + done)
                .map_err(self.io("zeroing"))?;
            done += n as u64;
        }
        Ok(())
    }

    /// Zeros the first and last MiB: the MBR, both GPT headers and tables, and any old
    /// boot code go, so nothing on the disk is bootable until the new table is written.
    pub fn wipe_partition_tables(&self) -> Result<(), BlockDevError> {
        let edge = MIB.min(self.size);
        self.zero(0, edge)?;
        self.zero(self.size - edge, edge)?;
        self.sync()
    }

    pub fn write_at(&self, offset: u64, bytes: &[u8]) -> Result<(), BlockDevError> {
        self.file
            .write_all_at(bytes, offset)
            .map_err(self.io("writing"))
    }

    pub fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, BlockDevError> {
        let mut buf = vec![0u8; len];
        self.file
            .read_exact_at(&mut buf, offset)
            .map_err(self.io("reading"))?;
        Ok(buf)
    }

    pub fn sync(&self) -> Result<(), BlockDevError> {
        self.file.sync_all().map_err(self.io("syncing"))
    }

    /// Streams `image` into `[offset, offset + slot_len)`, hashing on the way, then syncs,
    /// drops the cached pages and reads the region back: the digest of what the disk returns
    /// must equal the digest of what was read (and `expected_sha256`, when known).
    /// `progress(done, total)` is called after every chunk.
    pub fn write_image_verified(
        &self,
        image: &Path,
        offset: u64,
        slot_len: u64,
        expected_sha256: Option<&str>,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<WrittenImage, BlockDevError> {
        let img_io = |what| {
            move |source| BlockDevError::Io {
                what,
                path: image.to_path_buf(),
                source,
            }
        };
        let mut src = File::open(image).map_err(img_io("opening"))?;
        let total = src.metadata().map_err(img_io("reading metadata of"))?.len();
        if total > slot_len {
            return Err(BlockDevError::ImageTooLarge {
                image: image.to_path_buf(),
                image_len: total,
                slot_len,
            });
        }
        // Reading and hashing run on a second thread, overlapping the writes.
        let mut hasher = Sha256::new();
        let hashing = &mut hasher;
        let mut done = 0u64;
        pipelined(
            |buf| {
                let n = read_full(&mut src, buf).map_err(img_io("reading"))?;
                hashing.update(&buf[..n]);
                Ok(n)
            },
            |chunk| {
                self.write_at(offset + done, chunk)?;
                done += chunk.len() as u64;
                progress(done, total);
                Ok(())
            },
        )?;
        let sha256 = hex::encode(hasher.finalize());
        if let Some(expected) = expected_sha256
            && !expected.eq_ignore_ascii_case(&sha256)
        {
            return Err(BlockDevError::ImageDigest {
                image: image.to_path_buf(),
                expected: expected.to_string(),
                actual: sha256,
            });
        }
        self.sync()?;
        self.drop_cache(offset, done);
        let actual = self.sha256_range(offset, done)?;
        if actual != sha256 {
            return Err(BlockDevError::ReadBack {
                path: self.path.clone(),
                offset,
                expected: sha256,
                actual,
            });
        }
        Ok(WrittenImage {
            bytes: done,
            sha256,
        })
    }

    /// Asks the kernel to forget cached pages, so a read-back comes from the device.
    fn drop_cache(&self, offset: u64, len: u64) {
        use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};
        // Advisory: if it fails, the read-back still checks the page cache contents.
        let _ = posix_fadvise(
            &self.file,
            offset as i64,
            len as i64,
            PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        );
    }

    /// sha256 of `len` bytes at `offset` (reads overlap the hashing).
    pub fn sha256_range(&self, offset: u64, len: u64) -> Result<String, BlockDevError> {
        let mut hasher = Sha256::new();
        let mut pos = 0u64;
        pipelined(
            |buf| {
                let n = (len - pos).min(CHUNK as u64) as usize;
                self.file
                    .read_exact_at(&mut buf[..n], offset + pos)
                    .map_err(self.io("reading back"))?;
                pos += n as u64;
                Ok(n)
            },
            |chunk| {
                hasher.update(chunk);
                Ok(())
            },
        )?;
        Ok(hex::encode(hasher.finalize()))
    }
}

/// Runs `produce` (fills a chunk, returns its length, 0 at the end) on a second thread while
/// `consume` handles the chunks in order: IO on one side overlaps hashing on the other.
/// The first error of either side ends both.
fn pipelined(
    mut produce: impl FnMut(&mut [u8]) -> Result<usize, BlockDevError> + Send,
    mut consume: impl FnMut(&[u8]) -> Result<(), BlockDevError>,
) -> Result<(), BlockDevError> {
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Vec<u8>, BlockDevError>>(2);
        scope.spawn(move || {
            loop {
                let mut buf = vec![0u8; CHUNK];
                match produce(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        buf.truncate(n);
                        // A closed channel means the consumer failed: stop reading.
                        if tx.send(Ok(buf)).is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        break;
                    }
                }
            }
        });
        for chunk in rx {
            consume(&chunk?)?;
        }
        Ok(())
    })
}

/// Fills `buf` as far as the reader allows (short only at the end of the input).
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target_of(size: u64) -> (tempfile::TempDir, Target) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        File::create(&path).unwrap().set_len(size).unwrap();
        let t = Target::open(&path).unwrap();
        (dir, t)
    }

    #[test]
    fn wiping_zeros_both_ends_and_nothing_else() {
        let (_d, t) = target_of(4 * MIB);
        t.write_at(0, &vec![0xaa; (4 * MIB) as usize]).unwrap();
        t.wipe_partition_tables().unwrap();
        let all = t.read_at(0, (4 * MIB) as usize).unwrap();
        assert!(all[..MIB as usize].iter().all(|&b| b == 0));
        assert!(all[(3 * MIB) as usize..].iter().all(|&b| b == 0));
        assert!(
            all[MIB as usize..(3 * MIB) as usize]
                .iter()
                .all(|&b| b == 0xaa)
        );
    }

    #[test]
    fn image_is_written_at_its_offset_and_verified() {
        let (d, t) = target_of(16 * MIB);
        let image = d.path().join("image");
        let content: Vec<u8> = (0..(5 * MIB + 123)).map(|i| (i % 251) as u8).collect();
        std::fs::write(&image, &content).unwrap();
        let expected = hex::encode(Sha256::digest(&content));
        let mut calls = 0;
        let w = t
            .write_image_verified(&image, 2 * MIB, 8 * MIB, Some(&expected), |_, _| calls += 1)
            .unwrap();
        assert_eq!(w.sha256, expected);
        assert_eq!(w.bytes, content.len() as u64);
        assert_eq!(calls, 2);
        assert_eq!(t.read_at(2 * MIB, content.len()).unwrap(), content);
    }

    #[test]
    fn wrong_digest_and_oversized_images_are_refused() {
        let (d, t) = target_of(4 * MIB);
        let image = d.path().join("image");
        std::fs::write(&image, vec![1u8; 1000]).unwrap();
        let err = t
            .write_image_verified(&image, 0, MIB, Some("00"), |_, _| {})
            .unwrap_err();
        assert!(matches!(err, BlockDevError::ImageDigest { .. }), "{err}");
        let err = t
            .write_image_verified(&image, 0, 999, None, |_, _| {})
            .unwrap_err();
        assert!(
            err.to_string().contains("larger than the 999-byte slot"),
            "{err}"
        );
    }
}
