//! GRUB for BIOS machines without `grub-install`: `grub-mkimage` builds core.img, which goes
//! into the `BIOSBOOT` partition, and GRUB's boot.img becomes the boot code of the protective
//! MBR. The two patches below are what `grub-bios-setup` does for an embedded core.img: tell
//! boot.img where core.img starts, and tell core.img's first sector (diskboot) where the rest
//! of it is.

use std::path::{Path, PathBuf};

use crate::tools::{self, ToolError};

/// GRUB's i386-pc module directory (Debian `grub-pc-bin`).
pub const GRUB_I386_PC_DIR: &str = "/usr/lib/grub/i386-pc";
const SECTOR: usize = 512;
/// boot.img: LBA of core.img's first sector.
const KERNEL_SECTOR: usize = 0x5c;
/// boot.img: drive number; 0xff = use the drive the BIOS booted from.
const BOOT_DRIVE: usize = 0x64;
/// boot.img: a jump that trusts the BIOS drive number; NOPed for hard disks, as
/// grub-bios-setup does, because some BIOSes pass 0x00/0x01 when booting from 0x80.
const DRIVE_CHECK: usize = 0x66;
/// The MBR boot code area ends where the disk signature and partition records begin.
pub const BOOTCODE_LEN: usize = 440;
/// diskboot.img's first blocklist entry: {start: u64, len: u16, segment: u16}, at the end
/// of the sector.
const BLOCKLIST: usize = SECTOR - 12;
/// Real-mode segment where diskboot loads the rest of core.img (0x800 + one sector).
const CORE_SEGMENT: u16 = 0x820;

/// Modules built into core.img: enough to read a GPT disk's FAT ESP, keep kiln's boot
/// counters in its `grubenv` and boot Linux from it.
const MODULES: &[&str] = &[
    "biosdisk",
    "part_gpt",
    "fat",
    "search",
    "search_fs_uuid",
    "normal",
    "configfile",
    "linux",
    "echo",
    "test",
    "serial",
    "terminal",
    "boot",
    // grubenv: the slots' generations and boot counters.
    "loadenv",
];

#[derive(Debug, thiserror::Error)]
pub enum BiosBootError {
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is {len} bytes; GRUB's boot.img is exactly 512")]
    BadBootImg { path: PathBuf, len: usize },
    #[error("core.img is {len} bytes, larger than the {room}-byte BIOSBOOT partition")]
    CoreTooLarge { len: usize, room: u64 },
}

/// The early configuration built into core.img: find the ESP by its FAT volume id and read
/// `grub/grub.cfg` from it.
pub fn early_config(esp_volume_id: u32) -> String {
    let (hi, lo) = (esp_volume_id >> 16, esp_volume_id & 0xffff);
    format!("search --no-floppy --fs-uuid --set=root {hi:04x}-{lo:04x}\nset prefix=($root)/grub\n")
}

/// Builds core.img with `grub-mkimage`.
pub fn build_core_img(work_dir: &Path, esp_volume_id: u32) -> Result<Vec<u8>, BiosBootError> {
    let cfg = work_dir.join("early.cfg");
    let out = work_dir.join("core.img");
    std::fs::write(&cfg, early_config(esp_volume_id)).map_err(|source| BiosBootError::Read {
        path: cfg.clone(),
        source,
    })?;
    let mut args: Vec<String> = vec![
        "-O".into(),
        "i386-pc".into(),
        "-d".into(),
        GRUB_I386_PC_DIR.into(),
        "-c".into(),
        cfg.display().to_string(),
        "-p".into(),
        "/grub".into(),
        "-o".into(),
        out.display().to_string(),
    ];
    args.extend(MODULES.iter().map(|m| m.to_string()));
    tools::run(tools::GRUB_MKIMAGE, "building GRUB's core image", &args)?;
    std::fs::read(&out).map_err(|source| BiosBootError::Read { path: out, source })
}

/// Reads GRUB's boot.img.
pub fn read_boot_img() -> Result<Vec<u8>, BiosBootError> {
    let path = Path::new(GRUB_I386_PC_DIR).join("boot.img");
    let bytes = std::fs::read(&path).map_err(|source| BiosBootError::Read {
        path: path.clone(),
        source,
    })?;
    if bytes.len() != SECTOR {
        return Err(BiosBootError::BadBootImg {
            path,
            len: bytes.len(),
        });
    }
    Ok(bytes)
}

/// The MBR boot code: boot.img pointed at core.img's first sector.
pub fn mbr_bootcode(boot_img: &[u8], core_lba: u64) -> [u8; BOOTCODE_LEN] {
    let mut code = [0u8; BOOTCODE_LEN];
    code.copy_from_slice(&boot_img[..BOOTCODE_LEN]);
    code[KERNEL_SECTOR..KERNEL_SECTOR + 8].copy_from_slice(&core_lba.to_le_bytes());
    code[BOOT_DRIVE] = 0xff;
    code[DRIVE_CHECK..DRIVE_CHECK + 2].copy_from_slice(&[0x90, 0x90]);
    code
}

/// core.img padded to whole sectors, with diskboot's blocklist pointing at the sectors that
/// follow it on the disk. Fails when it does not fit into `room` bytes.
pub fn place_core_img(core: &[u8], core_lba: u64, room: u64) -> Result<Vec<u8>, BiosBootError> {
    let sectors = core.len().div_ceil(SECTOR);
    let mut img = core.to_vec();
    img.resize(sectors * SECTOR, 0);
    if img.len() as u64 > room || sectors - 1 > u16::MAX as usize {
        return Err(BiosBootError::CoreTooLarge {
            len: img.len(),
            room,
        });
    }
    img[BLOCKLIST..BLOCKLIST + 8].copy_from_slice(&(core_lba + 1).to_le_bytes());
    img[BLOCKLIST + 8..BLOCKLIST + 10].copy_from_slice(&((sectors - 1) as u16).to_le_bytes());
    img[BLOCKLIST + 10..BLOCKLIST + 12].copy_from_slice(&CORE_SEGMENT.to_le_bytes());
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_code_points_at_core_and_keeps_the_rest() {
        let boot: Vec<u8> = (0..512).map(|i| i as u8).collect();
        let code = mbr_bootcode(&boot, 0x0102_0304);
        assert_eq!(&code[0x5c..0x64], &[4, 3, 2, 1, 0, 0, 0, 0]);
        assert_eq!(code[0x64], 0xff);
        assert_eq!(&code[0x66..0x68], &[0x90, 0x90]);
        assert_eq!(&code[..0x5c], &boot[..0x5c]);
        assert_eq!(&code[0x68..], &boot[0x68..440]);
    }

    #[test]
    fn core_blocklist_covers_the_following_sectors() {
        let core = vec![0xeeu8; 3 * 512 + 7];
        let img = place_core_img(&core, 34, 1 << 20).unwrap();
        assert_eq!(img.len(), 4 * 512);
        let bl = &img[500..512];
        assert_eq!(u64::from_le_bytes(bl[..8].try_into().unwrap()), 35);
        assert_eq!(u16::from_le_bytes(bl[8..10].try_into().unwrap()), 3);
        assert_eq!(u16::from_le_bytes(bl[10..12].try_into().unwrap()), 0x820);
        assert!(matches!(
            place_core_img(&core, 34, 1024),
            Err(BiosBootError::CoreTooLarge { .. })
        ));
    }

    #[test]
    fn early_config_searches_the_esp_volume_id() {
        assert_eq!(
            early_config(0x4b1c_0001),
            "search --no-floppy --fs-uuid --set=root 4b1c-0001\nset prefix=($root)/grub\n"
        );
    }
}
