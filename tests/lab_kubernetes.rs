//! Kubernetes on installed appliance nodes, under QEMU (SeaBIOS, TCG): the `test` profile with
//! the `kubernetes` feature is built and installed by `kiln lab install`; two nodes boot from
//! that install, each with a node config on its `KILN_STATE` partition, joined by a private
//! network between the two QEMU processes (a socket on loopback).
//!
//! - `kube-a`, the first control plane: its agent brings up etcd, the control plane,
//!   containerd and the kubelet from the image's own binaries and airgap bundle, and
//!   `kiln node status` reports `KubernetesReady True` with the CA pin workers join with.
//! - `kube-b`, a worker, is given that pin and the bootstrap token (read from kube-a's console,
//!   as an operator would read `kiln node status`) and joins.
//! - A pod of the bundle's pause image runs on each node; kube-a's agent routes kube-b's pod
//!   network through kube-b; and `kiln cluster status`, run on this host through kube-a's
//!   forwarded API server port with its admin kubeconfig, shows both nodes Ready with their
//!   pod running.
//!
//! The probes also print the nodes' uptime at each mark, and the agents log each bring-up
//! step: power-on → API server → Ready → pod Running, per stage.

mod common;
mod lab_support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use base64::Engine;
use common::free_port;
use kiln_lab::qemu::{Disk, Firmware, Nic, Regex, Vm};
use lab_support::{KILN, StateMount, build_iso, console_lines, lab_install, text};

/// The lab NIC of `kiln lab install`: each node keeps it (each has its own user network).
const LAB_MAC: &str = "52:54:00:4b:49:4c";
const TOKEN: &str = "abcdef.0123456789abcdef";

struct Node {
    name: &'static str,
    /// On the private cluster network, a NIC of its own.
    ip: &'static str,
    cluster_mac: &'static str,
    pod_cidr: &'static str,
}

const INIT: Node = Node {
    name: "kube-a",
    ip: "192.168.77.10",
    cluster_mac: "52:54:00:4b:77:0a",
    pod_cidr: "10.42.0.0/24",
};
const WORKER: Node = Node {
    name: "kube-b",
    ip: "192.168.77.11",
    cluster_mac: "52:54:00:4b:77:0b",
    pod_cidr: "10.42.1.0/24",
};

/// A node config: the node's name and cluster address, its part in the cluster (`role`
/// lines), kernel messages off the console (the probe's lines carry a kubeconfig), and a probe
/// unit running `probe` once the agent reports `KubernetesReady True`. The probe prints what a
/// user would check, each line prefixed so the test can find it, and ends with `<name>-end`.
fn node_config(node: &Node, role: &str, probe: &str) -> String {
    let mut probe_lines = String::new();
    for line in probe.lines() {
        probe_lines.push_str("        ");
        probe_lines.push_str(line);
        probe_lines.push('\n');
    }
    r#"apiVersion: kiln.dev/v1alpha1
kind: NodeConfig
spec:
  hostname: NAME
  sysctls:
    kernel.printk: "1 4 1 7"
  network:
    interfaces:
      - name: "en*"
        mac: "CLUSTER_MAC"
        addresses: [IP/24]
  kubernetes:
ROLE
    nodeIp: IP
    clusterCidr: 10.42.0.0/16
    serviceCidr: 10.43.0.0/16
    clusterDomain: cluster.local
    podCidr: POD_CIDR
  files:
    - path: /etc/kiln/probe-pod.yaml
      content: |
        apiVersion: v1
        kind: Pod
        metadata:
          name: probe-NAME
          namespace: default
        spec:
          nodeName: NAME
          containers:
            - name: pause
              image: PAUSE_IMAGE
              imagePullPolicy: Never
    - path: /usr/local/bin/kiln-k8s-probe
      mode: "0755"
      content: |
        #!/bin/sh
        kubectl=BIN_DIR/kubectl
        say() { sed "s/^/NAME-$1: /" > /dev/console; }
        mark() { echo "$1 $(cut -d' ' -f1 /proc/uptime)" | say uptime; }
        until /usr/bin/kiln node status > /run/kiln-k8s-status 2>&1 &&
              awk '$1 == "KubernetesReady" && $2 == "True" { ok = 1 } END { exit !ok }' /run/kiln-k8s-status
        do sleep 2; done
        mark ready
        say status < /run/kiln-k8s-status
PROBE        echo NAME-end > /dev/console
        exec sleep infinity
  units:
    - name: kiln-k8s-probe.service
      enabled: true
      started: true
      content: |
        [Unit]
        Description=kiln Kubernetes probe

        [Service]
        ExecStart=/usr/local/bin/kiln-k8s-probe

        [Install]
        WantedBy=multi-user.target
"#
    .replace("ROLE", role)
    .replace("PROBE", &probe_lines)
    .replace("CLUSTER_MAC", node.cluster_mac)
    .replace("POD_CIDR", node.pod_cidr)
    .replace("NAME", node.name)
    .replace("IP", node.ip)
    .replace("PAUSE_IMAGE", kiln_spec::kubernetes::PAUSE_IMAGE)
    .replace("BIN_DIR", kiln_spec::kubernetes::BIN_DIR)
}

/// The first control plane's probe: once the worker has registered, a pod on each node; the
/// route its agent sets to the worker's pods (at its next resync); then its admin kubeconfig
/// for the host.
fn init_probe() -> String {
    format!(
        r#"export KUBECONFIG=/etc/kubernetes/admin.conf
until $kubectl get node {worker} >/dev/null 2>&1; do sleep 2; done
$kubectl wait --for=condition=Ready node/{worker} --timeout=900s 2>&1 | say kubectl
mark worker-ready
$kubectl apply -f /etc/kiln/probe-pod.yaml 2>&1 | say kubectl
sed 's/{init}/{worker}/g' /etc/kiln/probe-pod.yaml | $kubectl apply -f - 2>&1 | say kubectl
$kubectl wait --for=condition=Ready pod/probe-{init} pod/probe-{worker} --timeout=600s 2>&1 | say kubectl
mark pods-running
for i in $(seq 150); do ip route show {worker_pods} | grep -q via && break; sleep 2; done
ip route show {worker_pods} | say route
mark pod-route
base64 -w 64 /etc/kubernetes/admin.conf | say kubeconfig
"#,
        init = INIT.name,
        worker = WORKER.name,
        worker_pods = WORKER.pod_cidr,
    )
}

fn write_node_config(disk: &Path, config: &str) {
    let state = StateMount::new(disk);
    let path = state.upper(kiln_agent::controllers::OVERRIDE_CONFIG);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, config).unwrap();
}

/// Boots a node from `disk` with its lab NIC (forwarding `hostfwd`) and its cluster NIC on
/// the loopback socket `cluster` (`listen=…` or `connect=…`).
fn boot(node: &Node, disk: &Path, console: &Path, hostfwd: Vec<String>, cluster: &str) -> Vm {
    Vm::builder()
        .name(format!("kiln-lab-{}", node.name))
        .firmware(Firmware::Bios)
        .memory_mib(2560)
        .disk(Disk::new(disk).bootindex(1).serial("kiln-lab-disk"))
        .nic(Nic::User {
            mac: LAB_MAC.into(),
            hostfwd,
            bootindex: None,
            // Before its cluster address is up, a node's packets for the other would take the
            // default route out through QEMU to the host's network.
            isolated: true,
        })
        .extra_args([
            "-netdev".to_string(),
            format!("socket,id=cluster,{cluster}"),
            "-device".to_string(),
            format!("virtio-net-pci,netdev=cluster,mac={}", node.cluster_mac),
        ])
        .serial_log(console)
        .spawn()
        .unwrap()
}

/// The text after `<prefix>: ` on each line that has it.
fn prefixed(lines: &[String], prefix: &str) -> Vec<String> {
    let prefix = format!("{prefix}: ");
    lines
        .iter()
        .filter_map(|l| l.split_once(prefix.as_str()).map(|(_, s)| s.to_string()))
        .collect()
}

/// The bring-up's steps as the node's agent logged them (journald forwards them to the
/// console with the node's uptime), then the probe's marks.
fn stages(node: &Node, lines: &[String]) -> String {
    let step = Regex::new(r"^\[\s*([0-9.]+)\] kiln\[\d+\]: \S+\s+INFO kubernetes: (.*)$").unwrap();
    let mut stages: Vec<(f64, String)> = lines
        .iter()
        .filter_map(|l| step.captures(l))
        .filter_map(|c| Some((c[1].parse().ok()?, c[2].to_string())))
        .collect();
    stages.extend(
        prefixed(lines, &format!("{}-uptime", node.name))
            .iter()
            .filter_map(|mark| {
                let (what, at) = mark.split_once(' ')?;
                Some((at.parse().ok()?, what.to_string()))
            }),
    );
    stages
        .iter()
        .map(|(at, what)| format!("{at:>8.1} s  {what}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The node's `kiln node status` as its probe printed it, checked for `KubernetesReady True`.
fn ready_status(node: &Node, lines: &[String], log: &str) -> Vec<String> {
    let status = prefixed(lines, &format!("{}-status", node.name));
    let text = status.join("\n");
    eprintln!("kiln node status on {}:\n{text}", node.name);
    let condition = status
        .iter()
        .find(|l| l.split_whitespace().next() == Some("KubernetesReady"))
        .unwrap_or_else(|| panic!("no KubernetesReady condition on {}:\n{log}", node.name));
    assert_eq!(
        condition.split_whitespace().nth(1),
        Some("True"),
        "{condition}"
    );
    status
}

#[test]
fn installed_nodes_form_a_cluster_and_run_pods() {
    let iso = build_iso(
        &[
            "--spec",
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/lab-kubernetes.yaml"
            ),
        ],
        "lab-kubernetes-iso",
    );
    let dir = tempfile::tempdir().unwrap();
    let (disk_a, disk_b) = (dir.path().join("kube-a.raw"), dir.path().join("kube-b.raw"));
    // The slot holds the Kubernetes binaries; containerd's images live on KILN_STATE.
    let out = lab_install(&iso, &disk_a, "bios", "5GiB");
    assert!(out.status.success(), "kiln lab install:\n{}", text(&out));
    // The worker starts from the same install: a copy, before either has booted.
    let out = Command::new("cp")
        .arg("--sparse=always")
        .arg(&disk_a)
        .arg(&disk_b)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    write_node_config(
        &disk_a,
        &node_config(
            &INIT,
            &format!("    role: init\n    join:\n      token: {TOKEN}"),
            &init_probe(),
        ),
    );

    let (api_port, cluster_port) = (free_port(), free_port());
    let console_a = dir.path().join("kube-a-console.log");
    let mut vm_a = boot(
        &INIT,
        &disk_a,
        &console_a,
        vec![format!("tcp:127.0.0.1:{api_port}-:6443")],
        &format!("listen=127.0.0.1:{cluster_port}"),
    );
    // kube-a's status names the CA pin once its control plane is up (its last line is the
    // drift repair count).
    vm_a.wait_for_console("kube-a-status: drift repairs:", Duration::from_secs(900))
        .unwrap_or_else(|e| panic!("{e}"));
    let lines_a = console_lines(&console_a);
    let log_a = lines_a.join("\n");
    let status_a = ready_status(&INIT, &lines_a, &log_a);
    let pin = Regex::new(
        r"^kubernetes: init\s+API https://192\.168\.77\.10:6443\s+CA (sha256:[0-9a-f]{64})$",
    )
    .unwrap();
    let ca_hash = status_a
        .iter()
        .find_map(|l| pin.captures(l))
        .map(|c| c[1].to_string())
        .unwrap_or_else(|| panic!("no CA pin in kube-a's status:\n{}", status_a.join("\n")));

    write_node_config(
        &disk_b,
        &node_config(
            &WORKER,
            &format!(
                "    role: worker\n    apiServer: https://{}:6443\n    join:\n      token: {TOKEN}\n      caCertHash: {ca_hash}",
                INIT.ip
            ),
            "",
        ),
    );
    let console_b = dir.path().join("kube-b-console.log");
    let mut vm_b = boot(
        &WORKER,
        &disk_b,
        &console_b,
        Vec::new(),
        &format!("connect=127.0.0.1:{cluster_port}"),
    );
    vm_b.wait_for_console("kube-b-end", Duration::from_secs(900))
        .unwrap_or_else(|e| panic!("{e}"));
    vm_a.wait_for_console("kube-a-end", Duration::from_secs(900))
        .unwrap_or_else(|e| panic!("{e}"));

    let lines_a = console_lines(&console_a);
    let lines_b = console_lines(&console_b);
    let log_a = lines_a.join("\n");
    eprintln!(
        "kube-a, power-on to each stage (node uptime):\n{}",
        stages(&INIT, &lines_a)
    );
    eprintln!(
        "kube-b, power-on to each stage (node uptime):\n{}",
        stages(&WORKER, &lines_b)
    );
    let status_b = ready_status(&WORKER, &lines_b, &lines_b.join("\n"));
    assert!(
        status_b.iter().any(|l| l.starts_with(&format!(
            "kubernetes: worker  API https://{}:6443  CA {ca_hash}",
            INIT.ip
        ))),
        "{}",
        status_b.join("\n")
    );
    let route = prefixed(&lines_a, "kube-a-route").join("\n");
    assert!(
        route.starts_with(&format!("{} via {} ", WORKER.pod_cidr, WORKER.ip)),
        "kube-a's route to kube-b's pods: {route:?}"
    );
    let kubectl = prefixed(&lines_a, "kube-a-kubectl").join("\n");
    for expected in ["pod/probe-kube-a created", "pod/probe-kube-b created"] {
        assert!(kubectl.contains(expected), "kubectl on kube-a:\n{kubectl}");
    }

    // From this host: kube-a's admin kubeconfig, pointed at the forwarded port (127.0.0.1 is
    // one of the API server certificate's addresses).
    let admin = base64::engine::general_purpose::STANDARD
        .decode(prefixed(&lines_a, "kube-a-kubeconfig").concat())
        .unwrap_or_else(|e| panic!("the kubeconfig on the console is not base64 ({e}):\n{log_a}"));
    let admin = String::from_utf8(admin).unwrap().replace(
        &format!("https://{}:6443", INIT.ip),
        &format!("https://127.0.0.1:{api_port}"),
    );
    let kubeconfig = dir.path().join("admin.conf");
    std::fs::write(&kubeconfig, admin).unwrap();
    let out = Command::new(KILN)
        .args(["cluster", "status", "--output", "json", "--kubeconfig"])
        .arg(&kubeconfig)
        .output()
        .unwrap();
    vm_b.quit().unwrap();
    vm_a.quit().unwrap();
    assert!(out.status.success(), "kiln cluster status:\n{}", text(&out));
    let cluster: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", text(&out)));
    eprintln!("kiln cluster status from the host:\n{cluster:#}");
    let mut nodes: Vec<(String, bool, u64)> = cluster["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["name"].as_str().unwrap_or_default().to_string(),
                n["ready"] == true,
                n["pods"]["running"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    nodes.sort();
    assert_eq!(
        nodes,
        [
            (INIT.name.to_string(), true, 1),
            (WORKER.name.to_string(), true, 1)
        ],
        "{cluster:#}"
    );
}
