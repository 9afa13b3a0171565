//! Benchmark behind `benches/cluster.sh`: `kiln node maintenance enter` on a node with 100
//! VMIs and 200 pods, and on a node with the same 200 pods alone, against `kubectl drain` of
//! those 200 pods — all on one real kube-apiserver + etcd, with the stand-in kubelet and
//! virt-controller. Reports wall time and API requests (from the API server's audit log,
//! counting only the user kiln and kubectl run as).
//!
//! Usage: maintenance_bench KILN_BINARY

use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kiln_cluster::testing::{
    ADMIN_USER, HarnessOptions, TestCluster, install_kubevirt_fixture_crds, standin_kubelet,
    standin_virt_controller, workload,
};
use kube::Client;
use kube::api::{Api, DynamicObject, PostParams};
use serde_json::json;

const VMIS: usize = 100;
const PODS: usize = 200;

struct Run {
    name: &'static str,
    wall: Duration,
    requests: usize,
}

#[tokio::main]
async fn main() {
    let kiln = std::env::args()
        .nth(1)
        .expect("usage: maintenance_bench KILN_BINARY");
    let cluster = TestCluster::start(HarnessOptions { audit: true });
    let client = cluster.client().await;
    install_kubevirt_fixture_crds(&client)
        .await
        .expect("fixture CRDs");
    let kubeconfig = cluster.kubeconfig.display().to_string();

    let mut runs = Vec::new();
    for (name, ns, node, vmis) in [
        (
            "kiln maintenance enter (100 VMIs + 200 pods)",
            "bench-vms",
            "bench-vms-1",
            VMIS,
        ),
        (
            "kiln maintenance enter (200 pods)",
            "bench-kiln",
            "bench-kiln-1",
            0,
        ),
        (
            "kubectl drain (200 pods)",
            "bench-kubectl",
            "bench-kubectl-1",
            0,
        ),
    ] {
        populate(&client, ns, node, vmis).await;
        let _kubelet = standin_kubelet(cluster.standin_client().await, ns);
        let _virt = standin_virt_controller(cluster.standin_client().await, ns, "bench-target");
        let mut command = if name.starts_with("kubectl") {
            let mut c = Command::new(&cluster.binaries().kubectl);
            c.args([
                "drain",
                node,
                "--ignore-daemonsets",
                "--force",
                "--timeout=10m",
                "--kubeconfig",
                &kubeconfig,
            ]);
            c
        } else {
            let mut c = Command::new(&kiln);
            c.args([
                "node",
                "maintenance",
                "enter",
                node,
                "--timeout",
                "10m",
                "--ceph-command",
                "true",
                "--kubeconfig",
                &kubeconfig,
            ]);
            c
        };
        let before = cluster.audited_requests(ADMIN_USER);
        let start = Instant::now();
        let out = command.output().expect("running the command");
        let wall = start.elapsed();
        assert!(
            out.status.success(),
            "{name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let requests = cluster.audited_requests(ADMIN_USER) - before;
        eprintln!(
            "{name}: {:.2} s, {requests} API requests",
            wall.as_secs_f64()
        );
        runs.push(Run {
            name,
            wall,
            requests,
        });
    }

    println!("\n{:<46} {:>10} {:>13}", "run", "wall (s)", "API requests");
    for r in &runs {
        println!(
            "{:<46} {:>10.2} {:>13}",
            r.name,
            r.wall.as_secs_f64(),
            r.requests
        );
    }
    let (kiln_pods, kubectl) = (&runs[1], &runs[2]);
    println!(
        "\nsame 200 pods: kiln/kubectl wall time {:.2}x, requests {:.2}x",
        kiln_pods.wall.as_secs_f64() / kubectl.wall.as_secs_f64(),
        kiln_pods.requests as f64 / kubectl.requests as f64
    );
}

/// A node with `vmis` VMIs (and their virt-launcher pods) and 200 plain pods, plus the
/// target node the VMs migrate to.
async fn populate(client: &Client, ns: &str, node: &str, vmis: usize) {
    workload::namespace(client, ns).await;
    let nodes: Api<Node> = Api::all(client.clone());
    for n in [node, "bench-target"] {
        match nodes
            .create(&PostParams::default(), &workload::node(n))
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => panic!("creating node {n}: {e}"),
        }
    }
    let vmi_api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), ns, &workload::vmi_resource());
    for i in 0..vmis {
        let (vmi, launcher) = workload::vmi(
            ns,
            &format!("vm-{i:03}"),
            node,
            Some("LiveMigrate"),
            json!([]),
        );
        vmi_api
            .create(&PostParams::default(), &vmi)
            .await
            .expect("vmi");
        workload::run_pod(client, &launcher)
            .await
            .expect("launcher pod");
    }
    for i in 0..PODS {
        let pod = workload::pod(ns, &format!("app-{i:03}"), node, &[("app", "bench")], None);
        workload::run_pod(client, &pod).await.expect("pod");
    }
}
