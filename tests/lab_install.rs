//! End to end, on real firmware (OVMF and SeaBIOS) under QEMU: the `test` profile ISO installs
//! onto a blank virtual disk with `kiln lab install`, the installed disk boots until the node
//! agent is ready, the disk's GPT is exactly kiln's layout, and a second install onto the now
//! used disk without wipe consent refuses and leaves every byte as it was. Then each firmware's
//! node has a day-2 run of its own:
//! - BIOS: a local override goes on the node's `KILN_STATE` (a new host name, a sysctl, a script
//!   and a systemd unit) and the node boots beside a clone of its disk (another kiln disk in
//!   the same machine, found first). The node runs from, and writes to, only the disk it was
//!   installed to; its agent applies all of the override: the running system shows the host
//!   name and sysctl value, the unit runs, `kiln node status` on the node reports every
//!   resource Ready, and the agent's record on the disk lists what it now manages.
//! - UEFI: the A/B upgrade run of [`lab_support::upgrade`], with power cuts. The rack's rolling
//!   upgrade (`fleet_rollout`) takes a BIOS node through an upgrade and a build that cannot
//!   boot, so each boot loader's counting is exercised once.

mod lab_support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kiln_agent::plan::Record;
use kiln_lab::qemu::{Disk, Firmware, Nic, Regex, Vm};
use kiln_spec::layout::{self, PartitionRole, Slot};
use lab_support::{
    StateMount, console_lines, disk_fingerprint, lab_install, probe_unit, sgdisk_field, test_iso,
    text, upgrade,
};

const NEW_HOSTNAME: &str = "lab-agent-node";
const SWAPPINESS: &str = "13";
/// What [`probe_unit`] makes of the name `kiln-lab-probe`.
const PROBE_UNIT: &str = "kiln-lab-probe.service";
const PROBE_SCRIPT: &str = "/usr/local/bin/kiln-lab-probe";

/// `sgdisk -i N`: (name, type GUID).
fn sgdisk_partition(disk: &Path, n: u32) -> (String, String) {
    let guid = sgdisk_field(disk, n, "Partition GUID code:");
    (
        sgdisk_field(disk, n, "Partition name:")
            .trim_matches('\'')
            .to_string(),
        guid.split_whitespace().next().unwrap().to_string(),
    )
}

/// The override: the probe prints what the running system sees, then (once the agent's API is
/// up, after its first converge) the agent's own status, line by line, to the console.
fn override_yaml() -> String {
    format!(
        r#"apiVersion: kiln.dev/v1alpha1
kind: NodeConfig
spec:
  hostname: {NEW_HOSTNAME}
  sysctls:
    vm.swappiness: "{SWAPPINESS}"
  files:
    - path: {PROBE_SCRIPT}
      mode: "0755"
      content: |
        #!/bin/sh
        echo "kiln-lab-probe: hostname=$(cat /proc/sys/kernel/hostname) swappiness=$(cat /proc/sys/vm/swappiness)" > /dev/console
        until /usr/bin/kiln node status > /run/kiln-lab-status 2>&1; do sleep 1; done
        sed 's/^/kiln-lab-status: /' /run/kiln-lab-status > /dev/console
        echo kiln-lab-status-end > /dev/console
        exec sleep infinity
"#
    ) + &probe_unit("kiln-lab-probe", "kiln lab probe")
}

/// Writes the local override onto the installed `disk`, as root would have on the node, then
/// boots a machine holding a clone of `disk` (new GPT GUIDs, first in device order and first in
/// boot order) and `disk` itself: stage-1 must take the slot and `KILN_STATE` from `disk`, the
/// one named on the kernel command line, and leave the clone untouched; the agent applies the
/// override.
fn boots_from_its_own_disk_and_applies_an_override(disk: &Path) {
    {
        let state = StateMount::new(disk);
        let path = state.upper(kiln_agent::controllers::OVERRIDE_CONFIG);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, override_yaml()).unwrap();
    }
    let dir = disk.parent().unwrap();
    let clone = dir.join("clone.raw");
    let out = Command::new("cp")
        .arg("--sparse=always")
        .arg(disk)
        .arg(&clone)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let out = Command::new("sgdisk")
        .arg("-G")
        .arg(&clone)
        .output()
        .unwrap();
    assert!(out.status.success(), "sgdisk -G: {}", text(&out));
    let (clone_before, disk_before) = (disk_fingerprint(&clone), disk_fingerprint(disk));

    let console = dir.join("two-disks-console.log");
    let mut vm = Vm::builder()
        .name(format!("two-kiln-disks-{}", std::process::id()))
        .firmware(Firmware::Bios)
        .memory_mib(2048)
        .disk(Disk::new(&clone).bootindex(1).serial("clone"))
        .disk(Disk::new(disk).bootindex(2).serial("kiln-lab-disk"))
        .nic(Nic::lab(Vec::new()))
        .serial_log(&console)
        .work_dir(dir.join("two-disks-vm"))
        .spawn()
        .expect("starting QEMU");
    let found = vm
        .wait_for_console("kiln-stage1: found KILN_A on", Duration::from_secs(600))
        .unwrap_or_else(|e| panic!("stage-1 finds the slot: {e}"));
    assert!(
        found.contains("on /dev/vdb"),
        "slot A taken from the wrong disk: {found}"
    );
    // The probe reports the agent's status last (it needs the agent's API).
    vm.wait_for_console("kiln-lab-status-end", Duration::from_secs(600))
        .unwrap_or_else(|e| panic!("the node boots with two kiln disks: {e}"));
    let _ = vm.quit();
    assert_eq!(
        disk_fingerprint(&clone),
        clone_before,
        "the other kiln disk was written"
    );
    assert_ne!(
        disk_fingerprint(disk),
        disk_before,
        "the node kept no state on its own disk"
    );
    agent_applied_the_override(&console_lines(&console), disk);
}

/// What the node's console and its disk show of the override once its agent converged.
fn agent_applied_the_override(lines: &[String], disk: &Path) {
    let log = lines.join("\n");
    // Only the slot letter: other writers to the console may continue the line without a break.
    let ready = Regex::new(r"kiln-agent ready node=(\S+) slot=([AB])").unwrap();
    let caps = lines
        .iter()
        .find_map(|l| ready.captures(l))
        .unwrap_or_else(|| panic!("no `kiln-agent ready` line on the console:\n{log}"));
    assert_eq!((&caps[1], &caps[2]), (NEW_HOSTNAME, "A"), "{}", &caps[0]);

    // What the running system saw, from the unit the agent installed and started.
    let probe = format!("kiln-lab-probe: hostname={NEW_HOSTNAME} swappiness={SWAPPINESS}");
    assert!(
        lines.iter().any(|l| l.contains(&probe)),
        "no {probe:?} on the console:\n{log}"
    );

    // The agent's status, as `kiln node status` printed it on the node.
    let status: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.split_once("kiln-lab-status: ").map(|(_, s)| s))
        .collect();
    let status_text = status.join("\n");
    eprintln!("kiln node status on the node:\n{status_text}");
    assert!(
        status
            .iter()
            .any(|l| l.starts_with(&format!("node {NEW_HOSTNAME}  slot A"))),
        "{status_text}"
    );
    assert!(
        status.iter().any(|l| l.starts_with("config: valid")
            && l.contains(kiln_agent::controllers::OVERRIDE_CONFIG)),
        "{status_text}"
    );
    for (condition, expected) in [("Ready", "True"), ("Failed", "False")] {
        let value = status.iter().find_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some(condition))
                .then(|| words.next())
                .flatten()
        });
        assert_eq!(value, Some(expected), "{condition}:\n{status_text}");
    }
    for resource in [
        "hostname".to_string(),
        "sysctl:vm.swappiness".to_string(),
        format!("unit:{PROBE_UNIT}"),
        format!("file:{PROBE_SCRIPT}"),
    ] {
        let state = status
            .iter()
            .find_map(|l| {
                let mut words = l.split_whitespace();
                (words.next() == Some(resource.as_str())).then(|| words.next())
            })
            .flatten()
            .unwrap_or_else(|| panic!("no resource {resource} in the status:\n{status_text}"));
        assert_eq!(state, "Ready", "{resource}:\n{status_text}");
    }

    // What the agent persisted: its record of managed resources, and the files it wrote.
    let state = StateMount::new(disk);
    let record_path = state.upper(&format!("{}/record.json", kiln_agent::sysroot::STATE_DIR));
    let record: Record = serde_json::from_slice(
        &std::fs::read(&record_path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", record_path.display())),
    )
    .unwrap();
    assert!(record.sysctls.contains_key("vm.swappiness"), "{record:#?}");
    assert!(
        record
            .units
            .get(PROBE_UNIT)
            .is_some_and(|u| u.enabled_by_kiln),
        "{record:#?}"
    );
    for path in [
        PROBE_SCRIPT.to_string(),
        format!("/etc/systemd/system/{PROBE_UNIT}"),
        kiln_agent::desired::SYSCTL_FILE.to_string(),
    ] {
        assert!(record.paths.contains_key(&path), "{path}: {record:#?}");
    }
    let sysctl_file =
        std::fs::read_to_string(state.upper(kiln_agent::desired::SYSCTL_FILE)).unwrap();
    assert!(
        sysctl_file
            .lines()
            .any(|l| l.replace(' ', "") == format!("vm.swappiness={SWAPPINESS}")),
        "{sysctl_file}"
    );
    let hostname = std::fs::read_to_string(state.upper("/etc/hostname")).unwrap();
    assert_eq!(hostname.trim(), NEW_HOSTNAME);
}

/// The lines of a console log a boot split is read from, for a failure message.
fn split_lines(console: &str) -> String {
    let text = std::fs::read(console).unwrap_or_default();
    String::from_utf8_lossy(&text)
        .lines()
        .filter(|l| {
            [
                "Run /init",
                "systemd[1]: systemd ",
                "kiln-install: ",
                "kiln-agent ready",
            ]
            .iter()
            .any(|k| l.contains(k))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn install_and_boot(firmware: &str) {
    let iso = test_iso();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");

    let out = lab_install(&iso, &disk, firmware, "4GiB");
    assert!(
        out.status.success(),
        "kiln lab install ({firmware}):\n{}",
        text(&out)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("summary is not JSON ({e}):\n{}", text(&out)));
    assert_eq!(summary["slot"], "A");
    assert_eq!(summary["firmware"], firmware);
    // The test profile names hosts kiln-{mac}; `Nic::lab` is 52:54:00:4b:49:4c.
    assert_eq!(summary["node"], "kiln-5254004b494c");
    // Where each boot's time went, read from its console: every step took some time.
    for (boot, console) in [
        ("live_split", "install_console"),
        ("installed_split", "installed_console"),
    ] {
        for step in ["firmware_loader", "kernel", "stage1", "userspace"] {
            let seconds = summary[boot][step].as_f64();
            assert!(
                seconds.is_some_and(|s| s > 0.0),
                "{boot}.{step} in {summary}\nthe console lines the split reads:\n{}",
                split_lines(summary[console].as_str().unwrap_or_default())
            );
        }
    }
    eprintln!("{firmware}: {}", serde_json::to_string(&summary).unwrap());

    // A clean GPT with exactly kiln's names and types, in order.
    let v = Command::new("sgdisk")
        .arg("-v")
        .arg(&disk)
        .output()
        .unwrap();
    assert!(
        text(&v).contains("No problems found"),
        "sgdisk -v:\n{}",
        text(&v)
    );
    let roles = [
        PartitionRole::BiosBoot,
        PartitionRole::Esp,
        PartitionRole::Slot(Slot::A),
        PartitionRole::Slot(Slot::B),
        PartitionRole::State,
    ];
    for (i, role) in roles.iter().enumerate() {
        assert_eq!(
            sgdisk_partition(&disk, i as u32 + 1),
            (role.gpt_name().to_string(), role.type_guid().to_string()),
            "partition {}",
            i + 1
        );
    }
    let table = kiln_installer::hardware::read_gpt(&disk, 512).expect("a GPT");
    let names: Vec<String> = table
        .partitions
        .iter()
        .map(|p| p.name.clone().unwrap_or_default())
        .collect();
    assert_eq!(names, layout::KILN_NAMES);
    let types: Vec<String> = table
        .partitions
        .iter()
        .map(|p| p.type_id.clone().unwrap_or_default())
        .collect();
    assert_eq!(types, roles.map(|r| r.type_guid().to_string()));
    let fs: Vec<Option<String>> = table
        .partitions
        .iter()
        .map(|p| p.filesystem.clone())
        .collect();
    assert_eq!(
        fs,
        [
            None,
            Some("vfat".into()),
            Some("squashfs".into()),
            None,
            Some("ext4".into())
        ]
    );

    // Again, without consent to erase: refused, and not one byte changed.
    let before = disk_fingerprint(&disk);
    let out = lab_install(&iso, &disk, firmware, "4GiB");
    let all = text(&out);
    assert!(!out.status.success(), "a second install succeeded:\n{all}");
    assert!(all.contains("refusing to erase"), "{all}");
    assert_eq!(
        disk_fingerprint(&disk),
        before,
        "the refused install changed the disk"
    );
    // systemd-boot counts boots by renaming entries on the ESP it booted from, so only a
    // BIOS boot leaves the clone it boots through byte-identical.
    match firmware {
        "bios" => boots_from_its_own_disk_and_applies_an_override(&disk),
        // Day 2 on the same disk: upgrades, power cuts, an image that cannot boot.
        _ => upgrade::upgrade_and_fall_back(&disk),
    }
}

#[test]
fn iso_installs_and_boots_under_uefi() {
    install_and_boot("uefi");
}

#[test]
fn iso_installs_and_boots_under_bios() {
    install_and_boot("bios");
}
