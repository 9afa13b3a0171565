//! Collecting the [`HardwareInventory`] the planner decides from: disks from `/sys/block`
//! (size, sectors, model, serial, WWN, rotational, removable, read-only, transport from the
//! sysfs path), their `/dev/disk/by-id` links when udev runs, what is on them (partition
//! table, file system signatures, read directly from the device: no udev or blkid needed),
//! which one holds the boot medium, NICs, memory and CPUs.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::Path;

use kiln_spec::hardware::{
    Disk, ExistingPartition, Firmware, HardwareInventory, Nic, PartitionTable, PartitionTableKind,
    Transport,
};

/// Where stage-1 mounts the live medium (ISO or USB stick).
pub const MEDIUM_DIR: &str = "/run/kiln/medium";
/// A file naming the boot device, written by whoever knows it better than the mount table.
pub const BOOT_DEVICE_FILE: &str = "/run/kiln/boot-device";

/// Reads the machine. Disks that cannot be opened are still listed, without contents.
pub fn collect() -> HardwareInventory {
    let boot_disk = boot_medium_disk();
    let by_id = by_id_links(Path::new("/dev/disk/by-id"));
    let mut disks = Vec::new();
    let mut names: Vec<String> = fs::read_dir("/sys/block")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    for name in names {
        if let Some(d) = read_disk(&name, &by_id, boot_disk.as_deref()) {
            disks.push(d);
        }
    }
    HardwareInventory {
        firmware: if Path::new("/sys/firmware/efi").exists() {
            Firmware::Uefi
        } else {
            Firmware::Bios
        },
        disks,
        nics: read_nics(),
        memory_bytes: fs::read_to_string("/proc/meminfo")
            .map(|m| mem_total(&m))
            .unwrap_or(0),
        cpus: std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
    }
}

/// Kernel block devices that are never install targets.
fn is_virtual_or_optical(name: &str) -> bool {
    ["loop", "ram", "zram", "sr", "fd", "dm-", "md", "nbd"]
        .iter()
        .any(|p| name.starts_with(p))
}

fn sys_attr(dir: &Path, attr: &str) -> Option<String> {
    fs::read_to_string(dir.join(attr))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

fn read_disk(
    name: &str,
    by_id: &BTreeMap<String, Vec<String>>,
    boot: Option<&str>,
) -> Option<Disk> {
    if is_virtual_or_optical(name) {
        return None;
    }
    let sys = Path::new("/sys/block").join(name);
    let sectors: u64 = sys_attr(&sys, "size")?.parse().ok()?;
    if sectors == 0 {
        return None;
    }
    let flag = |attr| sys_attr(&sys, attr).as_deref() == Some("1");
    let real = fs::canonicalize(&sys).unwrap_or_else(|_| sys.clone());
    let dev_path = format!("/dev/{name}");
    let logical_sector_size = sys_attr(&sys, "queue/logical_block_size")
        .and_then(|s| s.parse().ok())
        .unwrap_or(512);
    let serial = sys_attr(&sys, "serial")
        .or_else(|| sys_attr(&sys, "device/serial"))
        .or_else(|| {
            fs::read(sys.join("device/vpd_pg80"))
                .ok()
                .and_then(|b| serial_from_vpd80(&b))
        });
    let wwn = sys_attr(&sys, "wwid")
        .or_else(|| sys_attr(&sys, "device/wwid"))
        .and_then(|w| normalize_wwid(&w));
    let (partition_table, signature) = read_contents(Path::new(&dev_path), logical_sector_size);
    Some(Disk {
        by_id: by_id.get(&dev_path).cloned().unwrap_or_default(),
        size_bytes: sectors * 512,
        logical_sector_size,
        model: sys_attr(&sys, "device/model"),
        serial,
        wwn,
        rotational: flag("queue/rotational"),
        removable: flag("removable"),
        transport: transport_from_sysfs_path(&real.to_string_lossy()),
        read_only: flag("ro"),
        holds_boot_medium: boot == Some(name),
        partition_table,
        signature,
        dev_path,
    })
}

/// How a disk is attached, from its canonical sysfs path
/// (`/sys/devices/pci0000:00/0000:00:04.0/virtio1/block/vda`).
pub fn transport_from_sysfs_path(path: &str) -> Transport {
    let has = |s: &str| path.contains(s);
    if has("/nvme") {
        Transport::Nvme
    } else if has("/usb") {
        Transport::Usb
    } else if has("/virtio") {
        Transport::Virtio
    } else if has("/mmc") {
        Transport::Mmc
    } else if has("/ata") {
        Transport::Sata
    } else if has("/end_device-") || has("/sas_") {
        Transport::Sas
    } else if has("/target") {
        Transport::Scsi
    } else {
        Transport::Unknown
    }
}

/// SCSI VPD page 0x80 (unit serial number): a 4-byte header, then the serial.
pub fn serial_from_vpd80(page: &[u8]) -> Option<String> {
    let len = *page.get(3)? as usize;
    let s = String::from_utf8_lossy(page.get(4..4 + len)?)
        .trim()
        .to_string();
    (!s.is_empty()).then_some(s)
}

/// `naa.5002538e40a1b2c3` → `0x5002538e40a1b2c3`; `eui.…` and NVMe ids are kept as they are.
pub fn normalize_wwid(wwid: &str) -> Option<String> {
    let w = wwid.trim();
    if w.is_empty() {
        return None;
    }
    Some(match w.strip_prefix("naa.") {
        Some(hex) => format!("0x{}", hex.to_ascii_lowercase()),
        None => w.to_string(),
    })
}

/// `/dev/disk/by-id` links grouped by the device they point to, sorted.
fn by_id_links(dir: &Path) -> BTreeMap<String, Vec<String>> {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let Ok(rd) = fs::read_dir(dir) else {
        return map;
    };
    for e in rd.filter_map(|e| e.ok()) {
        let link = e.path();
        if let Ok(target) = fs::canonicalize(&link) {
            map.entry(target.display().to_string())
                .or_default()
                .push(link.display().to_string());
        }
    }
    for v in map.values_mut() {
        v.sort();
    }
    map
}

/// The whole disk (`sda`, `vda`) holding the live medium: named in `/run/kiln/boot-device`,
/// or found from the device mounted at `/run/kiln/medium`.
fn boot_medium_disk() -> Option<String> {
    if let Some(dev) = fs::read_to_string(BOOT_DEVICE_FILE)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
    {
        return whole_disk_of(Path::new(&dev));
    }
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let majmin = mount_source_majmin(&mountinfo, MEDIUM_DIR)?;
    whole_disk_of_majmin(&majmin)
}

/// `MAJ:MIN` of the device mounted at `mount_point`, from `/proc/self/mountinfo`.
pub fn mount_source_majmin(mountinfo: &str, mount_point: &str) -> Option<String> {
    mountinfo.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(4) == Some(&mount_point)).then(|| f.get(2).map(|s| s.to_string()))?
    })
}

fn whole_disk_of(dev: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let rdev = fs::metadata(dev).ok()?.rdev();
    whole_disk_of_majmin(&format!(
        "{}:{}",
        nix::sys::stat::major(rdev),
        nix::sys::stat::minor(rdev)
    ))
}

/// The disk a `MAJ:MIN` belongs to: itself, or the parent of a partition.
fn whole_disk_of_majmin(majmin: &str) -> Option<String> {
    let sys = fs::canonicalize(format!("/sys/dev/block/{majmin}")).ok()?;
    let dir = if sys.join("partition").exists() {
        sys.parent()?.to_path_buf()
    } else {
        sys
    };
    Some(dir.file_name()?.to_string_lossy().into_owned())
}

/// What is on a disk: its partition table, or else a whole-disk signature.
fn read_contents(dev: &Path, sector: u32) -> (Option<PartitionTable>, Option<String>) {
    let Ok(mut f) = fs::File::open(dev) else {
        return (None, None);
    };
    let mut head = vec![0u8; 68 * 1024];
    let n = f.read(&mut head).unwrap_or(0);
    head.truncate(n);
    if let Some(table) = read_gpt(dev, sector) {
        return (Some(table), None);
    }
    if let Some(parts) = parse_mbr(&head) {
        let partitions = parts
            .into_iter()
            .map(|(number, type_byte, start, len)| {
                let fs = probe_at(dev, start * 512);
                ExistingPartition {
                    number,
                    name: None,
                    type_id: Some(format!("0x{type_byte:02x}")),
                    size_bytes: len * 512,
                    filesystem: fs.as_ref().map(|(t, _)| t.clone()),
                    label: fs.and_then(|(_, l)| l),
                }
            })
            .collect();
        return (
            Some(PartitionTable {
                kind: PartitionTableKind::Dos,
                partitions,
            }),
            None,
        );
    }
    (None, probe_signature(&head).map(|(t, _)| t))
}

/// The GPT on `dev` (a disk or a disk image) with each partition's name, type and the file
/// system found in it; `None` when there is no valid GPT.
pub fn read_gpt(dev: &Path, sector: u32) -> Option<PartitionTable> {
    let lb = if sector == 4096 {
        gpt::disk::LogicalBlockSize::Lb4096
    } else {
        gpt::disk::LogicalBlockSize::Lb512
    };
    let disk = gpt::GptConfig::new()
        .writable(false)
        .logical_block_size(lb)
        .open(dev)
        .ok()?;
    let partitions = disk
        .partitions()
        .iter()
        .filter(|(_, p)| p.is_used())
        .map(|(n, p)| {
            let fs = probe_at(dev, p.first_lba * u64::from(sector));
            ExistingPartition {
                number: *n,
                name: Some(p.name.clone()).filter(|s| !s.is_empty()),
                type_id: Some(p.part_type_guid.guid.to_string().to_uppercase()),
                size_bytes: (p.last_lba + 1 - p.first_lba) * u64::from(sector),
                filesystem: fs.as_ref().map(|(t, _)| t.clone()),
                label: fs.and_then(|(_, l)| l),
            }
        })
        .collect();
    Some(PartitionTable {
        kind: PartitionTableKind::Gpt,
        partitions,
    })
}

fn probe_at(dev: &Path, offset: u64) -> Option<(String, Option<String>)> {
    use std::os::unix::fs::FileExt;
    let f = fs::File::open(dev).ok()?;
    let mut buf = vec![0u8; 68 * 1024];
    let n = f.read_at(&mut buf, offset).ok()?;
    buf.truncate(n);
    probe_signature(&buf)
}

/// DOS partitions `(number, type, first sector, sectors)` from an MBR; `None` when the
/// sector is not an MBR or is a GPT's protective MBR.
pub fn parse_mbr(sector0: &[u8]) -> Option<Vec<(u32, u8, u64, u64)>> {
    if sector0.len() < 512 || sector0[510..512] != [0x55, 0xaa] {
        return None;
    }
    let mut parts = Vec::new();
    for i in 0..4 {
        let e = &sector0[446 + 16 * i..446 + 16 * (i + 1)];
        let kind = e[4];
        if kind == 0 {
            continue;
        }
        if kind == 0xee {
            return None;
        }
        let start = u32::from_le_bytes(e[8..12].try_into().ok()?) as u64;
        let len = u32::from_le_bytes(e[12..16].try_into().ok()?) as u64;
        parts.push((i as u32 + 1, kind, start, len));
    }
    // A FAT boot sector also ends in 55 AA: only records that look like partitions count.
    (!parts.is_empty() && parts.iter().all(|p| p.2 > 0 && p.3 > 0)).then_some(parts)
}

/// The file system or volume signature at the start of `buf` (a device or partition), with
/// its label when the format has one where it is cheap to read.
pub fn probe_signature(buf: &[u8]) -> Option<(String, Option<String>)> {
    let at = |off: usize, magic: &[u8]| buf.get(off..off + magic.len()) == Some(magic);
    let label = |off: usize, len: usize| {
        buf.get(off..off + len)
            .map(|b| {
                String::from_utf8_lossy(b)
                    .trim_end_matches(['\0', ' '])
                    .to_string()
            })
            .filter(|s| !s.is_empty() && s != "NO NAME")
    };
    let found = |t: &str, l: Option<String>| Some((t.to_string(), l));
    if at(1024 + 56, &[0x53, 0xef]) {
        // ext2/3/4: the journal and extent feature bits tell them apart.
        let compat = buf
            .get(1024 + 92..1024 + 96)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()));
        let incompat = buf
            .get(1024 + 96..1024 + 100)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()));
        let kind = match (compat, incompat) {
            (_, Some(i)) if i & 0x40 != 0 => "ext4",
            (Some(c), _) if c & 0x4 != 0 => "ext3",
            _ => "ext2",
        };
        return found(kind, label(1024 + 120, 16));
    }
    if at(0, b"hsqs") {
        return found("squashfs", None);
    }
    if at(0, b"LUKS\xba\xbe") {
        return found("crypto_LUKS", None);
    }
    if at(0, b"XFSB") {
        return found("xfs", label(108, 12));
    }
    if at(0x10040, b"_BHRfS_M") {
        return found("btrfs", label(0x1012b, 256));
    }
    if at(512 + 24, b"LVM2 001") || at(512, b"LABELONE") {
        return found("LVM2_member", None);
    }
    if at(32769, b"CD001") {
        return found("iso9660", label(32768 + 40, 32));
    }
    if at(4086, b"SWAPSPACE2") {
        return found("swap", None);
    }
    if at(82, b"FAT32   ") {
        return found("vfat", label(71, 11));
    }
    if at(54, b"FAT16   ") || at(54, b"FAT12   ") {
        return found("vfat", label(43, 11));
    }
    None
}

fn read_nics() -> Vec<Nic> {
    let mut nics: Vec<Nic> = fs::read_dir("/sys/class/net")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.path().join("device").exists())
                .filter_map(|e| {
                    let mac = sys_attr(&e.path(), "address")?;
                    Some(Nic {
                        name: e.file_name().to_string_lossy().into_owned(),
                        mac,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    nics.sort_by(|a, b| a.name.cmp(&b.name));
    nics
}

/// `MemTotal` from `/proc/meminfo`, in bytes.
pub fn mem_total(meminfo: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transports_come_from_the_sysfs_path() {
        let t = transport_from_sysfs_path;
        assert_eq!(
            t("/sys/devices/pci0000:00/0000:00:04.0/virtio1/block/vda"),
            Transport::Virtio
        );
        assert_eq!(
            t("/sys/devices/pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block/sda"),
            Transport::Sata
        );
        assert_eq!(
            t("/sys/devices/pci0000:00/0000:00:05.0/nvme/nvme0/nvme0n1"),
            Transport::Nvme
        );
        assert_eq!(
            t(
                "/sys/devices/pci0000:00/0000:00:14.0/usb2/2-1/2-1:1.0/host6/target6:0:0/6:0:0:0/block/sdb"
            ),
            Transport::Usb
        );
        assert_eq!(
            t("/sys/devices/pci0000:00/0000:00:06.0/virtio2/host2/target2:0:0/2:0:0:0/block/sdc"),
            Transport::Virtio
        );
        assert_eq!(
            t(
                "/sys/devices/pci0000:00/0000:03:00.0/host1/port-1:0/end_device-1:0/target1:0:0/1:0:0:0/block/sdd"
            ),
            Transport::Sas
        );
        assert_eq!(
            t("/sys/devices/platform/host3/target3:0:0/3:0:0:0/block/sde"),
            Transport::Scsi
        );
        assert_eq!(t("/sys/devices/virtual/block/xyz"), Transport::Unknown);
    }

    #[test]
    fn serials_and_wwns_are_normalized() {
        let mut page = vec![0u8, 0x80, 0, 8];
        page.extend_from_slice(b"  S3Z9  ");
        assert_eq!(serial_from_vpd80(&page).as_deref(), Some("S3Z9"));
        assert_eq!(serial_from_vpd80(&[0, 0x80, 0, 40]), None);
        assert_eq!(
            normalize_wwid("naa.5002538E40A1B2C3").as_deref(),
            Some("0x5002538e40a1b2c3")
        );
        assert_eq!(
            normalize_wwid("eui.0025388b91b0ab3e").as_deref(),
            Some("eui.0025388b91b0ab3e")
        );
        assert_eq!(normalize_wwid(" "), None);
    }

    #[test]
    fn medium_mount_is_found_in_mountinfo() {
        let mi = "22 1 0:21 / /run rw - tmpfs tmpfs rw\n\
                  40 22 11:0 / /run/kiln/medium ro,relatime - iso9660 /dev/sr0 ro\n";
        assert_eq!(mount_source_majmin(mi, MEDIUM_DIR).as_deref(), Some("11:0"));
        assert_eq!(mount_source_majmin(mi, "/mnt"), None);
    }

    #[test]
    fn mbr_partitions_and_protective_mbrs() {
        let mut s = vec![0u8; 512];
        s[510] = 0x55;
        s[511] = 0xaa;
        assert_eq!(parse_mbr(&s), None);
        s[446 + 4] = 0x83;
        s[446 + 8..446 + 12].copy_from_slice(&2048u32.to_le_bytes());
        s[446 + 12..446 + 16].copy_from_slice(&4096u32.to_le_bytes());
        assert_eq!(parse_mbr(&s), Some(vec![(1, 0x83, 2048, 4096)]));
        s[446 + 4] = 0xee;
        assert_eq!(parse_mbr(&s), None);
    }

    #[test]
    fn signatures_of_real_file_systems() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("fs.img");
        let make = |args: &[&str]| {
            std::fs::File::create(&img)
                .unwrap()
                .set_len(64 << 20)
                .unwrap();
            let out = std::process::Command::new(args[0])
                .args(&args[1..])
                .arg(&img)
                .output()
                .unwrap_or_else(|e| panic!("{} (e2fsprogs, dosfstools): {e}", args[0]));
            assert!(out.status.success(), "{:?}", out);
            let mut buf = vec![0u8; 68 * 1024];
            let n = std::fs::File::open(&img).unwrap().read(&mut buf).unwrap();
            buf.truncate(n);
            probe_signature(&buf)
        };
        assert_eq!(
            make(&["mke2fs", "-q", "-F", "-t", "ext4", "-L", "KILN_STATE"]),
            Some(("ext4".into(), Some("KILN_STATE".into())))
        );
        assert_eq!(
            make(&["mkfs.vfat", "-F", "32", "-n", "KILN_ESP"]),
            Some(("vfat".into(), Some("KILN_ESP".into())))
        );
        assert_eq!(probe_signature(&vec![0u8; 70_000]), None);
    }

    #[test]
    fn meminfo_total() {
        assert_eq!(
            mem_total("MemTotal:        2048 kB\nMemFree: 1 kB\n"),
            2048 * 1024
        );
    }

    #[test]
    fn this_machine_has_readable_disks() {
        let hw = collect();
        for d in &hw.disks {
            assert!(d.size_bytes > 0 && d.dev_path.starts_with("/dev/"), "{d:?}");
            assert!(matches!(d.logical_sector_size, 512 | 4096), "{d:?}");
        }
    }
}
