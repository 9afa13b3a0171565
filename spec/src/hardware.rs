//! A frozen snapshot of a machine as the installer sees it. The installer collects it from
//! sysfs; the planner is a pure function of (spec, snapshot), so every planning decision can
//! be replayed from a JSON file.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use crate::appliance::Transport;
use crate::layout;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HardwareInventory {
    /// How the machine booted the live system.
    pub firmware: Firmware,
    pub disks: Vec<Disk>,
    #[serde(default)]
    pub nics: Vec<Nic>,
    #[serde(default)]
    pub memory_bytes: u64,
    #[serde(default)]
    pub cpus: u32,
    /// Set when the live system was booted from a local medium that could not be traced to a
    /// physical disk (say, behind device-mapper or multipath): why. The planner then picks no
    /// disk on its own, since it cannot rule out the medium.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_medium_unresolved: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    Uefi,
    Bios,
}

impl Firmware {
    pub fn as_str(self) -> &'static str {
        match self {
            Firmware::Uefi => "uefi",
            Firmware::Bios => "bios",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Disk {
    /// Kernel device node, `/dev/vda`, `/dev/nvme0n1`.
    pub dev_path: String,
    /// Its `/dev/disk/by-id/…` links, sorted.
    #[serde(default)]
    pub by_id: Vec<String>,
    pub size_bytes: u64,
    #[serde(default = "default_sector")]
    pub logical_sector_size: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wwn: Option<String>,
    #[serde(default)]
    pub rotational: bool,
    #[serde(default)]
    pub removable: bool,
    pub transport: Transport,
    #[serde(default)]
    pub read_only: bool,
    /// The live system was booted from this disk (the USB stick or the ISO's disk).
    #[serde(default)]
    pub holds_boot_medium: bool,
    /// The partition table found on the disk, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition_table: Option<PartitionTable>,
    /// Every signature libblkid (and kiln's own look at both GPT headers and the MBR) found on
    /// the whole disk: file systems, RAID and volume-manager members, partition tables, or data
    /// nothing recognised.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signatures: Vec<Signature>,
    /// Why the disk could not be read; such a disk counts as in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unreadable: Option<String>,
}

/// One signature on a disk, as `wipefs --no-act` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Signature {
    /// libblkid's name (`ext4`, `ceph_bluestore`, `linux_raid_member`, `gpt`, …), or
    /// [`UNRECOGNISED_DATA`].
    #[serde(rename = "type")]
    pub kind: String,
    /// Byte offset on the disk.
    pub offset: u64,
    /// libblkid's usage class (`filesystem`, `raid`, `crypto`, `partition-table`, `other`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

/// The signature kind for bytes that are not zero where a blank disk has zeros, when nothing
/// recognised them.
pub const UNRECOGNISED_DATA: &str = "unrecognised data";
/// libblkid's usage class of partition tables.
pub const PARTITION_TABLE_USAGE: &str = "partition-table";

impl Signature {
    pub fn is_partition_table(&self) -> bool {
        self.usage.as_deref() == Some(PARTITION_TABLE_USAGE)
    }
}

fn default_sector() -> u32 {
    512
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PartitionTableKind {
    Gpt,
    Dos,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PartitionTable {
    pub kind: PartitionTableKind,
    #[serde(default)]
    pub partitions: Vec<ExistingPartition>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExistingPartition {
    pub number: u32,
    /// GPT partition name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// GPT type GUID (upper case) or DOS type byte as `0x83`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub type_id: Option<String>,
    pub size_bytes: u64,
    /// File system type found in it (`ext4`, `vfat`, `crypto_LUKS`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filesystem: Option<String>,
    /// File system label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Nic {
    pub name: String,
    /// `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
}

impl Disk {
    /// Readable, and nothing on it: no partition table, no signature, no unrecognised data.
    /// Anything else is in use.
    pub fn is_blank(&self) -> bool {
        self.unreadable.is_none() && self.partition_table.is_none() && self.signatures.is_empty()
    }

    /// Carries a GPT whose partitions all have kiln's names (an earlier kiln install) and
    /// nothing else on the whole disk but partition tables.
    pub fn carries_kiln_layout(&self) -> bool {
        if self.unreadable.is_some() || !self.signatures.iter().all(Signature::is_partition_table) {
            return false;
        }
        match &self.partition_table {
            Some(t) if t.kind == PartitionTableKind::Gpt && !t.partitions.is_empty() => {
                t.partitions.iter().all(|p| {
                    p.name
                        .as_deref()
                        .is_some_and(|n| layout::KILN_NAMES.contains(&n))
                })
            }
            _ => false,
        }
    }

    /// What is on the disk, for messages: `["GPT with 2 partitions: 1 EFI (vfat, 512.0 MiB), 2 data (ext4, 9.5 GiB)"]`.
    pub fn contents(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(why) = &self.unreadable {
            out.push(format!("unreadable ({why}), so it counts as in use"));
        }
        // Partition tables are described below with their partitions.
        let table_found = self.partition_table.is_some();
        for sig in &self.signatures {
            if table_found && sig.is_partition_table() {
                continue;
            }
            let label = sig
                .label
                .as_deref()
                .map(|l| format!(" labelled {l:?}"))
                .unwrap_or_default();
            out.push(format!("{}{label} at offset {:#x}", sig.kind, sig.offset));
        }
        if let Some(t) = &self.partition_table {
            let kind = match t.kind {
                PartitionTableKind::Gpt => "GPT",
                PartitionTableKind::Dos => "DOS partition table",
            };
            let parts: Vec<String> = t
                .partitions
                .iter()
                .map(|p| {
                    let mut what = vec![];
                    if let Some(fs) = &p.filesystem {
                        what.push(fs.clone());
                    }
                    what.push(crate::size::ByteSize(p.size_bytes).human());
                    format!(
                        "{} {} ({})",
                        p.number,
                        p.name
                            .as_deref()
                            .or(p.label.as_deref())
                            .unwrap_or("unnamed"),
                        what.join(", ")
                    )
                })
                .collect();
            if parts.is_empty() {
                out.push(format!("{kind} without partitions"));
            } else {
                out.push(format!(
                    "{kind} with {} partition(s): {}",
                    parts.len(),
                    parts.join(", ")
                ));
            }
        }
        out
    }
}

impl HardwareInventory {
    pub fn from_json(text: &str) -> Result<HardwareInventory, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// The MAC address `{mac}` in host name patterns stands for: the first Ethernet
    /// interface (`en*`, `eth*`) by name, else the first interface by name.
    pub fn primary_mac(&self) -> Option<[u8; 6]> {
        let mut nics: Vec<&Nic> = self.nics.iter().collect();
        nics.sort_by(|a, b| a.name.cmp(&b.name));
        let ethernet = |n: &&&Nic| n.name.starts_with("en") || n.name.starts_with("eth");
        nics.iter()
            .find(ethernet)
            .or(nics.first())
            .and_then(|n| crate::inventory::parse_mac(&n.mac))
    }
}
