//! The rolling upgrade's cluster side against a real kube-apiserver + etcd: every node is
//! cordoned and drained (kiln's maintenance, with a stand-in kubelet finishing pod deletions)
//! while its slot is written, uncordoned once its new slot is blessed, and a node that fails
//! stays cordoned while the nodes after it are never touched. The node agents are stand-ins
//! here, named as such: the rack tier (`tests/fleet_rollout.rs`) upgrades real agents on
//! real firmware.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kiln_agent::status::{Condition, NodeStatus};
use kiln_cluster::maintenance::EnterOptions;
use kiln_cluster::testing::{RecordingCephAdmin, TestCluster, standin_kubelet, workload};
use kiln_fleet::rolling::{
    ClusterAccess, RollingUpgrade, UpgradeActuator, UpgradeOptions, UpgradeShared, maintenance_step,
};
use kiln_fleet::upgrade::{
    NodeUpgrade, SlotTarget, UpgradeAction, UpgradeLimits, UpgradeObservation, UpgradeStage,
};
use kiln_spec::boot::{Assessment, BootStatus, EntryState, SlotImage, SlotReport};
use kiln_spec::layout::Slot;
use kube::Client;
use kube::api::{Api, PostParams};

const NS: &str = "fleet-upgrade";
const NODES: [&str; 3] = ["fu-1", "fu-2", "fu-3"];

/// A node agent's status: `image` in `slot`, blessed, and the last assessment failed when
/// `failed` (slot B generation 2 did not pass).
fn agent_status(slot: Slot, generation: u32, image: &str, failed: bool) -> NodeStatus {
    NodeStatus {
        conditions: vec![Condition {
            kind: "Ready".into(),
            status: true,
            reason: "Converged".into(),
            message: String::new(),
        }],
        boot: Some(BootStatus {
            booted: SlotReport {
                slot,
                generation: Some(generation),
                state: Some(EntryState::Good),
                tries_left: None,
                image: Some(SlotImage {
                    rootfs_sha256: image.into(),
                    source: String::new(),
                    written: String::new(),
                }),
            },
            staged: None,
            rollback: None,
            next_boot: None,
            last_assessment: failed.then(|| Assessment {
                slot: Slot::B,
                generation: 2,
                good: false,
                reason: "ActionFailed: unit:web.service: start failed".into(),
                at: String::new(),
            }),
        }),
        ..Default::default()
    }
}

/// Stand-in node agents: image "old" in slot A; once asked, "new" in slot B, blessed — except
/// the `bad` node, which comes back on A with a failed assessment. Maintenance is the real
/// thing. Records whether each node was cordoned when its slot was written.
struct StandInAgents {
    shared: Arc<UpgradeShared>,
    runtime: tokio::runtime::Handle,
    cluster: Arc<ClusterAccess>,
    bad: &'static str,
    upgraded: Arc<Mutex<Vec<String>>>,
    cordoned_at_write: Arc<Mutex<BTreeMap<String, bool>>>,
}

impl UpgradeActuator for StandInAgents {
    fn start(&self, node: &str, action: UpgradeAction) {
        let (shared, node) = (self.shared.clone(), node.to_string());
        match action {
            UpgradeAction::Status => {
                let upgraded = self.upgraded.lock().unwrap().contains(&node);
                let status = match (upgraded, node == self.bad) {
                    (false, _) => agent_status(Slot::A, 1, "old", false),
                    (true, false) => agent_status(Slot::B, 2, "new", false),
                    (true, true) => agent_status(Slot::A, 1, "old", true),
                };
                shared.observe(&node, UpgradeObservation::Status(Ok(Box::new(status))));
            }
            UpgradeAction::Upgrade => {
                let (client, upgraded, cordoned) = (
                    self.cluster.client.clone(),
                    self.upgraded.clone(),
                    self.cordoned_at_write.clone(),
                );
                self.runtime.spawn(async move {
                    let n = Api::<Node>::all(client).get(&node).await.unwrap();
                    let unschedulable = n.spec.and_then(|s| s.unschedulable).unwrap_or(false);
                    cordoned.lock().unwrap().insert(node.clone(), unschedulable);
                    upgraded.lock().unwrap().push(node.clone());
                    shared.observe(
                        &node,
                        UpgradeObservation::Written(Ok(SlotTarget {
                            slot: Slot::B,
                            generation: 2,
                        })),
                    );
                });
            }
            UpgradeAction::EnterMaintenance | UpgradeAction::ExitMaintenance => {
                let cluster = self.cluster.clone();
                self.runtime.spawn(async move {
                    let obs = maintenance_step(&cluster, &node, action).await;
                    shared.observe(&node, obs);
                });
            }
        }
    }
}

fn run(
    state: &std::path::Path,
    runtime: &tokio::runtime::Runtime,
    cluster: &Arc<ClusterAccess>,
    bad: &'static str,
    cordoned_at_write: &Arc<Mutex<BTreeMap<String, bool>>>,
) -> BTreeMap<String, NodeUpgrade> {
    let nodes: Vec<String> = NODES.map(String::from).to_vec();
    let opts = UpgradeOptions {
        state_dir: state.to_path_buf(),
        limits: UpgradeLimits {
            maintenance: true,
            poll: Duration::ZERO,
            ..UpgradeLimits::default()
        },
        image: "http://images.invalid/v2".into(),
        image_sha256: "new".into(),
        events: None,
    };
    let rolling = RollingUpgrade::new(&nodes, &opts, |shared| {
        Arc::new(StandInAgents {
            shared,
            runtime: runtime.handle().clone(),
            cluster: cluster.clone(),
            bad,
            upgraded: Arc::new(Mutex::new(Vec::new())),
            cordoned_at_write: cordoned_at_write.clone(),
        })
    })
    .unwrap();
    rolling
        .run(Duration::from_millis(100))
        .into_iter()
        .collect()
}

async fn cordoned(client: &Client, node: &str) -> bool {
    Api::<Node>::all(client.clone())
        .get(node)
        .await
        .unwrap()
        .spec
        .and_then(|s| s.unschedulable)
        .unwrap_or(false)
}

async fn pods_on(client: &Client, node: &str) -> usize {
    Api::<Pod>::namespaced(client.clone(), NS)
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
        .count()
}

#[test]
fn each_node_is_drained_while_it_upgrades_and_a_failed_node_stays_cordoned() {
    let harness = TestCluster::shared();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (client, _kubelet) = runtime.block_on(async {
        let client = harness.client().await;
        workload::namespace(&client, NS).await;
        for n in NODES {
            Api::<Node>::all(client.clone())
                .create(&PostParams::default(), &workload::node(n))
                .await
                .unwrap();
            let pod = workload::pod(
                NS,
                &format!("web-{n}"),
                n,
                &[("app", "web")],
                Some(("ReplicaSet", "web")),
            );
            workload::run_pod(&client, &pod).await.unwrap();
        }
        let kubelet = standin_kubelet(harness.standin_client().await, NS);
        (client, kubelet)
    });
    let cluster = Arc::new(ClusterAccess {
        client: client.clone(),
        ceph: Box::new(RecordingCephAdmin::default()),
        enter: EnterOptions {
            dry_run: false,
            timeout: Duration::from_secs(120),
            allow_storage_outage: false,
        },
    });
    let state = tempfile::tempdir().unwrap();
    let at_write = Arc::new(Mutex::new(BTreeMap::new()));

    // fu-2's new slot fails: fu-1 is done, fu-2 failed and still cordoned, fu-3 untouched.
    let first = run(state.path(), &runtime, &cluster, "fu-2", &at_write);
    assert_eq!(first["fu-1"].stage, UpgradeStage::Done);
    assert_eq!(first["fu-2"].stage, UpgradeStage::Failed);
    assert_eq!(first["fu-3"].stage, UpgradeStage::Pending);
    let failure = first["fu-2"].failure.as_ref().unwrap();
    assert_eq!(
        failure.reason,
        "slot B (generation 2) failed and the node is back on slot A: \
         ActionFailed: unit:web.service: start failed"
    );
    assert!(first["fu-2"].in_maintenance);
    runtime.block_on(async {
        assert!(!cordoned(&client, "fu-1").await);
        assert_eq!(pods_on(&client, "fu-1").await, 0, "fu-1 was not drained");
        assert!(cordoned(&client, "fu-2").await);
        assert!(!cordoned(&client, "fu-3").await);
        assert_eq!(pods_on(&client, "fu-3").await, 1, "fu-3 was drained");
    });

    // Fixed and run again: fu-1 is left alone, fu-2 is tried again without entering
    // maintenance twice, fu-3 goes next; all end uncordoned.
    let second = run(state.path(), &runtime, &cluster, "none", &at_write);
    for n in NODES {
        assert_eq!(second[n].stage, UpgradeStage::Done, "{n}: {:?}", second[n]);
        assert!(!runtime.block_on(cordoned(&client, n)), "{n} is cordoned");
    }
    assert_eq!(
        second["fu-1"]
            .history
            .iter()
            .filter(|e| e.stage == UpgradeStage::Writing)
            .count(),
        1
    );
    assert_eq!(
        second["fu-2"]
            .history
            .iter()
            .filter(|e| e.stage == UpgradeStage::EnteringMaintenance)
            .count(),
        1,
        "{:?}",
        second["fu-2"].history
    );
    // Every slot write happened on a cordoned node.
    let at_write = at_write.lock().unwrap().clone();
    assert_eq!(at_write.len(), 3, "{at_write:?}");
    assert!(at_write.values().all(|c| *c), "{at_write:?}");
}
