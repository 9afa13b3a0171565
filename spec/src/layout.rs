//! The disk layout every kiln disk carries, shared by the image builder (raw disk images)
//! and the installer. GPT partition names are the contract: nothing finds a partition by
//! device name or number.
//!
//! ```text
//! LBA 0      protective MBR
//! LBA 1..    primary GPT (128 entries)
//! 1 MiB      BIOSBOOT    1 MiB   BIOS boot partition (GRUB core image on BIOS machines)
//!            ESP                 FAT32: kernels, initrds, boot loader entries
//!            KILN_A              raw squashfs root image, slot A
//!            KILN_B              raw squashfs root image, slot B
//!            KILN_STATE          ext4: /etc and /var overlays, agent state, node config
//!            (free)              left for data: Ceph OSDs, VM disks
//! end        backup GPT
//! ```

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::appliance::InstallSpec;
use crate::size::{ByteSize, MIB};

pub const BIOSBOOT: &str = "BIOSBOOT";
pub const ESP: &str = "ESP";
pub const KILN_A: &str = "KILN_A";
pub const KILN_B: &str = "KILN_B";
pub const KILN_STATE: &str = "KILN_STATE";
/// Where the running system finds the file system under its writable layer: `KILN_STATE` on
/// an installed node, a tmpfs on a live or netbooted one. A real file system, unlike `/`.
pub const STATE_MOUNT: &str = "/run/kiln/rw";

/// Every GPT name kiln writes, in disk order.
pub const KILN_NAMES: [&str; 5] = [BIOSBOOT, ESP, KILN_A, KILN_B, KILN_STATE];

/// GPT partition type GUIDs (upper case, as `sgdisk -i` prints them).
pub mod type_guid {
    /// BIOS boot partition: GRUB embeds its core image here on BIOS machines.
    pub const BIOS_BOOT: &str = "21686148-6449-6E6F-744E-656564454649";
    /// EFI System Partition.
    pub const EFI_SYSTEM: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
    /// Linux filesystem data. Used for the slots and the state partition: no generator
    /// auto-mounts this type, so only kiln's initramfs decides what is mounted.
    pub const LINUX_DATA: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
}

/// Partitions start and end on 1 MiB boundaries.
pub const ALIGNMENT: u64 = MIB;
pub const BIOSBOOT_SIZE: u64 = MIB;
/// Bytes of one GPT partition entry array (128 entries of 128 bytes).
const GPT_ENTRIES_BYTES: u64 = 128 * 128;

/// The kernel argument that tells kiln's initramfs which slot to boot: `kiln.slot=A`.
pub const SLOT_KERNEL_ARG: &str = "kiln.slot";
/// Kernel argument naming the GPT disk GUID of the installed disk: stage-1 mounts the slot and
/// `KILN_STATE` from that disk only, whatever other kiln disks the machine holds.
pub const DISK_KERNEL_ARG: &str = "kiln.disk";

/// One of the two OS slots.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub fn gpt_name(self) -> &'static str {
        match self {
            Slot::A => KILN_A,
            Slot::B => KILN_B,
        }
    }

    pub fn letter(self) -> &'static str {
        match self {
            Slot::A => "A",
            Slot::B => "B",
        }
    }

    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    /// Directory on the ESP holding this slot's kernel and initrd: `/kiln/a`.
    pub fn esp_dir(self) -> String {
        format!("/kiln/{}", self.letter().to_ascii_lowercase())
    }

    /// `kiln.slot=A`.
    pub fn kernel_arg(self) -> String {
        format!("{SLOT_KERNEL_ARG}={}", self.letter())
    }
}

/// What a partition is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum PartitionRole {
    BiosBoot,
    Esp,
    Slot(Slot),
    State,
}

/// What the partition is formatted with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Filesystem {
    /// Raw (BIOS boot partition).
    None,
    Vfat,
    /// A squashfs image written as is.
    Squashfs,
    Ext4,
}

/// Sizes the layout is computed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LayoutSizes {
    pub esp: ByteSize,
    pub slot: ByteSize,
    pub state: ByteSize,
}

impl LayoutSizes {
    pub fn from_spec(install: &InstallSpec) -> LayoutSizes {
        LayoutSizes {
            esp: install.esp_size,
            slot: install.slot_size,
            state: install.state_size,
        }
    }

    fn in_order(&self) -> [(PartitionRole, u64); 5] {
        [
            (PartitionRole::BiosBoot, BIOSBOOT_SIZE),
            (PartitionRole::Esp, self.esp.0),
            (PartitionRole::Slot(Slot::A), self.slot.0),
            (PartitionRole::Slot(Slot::B), self.slot.0),
            (PartitionRole::State, self.state.0),
        ]
    }
}

impl PartitionRole {
    pub fn gpt_name(self) -> &'static str {
        match self {
            PartitionRole::BiosBoot => BIOSBOOT,
            PartitionRole::Esp => ESP,
            PartitionRole::Slot(s) => s.gpt_name(),
            PartitionRole::State => KILN_STATE,
        }
    }

    pub fn type_guid(self) -> &'static str {
        match self {
            PartitionRole::BiosBoot => type_guid::BIOS_BOOT,
            PartitionRole::Esp => type_guid::EFI_SYSTEM,
            PartitionRole::Slot(_) | PartitionRole::State => type_guid::LINUX_DATA,
        }
    }

    pub fn filesystem(self) -> Filesystem {
        match self {
            PartitionRole::BiosBoot => Filesystem::None,
            PartitionRole::Esp => Filesystem::Vfat,
            PartitionRole::Slot(_) => Filesystem::Squashfs,
            PartitionRole::State => Filesystem::Ext4,
        }
    }
}

/// One partition of the layout, in logical sectors of the disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlannedPartition {
    /// GPT entry number, from 1.
    pub number: u32,
    pub name: String,
    pub role: PartitionRole,
    pub type_guid: String,
    pub first_lba: u64,
    /// Inclusive, as in the GPT.
    pub last_lba: u64,
    pub size_bytes: u64,
    pub filesystem: Filesystem,
}

impl PlannedPartition {
    pub fn offset_bytes(&self, sector_size: u32) -> u64 {
        self.first_lba * u64::from(sector_size)
    }
}

/// The whole layout for one disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Layout {
    pub logical_sector_size: u32,
    pub disk_bytes: u64,
    pub partitions: Vec<PlannedPartition>,
    /// Bytes after the last kiln partition left for data.
    pub free_bytes: u64,
}

impl Layout {
    pub fn partition(&self, role: PartitionRole) -> &PlannedPartition {
        self.partitions
            .iter()
            .find(|p| p.role == role)
            .expect("a layout has every role")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("the disk has {have} bytes but the layout needs {needed}")]
    TooSmall { needed: u64, have: u64 },
    #[error("logical sector size {0} is not supported (512 or 4096)")]
    SectorSize(u32),
}

fn gpt_overhead_lbas(sector: u64) -> u64 {
    GPT_ENTRIES_BYTES.div_ceil(sector) + 1
}

/// The smallest disk the layout fits on, in bytes (backup GPT included).
pub fn required_disk_bytes(sizes: &LayoutSizes, logical_sector_size: u32) -> u64 {
    let sector = u64::from(logical_sector_size);
    let parts: u64 = sizes
        .in_order()
        .iter()
        .map(|(_, s)| s.next_multiple_of(ALIGNMENT))
        .sum();
    ALIGNMENT + parts + gpt_overhead_lbas(sector) * sector
}

/// The layout for a disk of `disk_bytes` with `logical_sector_size` sectors.
pub fn compute(
    disk_bytes: u64,
    logical_sector_size: u32,
    sizes: &LayoutSizes,
) -> Result<Layout, LayoutError> {
    if !matches!(logical_sector_size, 512 | 4096) {
        return Err(LayoutError::SectorSize(logical_sector_size));
    }
    let needed = required_disk_bytes(sizes, logical_sector_size);
    if disk_bytes < needed {
        return Err(LayoutError::TooSmall {
            needed,
            have: disk_bytes,
        });
    }
    let sector = u64::from(logical_sector_size);
    let total_lbas = disk_bytes / sector;
    let last_usable = total_lbas - 1 - gpt_overhead_lbas(sector);
    let mut next = ALIGNMENT / sector;
    let mut partitions = Vec::new();
    for (i, (role, size)) in sizes.in_order().into_iter().enumerate() {
        let size = size.next_multiple_of(ALIGNMENT);
        let first = next;
        let last = first + size / sector - 1;
        partitions.push(PlannedPartition {
            number: i as u32 + 1,
            name: role.gpt_name().to_string(),
            role,
            type_guid: role.type_guid().to_string(),
            first_lba: first,
            last_lba: last,
            size_bytes: size,
            filesystem: role.filesystem(),
        });
        next = last + 1;
    }
    Ok(Layout {
        logical_sector_size,
        disk_bytes,
        partitions,
        free_bytes: (last_usable + 1).saturating_sub(next) * sector,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes() -> LayoutSizes {
        LayoutSizes {
            esp: ByteSize::mib(256),
            slot: ByteSize::gib(1),
            state: ByteSize::mib(512),
        }
    }

    #[test]
    fn partitions_are_aligned_contiguous_and_named() {
        let l = compute(8 << 30, 512, &sizes()).unwrap();
        let names: Vec<&str> = l.partitions.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, KILN_NAMES);
        assert_eq!(l.partitions[0].first_lba, 2048);
        assert_eq!(l.partitions[0].last_lba, 4095);
        for w in l.partitions.windows(2) {
            assert_eq!(w[0].last_lba + 1, w[1].first_lba);
        }
        for p in &l.partitions {
            assert_eq!(p.first_lba * 512 % MIB, 0, "{} unaligned", p.name);
            assert_eq!((p.last_lba - p.first_lba + 1) * 512, p.size_bytes);
        }
        let state = l.partition(PartitionRole::State);
        // The backup GPT takes the last 33 sectors: 32 of entries and its header.
        assert_eq!(
            l.free_bytes,
            (8u64 << 30) - (state.last_lba + 1) * 512 - 33 * 512
        );
    }

    #[test]
    fn required_size_is_exactly_enough() {
        for sector in [512, 4096] {
            let need = required_disk_bytes(&sizes(), sector);
            let l = compute(need, sector, &sizes()).unwrap();
            assert_eq!(l.free_bytes, 0);
            assert_eq!(
                compute(need - u64::from(sector), sector, &sizes()),
                Err(LayoutError::TooSmall {
                    needed: need,
                    have: need - u64::from(sector)
                })
            );
        }
    }

    #[test]
    fn four_k_sectors_use_four_k_lbas() {
        let l = compute(8 << 30, 4096, &sizes()).unwrap();
        assert_eq!(l.partitions[0].first_lba, 256);
        assert_eq!(l.partitions[1].first_lba, 512);
    }
}
