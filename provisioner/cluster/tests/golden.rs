//! Golden tests of the pure steps: bootstrap planning, maintenance planning and status.
//! Regenerate the files under tests/golden with `KILN_BLESS=1 cargo test -p kiln-cluster --test golden`.

use std::path::PathBuf;

use k8s_openapi::api::core::v1::{Node, PersistentVolumeClaim, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kiln_cluster::lock::Lock;
use kiln_cluster::maintenance::{self, NodeFacts, Vmi};
use kiln_cluster::manifests::{Source, fetch_all};
use kiln_cluster::node::{Host, describe, plan};
use kiln_cluster::plan::{kiln_objects, plan_bootstrap};
use kiln_cluster::status::{HEALTH_CHECKS, summarize};
use kiln_cluster::testing::workload;
use kiln_spec::kubernetes::{KubeRole, KubernetesNode};
use serde_json::{Value, json};

fn golden(name: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("KILN_BLESS").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (KILN_BLESS=1 writes it)", path.display()));
    assert!(
        expected == actual,
        "{} differs (KILN_BLESS=1 to accept):\n{actual}",
        path.display()
    );
}

#[tokio::test]
async fn bootstrap_plan_of_the_pinned_addon_set() {
    let mirror = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/upstream");
    let files = fetch_all(&Lock::embedded().unwrap(), &Source::Mirror(mirror))
        .await
        .unwrap();
    let plan = plan_bootstrap(&files, kiln_objects()).unwrap();
    golden("bootstrap-plan.txt", &plan.render());
}

fn from<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).unwrap()
}

fn vmi(name: &str, strategy: Option<&str>, volumes: Value, conditions: Value) -> Vmi {
    let (mut obj, _) = workload::vmi("apps", name, "worker-1", strategy, volumes);
    obj.data["status"]["conditions"] = conditions;
    from(serde_json::to_value(obj).unwrap())
}

fn facts() -> NodeFacts {
    let mut node = workload::node("worker-1");
    node.spec = Some(from(json!({"unschedulable": false})));
    let pvc = |name: &str, mode: &str| -> PersistentVolumeClaim {
        from(
            json!({"metadata": {"name": name, "namespace": "apps"}, "spec": {"accessModes": [mode]}}),
        )
    };
    let pdb = |name: &str, selector: Value, allowed: i32| -> PodDisruptionBudget {
        from(
            json!({"metadata": {"name": name, "namespace": "apps"}, "spec": {"selector": selector}, "status": {"disruptionsAllowed": allowed, "currentHealthy": 1, "desiredHealthy": 1, "expectedPods": 1}}),
        )
    };
    let mut mirror: Pod = workload::pod("kube-system", "etcd-worker-1", "worker-1", &[], None);
    mirror.metadata.annotations =
        Some([("kubernetes.io/config.mirror".to_string(), "abc".to_string())].into());
    let ready = json!([{"type": "Ready", "status": "True"}]);
    NodeFacts {
        node,
        pods: vec![
            workload::vmi("apps", "web-vm", "worker-1", None, json!([])).1,
            workload::vmi("apps", "db-vm", "worker-1", None, json!([])).1,
            workload::vmi("apps", "scratch-vm", "worker-1", None, json!([])).1,
            workload::pod(
                "apps",
                "api-7f9c-x2",
                "worker-1",
                &[("app", "api"), ("tier", "front")],
                Some(("ReplicaSet", "api-7f9c")),
            ),
            workload::pod(
                "apps",
                "queue-0",
                "worker-1",
                &[("app", "queue")],
                Some(("StatefulSet", "queue")),
            ),
            workload::pod(
                "rook-ceph",
                "rook-ceph-osd-3-5d8",
                "worker-1",
                &[("app", "rook-ceph-osd"), ("ceph-osd-id", "3")],
                Some(("ReplicaSet", "rook-ceph-osd-3")),
            ),
            workload::pod(
                "rook-ceph",
                "rook-ceph-osd-11-9a1",
                "worker-1",
                &[("app", "rook-ceph-osd"), ("ceph-osd-id", "11")],
                Some(("ReplicaSet", "rook-ceph-osd-11")),
            ),
            workload::pod(
                "kube-system",
                "kube-multus-ds-abcde",
                "worker-1",
                &[("app", "multus")],
                Some(("DaemonSet", "kube-multus-ds")),
            ),
            mirror,
        ],
        vmis: vec![
            vmi(
                "web-vm",
                Some("LiveMigrate"),
                json!([{"name": "root", "persistentVolumeClaim": {"claimName": "web-root"}}, {"name": "cloudinit", "cloudInitNoCloud": {"userData": "#cloud-config"}}]),
                ready.clone(),
            ),
            vmi(
                "db-vm",
                None,
                json!([{"name": "data", "dataVolume": {"name": "db-data"}}, {"name": "scratch", "hostDisk": {"path": "/var/scratch.img", "type": "DiskOrCreate"}}]),
                json!([{"type": "LiveMigratable", "status": "False", "reason": "DisksNotLiveMigratable", "message": "cannot migrate VMI: PVC db-data is not shared, live migration requires that all PVCs must be shared (using ReadWriteMany access mode)"}]),
            ),
            vmi(
                "scratch-vm",
                Some("LiveMigrateIfPossible"),
                json!([{"name": "root", "persistentVolumeClaim": {"claimName": "missing"}}]),
                ready,
            ),
        ],
        pvcs: vec![
            pvc("web-root", "ReadWriteMany"),
            pvc("db-data", "ReadWriteOnce"),
        ],
        pdbs: vec![
            pdb(
                "api",
                json!({"matchLabels": {"app": "api"}, "matchExpressions": [{"key": "tier", "operator": "In", "values": ["front"]}]}),
                1,
            ),
            pdb(
                "queue-quorum",
                json!({"matchExpressions": [{"key": "app", "operator": "Exists"}, {"key": "app", "operator": "NotIn", "values": ["api"]}]}),
                0,
            ),
            pdb("other", json!({"matchLabels": {"app": "other"}}), 0),
        ],
        // A native OSD Ceph places under the node, besides the Rook OSD pod's.
        ceph_osds: vec![9],
    }
}

#[test]
fn maintenance_plan_of_a_mixed_node() {
    let plan = maintenance::plan(&facts());
    golden("maintenance-plan.txt", &plan.render());
    golden(
        "maintenance-plan.json",
        &(serde_json::to_string_pretty(&plan).unwrap() + "\n"),
    );
}

#[test]
fn cluster_status_summary() {
    let mut in_maintenance: Node = workload::node("worker-2");
    in_maintenance.spec = Some(from(json!({"unschedulable": true})));
    in_maintenance.metadata.annotations = Some(
        [(
            maintenance::ANNOTATION.to_string(),
            r#"{"phase":"in-maintenance","started":"2026-11-22T05:00:00Z","nooutOsds":[3,11]}"#
                .to_string(),
        )]
        .into(),
    );
    let mut ready = workload::node("worker-1");
    ready.status = Some(from(
        json!({"conditions": [{"type": "Ready", "status": "True"}]}),
    ));
    let hco = json!({"status": {"conditions": [
        {"type": "Available", "status": "False", "reason": "Reconciling", "message": "Reconciling HyperConverged"},
        {"type": "Progressing", "status": "True", "reason": "Reconciling"},
    ]}});
    let ceph = json!({"status": {"conditions": [{"type": "Ready", "status": "True", "reason": "ClusterCreated", "message": "Cluster created successfully"}]}});
    let resources = vec![
        (HEALTH_CHECKS[0], Some(hco)),
        (HEALTH_CHECKS[1], Some(ceph)),
        (HEALTH_CHECKS[2], None),
    ];
    let phase = |mut pod: Pod, phase: &str| {
        pod.status = Some(from(json!({ "phase": phase })));
        pod
    };
    let pods = [
        phase(
            workload::pod("apps", "web-1", "worker-1", &[], None),
            "Running",
        ),
        phase(
            workload::pod("apps", "web-2", "worker-1", &[], None),
            "Pending",
        ),
        phase(
            workload::pod("apps", "db", "worker-2", &[], None),
            "Running",
        ),
        // Not scheduled: on no node.
        phase(workload::pod("apps", "web-3", "", &[], None), "Pending"),
    ];
    let status = summarize(&[ready, in_maintenance], &pods, &resources);
    golden("cluster-status.txt", &status.render());
    golden(
        "cluster-status.json",
        &(serde_json::to_string_pretty(&status).unwrap() + "\n"),
    );
}

fn kube_node(role: KubeRole) -> KubernetesNode {
    KubernetesNode {
        role,
        node_ip: "10.99.0.1".into(),
        api_server: (role == KubeRole::Worker).then(|| "https://10.99.0.1:6443".into()),
        join: None,
        ca: None,
        etcd_ca: None,
        service_account_key: None,
        cluster_cidr: "10.42.0.0/16".into(),
        service_cidr: "10.43.0.0/16".into(),
        cluster_domain: "cluster.local".into(),
        pod_cidr: "10.42.0.0/24".into(),
        max_pods: 110,
        labels: [("kiln.dev/rack".to_string(), "r1".to_string())].into(),
        taints: vec!["dedicated=storage:NoSchedule".into()],
        system_reserved: [
            ("cpu".to_string(), "500m".to_string()),
            ("memory".to_string(), "1Gi".to_string()),
        ]
        .into(),
        kube_reserved: [("memory".to_string(), "256Mi".to_string())].into(),
        registry_mirrors: [(
            "images.example.org".to_string(),
            vec![
                "https://mirror.site.example:5000".to_string(),
                "http://10.99.0.9:5000".to_string(),
            ],
        )]
        .into(),
    }
}

#[test]
fn node_plan_of_the_first_control_plane() {
    let p = plan(&kube_node(KubeRole::Init), &Host::appliance("cp1"));
    assert_eq!(
        p.control_plane
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>(),
        [
            "etcd",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler"
        ]
    );
    assert!(
        !p.kubelet
            .argv
            .iter()
            .any(|a| a.starts_with("--bootstrap-kubeconfig"))
    );
    golden("node-plan-init.txt", &describe(&p));
}

#[test]
fn node_plan_of_a_joining_control_plane() {
    let node = KubernetesNode {
        api_server: Some("https://10.99.0.1:6443".into()),
        node_ip: "10.99.0.2".into(),
        ..kube_node(KubeRole::ControlPlane)
    };
    let p = plan(&node, &Host::appliance("cp2"));
    let etcd = &p.control_plane[0].argv;
    assert!(etcd.contains(&"--initial-cluster-state=existing".to_string()));
    assert!(!etcd.iter().any(|a| a.starts_with("--initial-cluster=")));
    assert!(
        !p.kubelet
            .argv
            .iter()
            .any(|a| a.starts_with("--bootstrap-kubeconfig"))
    );
    golden("node-plan-control-plane.txt", &describe(&p));
}

#[test]
fn node_plan_of_a_worker_bootstraps_its_kubelet() {
    let p = plan(&kube_node(KubeRole::Worker), &Host::appliance("w1"));
    assert!(p.control_plane.is_empty());
    assert!(
        p.kubelet
            .argv
            .contains(&"--bootstrap-kubeconfig=/etc/kubernetes/bootstrap-kubelet.conf".to_string())
    );
    golden("node-plan-worker.txt", &describe(&p));
}

#[test]
fn cluster_dns_objects() {
    let node = kube_node(KubeRole::Init);
    let objects = kiln_cluster::node::dns::dns_objects(&node, &["192.0.2.53".to_string()]);
    let text: String = objects
        .iter()
        .map(|o| format!("---\n{}", serde_saphyr::to_string(o).unwrap()))
        .collect();
    golden("cluster-dns.yaml", &text);
    // The Service sits where every kubelet points its pods.
    let kubelet = describe(&plan(&node, &Host::appliance("cp1")));
    assert!(kubelet.contains("clusterDNS:\n- 10.43.0.10\n"), "{kubelet}");
    assert_eq!(objects[5]["spec"]["clusterIP"], "10.43.0.10");
    // An airgapped node forwards nowhere.
    let alone = kiln_cluster::node::dns::corefile(&node, &[]);
    assert!(!alone.contains("forward"), "{alone}");
}

#[test]
fn ceph_conf_and_daemons_of_a_first_monitor() {
    use kiln_cluster::ceph::conf;
    let node: kiln_spec::ceph::CephNode = serde_saphyr::from_str(
        "monitorAddress: 10.0.0.11\npublicNetwork: 10.0.0.0/24\npools:\n- {name: rbd, size: 3}\n- {name: scratch, size: 1, pgNum: 8}\n",
    )
    .unwrap();
    let fsid = "0b72ae7b-5a17-4f09-8572-829a37973a44";
    let text = conf::ceph_conf(&node, fsid, "node-1", false);
    assert_eq!(conf::conf_fsid(&text).as_deref(), Some(fsid));
    let services: String = [
        conf::mon_service("node-1", Some("ceph")),
        conf::mgr_service("node-1", Some("ceph")),
        conf::osd_service(2, Some("ceph")),
    ]
    .iter()
    .map(|s| format!("--- service {}\n{}\n", s.name, s.argv.join(" ")))
    .collect();
    golden("ceph-first-monitor.txt", &format!("{text}{services}"));
    assert_eq!(
        conf::mon_addrs("fd00::1".parse().unwrap()),
        "[v2:[fd00::1]:3300,v1:[fd00::1]:6789]"
    );
}

#[test]
fn ceph_conf_of_the_nodes_of_a_cluster_of_several() {
    use kiln_cluster::ceph::conf;
    let fsid = "0b72ae7b-5a17-4f09-8572-829a37973a44";
    let keys = conf::new_keys();
    let text: String = [
        ("first-monitor", Some("10.0.0.11"), "node-1"),
        ("monitor", Some("10.0.0.12"), "node-2"),
        ("osd", None, "node-3"),
    ]
    .into_iter()
    .map(|(role, address, name)| {
        let mut node: kiln_spec::ceph::CephNode = serde_saphyr::from_str(&format!(
            "role: {role}\nfsid: {fsid}\npublicNetwork: 10.0.0.0/24\nmonitors: [10.0.0.11, 10.0.0.12]\n"
        ))
        .unwrap();
        node.monitor_address = address.map(String::from);
        node.keys = Some(keys.clone());
        if role == "osd" {
            node.keys.as_mut().unwrap().monitor = None;
        }
        // The fleet's keys are well-formed cephx keys, and each role's config valid.
        let mut errs = kiln_spec::errors::ValidationErrors::default();
        node.validate_into("ceph", 1, &mut errs);
        assert!(errs.0.is_empty(), "{role}: {errs:?}");
        format!("--- {name} ({role})\n{}", conf::ceph_conf(&node, fsid, name, false))
    })
    .collect();
    golden("ceph-cluster-nodes.txt", &text);
}
