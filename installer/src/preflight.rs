//! The last look before the first write: the target must still be the disk that was planned
//! (size, serial, WWN, contents) and nothing on the machine may be using it (a mounted
//! partition, active swap, a device-mapper, LVM, md or multipath holder). `apply` runs it right
//! after opening the target exclusively and refuses on any finding; nothing has been written
//! then.

use std::fs;
use std::path::Path;

use kiln_spec::size::ByteSize;

use crate::blockdev::Target;
use crate::hardware;
use crate::plan::SelectedDisk;

/// What the machine says about the target right now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LiveTarget {
    /// Serial and WWN are compared for block devices only: a disk image file has none.
    pub block_device: bool,
    pub size_bytes: u64,
    pub serial: Option<String>,
    pub wwn: Option<String>,
    /// [`kiln_spec::hardware::Disk::contents`] of the disk as probed now.
    pub contents: Vec<String>,
    /// `partition vda1 is mounted at /mnt`, `vda2 is active swap`, `vda is held by dm-0`.
    pub in_use: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "refusing to write {disk}: {}; nothing was written (plan again once that is sorted out)",
    problems.join("; ")
)]
pub struct PreflightError {
    pub disk: String,
    pub problems: Vec<String>,
}

/// Everything that makes writing `live` wrong for a plan made for `planned`. Pure.
pub fn problems(planned: &SelectedDisk, planned_size: u64, live: &LiveTarget) -> Vec<String> {
    let mut out = live.in_use.clone();
    if live.size_bytes != planned_size {
        out.push(format!(
            "it is {} now, the plan was made for {}",
            ByteSize(live.size_bytes).human(),
            ByteSize(planned_size).human()
        ));
    }
    for (what, plan, now) in [
        ("serial", &planned.serial, &live.serial),
        ("WWN", &planned.wwn, &live.wwn),
    ] {
        if live.block_device && plan.is_some() && plan != now {
            out.push(format!(
                "its {what} is {} now, the plan was made for {}",
                now.as_deref().unwrap_or("unknown"),
                plan.as_deref().unwrap_or("unknown")
            ));
        }
    }
    if live.contents != planned.erases {
        let show = |c: &[String]| {
            if c.is_empty() {
                "nothing".to_string()
            } else {
                c.join(", ")
            }
        };
        out.push(format!(
            "its contents changed since planning (planned: {}; now: {}); plan again",
            show(&planned.erases),
            show(&live.contents)
        ));
    }
    out
}

/// Checks the open target against the plan's disk.
pub fn check(
    planned: &SelectedDisk,
    planned_size: u64,
    target: &Target,
) -> Result<(), PreflightError> {
    let live = observe(target);
    let problems = problems(planned, planned_size, &live);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(PreflightError {
            disk: target.path().display().to_string(),
            problems,
        })
    }
}

fn observe(target: &Target) -> LiveTarget {
    let sector = target.logical_sector_size();
    let contents = hardware::probe_contents(target.path(), sector);
    let disk = kiln_spec::hardware::Disk {
        dev_path: target.path().display().to_string(),
        by_id: Vec::new(),
        size_bytes: target.size(),
        logical_sector_size: sector,
        model: None,
        serial: None,
        wwn: None,
        rotational: false,
        removable: false,
        transport: kiln_spec::hardware::Transport::Unknown,
        read_only: false,
        holds_boot_medium: false,
        partition_table: contents.partition_table,
        signatures: contents.signatures,
        unreadable: contents.unreadable,
    };
    let mut live = LiveTarget {
        block_device: target.is_block_device(),
        size_bytes: target.size(),
        contents: if disk.is_blank() {
            Vec::new()
        } else {
            disk.contents()
        },
        ..LiveTarget::default()
    };
    if let Some(sys) = target.sysfs_dir() {
        let (serial, wwn) = hardware::identity(&sys);
        live.serial = serial;
        live.wwn = wwn;
        live.in_use = users(&sys);
    }
    live
}

/// Who uses the disk at `sys` (`/sys/block/NAME`) or one of its partitions.
fn users(sys: &Path) -> Vec<String> {
    let mut devices = vec![sys.to_path_buf()];
    if let Ok(rd) = fs::read_dir(sys) {
        let mut parts: Vec<_> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.join("partition").exists())
            .collect();
        parts.sort();
        devices.extend(parts);
    }
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let swaps = fs::read_to_string("/proc/swaps").unwrap_or_default();
    let mut found = Vec::new();
    for dev in devices {
        let name = dev
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let Some(majmin) = fs::read_to_string(dev.join("dev"))
            .ok()
            .map(|s| s.trim().to_string())
        else {
            continue;
        };
        found.extend(uses(&name, &majmin, &mountinfo, &swaps, &holders(&dev)));
    }
    found
}

fn holders(dev: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dev.join("holders"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// How device `name` (`MAJ:MIN`) is in use per the mount table, the swap table and its
/// sysfs holders. Pure.
pub fn uses(
    name: &str,
    majmin: &str,
    mountinfo: &str,
    swaps: &str,
    holders: &[String],
) -> Vec<String> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.get(2) == Some(&majmin)
            && let Some(at) = f.get(4)
        {
            out.push(format!("{name} is mounted at {at}"));
        }
    }
    for line in swaps.lines().skip(1) {
        if line.split_whitespace().next() == Some(&format!("/dev/{name}")) {
            out.push(format!("{name} is active swap"));
        }
    }
    if !holders.is_empty() {
        out.push(format!(
            "{name} is held by {} (device-mapper, LVM, RAID or multipath)",
            holders.join(", ")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planned() -> SelectedDisk {
        SelectedDisk {
            dev_path: "/dev/vda".into(),
            stable_path: "/dev/disk/by-id/virtio-d1".into(),
            size_bytes: 8 << 30,
            logical_sector_size: 512,
            model: None,
            serial: Some("d1".into()),
            wwn: None,
            reasons: Vec::new(),
            erases: Vec::new(),
            wipe_consent: None,
        }
    }

    fn live() -> LiveTarget {
        LiveTarget {
            block_device: true,
            size_bytes: 8 << 30,
            serial: Some("d1".into()),
            ..LiveTarget::default()
        }
    }

    #[test]
    fn the_planned_disk_unchanged_passes() {
        assert_eq!(problems(&planned(), 8 << 30, &live()), Vec::<String>::new());
    }

    #[test]
    fn another_disk_or_new_contents_are_refused() {
        let mut l = live();
        l.serial = Some("d2".into());
        l.size_bytes = 4 << 30;
        l.contents = vec!["ext4 at offset 0x438".into()];
        l.in_use = vec!["vda1 is mounted at /mnt".into()];
        assert_eq!(
            problems(&planned(), 8 << 30, &l),
            [
                "vda1 is mounted at /mnt",
                "it is 4.0 GiB now, the plan was made for 8.0 GiB",
                "its serial is d2 now, the plan was made for d1",
                "its contents changed since planning (planned: nothing; now: ext4 at offset 0x438); plan again",
            ]
        );
    }

    #[test]
    fn mounts_swap_and_holders_are_found() {
        let mountinfo = "22 1 0:21 / /run rw - tmpfs tmpfs rw\n\
                         40 22 254:1 / /mnt rw,relatime - ext4 /dev/vda1 rw\n";
        let swaps = "Filename Type Size Used Priority\n/dev/vda2 partition 1024 0 -2\n";
        assert_eq!(
            uses("vda1", "254:1", mountinfo, swaps, &[]),
            ["vda1 is mounted at /mnt"]
        );
        assert_eq!(
            uses("vda2", "254:2", mountinfo, swaps, &["dm-0".into()]),
            [
                "vda2 is active swap",
                "vda2 is held by dm-0 (device-mapper, LVM, RAID or multipath)"
            ]
        );
        assert!(uses("vda3", "254:3", mountinfo, swaps, &[]).is_empty());
    }
}
