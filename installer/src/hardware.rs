//! Collecting the [`HardwareInventory`] the planner decides from: disks from `/sys/block`
//! (size, sectors, model, serial, WWN, rotational, removable, read-only, transport from the
//! sysfs path), their `/dev/disk/by-id` links when udev runs, what is on them (every
//! signature libblkid knows, both GPT headers, the MBR, data nothing recognised), which disks
//! hold the boot medium (through device-mapper, md and loop devices), NICs, memory and CPUs.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use kiln_exec::Tool;
use kiln_spec::hardware::{
    Disk, ExistingPartition, Firmware, HardwareInventory, Nic, PARTITION_TABLE_USAGE,
    PartitionTable, PartitionTableKind, Signature, Transport, UNRECOGNISED_DATA,
};

/// Where stage-1 mounts the live medium (ISO or USB stick).
pub const MEDIUM_DIR: &str = "/run/kiln/medium";
/// A file naming the boot device, written by whoever knows it better than the mount table.
pub const BOOT_DEVICE_FILE: &str = "/run/kiln/boot-device";

/// Reads the machine. Disks that cannot be opened or read are listed as unreadable.
pub fn collect() -> HardwareInventory {
    settle_udev();
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let (boot_disks, boot_medium_unresolved) = match boot_medium(&cmdline) {
        Ok(disks) => (disks, None),
        Err(why) => (Vec::new(), Some(why)),
    };
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
        if let Some(d) = read_disk(&name, &by_id, &boot_disks) {
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
        boot_medium_unresolved,
    }
}

/// The machine as [`collect`] sees it, but with one disk: `image` (a disk image file or a
/// device named explicitly), probed live, as the machine's only disk.
pub fn collect_for_image(image: &Path, firmware: Firmware) -> std::io::Result<HardwareInventory> {
    // Seeking to the end measures block devices and files alike.
    let size_bytes = {
        use std::io::Seek;
        fs::File::open(image)?.seek(std::io::SeekFrom::End(0))?
    };
    let contents = probe_contents(image, 512);
    let dev_path = image.display().to_string();
    Ok(HardwareInventory {
        firmware,
        disks: vec![Disk {
            dev_path,
            by_id: Vec::new(),
            size_bytes,
            logical_sector_size: 512,
            model: None,
            serial: None,
            wwn: None,
            rotational: false,
            removable: false,
            transport: Transport::Unknown,
            read_only: false,
            holds_boot_medium: false,
            partition_table: contents.partition_table,
            signatures: contents.signatures,
            unreadable: contents.unreadable,
        }],
        nics: read_nics(),
        memory_bytes: fs::read_to_string("/proc/meminfo")
            .map(|m| mem_total(&m))
            .unwrap_or(0),
        cpus: std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
        boot_medium_unresolved: None,
    })
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

fn read_disk(name: &str, by_id: &BTreeMap<String, Vec<String>>, boot: &[String]) -> Option<Disk> {
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
    let (serial, wwn) = identity(&sys);
    let contents = probe_contents(Path::new(&dev_path), logical_sector_size);
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
        holds_boot_medium: boot.iter().any(|b| b == name),
        partition_table: contents.partition_table,
        signatures: contents.signatures,
        unreadable: contents.unreadable,
        dev_path,
    })
}

/// A disk's serial number and WWN from its sysfs directory.
pub fn identity(sys: &Path) -> (Option<String>, Option<String>) {
    let serial = sys_attr(sys, "serial")
        .or_else(|| sys_attr(sys, "device/serial"))
        .or_else(|| {
            fs::read(sys.join("device/vpd_pg80"))
                .ok()
                .and_then(|b| serial_from_vpd80(&b))
        });
    let wwn = sys_attr(sys, "wwid")
        .or_else(|| sys_attr(sys, "device/wwid"))
        .and_then(|w| normalize_wwid(&w));
    (serial, wwn)
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

/// The whole disks holding the live medium: the device named in `/run/kiln/boot-device`, or
/// the one mounted at `/run/kiln/medium`, followed through partitions, device-mapper, md and
/// loop devices to the physical disks under them. No disks when the system was netbooted.
/// An error says why the medium could not be traced; the planner then picks no disk itself.
fn boot_medium(cmdline: &str) -> Result<Vec<String>, String> {
    let sys = Path::new("/sys");
    if let Some(dev) = fs::read_to_string(BOOT_DEVICE_FILE)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
    {
        let majmin = majmin_of(Path::new(&dev))
            .ok_or_else(|| format!("{BOOT_DEVICE_FILE} names {dev}, which is not a device"))?;
        return physical_disks(sys, &majmin, &majmin_of);
    }
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("reading /proc/self/mountinfo: {e}"))?;
    match mount_source_majmin(&mountinfo, MEDIUM_DIR) {
        Some(majmin) => physical_disks(sys, &majmin, &majmin_of),
        None if cmdline
            .split_whitespace()
            .any(|w| w.starts_with("kiln.root=live:")) =>
        {
            Err(format!(
                "the kernel booted from a live medium but nothing is mounted at {MEDIUM_DIR}"
            ))
        }
        None => Ok(Vec::new()),
    }
}

/// `MAJ:MIN` of the device mounted at `mount_point`, from `/proc/self/mountinfo`.
pub fn mount_source_majmin(mountinfo: &str, mount_point: &str) -> Option<String> {
    mountinfo.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(4) == Some(&mount_point)).then(|| f.get(2).map(|s| s.to_string()))?
    })
}

/// `MAJ:MIN` of a device node, or of the file system holding a regular file.
fn majmin_of(path: &Path) -> Option<String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = fs::metadata(path).ok()?;
    let dev = if meta.file_type().is_block_device() {
        meta.rdev()
    } else {
        meta.dev()
    };
    Some(format!(
        "{}:{}",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    ))
}

/// The physical whole disks under block device `majmin` (per `sys`, normally `/sys`):
/// a partition's disk, a device-mapper or md device's `slaves`, a loop device's backing
/// file's device (`device_of` finds the device holding a file), recursively.
pub fn physical_disks(
    sys: &Path,
    majmin: &str,
    device_of: &dyn Fn(&Path) -> Option<String>,
) -> Result<Vec<String>, String> {
    let mut disks = Vec::new();
    let mut todo = vec![majmin.to_string()];
    let mut seen = std::collections::BTreeSet::new();
    while let Some(mm) = todo.pop() {
        if !seen.insert(mm.clone()) || seen.len() > 64 {
            continue;
        }
        let node = fs::canonicalize(sys.join("dev/block").join(&mm))
            .map_err(|e| format!("device {mm} has no entry in sysfs: {e}"))?;
        let disk = if node.join("partition").exists() {
            node.parent()
                .ok_or_else(|| format!("partition {mm} has no parent disk"))?
                .to_path_buf()
        } else {
            node
        };
        let name = disk
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| format!("device {mm} has no name"))?;
        let under: Vec<String> = fs::read_dir(disk.join("slaves"))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| fs::read_to_string(e.path().join("dev")).ok())
                    .map(|d| d.trim().to_string())
                    .collect()
            })
            .unwrap_or_default();
        if !under.is_empty() {
            todo.extend(under);
        } else if name.starts_with("loop") {
            let backing = fs::read_to_string(disk.join("loop/backing_file"))
                .map_err(|e| format!("{name}: cannot read its backing file: {e}"))?;
            let backing = backing.trim();
            let mm = device_of(Path::new(backing))
                .ok_or_else(|| format!("{name}: cannot find the device holding {backing}"))?;
            todo.push(mm);
        } else if name.starts_with("dm-") || name.starts_with("md") {
            return Err(format!("{name} lists no devices under it"));
        } else if disk.join("device").exists() {
            disks.push(name);
        } else {
            return Err(format!(
                "{name} is neither a physical disk nor a device kiln can look through"
            ));
        }
    }
    disks.sort();
    disks.dedup();
    Ok(disks)
}

/// What is on a disk or disk image.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Contents {
    pub partition_table: Option<PartitionTable>,
    pub signatures: Vec<Signature>,
    pub unreadable: Option<String>,
}

/// How much of each end of a disk must be zeros for a disk without signatures to count as
/// blank: partition tables, boot code and most superblocks live there.
const HEAD_BYTES: u64 = 4 << 20;
const TAIL_BYTES: u64 = 1 << 20;

/// Probes a disk (or disk image) the way the planner needs it: every signature libblkid finds
/// (through `wipefs --no-act`), both GPT headers and the MBR checked by kiln itself, and data
/// nothing recognised in the first 4 MiB or the last MiB. A disk that cannot be opened, read
/// or probed says why in `unreadable`.
pub fn probe_contents(dev: &Path, sector: u32) -> Contents {
    match read_ends(dev) {
        Ok((size, head, tail)) => {
            let mut signatures = match wipefs(dev) {
                Ok(s) => s,
                Err(why) => {
                    return Contents {
                        unreadable: Some(why),
                        ..Contents::default()
                    };
                }
            };
            let partition_table = read_gpt(dev, sector).or_else(|| mbr_table(dev, &head));
            signatures.extend(table_signatures(&head, &tail, size, sector, &signatures));
            if signatures.is_empty() && partition_table.is_none() {
                signatures.extend(unrecognised_data(&head, &tail, size));
            }
            signatures.sort_by_key(|s| s.offset);
            Contents {
                partition_table,
                signatures,
                unreadable: None,
            }
        }
        Err(why) => Contents {
            unreadable: Some(why),
            ..Contents::default()
        },
    }
}

/// The disk's size, its first [`HEAD_BYTES`] and its last [`TAIL_BYTES`].
fn read_ends(dev: &Path) -> Result<(u64, Vec<u8>, Vec<u8>), String> {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::FileExt;
    let mut f = fs::File::open(dev).map_err(|e| format!("opening it: {e}"))?;
    let size = f
        .seek(SeekFrom::End(0))
        .map_err(|e| format!("measuring it: {e}"))?;
    let read = |offset: u64, len: u64| {
        let mut buf = vec![0u8; len as usize];
        f.read_exact_at(&mut buf, offset)
            .map(|()| buf)
            .map_err(|e| format!("reading {len} bytes at offset {offset}: {e}"))
    };
    let head = read(0, HEAD_BYTES.min(size))?;
    let tail_len = TAIL_BYTES.min(size);
    let tail = read(size - tail_len, tail_len)?;
    Ok((size, head, tail))
}

/// Waits while udev still works through the kernel's device events, so every disk it has
/// seen has its `/dev/disk/by-id` links: an unattended install starts as soon as udevd does,
/// not after the whole system has come up. Without udev there is nothing to wait for.
fn settle_udev() {
    if !Path::new("/run/udev/control").exists() {
        return;
    }
    let mut cmd = UDEVADM.command();
    cmd.args(["settle", "--timeout=60"]);
    if let Err(e) = UDEVADM.output(cmd, "waiting for udev") {
        tracing::warn!("{e}; disks may be listed without their by-id links");
    }
}

const UDEVADM: Tool = Tool::new("udevadm", "udev");
const WIPEFS: Tool = Tool::new("wipefs", "util-linux");
const BLKID: Tool = Tool::new("blkid", "util-linux");

/// `wipefs --no-act`: every signature libblkid knows, anywhere it looks on the device.
fn wipefs(dev: &Path) -> Result<Vec<Signature>, String> {
    let mut cmd = WIPEFS.command();
    cmd.args(["--no-act", "--json", "--output", "OFFSET,TYPE,LABEL,USAGE"])
        .arg(dev);
    let out = WIPEFS
        .output(cmd, "looking for signatures")
        .map_err(|e| e.to_string())?;
    parse_wipefs_json(&out)
}

/// The output of `wipefs --json --output OFFSET,TYPE,LABEL,USAGE` (empty when it found
/// nothing: wipefs then prints no JSON at all).
pub fn parse_wipefs_json(text: &str) -> Result<Vec<Signature>, String> {
    #[derive(serde::Deserialize)]
    struct Report {
        signatures: Vec<Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        offset: String,
        #[serde(rename = "type")]
        kind: String,
        label: Option<String>,
        usage: Option<String>,
    }
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let report: Report =
        serde_json::from_str(text).map_err(|e| format!("reading wipefs' report: {e}"))?;
    report
        .signatures
        .into_iter()
        .map(|e| {
            let offset = e
                .offset
                .strip_prefix("0x")
                .and_then(|h| u64::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("wipefs reported offset {:?}", e.offset))?;
            Ok(Signature {
                kind: e.kind,
                offset,
                usage: e.usage,
                label: e.label.filter(|l| !l.is_empty()),
            })
        })
        .collect()
}

/// GPT headers (primary at LBA 1, backup at the last LBA) and MBR partition records that
/// libblkid did not report: it skips a backup GPT without a protective MBR, for one.
fn table_signatures(
    head: &[u8],
    tail: &[u8],
    size: u64,
    sector: u32,
    known: &[Signature],
) -> Vec<Signature> {
    let sector = u64::from(sector);
    let reported = |offset: u64| known.iter().any(|s| s.offset == offset);
    let table = |kind: &str, offset: u64| Signature {
        kind: kind.to_string(),
        offset,
        usage: Some(PARTITION_TABLE_USAGE.to_string()),
        label: None,
    };
    let mut found = Vec::new();
    let at = |buf: &[u8], off: u64| buf.get(off as usize..off as usize + 8) == Some(b"EFI PART");
    if at(head, sector) && !reported(sector) {
        found.push(table("gpt", sector));
    }
    if size >= 2 * sector {
        let last = size - sector;
        let in_tail = last - (size - tail.len() as u64);
        if at(tail, in_tail) && !reported(last) {
            found.push(table("gpt", last));
        }
    }
    let mbr_reported = known.iter().any(|s| s.offset == 0x1fe);
    if !mbr_reported && head.len() >= 512 && head[510..512] == [0x55, 0xaa] {
        let entries = &head[446..510];
        if entries.chunks(16).any(|e| e[4] == 0xee) {
            found.push(table("PMBR", 0x1fe));
        } else if parse_mbr(head).is_some() {
            found.push(table("dos", 0x1fe));
        }
    }
    found
}

/// A signature for the first non-zero byte in the disk's ends, if any.
fn unrecognised_data(head: &[u8], tail: &[u8], size: u64) -> Option<Signature> {
    let offset = head
        .iter()
        .position(|&b| b != 0)
        .map(|i| i as u64)
        .or_else(|| {
            tail.iter()
                .position(|&b| b != 0)
                .map(|i| size - tail.len() as u64 + i as u64)
        })?;
    Some(Signature {
        kind: UNRECOGNISED_DATA.to_string(),
        offset,
        usage: None,
        label: None,
    })
}

/// The DOS partition table in `head`, with what is in each partition.
fn mbr_table(dev: &Path, head: &[u8]) -> Option<PartitionTable> {
    let partitions = parse_mbr(head)?
        .into_iter()
        .map(|(number, type_byte, start, len)| {
            let fs = probe_at(dev, start * 512, len * 512);
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
    Some(PartitionTable {
        kind: PartitionTableKind::Dos,
        partitions,
    })
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
            let len = (p.last_lba + 1 - p.first_lba) * u64::from(sector);
            let fs = probe_at(dev, p.first_lba * u64::from(sector), len);
            ExistingPartition {
                number: *n,
                name: Some(p.name.clone()).filter(|s| !s.is_empty()),
                type_id: Some(p.part_type_guid.guid.to_string().to_uppercase()),
                size_bytes: len,
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

/// libblkid's verdict (type, label) on the `len` bytes at `offset` of `dev`: `blkid -p` works
/// at an offset, so partitions are probed where the kernel shows no partition devices.
pub fn probe_at(dev: &Path, offset: u64, len: u64) -> Option<(String, Option<String>)> {
    let mut cmd = BLKID.command();
    cmd.args(["--probe", "--output", "export", "--offset"])
        .arg(offset.to_string())
        .arg("--size")
        .arg(len.to_string())
        .arg(dev);
    // blkid exits 2 when it finds nothing.
    let text = BLKID.output(cmd, "probing a partition").ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
            .map(str::to_string)
    };
    Some((field("TYPE").or_else(|| field("PTTYPE"))?, field("LABEL")))
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

    /// A 64 MiB image file prepared by `prep` (given its path), probed.
    fn probe_image(prep: impl FnOnce(&Path)) -> Contents {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        prep(&img);
        probe_contents(&img, 512)
    }

    fn tool(args: &[&str], img: &Path) {
        let out = std::process::Command::new(args[0])
            .args(&args[1..])
            .arg(img)
            .output()
            .unwrap_or_else(|e| panic!("{} (scripts/install-deps.sh): {e}", args[0]));
        assert!(out.status.success(), "{out:?}");
    }

    fn kinds(c: &Contents) -> Vec<(String, u64)> {
        c.signatures
            .iter()
            .map(|s| (s.kind.clone(), s.offset))
            .collect()
    }

    #[test]
    fn blank_images_have_nothing_and_file_systems_are_named() {
        assert_eq!(probe_image(|_| {}), Contents::default());
        let c = probe_image(|img| tool(&["mke2fs", "-q", "-F", "-t", "ext4", "-L", "DATA"], img));
        assert_eq!(kinds(&c), [("ext4".to_string(), 0x438)]);
        assert_eq!(c.signatures[0].label.as_deref(), Some("DATA"));
        assert_eq!(c.signatures[0].usage.as_deref(), Some("filesystem"));
        let c = probe_image(|img| tool(&["mkfs.vfat", "-F", "32", "-n", "KILN_ESP"], img));
        assert!(kinds(&c).iter().any(|(k, _)| k == "vfat"), "{c:?}");
    }

    #[test]
    fn a_backup_gpt_alone_is_found() {
        let c = probe_image(|img| {
            tool(&["sgdisk", "-n", "1:2048:+8M", "-c", "1:DATA"], img);
            // Zero the protective MBR and the primary header: only the backup is left.
            let f = std::fs::File::options().write(true).open(img).unwrap();
            use std::os::unix::fs::FileExt;
            f.write_all_at(&[0u8; 1024], 0).unwrap();
        });
        assert_eq!(kinds(&c), [("gpt".to_string(), (64 << 20) - 512)], "{c:?}");
        assert!(c.signatures[0].is_partition_table());
    }

    #[test]
    fn bytes_nothing_recognises_are_data() {
        let end = (64u64 << 20) - 3;
        let c = probe_image(|img| {
            let f = std::fs::File::options().write(true).open(img).unwrap();
            use std::os::unix::fs::FileExt;
            f.write_all_at(b"abc", end).unwrap();
        });
        assert_eq!(kinds(&c), [(UNRECOGNISED_DATA.to_string(), end)]);
    }

    #[test]
    fn missing_and_unreadable_disks_say_why() {
        let c = probe_contents(Path::new("/nonexistent/disk"), 512);
        assert!(
            c.unreadable.as_deref().unwrap().starts_with("opening it:"),
            "{c:?}"
        );
        let dir = tempfile::tempdir().unwrap();
        let c = probe_contents(dir.path(), 512);
        assert!(c.unreadable.is_some(), "a directory is no disk: {c:?}");
    }

    #[test]
    fn wipefs_reports_are_parsed() {
        let text = r#"{"signatures": [
            {"offset": "0x1018", "type": "bcache", "label": null, "usage": "other"},
            {"offset": "0x0", "type": "crypto_LUKS", "label": "", "usage": "crypto"}]}"#;
        let sigs = parse_wipefs_json(text).unwrap();
        assert_eq!(sigs[0].offset, 0x1018);
        assert_eq!(sigs[1].label, None);
        assert_eq!(parse_wipefs_json(""), Ok(Vec::new()));
        assert!(parse_wipefs_json(r#"{"signatures":[{"offset":"12","type":"x"}]}"#).is_err());
    }

    /// A fake sysfs: `dev/block/MAJ:MIN` links to device directories.
    fn fake_sys(devices: &[(&str, &str, &[&str])]) -> tempfile::TempDir {
        let sys = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(sys.path().join("dev/block")).unwrap();
        for (majmin, path, slaves) in devices {
            let dir = sys.path().join(path);
            std::fs::create_dir_all(dir.join("slaves")).unwrap();
            std::fs::write(dir.join("dev"), format!("{majmin}\n")).unwrap();
            let name = dir.file_name().unwrap().to_string_lossy().to_string();
            if path.starts_with("devices/pci") && !name.starts_with("loop") {
                if dir.parent().unwrap().join("dev").exists() {
                    std::fs::write(dir.join("partition"), "1").unwrap();
                } else {
                    std::fs::create_dir_all(dir.join("device")).unwrap();
                }
            }
            for s in *slaves {
                std::os::unix::fs::symlink(
                    sys.path().join(s),
                    dir.join("slaves").join(Path::new(s).file_name().unwrap()),
                )
                .unwrap();
            }
            std::os::unix::fs::symlink(&dir, sys.path().join("dev/block").join(majmin)).unwrap();
        }
        sys
    }

    #[test]
    fn boot_medium_is_followed_to_the_physical_disks() {
        let usb = "devices/pci0000:00/usb1/block/sdb";
        let sys = fake_sys(&[
            ("8:16", usb, &[]),
            ("8:17", "devices/pci0000:00/usb1/block/sdb/sdb1", &[]),
            ("8:32", "devices/pci0000:00/usb2/block/sdc", &[]),
            (
                "253:0",
                "devices/virtual/block/dm-0",
                &["devices/pci0000:00/usb1/block/sdb/sdb1"],
            ),
            (
                "9:0",
                "devices/virtual/block/md0",
                &[
                    "devices/virtual/block/dm-0",
                    "devices/pci0000:00/usb2/block/sdc",
                ],
            ),
            ("253:1", "devices/virtual/block/dm-1", &[]),
            ("7:0", "devices/virtual/block/loop0", &[]),
        ]);
        let none = |_: &Path| None;
        let disks = |mm| physical_disks(sys.path(), mm, &none);
        assert_eq!(disks("8:17"), Ok(vec!["sdb".to_string()]));
        assert_eq!(disks("253:0"), Ok(vec!["sdb".to_string()]));
        assert_eq!(disks("9:0"), Ok(vec!["sdb".to_string(), "sdc".to_string()]));
        assert_eq!(
            disks("253:1"),
            Err("dm-1 lists no devices under it".to_string())
        );
        assert!(
            disks("7:0")
                .unwrap_err()
                .contains("loop0: cannot read its backing file")
        );
        let loop_dir = sys.path().join("devices/virtual/block/loop0/loop");
        std::fs::create_dir_all(&loop_dir).unwrap();
        std::fs::write(loop_dir.join("backing_file"), "/medium/live.img\n").unwrap();
        let on_sdb1 = |p: &Path| (p == Path::new("/medium/live.img")).then(|| "8:17".to_string());
        assert_eq!(
            physical_disks(sys.path(), "7:0", &on_sdb1),
            Ok(vec!["sdb".to_string()])
        );
        assert!(disks("1:1").unwrap_err().contains("no entry in sysfs"));
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
