//! Kubernetes on installed appliance nodes, under QEMU (SeaBIOS, TCG): the `test` profile with
//! the `kubernetes` feature is built and installed by `kiln lab install`; two nodes boot from
//! that install, joined by a private network between the two QEMU processes (a socket
//! on loopback). Each node's config is what `kiln fleet node-config` prints for it from one
//! inventory (kube-a `control-plane`, kube-b `worker`), as an operator installing from the ISO
//! would give it, on the node's `KILN_STATE` partition.
//!
//! - `kube-a`, the first control plane: its agent brings up etcd, the control plane,
//!   containerd and the kubelet from the image's own binaries and airgap bundle, with the CA
//!   the fleet made, and `kiln node status` reports `KubernetesReady True`.
//! - `kube-b`, a worker, joins with the fleet's bootstrap token, pinning the fleet's CA by its
//!   hash: its config was written before kube-a ever booted.
//! - A pod of the bundle's pause image runs on each node, the cluster DNS (the bundle's CoreDNS)
//!   rolls out, a pod of the bundle's check workload on kube-b fetches its own page through
//!   its Service by name, and kube-a's agent routes kube-b's pod network through kube-b.
//! - From this host, `kiln cluster kubeconfig` fetches the admin kubeconfig from kube-a's agent
//!   over its network API (a forwarded port; the fleet's admin certificate), and `kiln cluster
//!   status` with it, through kube-a's forwarded API server port, shows both nodes Ready with
//!   their pods running.
//!
//! The probes also print the nodes' uptime at each mark, and the agents log each bring-up
//! step: power-on → API server → Ready → pod Running, per stage.

mod common;
mod lab_support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::free_port;
use kiln_lab::qemu::{Disk, Firmware, Nic, Regex, Vm};
use kiln_spec::NodeConfig;
use lab_support::{
    KILN, StateMount, build_iso, console_lines, lab_install, prefixed, probe_unit, text,
};

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/lab-kubernetes.yaml"
);

struct Node {
    name: &'static str,
    /// On the private cluster network, a NIC of its own.
    ip: &'static str,
    cluster_mac: &'static str,
    pod_cidr: &'static str,
    /// QEMU's niceness: the control plane keeps the larger share of this host's cores, as
    /// every other node waits on its API server (on real machines each has its own CPUs).
    nice: i32,
}

const INIT: Node = Node {
    name: "kube-a",
    ip: "192.168.77.10",
    cluster_mac: "52:54:00:4b:77:0a",
    pod_cidr: "10.42.0.0/24",
    nice: 0,
};
const WORKER: Node = Node {
    name: "kube-b",
    ip: "192.168.77.11",
    cluster_mac: "52:54:00:4b:77:0b",
    pod_cidr: "10.42.1.0/24",
    nice: 5,
};

/// The fleet both nodes belong to: kube-a the control plane, kube-b a worker, each with its
/// cluster address on its own NIC.
fn inventory() -> String {
    let node = |n: &Node, role: &str| {
        format!(
            "    - name: {name}\n      role: {role}\n      overrides:\n        network:\n          \
             interfaces:\n            - name: \"en*\"\n              mac: \"{mac}\"\n              \
             addresses: [{ip}/24]\n",
            name = n.name,
            mac = n.cluster_mac,
            ip = n.ip,
        )
    };
    format!(
        "apiVersion: kiln.dev/v1alpha1\nkind: Inventory\nspec:\n  nodes:\n{}{}",
        node(&INIT, "control-plane"),
        node(&WORKER, "worker")
    )
}

/// What the test adds to a node's config: kernel messages off the console (the probe's lines
/// carry a kubeconfig), and a probe unit running `probe` once the agent reports
/// `KubernetesReady True`. The probe prints what a user would check, each line prefixed so
/// the test can find it, and ends with `<name>-end`.
fn probe_config(node: &Node, probe: &str) -> String {
    let mut probe_lines = String::new();
    for line in probe.lines() {
        probe_lines.push_str("        ");
        probe_lines.push_str(line);
        probe_lines.push('\n');
    }
    r#"apiVersion: kiln.dev/v1alpha1
kind: NodeConfig
spec:
  sysctls:
    kernel.printk: "1 4 1 7"
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
        # A loaded API server may time a request out: try again, as an operator would.
        retry() { n=0; until "$@"; do n=$((n+1)); [ $n -ge 10 ] && return 1; sleep 5; done; }
        # What keeps the node busy, each minute: on a failure the console's tail shows it.
        while sleep 60; do /bin/busybox top -b -n1 | head -12 | say top; done &
        until /usr/bin/kiln node status > /run/kiln-k8s-status 2>&1 &&
              awk '$1 == "KubernetesReady" && $2 == "True" { ok = 1 } END { exit !ok }' /run/kiln-k8s-status
        do sleep 10; done
        mark ready
        say status < /run/kiln-k8s-status
PROBE        echo NAME-end > /dev/console
        exec sleep infinity
"#
    .replace("PROBE", &probe_lines)
    .replace("NAME", node.name)
    .replace("PAUSE_IMAGE", kiln_spec::kubernetes::PAUSE_IMAGE)
    .replace("BIN_DIR", kiln_spec::kubernetes::BIN_DIR)
        + &probe_unit("kiln-k8s-probe", "kiln Kubernetes probe")
}

/// The node's config as an operator installing from the ISO gives it: what `kiln fleet
/// node-config` prints for the node (its address and its part in the cluster, credentials
/// included), with the test's probe merged over it, as the node's local override.
fn write_node_config(disk: &Path, dir: &Path, node: &Node, probe: &str) -> NodeConfig {
    let out = Command::new(KILN)
        .args([
            "fleet",
            "node-config",
            node.name,
            "--spec",
            FIXTURE,
            "--inventory",
        ])
        .arg(dir.join("fleet.yaml"))
        .arg("--state-dir")
        .arg(dir.join("fleet"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kiln fleet node-config:\n{}",
        text(&out)
    );
    let fleet = NodeConfig::from_yaml(&String::from_utf8(out.stdout).unwrap()).unwrap();
    let test = NodeConfig::from_yaml(&probe_config(node, probe)).unwrap();
    let config = NodeConfig {
        spec: kiln_spec::nodeconfig::merge([&fleet.spec, &test.spec]),
        ..fleet.clone()
    };
    let state = StateMount::new(disk);
    let path = state.upper(kiln_agent::controllers::OVERRIDE_CONFIG);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, config.to_yaml()).unwrap();
    fleet
}

/// The first control plane's probe: a pod on each node, the cluster DNS from the bundle
/// running, the bundle's check workload on the worker fetched through its Service by name from
/// a pod, and the route its agent sets to the worker's pods. What needs no worker is applied
/// while the worker still boots (the check workload waits for it in the scheduler); the
/// worker's own pod names it, so it follows its registration (a pod bound to a node that does
/// not exist is collected). Each wait is one `kubectl` watching, not a poll: under emulation
/// every `kubectl` start costs the control plane's CPU seconds.
fn init_probe() -> String {
    format!(
        r#"export KUBECONFIG=/etc/kubernetes/admin.conf
apply() {{ retry $kubectl apply --validate=false "$@" 2>&1 | say kubectl; }}
cat > /run/kiln-hello.yaml <<'END'
apiVersion: apps/v1
kind: Deployment
metadata: {{name: hello, namespace: default}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: hello}}}}
  template:
    metadata: {{labels: {{app: hello}}}}
    spec:
      nodeSelector: {{kubernetes.io/hostname: {worker}}}
      containers:
      - {{name: hello, image: {check}, imagePullPolicy: Never, ports: [{{containerPort: 8080}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: hello, namespace: default}}
spec:
  selector: {{app: hello}}
  ports: [{{port: 80, targetPort: 8080}}]
END
apply -f /etc/kiln/probe-pod.yaml -f /run/kiln-hello.yaml
$kubectl wait --for=create node/{worker} --timeout=1500s 2>&1 | say kubectl
$kubectl wait --for=condition=Ready node/{worker} --timeout=900s 2>&1 | say kubectl
mark worker-ready
sed 's/{init}/{worker}/g' /etc/kiln/probe-pod.yaml > /run/kiln-probe-{worker}.yaml
apply -f /run/kiln-probe-{worker}.yaml
$kubectl wait --for=condition=Ready pod/probe-{init} pod/probe-{worker} --timeout=600s 2>&1 | say kubectl
mark pods-running
$kubectl -n kube-system rollout status deployment/coredns --timeout=600s 2>&1 | say kubectl
mark dns-running
$kubectl rollout status deployment/hello --timeout=600s 2>&1 | say kubectl
pod=$($kubectl get pods -l app=hello --field-selector=status.phase=Running -o jsonpath='{{.items[0].metadata.name}}')
for i in $(seq 30); do
  $kubectl exec $pod -- /bin/busybox wget -qO- http://hello.default.svc.{domain}/ > /run/kiln-hello 2>&1 && break
  sleep 2
done
say hello < /run/kiln-hello
mark service-by-name
for i in $(seq 150); do ip route show {worker_pods} | grep -q via && break; sleep 2; done
ip route show {worker_pods} | say route
mark pod-route
"#,
        init = INIT.name,
        worker = WORKER.name,
        worker_pods = WORKER.pod_cidr,
        check = kiln_spec::kubernetes::CHECK_IMAGE,
        domain = "cluster.local",
    )
}

/// Boots a node from `disk` with its lab NIC (forwarding `hostfwd`) and its cluster NIC on
/// the loopback socket `cluster` (`listen=…` or `connect=…`).
fn boot(node: &Node, disk: &Path, console: &Path, hostfwd: Vec<String>, cluster: &str) -> Vm {
    Vm::builder()
        .name(format!("kiln-lab-{}", node.name))
        .firmware(Firmware::Bios)
        .memory_mib(2560)
        .nice(node.nice)
        .disk(Disk::new(disk).bootindex(1).serial("kiln-lab-disk"))
        // Isolated: before its cluster address is up, a node's packets for the other would
        // take the default route out through QEMU to the host's network.
        .nic(Nic::lab(hostfwd))
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
    let iso = build_iso(&["--spec", FIXTURE], "lab-kubernetes-iso");
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
    std::fs::write(dir.path().join("fleet.yaml"), inventory()).unwrap();
    let fleet_a = write_node_config(&disk_a, dir.path(), &INIT, &init_probe());
    write_node_config(&disk_b, dir.path(), &WORKER, "");
    // The fleet made the CA: the worker knows its pin before the control plane exists.
    let ca_hash = fleet_a
        .spec
        .kubernetes
        .as_ref()
        .and_then(|k| k.join.as_ref()?.ca_cert_hash.clone())
        .expect("the fleet gives the control plane the CA hash");

    let (api_port, agent_port, cluster_port) = (free_port(), free_port(), free_port());
    let console_a = dir.path().join("kube-a-console.log");
    let mut vm_a = boot(
        &INIT,
        &disk_a,
        &console_a,
        vec![
            format!("tcp:127.0.0.1:{api_port}-:6443"),
            format!(
                "tcp:127.0.0.1:{agent_port}-:{}",
                kiln_spec::remote::DEFAULT_PORT
            ),
        ],
        &format!("listen=127.0.0.1:{cluster_port}"),
    );
    // The worker could boot at once (it knows the pin, and its agent retries the join until
    // the control plane answers), but under emulation two booting nodes share this host's
    // cores and both take far longer: it boots once kube-a reports Ready. The limits only guard
    // against hangs: the suite runs this beside another lane of guests.
    vm_a.wait_for_console("kube-a-status: drift repairs:", Duration::from_secs(1800))
        .unwrap_or_else(|e| panic!("{e}"));
    let console_b = dir.path().join("kube-b-console.log");
    let mut vm_b = boot(
        &WORKER,
        &disk_b,
        &console_b,
        Vec::new(),
        &format!("connect=127.0.0.1:{cluster_port}"),
    );
    // A worker that does not join is as often the control plane's story: show both.
    let tail = |console: &Path| {
        let lines = console_lines(console);
        lines[lines.len().saturating_sub(60)..].join("\n")
    };
    // The worker boots, joins and reports Ready while sharing the host with the control
    // plane: the longer wait.
    for (vm, end, limit) in [
        (&mut vm_b, "kube-b-end", 2700),
        (&mut vm_a, "kube-a-end", 1800),
    ] {
        if let Err(e) = vm.wait_for_console(end, Duration::from_secs(limit)) {
            panic!(
                "{e}\n\nkube-a's console:\n{}\n\nkube-b's console:\n{}",
                tail(&console_a),
                tail(&console_b)
            );
        }
    }

    let lines_a = console_lines(&console_a);
    let lines_b = console_lines(&console_b);
    eprintln!(
        "kube-a, power-on to each stage (node uptime):\n{}",
        stages(&INIT, &lines_a)
    );
    eprintln!(
        "kube-b, power-on to each stage (node uptime):\n{}",
        stages(&WORKER, &lines_b)
    );
    for (node, lines) in [(&INIT, &lines_a), (&WORKER, &lines_b)] {
        let status = ready_status(node, lines, &lines.join("\n"));
        let role = if node.name == INIT.name {
            "init"
        } else {
            "worker"
        };
        assert!(
            status.iter().any(|l| l.starts_with(&format!(
                "kubernetes: {role}  API https://{}:6443  CA {ca_hash}",
                INIT.ip
            ))),
            "{}",
            status.join("\n")
        );
    }
    // A pod on kube-b fetched the check workload's page through its Service, by name.
    let hello = prefixed(&lines_a, "kube-a-hello").join("\n");
    assert_eq!(
        hello,
        kiln_spec::kubernetes::CHECK_PAGE.trim_end(),
        "the check workload by its Service name from a pod"
    );
    let route = prefixed(&lines_a, "kube-a-route").join("\n");
    assert!(
        route.starts_with(&format!("{} via {} ", WORKER.pod_cidr, WORKER.ip)),
        "kube-a's route to kube-b's pods: {route:?}"
    );
    let kubectl = prefixed(&lines_a, "kube-a-kubectl").join("\n");
    for expected in [
        "pod/probe-kube-a created",
        "pod/probe-kube-b created",
        "deployment \"coredns\" successfully rolled out",
    ] {
        assert!(kubectl.contains(expected), "kubectl on kube-a:\n{kubectl}");
    }

    // From this host: kube-a's admin kubeconfig from its agent's network API, with the
    // fleet's admin credentials, pointed at the forwarded API server port (127.0.0.1 is one of
    // the API server certificate's addresses).
    let kubeconfig = dir.path().join("admin.conf");
    let out = Command::new(KILN)
        .args(["cluster", "kubeconfig", "--node", INIT.name, "--inventory"])
        .arg(dir.path().join("fleet.yaml"))
        .arg("--state-dir")
        .arg(dir.path().join("fleet"))
        .arg("--address")
        .arg(format!("127.0.0.1:{agent_port}"))
        .arg("--out")
        .arg(&kubeconfig)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kiln cluster kubeconfig:\n{}",
        text(&out)
    );
    let admin = std::fs::read_to_string(&kubeconfig).unwrap().replace(
        &format!("https://{}:6443", INIT.ip),
        &format!("https://127.0.0.1:{api_port}"),
    );
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
    let ready: Vec<(&str, bool)> = nodes.iter().map(|(n, r, _)| (n.as_str(), *r)).collect();
    assert_eq!(
        ready,
        [(INIT.name, true), (WORKER.name, true)],
        "{cluster:#}"
    );
    // A probe pod on each node, the check workload on kube-b and the cluster DNS on one.
    let running: Vec<u64> = nodes.iter().map(|(_, _, r)| *r).collect();
    assert!(
        running.iter().all(|r| *r >= 1) && running.iter().sum::<u64>() == 4,
        "running pods per node {running:?}: {cluster:#}"
    );
}
