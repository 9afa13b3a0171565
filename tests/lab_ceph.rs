//! Ceph on an installed node, under QEMU (SeaBIOS, TCG): the `test` profile with Debian's Ceph
//! daemons (`tests/fixtures/lab-ceph.yaml`) is built and installed by `kiln lab install`; the
//! node boots from that install with three blank virtual data disks, and its node config (on
//! its `KILN_STATE` partition, as an operator installing from the ISO gives it) names them by
//! their `/dev/disk/by-id` paths with usage `ceph-osd` and makes the node its cluster's first
//! monitor. Its agent alone makes the cluster: keys, monitor, manager, an OSD on each disk,
//! the pool; a probe on the node waits until `kiln node status` reports `CephHealthy True` and
//! prints the status to the console.
//!
//! Ceph's mkfs steps, which made a Ceph VM slow under emulation, run once per disk here; the
//! tier takes about five minutes (Ceph healthy about three minutes after power-on).

mod lab_support;

use std::path::Path;
use std::time::{Duration, Instant};

use kiln_lab::qemu::{Disk, Firmware, Nic, Vm};
use kiln_spec::NodeConfig;
use lab_support::{StateMount, build_iso, console_lines, lab_install, prefixed, probe_unit, text};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/lab-ceph.yaml");
/// QEMU's user network gives the node this address.
const NODE_ADDRESS: &str = "10.0.2.15";

/// The node's part: the cluster's first monitor on its three data disks, and a probe that
/// prints `kiln node status` to the console once Ceph is healthy.
fn node_config() -> String {
    format!(
        r#"apiVersion: kiln.dev/v1alpha1
kind: NodeConfig
spec:
  sysctls:
    kernel.printk: "1 4 1 7"
  dataDisks:
    - {{device: /dev/disk/by-id/virtio-kiln-data-1, usage: ceph-osd}}
    - {{device: /dev/disk/by-id/virtio-kiln-data-2, usage: ceph-osd}}
    - {{device: /dev/disk/by-id/virtio-kiln-data-3, usage: ceph-osd}}
  ceph:
    monitorAddress: {NODE_ADDRESS}
    publicNetwork: 10.0.2.0/24
    pools: [{{name: rbd, size: 3, pgNum: 32}}]
  files:
    - path: /usr/local/bin/kiln-ceph-probe
      mode: "0755"
      content: |
        #!/bin/sh
        say() {{ sed "s/^/ceph-$1: /" > /dev/console; }}
        # Each new Ceph state, as the agent reports it: on a failure the console's tail says
        # where the node stopped.
        until /usr/bin/kiln node status > /run/kiln-ceph-status 2>&1 &&
              awk '$1 == "CephHealthy" && $2 == "True" {{ ok = 1 }} END {{ exit !ok }}' /run/kiln-ceph-status
        do
          grep -E '^(ceph|CephHealthy)' /run/kiln-ceph-status > /run/kiln-ceph-now
          cmp -s /run/kiln-ceph-now /run/kiln-ceph-last || say progress < /run/kiln-ceph-now
          mv /run/kiln-ceph-now /run/kiln-ceph-last
          sleep 10
        done
        echo "ready $(cut -d' ' -f1 /proc/uptime)" | say uptime
        say status < /run/kiln-ceph-status
        ceph osd tree 2>&1 | say tree
        echo ceph-end > /dev/console
        exec sleep infinity
"#
    ) + &probe_unit("kiln-ceph-probe", "kiln Ceph probe")
}

fn sparse_disk(path: &Path, size: u64) {
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
}

#[test]
fn an_installed_node_makes_a_ceph_cluster_of_its_data_disks() {
    let iso = build_iso(&["--spec", FIXTURE], "lab-ceph-iso");
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let disk = dir.path().join("node.img");
    let out = lab_install(&iso, &disk, "bios", "8GiB");
    assert!(out.status.success(), "kiln lab install:\n{}", text(&out));

    let config = NodeConfig::from_yaml(&node_config()).unwrap();
    {
        let state = StateMount::new(&disk);
        let path = state.upper(kiln_agent::controllers::OVERRIDE_CONFIG);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, config.to_yaml()).unwrap();
    }

    let mut vm = Vm::builder()
        .name("kiln-lab-ceph")
        .firmware(Firmware::Bios)
        .memory_mib(3072)
        .cpus(2)
        .disk(Disk::new(&disk).bootindex(1).serial("kiln-lab-disk"));
    for i in 1..=3 {
        let data = dir.path().join(format!("data-{i}.img"));
        sparse_disk(&data, 4 << 30);
        vm = vm.disk(Disk::new(&data).serial(format!("kiln-data-{i}")));
    }
    let console = dir.path().join("console.log");
    let mut vm: Vm = vm
        .nic(Nic::lab(Vec::new()))
        .serial_log(&console)
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let end = vm.wait_for_console("ceph-end", Duration::from_secs(45 * 60));
    let lines = console_lines(&console);
    if let Err(e) = end {
        panic!(
            "the node's Ceph did not become healthy: {e}\n{}",
            lines[lines.len().saturating_sub(80)..].join("\n")
        );
    }
    eprintln!(
        "CephHealthy after {:.0} s of QEMU ({})",
        t0.elapsed().as_secs_f64(),
        prefixed(&lines, "ceph-uptime").join(", ")
    );
    let status = prefixed(&lines, "ceph-status");
    eprintln!("kiln node status:\n{}", status.join("\n"));
    let summary = status
        .iter()
        .find(|l| l.starts_with("ceph: first monitor of cluster"))
        .unwrap_or_else(|| panic!("no Ceph line in the status: {status:?}"));
    assert!(
        summary.contains("HEALTH_OK") && summary.contains("3/3 OSDs up, 3 in"),
        "{summary}"
    );
    for i in 1..=3 {
        let line = status
            .iter()
            .find(|l| l.contains(&format!("virtio-kiln-data-{i}:")))
            .unwrap_or_else(|| panic!("data disk {i} is not in the status: {status:?}"));
        assert!(line.contains("osd."), "{line}");
    }
    let tree = prefixed(&lines, "ceph-tree").join("\n");
    eprintln!("ceph osd tree:\n{tree}");
    assert_eq!(tree.matches(" up ").count(), 3, "{tree}");
    drop(vm);
}
