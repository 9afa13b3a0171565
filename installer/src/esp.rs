//! The EFI system partition: a FAT32 file system made at its byte offset on the target
//! (`mkfs.vfat --offset`), filled with mtools (no mounts needed). It carries systemd-boot for
//! UEFI machines, the GRUB menu for BIOS machines, and each slot's kernel and initrd, so both
//! loaders boot the same files.

use std::path::{Path, PathBuf};

use crate::tools::{self, ToolError};

/// systemd-boot (Debian `systemd-boot-efi`).
pub const SYSTEMD_BOOT_EFI: &str = "/usr/lib/systemd/boot/efi/systemd-bootx64.efi";
/// FAT volume label of the ESP.
pub const ESP_LABEL: &str = "KILN_ESP";

/// One file to put on the ESP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EspFile {
    /// Absolute path on the ESP, `/loader/loader.conf`.
    pub path: String,
    pub source: EspSource,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EspSource {
    Content(String),
    Copy(PathBuf),
}

/// Makes a FAT32 file system of `size` bytes at byte `offset` of `target`.
pub fn make_fat32(target: &Path, offset: u64, size: u64, volume_id: u32) -> Result<(), ToolError> {
    tools::run(
        tools::MKFS_VFAT,
        "formatting the EFI system partition",
        [
            "-F".to_string(),
            "32".into(),
            "-n".into(),
            ESP_LABEL.into(),
            "-i".into(),
            format!("{volume_id:08x}"),
            "-s".into(),
            sectors_per_cluster(size).to_string(),
            // Sectors of 512 bytes; the whole-device target needs -I.
            format!("--offset={}", offset / 512),
            "-I".into(),
            target.display().to_string(),
            (size / 1024).to_string(),
        ],
    )
    .map(drop)
}

/// The largest cluster (up to 4 KiB) that still gives FAT32 its minimum of 65525 clusters
/// (with margin); mkfs.vfat's own choice makes a small ESP that firmware reads as FAT16.
fn sectors_per_cluster(size: u64) -> u64 {
    let sectors = size / 512;
    [8, 4, 2, 1]
        .into_iter()
        .find(|spc| sectors / spc >= 66_000)
        .unwrap_or(1)
}

/// Copies `files` onto the FAT file system at `offset`, creating their directories.
pub fn populate(
    target: &Path,
    offset: u64,
    files: &[EspFile],
    staging: &Path,
) -> Result<(), EspError> {
    let image = tools::mtools_image(target, offset);
    let mut dirs: Vec<String> = Vec::new();
    for f in files {
        let mut dir = String::new();
        for part in f
            .path
            .trim_start_matches('/')
            .split('/')
            .rev()
            .skip(1)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
        {
            dir = format!("{dir}/{part}");
            if !dirs.contains(&dir) {
                dirs.push(dir.clone());
            }
        }
    }
    for dir in &dirs {
        tools::run(
            tools::MMD,
            "creating a directory on the ESP",
            ["-i", &image, &format!("::{dir}")],
        )?;
    }
    for (n, f) in files.iter().enumerate() {
        let src = match &f.source {
            EspSource::Copy(p) => {
                if !p.exists() {
                    return Err(EspError::MissingSource(p.clone()));
                }
                p.clone()
            }
            EspSource::Content(text) => {
                let p = staging.join(format!("esp-{n}"));
                std::fs::write(&p, text).map_err(|source| EspError::Staging {
                    path: p.clone(),
                    source,
                })?;
                p
            }
        };
        tools::run(
            tools::MCOPY,
            "copying a file onto the ESP",
            [
                "-o".to_string(),
                "-i".into(),
                image.clone(),
                src.display().to_string(),
                format!("::{}", f.path),
            ],
        )?;
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum EspError {
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error("writing {path}: {source}")]
    Staging {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{0} does not exist (systemd-boot comes from the Debian package systemd-boot-efi; kernel and initrd from the install medium)"
    )]
    MissingSource(PathBuf),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_esps_get_small_clusters_for_fat32() {
        assert_eq!(sectors_per_cluster(64 << 20), 1);
        assert_eq!(sectors_per_cluster(256 << 20), 4);
        assert_eq!(sectors_per_cluster(512 << 20), 8);
    }
}
