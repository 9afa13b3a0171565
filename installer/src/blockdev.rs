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
        "verifying {path}: the byte at offset {offset} reads back other than it was written \
         (the disk does not hold what was written)"
    )]
    ReadBack { path: PathBuf, offset: u64 },
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

    /// Streams `image` into `[offset, offset + slot_len)` and proves the disk holds it: one
    /// thread reads and hashes the image, this one writes it, a third waits for each written
    /// chunk to reach the device, drops its cached pages and compares what the device returns
    /// with what was written. The three overlap, so verifying costs about what writing does
    /// rather than a second pass after it; the image is hashed once. Then the device is synced;
    /// the digest must equal `expected_sha256`, when known. `progress(done, total)` is called
    /// after every chunk written.
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
        let mut hasher = Sha256::new();
        let hashing = &mut hasher;
        let mut done = 0u64;
        std::thread::scope(|scope| {
            use std::sync::mpsc::sync_channel;
            let (free_tx, free_rx) = sync_channel::<Vec<u8>>(IN_FLIGHT);
            for _ in 0..IN_FLIGHT {
                let _ = free_tx.send(vec![0; CHUNK]);
            }
            let (read_tx, read_rx) = sync_channel(IN_FLIGHT);
            let (written_tx, written_rx) = sync_channel::<(Vec<u8>, u64)>(IN_FLIGHT);
            // Each stage ends when the one feeding it goes: the first error stops all three.
            scope.spawn(move || {
                for mut buf in free_rx {
                    let read = read_full(&mut src, &mut buf).map(|n| {
                        buf.truncate(n);
                        hashing.update(&buf);
                        buf
                    });
                    let last = !matches!(&read, Ok(buf) if !buf.is_empty());
                    if read_tx.send(read.map_err(img_io("reading"))).is_err() || last {
                        break;
                    }
                }
            });
            let verifier = scope.spawn(move || {
                let mut back = vec![0; CHUNK];
                for (buf, at) in written_rx {
                    let back = &mut back[..buf.len()];
                    self.read_from_device(at, back)?;
                    if let Some(i) = first_difference(&buf, back) {
                        return Err(BlockDevError::ReadBack {
                            path: self.path.clone(),
                            offset: at + i as u64,
                        });
                    }
                    let mut buf = buf;
                    buf.resize(CHUNK, 0);
                    let _ = free_tx.send(buf);
                }
                Ok(())
            });
            for read in read_rx {
                let buf = read?;
                if buf.is_empty() {
                    break;
                }
                let at = offset + done;
                self.write_at(at, &buf)?;
                done += buf.len() as u64;
                progress(done, total);
                if written_tx.send((buf, at)).is_err() {
                    break;
                }
            }
            drop(written_tx);
            verifier
                .join()
                .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })?;
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
        Ok(WrittenImage {
            bytes: done,
            sha256,
        })
    }

    /// Reads `[at, at + buf.len())` as the device holds it: waits for the range's writeback
    /// to finish, then drops its pages from the cache so the read goes to the device.
    fn read_from_device(&self, at: u64, buf: &mut [u8]) -> Result<(), BlockDevError> {
        use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};
        write_back(&self.file, at, buf.len() as u64).map_err(self.io("writing back"))?;
        // Advisory: if it fails, the read still checks the page cache contents.
        let _ = posix_fadvise(
            &self.file,
            at as i64,
            buf.len() as i64,
            PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        );
        self.file
            .read_exact_at(buf, at)
            .map_err(self.io("reading back"))
    }
}

/// Chunks between the reader and the verifier: enough to keep the device writing while
/// earlier chunks are read back.
const IN_FLIGHT: usize = 6;

/// The first offset at which `written` and `read` differ.
fn first_difference(written: &[u8], read: &[u8]) -> Option<usize> {
    if written == read {
        return None;
    }
    Some(
        written
            .iter()
            .zip(read)
            .position(|(a, b)| a != b)
            .unwrap_or(written.len().min(read.len())),
    )
}

/// Starts writeback of `[at, at + len)` of `file` and waits until it has reached the device
/// (sync_file_range(2), which nix does not wrap). It does not flush the device's own cache:
/// the final sync does that once for the whole image.
#[allow(unsafe_code)]
fn write_back(file: &File, at: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // Integers only: the descriptor is open for as long as `file` is borrowed.
    let r = unsafe { libc::sync_file_range(file.as_raw_fd(), at as i64, len as i64, flags) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
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
    fn a_read_back_names_the_first_byte_that_differs() {
        assert_eq!(first_difference(b"abcd", b"abcd"), None);
        assert_eq!(first_difference(b"abcd", b"abxd"), Some(2));
        assert_eq!(first_difference(b"abcd", b"abc"), Some(3));
        assert_eq!(first_difference(b"", b""), None);
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
