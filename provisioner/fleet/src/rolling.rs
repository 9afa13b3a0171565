//! The rolling upgrade controller: one [`upgrade::step`] per node, run by the reconcile engine
//! the agent and the rollout use. Agent answers and maintenance results land in an inbox and
//! wake the controller; the engine's periodic resync drives the status reads of rebooting
//! nodes and the deadlines. Every change of a node's progress is committed to the store
//! before anything else sees it, so a stopped upgrade resumes where it was.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_agent::engine::{Controller, Ctx, ReconcileError, Resource, Runtime, Trigger};
use kiln_agent::slots::UpgradeReport;
use kiln_agent::status::NodeStatus;
use kiln_cluster::ceph::CephAdmin;
use kiln_cluster::kube_client::Client;
use kiln_cluster::maintenance::{self, EnterOptions};

use crate::mailbox::Mailbox;
use crate::remote::{CHANGE_TIMEOUT, NodeApi, READ_TIMEOUT};
use crate::rollout::{now_ms, open_event_log};
use crate::store::{Store, StoreError, UpgradeInfo};
use crate::upgrade::{
    self, NodeUpgrade, SlotTarget, UpgradeAction, UpgradeEntry, UpgradeInput, UpgradeLimits,
    UpgradeObservation, UpgradeStage,
};

const CONTROLLER: &str = "fleet-upgrade";

/// What the controller and the action tasks share.
pub struct UpgradeShared {
    store: Store,
    inbox: Mailbox<UpgradeObservation>,
    events: Option<Mutex<std::fs::File>>,
}

impl std::fmt::Debug for UpgradeShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpgradeShared")
            .field("store", &self.store.path())
            .finish_non_exhaustive()
    }
}

impl UpgradeShared {
    pub fn observe(&self, node: &str, obs: UpgradeObservation) {
        self.inbox.post(node, obs);
    }
}

/// Runs a node's actions without blocking the controller; results come back as observations.
pub trait UpgradeActuator: Send + Sync {
    fn start(&self, node: &str, action: UpgradeAction);
}

/// The cluster a fleet's nodes belong to, for maintenance around each node's upgrade.
pub struct ClusterAccess {
    pub client: Client,
    pub ceph: Box<dyn CephAdmin + Send + Sync>,
    pub enter: EnterOptions,
}

impl std::fmt::Debug for ClusterAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterAccess").finish_non_exhaustive()
    }
}

/// The real one: the nodes' agent APIs over mTLS, and the cluster's API server.
pub struct AgentActuator {
    pub runtime: tokio::runtime::Handle,
    pub apis: BTreeMap<String, Arc<NodeApi>>,
    /// The image's base URL, as the nodes fetch it.
    pub image: String,
    pub cluster: Option<Arc<ClusterAccess>>,
    pub shared: Arc<UpgradeShared>,
}

impl std::fmt::Debug for AgentActuator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentActuator")
            .field("image", &self.image)
            .finish_non_exhaustive()
    }
}

/// The agent's status, read over its network API.
pub async fn read_status(api: &NodeApi) -> Result<NodeStatus, String> {
    let body = api
        .request(reqwest::Method::GET, "/v1/status", READ_TIMEOUT)
        .await
        .map_err(|e| e.to_string())?;
    serde_json::from_slice(&body).map_err(|e| format!("the agent's status: {e}"))
}

/// Asks the node's agent to write `image` into its other slot (and reboot, unless dry).
pub async fn request_upgrade(
    api: &NodeApi,
    image: &str,
    dry_run: bool,
) -> Result<UpgradeReport, String> {
    let query = serde_urlencoded::to_string([
        ("image", image),
        ("reboot", if dry_run { "false" } else { "true" }),
        ("dryRun", if dry_run { "true" } else { "false" }),
    ])
    .map_err(|e| e.to_string())?;
    let body = api
        .request(
            reqwest::Method::POST,
            &format!("/v1/upgrade?{query}"),
            CHANGE_TIMEOUT,
        )
        .await
        .map_err(|e| e.to_string())?;
    serde_json::from_slice(&body).map_err(|e| format!("the agent's upgrade report: {e}"))
}

/// Puts `node` into maintenance or takes it out, as `action` says.
pub async fn maintenance_step(
    cluster: &ClusterAccess,
    node: &str,
    action: UpgradeAction,
) -> UpgradeObservation {
    let result = if action == UpgradeAction::EnterMaintenance {
        maintenance::enter(&cluster.client, node, cluster.ceph.as_ref(), &cluster.enter)
            .await
            .map(|r| {
                format!(
                    "in maintenance: {} VMs migrated, {} pods evicted",
                    r.migrated, r.evicted
                )
            })
    } else {
        maintenance::exit(&cluster.client, node, cluster.ceph.as_ref())
            .await
            .map(|()| "left maintenance".to_string())
    };
    UpgradeObservation::Maintenance(result.map_err(|e| e.to_string()))
}

impl UpgradeActuator for AgentActuator {
    fn start(&self, node: &str, action: UpgradeAction) {
        let (shared, node) = (self.shared.clone(), node.to_string());
        let api = self.apis.get(&node).cloned();
        let (image, cluster) = (self.image.clone(), self.cluster.clone());
        self.runtime.spawn(async move {
            let missing = |what: &str| format!("no {what} for node {node}");
            let obs = match (action, api, cluster) {
                (UpgradeAction::Status, Some(api), _) => {
                    UpgradeObservation::Status(read_status(&api).await.map(Box::new))
                }
                (UpgradeAction::Status, None, _) => {
                    UpgradeObservation::Status(Err(missing("agent API")))
                }
                (UpgradeAction::Upgrade, Some(api), _) => {
                    UpgradeObservation::Written(request_upgrade(&api, &image, false).await.map(
                        |r| SlotTarget {
                            slot: r.plan.target,
                            generation: r.plan.entry.generation,
                        },
                    ))
                }
                (UpgradeAction::Upgrade, None, _) => {
                    UpgradeObservation::Written(Err(missing("agent API")))
                }
                (_, _, Some(c)) => maintenance_step(&c, &node, action).await,
                (_, _, None) => UpgradeObservation::Maintenance(Err(missing("cluster access"))),
            };
            shared.observe(&node, obs);
        });
    }
}

/// A node's committed upgrade progress.
#[derive(Debug, Clone, PartialEq)]
pub struct UpgradeStatus(pub NodeUpgrade);

impl Resource for UpgradeStatus {
    const KIND: &'static str = "FleetNodeUpgrade";
}

struct NodeRun {
    progress: NodeUpgrade,
    busy: bool,
}

struct UpgradeController {
    shared: Arc<UpgradeShared>,
    limits: UpgradeLimits,
    image_sha256: String,
    /// In upgrade order.
    order: Vec<String>,
    nodes: BTreeMap<String, NodeRun>,
    actuator: Arc<dyn UpgradeActuator>,
    started_ms: u64,
}

impl Controller for UpgradeController {
    fn name(&self) -> &'static str {
        CONTROLLER
    }
    fn inputs(&self) -> Vec<&'static str> {
        vec![]
    }
    fn outputs(&self) -> Vec<&'static str> {
        vec![UpgradeStatus::KIND]
    }
    fn reconcile(&mut self, ctx: &mut Ctx<'_>) -> Result<(), ReconcileError> {
        let now = now_ms();
        let mut fresh: BTreeMap<String, Vec<UpgradeObservation>> = BTreeMap::new();
        for (node, obs) in self.shared.inbox.take() {
            fresh.entry(node).or_default().push(obs);
        }
        let mut unavailable = self
            .nodes
            .values()
            .filter(|n| n.progress.stage.is_active())
            .count();
        let mut halted = self
            .nodes
            .values()
            .any(|n| n.progress.stage == UpgradeStage::Failed);
        for name in &self.order {
            let run = self.nodes.get_mut(name).expect("known node");
            let observations = fresh.remove(name).unwrap_or_default();
            if !observations.is_empty() {
                run.busy = false;
            }
            let before = run.progress.clone();
            let actions = upgrade::step(
                &mut run.progress,
                &observations,
                UpgradeInput {
                    now_ms: now,
                    limits: &self.limits,
                    unavailable,
                    halted,
                    busy: run.busy,
                    image_sha256: &self.image_sha256,
                },
            );
            if run.progress != before {
                // Committed first: a stop after this line resumes from here.
                self.shared
                    .store
                    .put_upgrades(&[(name.clone(), run.progress.clone())])?;
                unavailable = unavailable + usize::from(run.progress.stage.is_active())
                    - usize::from(before.stage.is_active());
                halted |= run.progress.stage == UpgradeStage::Failed;
                for (left, entered) in
                    crate::stage::stage_changes(&before.history, &run.progress.history)
                {
                    announce(
                        &self.shared,
                        name,
                        &left,
                        &entered,
                        &run.progress,
                        self.started_ms,
                    );
                }
            }
            for action in actions {
                run.busy = true;
                self.actuator.start(name, action);
            }
            ctx.put(name, UpgradeStatus(run.progress.clone()))?;
        }
        Ok(())
    }
}

/// One progress line per stage change on stderr, and one JSON event per change: from `left`
/// into `entered`, the node now being `after`.
fn announce(
    shared: &UpgradeShared,
    node: &str,
    left: &UpgradeEntry,
    entered: &UpgradeEntry,
    after: &NodeUpgrade,
    started: u64,
) {
    let took = entered.at_ms.saturating_sub(left.at_ms) as f64 / 1000.0;
    let note = entered.note.clone();
    eprintln!(
        "[{:>7.1}s] {node:<16} {} → {} ({took:.1}s){}",
        entered.at_ms.saturating_sub(started) as f64 / 1000.0,
        left.stage,
        entered.stage,
        note.as_deref()
            .map(|n| format!(": {n}"))
            .unwrap_or_default()
    );
    if let Some(f) = &shared.events {
        let line = serde_json::json!({
            "atMs": entered.at_ms,
            "node": node,
            "from": left.stage,
            "stage": entered.stage,
            "secondsInPrevious": took,
            "note": note,
            "failure": after.failure,
            "target": after.target,
        });
        let _ = writeln!(f.lock().expect("events lock"), "{line}");
    }
}

/// How to start a rolling upgrade.
#[derive(Debug, Clone)]
pub struct UpgradeOptions {
    pub state_dir: PathBuf,
    pub limits: UpgradeLimits,
    /// The bundle's base URL and its root image's sha256.
    pub image: String,
    pub image_sha256: String,
    /// JSON lines of every stage change.
    pub events: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum UpgradeRunError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("opening the event log {path}: {source}")]
    Events {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A rolling upgrade, ready to run.
pub struct RollingUpgrade {
    runtime: Runtime,
    nodes: Vec<String>,
}

impl std::fmt::Debug for RollingUpgrade {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RollingUpgrade")
            .field("nodes", &self.nodes)
            .finish()
    }
}

impl RollingUpgrade {
    /// Opens the store and resumes every node of `nodes` (in upgrade order) from it. A node
    /// an earlier run upgraded to another image starts afresh.
    pub fn new(
        nodes: &[String],
        opts: &UpgradeOptions,
        actuator: impl FnOnce(Arc<UpgradeShared>) -> Arc<dyn UpgradeActuator>,
    ) -> Result<RollingUpgrade, UpgradeRunError> {
        let store = Store::open(&opts.state_dir)?;
        let snapshot = store.read()?;
        let now = now_ms();
        let same_image = snapshot
            .upgrade
            .as_ref()
            .is_some_and(|u| u.image_sha256 == opts.image_sha256);
        let resumed: Vec<(String, NodeUpgrade)> = nodes
            .iter()
            .map(|n| {
                let stored = snapshot.upgrade_of(n);
                let progress = if same_image {
                    NodeUpgrade::resume(stored, now)
                } else {
                    // Another image's run is over for this node, but not its maintenance.
                    let mut fresh = NodeUpgrade::new(now);
                    fresh.in_maintenance = stored.is_some_and(|p| p.in_maintenance);
                    fresh
                };
                (n.clone(), progress)
            })
            .collect();
        store.put_upgrades(&resumed)?;
        store.set_upgrade(&UpgradeInfo {
            image: opts.image.clone(),
            image_sha256: opts.image_sha256.clone(),
            started_ms: now,
            nodes: nodes.to_vec(),
        })?;
        let events = open_event_log(opts.events.as_deref())
            .map_err(|(path, source)| UpgradeRunError::Events { path, source })?;
        let shared = Arc::new(UpgradeShared {
            store,
            inbox: Mailbox::default(),
            events,
        });
        let mut runtime = Runtime::new();
        shared.inbox.connect(runtime.trigger(), CONTROLLER);
        let actuator = actuator(shared.clone());
        runtime
            .register(Box::new(UpgradeController {
                shared,
                limits: opts.limits.clone(),
                image_sha256: opts.image_sha256.clone(),
                order: nodes.to_vec(),
                nodes: resumed
                    .into_iter()
                    .map(|(n, progress)| {
                        (
                            n,
                            NodeRun {
                                progress,
                                busy: false,
                            },
                        )
                    })
                    .collect(),
                actuator,
                started_ms: now,
            }))
            .expect("fresh runtime");
        Ok(RollingUpgrade {
            runtime,
            nodes: nodes.to_vec(),
        })
    }

    /// Runs until every node is done, or a node failed and none is in progress any more (or
    /// `stop` is triggered); returns each node's progress.
    pub fn run(mut self, resync: Duration) -> Vec<(String, NodeUpgrade)> {
        self.runtime
            .run_to_end::<UpgradeStatus>(resync, &self.nodes, |all| {
                all.iter().all(|s| s.0.stage.is_done())
                    || (all.iter().any(|s| s.0.stage == UpgradeStage::Failed)
                        && !all.iter().any(|s| s.0.stage.is_active()))
            })
            .into_iter()
            .map(|(n, s)| (n, s.0))
            .collect()
    }

    /// Stops [`RollingUpgrade::run`] from another thread (a signal handler).
    pub fn stopper(&self) -> Trigger {
        self.runtime.trigger()
    }
}
