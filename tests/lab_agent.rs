//! End to end under QEMU (SeaBIOS): a node installed from the `test` profile ISO gets a local
//! override on its `KILN_STATE` partition (a new host name, a sysctl, a script and a systemd
//! unit), boots again, and the node agent applies all of it: the running system shows the host
//! name and sysctl value, the unit runs, `kiln node status` on the node reports every resource
//! Ready, and the agent's record on the disk lists what it now manages.

mod lab_support;

use std::time::Duration;

use kiln_agent::plan::Record;
use kiln_lab::qemu::{Disk, Firmware, Nic, Regex, Vm};
use lab_support::{StateMount, console_lines, lab_install, test_iso, text};

/// The lab NIC of `kiln lab install`: the node keeps its identity across both boots.
const LAB_MAC: &str = "52:54:00:4b:49:4c";
const NEW_HOSTNAME: &str = "lab-agent-node";
const SWAPPINESS: &str = "13";
const PROBE_UNIT: &str = "kiln-lab-probe.service";
const PROBE_SCRIPT: &str = "/usr/local/bin/kiln-lab-probe";

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
  units:
    - name: {PROBE_UNIT}
      enabled: true
      started: true
      content: |
        [Unit]
        Description=kiln lab probe

        [Service]
        ExecStart={PROBE_SCRIPT}

        [Install]
        WantedBy=multi-user.target
"#
    )
}

#[test]
fn agent_applies_a_local_override_on_the_installed_node() {
    let iso = test_iso();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");

    let out = lab_install(&iso, &disk, "bios", "4GiB");
    assert!(out.status.success(), "kiln lab install:\n{}", text(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("summary is not JSON ({e}):\n{}", text(&out)));
    let old_hostname = summary["node"].as_str().unwrap().to_string();
    assert_ne!(old_hostname, NEW_HOSTNAME);

    // The local override, written as root would have on the node.
    {
        let state = StateMount::new(&disk);
        let path = state.upper(kiln_agent::controllers::OVERRIDE_CONFIG);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, override_yaml()).unwrap();
    }

    let console = dir.path().join("agent-boot-console.log");
    let mut node = Vm::builder()
        .name("kiln-lab-agent")
        .firmware(Firmware::Bios)
        .memory_mib(2048)
        .disk(Disk::new(&disk).bootindex(1).serial("kiln-lab-disk"))
        .nic(Nic::User {
            mac: LAB_MAC.into(),
            hostfwd: Vec::new(),
            bootindex: None,
            isolated: true,
        })
        .serial_log(&console)
        .spawn()
        .unwrap();
    // The probe reports the agent's status last (it needs the agent's API).
    node.wait_for_console("kiln-lab-status-end", Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("{e}"));
    node.quit().unwrap();

    let lines = console_lines(&console);
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
    let state = StateMount::new(&disk);
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
