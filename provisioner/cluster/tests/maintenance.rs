//! Node maintenance against a real kube-apiserver + etcd. No kubelet or KubeVirt runs here:
//! stand-in controllers (kiln_cluster::testing) play kubelet (finish pod deletions) and
//! virt-controller (run migrations), and tests set PodDisruptionBudget status as the
//! disruption controller would.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, PersistentVolumeClaim, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kiln_cluster::maintenance::{self, EnterOptions, MaintenancePhase, MaintenanceState};
use kiln_cluster::testing::{
    HarnessOptions, RecordingCephAdmin, TestCluster, install_kubevirt_fixture_crds,
    standin_kubelet, standin_virt_controller, workload,
};
use kiln_cluster::{Error, status};
use kube::Client;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

fn opts(timeout: u64) -> EnterOptions {
    EnterOptions {
        dry_run: false,
        timeout: Duration::from_secs(timeout),
        allow_storage_outage: false,
    }
}

async fn setup(cluster: &TestCluster, ns: &str, nodes: &[&str]) -> Client {
    let client = cluster.client().await;
    install_kubevirt_fixture_crds(&client).await.unwrap();
    workload::namespace(&client, ns).await;
    for n in nodes {
        Api::<Node>::all(client.clone())
            .create(&PostParams::default(), &workload::node(n))
            .await
            .unwrap();
    }
    client
}

async fn create_pod(client: &Client, pod: Pod) {
    workload::run_pod(client, &pod).await.unwrap();
}

async fn create_vmi(
    client: &Client,
    ns: &str,
    name: &str,
    node: &str,
    strategy: Option<&str>,
    volumes: Value,
    conditions: Option<Value>,
) {
    let (mut vmi, launcher) = workload::vmi(ns, name, node, strategy, volumes);
    if let Some(c) = conditions {
        vmi.data["status"]["conditions"] = c;
    }
    Api::<DynamicObject>::namespaced_with(client.clone(), ns, &workload::vmi_resource())
        .create(&PostParams::default(), &vmi)
        .await
        .unwrap();
    create_pod(client, launcher).await;
}

async fn create_pvc(client: &Client, ns: &str, name: &str, mode: &str) {
    let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns},
        "spec": {"accessModes": [mode], "resources": {"requests": {"storage": "1Gi"}}},
    }))
    .unwrap();
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &pvc)
        .await
        .unwrap();
}

/// A PDB with the status the disruption controller would compute.
async fn create_pdb(client: &Client, ns: &str, name: &str, app: &str, disruptions_allowed: i32) {
    let api = Api::<PodDisruptionBudget>::namespaced(client.clone(), ns);
    let pdb: PodDisruptionBudget = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns},
        "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": app}}},
    }))
    .unwrap();
    api.create(&PostParams::default(), &pdb).await.unwrap();
    set_pdb_allowed(client, ns, name, disruptions_allowed).await;
}

async fn set_pdb_allowed(client: &Client, ns: &str, name: &str, disruptions_allowed: i32) {
    let api = Api::<PodDisruptionBudget>::namespaced(client.clone(), ns);
    let generation = api.get(name).await.unwrap().metadata.generation.unwrap();
    let status = json!({"status": {"observedGeneration": generation, "disruptionsAllowed": disruptions_allowed, "currentHealthy": 1 + disruptions_allowed, "desiredHealthy": 1, "expectedPods": 1 + disruptions_allowed}});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await
        .unwrap();
}

async fn pods_on(client: &Client, node: &str) -> Vec<String> {
    let mut names: Vec<String> = Api::<Pod>::all(client.clone())
        .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|p| p.metadata.name.unwrap())
        .collect();
    names.sort();
    names
}

async fn node(client: &Client, name: &str) -> Node {
    Api::<Node>::all(client.clone()).get(name).await.unwrap()
}

fn cordoned(n: &Node) -> bool {
    n.spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false)
}

async fn vmi_node(client: &Client, ns: &str, name: &str) -> String {
    let vmi = Api::<DynamicObject>::namespaced_with(client.clone(), ns, &workload::vmi_resource())
        .get(name)
        .await
        .unwrap();
    vmi.data["status"]["nodeName"].as_str().unwrap().to_string()
}

/// Retries while custom resource storage is still initializing after an API server restart.
async fn migrations(client: &Client, ns: &str) -> usize {
    let api = Api::<DynamicObject>::namespaced_with(client.clone(), ns, &workload::vmim_resource());
    for _ in 0..40 {
        match api.list(&ListParams::default()).await {
            Ok(list) => return list.items.len(),
            Err(kube::Error::Api(s)) if s.code == 429 => {
                tokio::time::sleep(Duration::from_millis(250)).await
            }
            Err(e) => panic!("listing migrations: {e}"),
        }
    }
    panic!("migrations never became listable")
}

#[tokio::test]
async fn migratable_vms_move_the_node_ends_empty_and_cordoned_and_exit_restores_it() {
    let cluster = TestCluster::shared();
    let (ns, src, dst) = ("mt-move", "move-1", "move-2");
    let client = setup(cluster, ns, &[src, dst]).await;
    let _kubelet = standin_kubelet(cluster.standin_client().await, ns);
    let _virt = standin_virt_controller(cluster.standin_client().await, ns, dst);

    create_pvc(&client, ns, "shared-disk", "ReadWriteMany").await;
    create_vmi(
        &client,
        ns,
        "vm-a",
        src,
        Some("LiveMigrate"),
        json!([{"name": "root", "containerDisk": {"image": "quay.io/containerdisks/fedora"}}]),
        None,
    )
    .await;
    create_vmi(
        &client,
        ns,
        "vm-b",
        src,
        None,
        json!([{"name": "root", "persistentVolumeClaim": {"claimName": "shared-disk"}}]),
        None,
    )
    .await;
    create_vmi(
        &client,
        ns,
        "vm-c",
        src,
        Some("LiveMigrateIfPossible"),
        json!([]),
        None,
    )
    .await;
    create_pod(
        &client,
        workload::pod(
            ns,
            "web-1",
            src,
            &[("app", "web")],
            Some(("ReplicaSet", "web-5d9")),
        ),
    )
    .await;
    create_pod(
        &client,
        workload::pod(ns, "batch-1", src, &[("app", "batch")], None),
    )
    .await;
    create_pod(
        &client,
        workload::pod(
            ns,
            "osd-4",
            src,
            &[("app", "rook-ceph-osd"), ("ceph-osd-id", "4")],
            Some(("ReplicaSet", "rook-ceph-osd-4-7c")),
        ),
    )
    .await;
    create_pod(
        &client,
        workload::pod(
            ns,
            "node-agent-x",
            src,
            &[("app", "agent")],
            Some(("DaemonSet", "node-agent")),
        ),
    )
    .await;
    create_pdb(&client, ns, "web", "web", 1).await;

    let ceph = RecordingCephAdmin::default();
    let dry = maintenance::enter(
        &client,
        src,
        &ceph,
        &EnterOptions {
            dry_run: true,
            timeout: Duration::from_secs(10),
            allow_storage_outage: false,
        },
    )
    .await
    .unwrap();
    assert!(
        !cordoned(&node(&client, src).await),
        "a dry run changes nothing"
    );
    assert_eq!(dry.plan.vms.len(), 3);
    assert_eq!(dry.plan.osds, [4]);

    let report = maintenance::enter(&client, src, &ceph, &opts(90))
        .await
        .unwrap();
    assert_eq!(
        (report.migrated, report.evicted),
        (3, 3),
        "{}",
        report.plan.render()
    );
    let n = node(&client, src).await;
    assert!(cordoned(&n));
    assert_eq!(
        MaintenanceState::from_node(&n).unwrap().phase,
        MaintenancePhase::InMaintenance
    );
    assert_eq!(
        pods_on(&client, src).await,
        ["node-agent-x"],
        "only the DaemonSet pod stays"
    );
    for vm in ["vm-a", "vm-b", "vm-c"] {
        assert_eq!(vmi_node(&client, ns, vm).await, dst, "{vm}");
    }
    assert_eq!(ceph.calls(), ["ceph osd add-noout osd.4"]);

    let st = status::fetch(&client).await.unwrap();
    let ns_status = st.nodes.iter().find(|x| x.name == src).unwrap();
    assert!(!ns_status.schedulable);
    assert_eq!(
        ns_status.maintenance.as_ref().unwrap().phase,
        MaintenancePhase::InMaintenance
    );

    // Running enter again on a node in maintenance is a no-op.
    let again = maintenance::enter(&client, src, &ceph, &opts(30))
        .await
        .unwrap();
    assert!(again.resumed);
    assert_eq!((again.migrated, again.evicted), (0, 0));

    maintenance::exit(&client, src, &ceph).await.unwrap();
    let n = node(&client, src).await;
    assert!(!cordoned(&n));
    assert!(MaintenanceState::from_node(&n).is_none());
    assert_eq!(ceph.calls().last().unwrap(), "ceph osd rm-noout osd.4");
    assert_eq!(
        migrations(&client, ns).await,
        0,
        "exit removes kiln's migrations"
    );
}

#[tokio::test]
async fn an_unmigratable_vm_blocks_with_a_report_and_nothing_is_touched() {
    let cluster = TestCluster::shared();
    let (ns, src) = ("mt-block", "block-1");
    let client = setup(cluster, ns, &[src]).await;
    create_pvc(&client, ns, "local-disk", "ReadWriteOnce").await;
    create_vmi(
        &client,
        ns,
        "db-vm",
        src,
        Some("LiveMigrate"),
        json!([{"name": "data", "persistentVolumeClaim": {"claimName": "local-disk"}}]),
        None,
    )
    .await;
    let gpu = json!([{"type": "Ready", "status": "True"}, {"type": "LiveMigratable", "status": "False", "reason": "HostDeviceNotLiveMigratable", "message": "VMI uses a host device"}]);
    create_vmi(&client, ns, "gpu-vm", src, None, json!([]), Some(gpu)).await;
    create_pod(
        &client,
        workload::pod(ns, "web-1", src, &[("app", "web")], None),
    )
    .await;

    let ceph = RecordingCephAdmin::default();
    let err = maintenance::enter(&client, src, &ceph, &opts(30))
        .await
        .unwrap_err();
    let Error::Blocked { report, .. } = &err else {
        panic!("{err}")
    };
    assert!(report.contains("BLOCKED   mt-block/db-vm (evictionStrategy LiveMigrate): not live-migratable: volume data: PersistentVolumeClaim local-disk is ReadWriteOnce (live migration needs ReadWriteMany)"), "{report}");
    assert!(report.contains("BLOCKED   mt-block/gpu-vm (evictionStrategy LiveMigrate): not live-migratable: LiveMigratable=False: HostDeviceNotLiveMigratable: VMI uses a host device"), "{report}");
    let n = node(&client, src).await;
    assert!(!cordoned(&n));
    assert!(MaintenanceState::from_node(&n).is_none());
    assert_eq!(migrations(&client, ns).await, 0);
    assert_eq!(pods_on(&client, src).await.len(), 3);
    assert!(ceph.calls().is_empty());
}

#[tokio::test]
async fn a_pdb_that_never_allows_eviction_times_out_naming_it() {
    let cluster = TestCluster::shared();
    let (ns, src) = ("mt-pdb", "pdb-1");
    let client = setup(cluster, ns, &[src]).await;
    let _kubelet = standin_kubelet(cluster.standin_client().await, ns);
    create_pod(
        &client,
        workload::pod(
            ns,
            "db-0",
            src,
            &[("app", "db")],
            Some(("StatefulSet", "db")),
        ),
    )
    .await;
    create_pod(
        &client,
        workload::pod(ns, "cache-0", src, &[("app", "cache")], None),
    )
    .await;
    create_pdb(&client, ns, "db-quorum", "db", 0).await;

    let ceph = RecordingCephAdmin::default();
    let err = maintenance::enter(&client, src, &ceph, &opts(5))
        .await
        .unwrap_err();
    let Error::Timeout { condition, .. } = &err else {
        panic!("{err}")
    };
    assert!(condition.starts_with("eviction of pod mt-pdb/db-0: PodDisruptionBudget mt-pdb/db-quorum to allow a disruption"), "{err}");
    assert!(err.to_string().starts_with("timed out after 5s"), "{err}");
    let n = node(&client, src).await;
    assert!(cordoned(&n));
    assert_eq!(
        MaintenanceState::from_node(&n).unwrap().phase,
        MaintenancePhase::Draining
    );
    assert_eq!(
        pods_on(&client, src).await,
        ["db-0"],
        "the other pod was evicted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_restart_mid_drain_is_resumed_by_entering_again() {
    // Its own API server: restarting the shared one would disturb the other tests.
    let mut cluster = TestCluster::start(HarnessOptions::default());
    let (ns, src, dst) = ("mt-restart", "restart-1", "restart-2");
    let client = setup(&cluster, ns, &[src, dst]).await;
    let kubelet = standin_kubelet(cluster.standin_client().await, ns);
    let virt = standin_virt_controller(cluster.standin_client().await, ns, dst);
    for vm in ["vm-1", "vm-2"] {
        create_vmi(&client, ns, vm, src, Some("LiveMigrate"), json!([]), None).await;
    }
    create_pod(
        &client,
        workload::pod(ns, "db-0", src, &[("app", "db")], None),
    )
    .await;
    create_pod(
        &client,
        workload::pod(ns, "web-0", src, &[("app", "web")], None),
    )
    .await;
    create_pdb(&client, ns, "db-quorum", "db", 0).await;

    let ceph = RecordingCephAdmin::default();
    let first = {
        let client = client.clone();
        tokio::spawn(async move {
            maintenance::enter(&client, src, &RecordingCephAdmin::default(), &opts(120)).await
        })
    };
    // Wait until the drain is under way (migrations done, db-0 held by its PDB).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let phase = MaintenanceState::from_node(&node(&client, src).await).map(|s| s.phase);
        if phase == Some(MaintenancePhase::Draining) && pods_on(&client, src).await == ["db-0"] {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "drain never started");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop((kubelet, virt));
    tokio::task::block_in_place(|| cluster.stop_apiserver());
    let err = first.await.unwrap().unwrap_err();
    assert!(
        matches!(err, Error::Kube { .. }),
        "the interrupted run fails on the lost connection: {err}"
    );
    tokio::task::block_in_place(|| cluster.restart_apiserver());

    let client = cluster.client().await;
    let _kubelet = standin_kubelet(cluster.standin_client().await, ns);
    set_pdb_allowed(&client, ns, "db-quorum", 1).await;
    let report = maintenance::enter(&client, src, &ceph, &opts(60))
        .await
        .unwrap();
    assert!(report.resumed);
    assert_eq!(
        report.migrated, 0,
        "migrations of the first run are not repeated"
    );
    assert_eq!(migrations(&client, ns).await, 2);
    assert!(pods_on(&client, src).await.is_empty());
    let n = node(&client, src).await;
    assert!(cordoned(&n));
    assert_eq!(
        MaintenanceState::from_node(&n).unwrap().phase,
        MaintenancePhase::InMaintenance
    );
}

#[tokio::test]
async fn cordon_and_uncordon() {
    let cluster = TestCluster::shared();
    let client = setup(cluster, "mt-cordon", &["cordon-1"]).await;
    maintenance::set_unschedulable(&client, "cordon-1", true)
        .await
        .unwrap();
    assert!(cordoned(&node(&client, "cordon-1").await));
    maintenance::set_unschedulable(&client, "cordon-1", false)
        .await
        .unwrap();
    assert!(!cordoned(&node(&client, "cordon-1").await));
}
