//! The rollout controller: one [`stage::step`] per node, run by the reconcile engine the agent
//! uses. Outside events (BMC results, phone-home reports) land in an inbox; the inbox
//! controller turns them into per-node event resources, which wake the rollout controller; the
//! engine's periodic resync drives deadlines and retries. Every change of a node's progress is
//! committed to the store before anything else sees it.

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiln_agent::engine::{Controller, Ctx, ReconcileError, Resource, Runtime, Trigger};
use kiln_bmc::{BmcTarget, BootDevice, BootOverride, Password, PowerAction, PowerState};
use kiln_netboot::enrol::{Enrolment, Refusal};
use kiln_spec::enrol::{self, Report};
use kiln_spec::inventory::{NodeRole, SecretRef};

use crate::mailbox::Mailbox;
use crate::metrics::FleetMetrics;
use crate::stage::{
    self, BmcAction, BmcOutcome, Command, Limits, Load, NodeProgress, Observation, Stage,
    StageEntry, StepInput,
};
use crate::store::{MachineInfo, RolloutInfo, RolloutStore, Snapshot, StoreError, StoredReport};
use crate::webhook::Webhook;

const INBOX: &str = "fleet-inbox";
const ROLLOUT: &str = "fleet-rollout";
/// Enrolment tokens one node may hold in one rollout (one per script fetch).
const MAX_TOKENS_PER_NODE: usize = 16;

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One node of the rollout.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub role: NodeRole,
    /// Boot MACs, canonical form.
    pub macs: Vec<String>,
    pub bmc: Option<BmcTarget>,
}

impl Target {
    /// An inventory node as a rollout target, its BMC reached as `bmc`.
    pub fn of(node: &kiln_spec::InventoryNode, bmc: Option<BmcTarget>) -> Target {
        Target {
            name: node.name.clone(),
            role: node.role,
            macs: node
                .boot_macs
                .iter()
                .filter_map(|m| kiln_spec::inventory::parse_mac(m))
                .map(|m| kiln_spec::inventory::format_mac(&m))
                .collect(),
            bmc,
        }
    }
}

/// What the HTTP handlers, the BMC tasks and the controllers share.
pub struct Shared {
    store: Box<dyn RolloutStore>,
    inbox: Mailbox<Observation>,
    /// Each node's stage as last committed: what token decisions are made on.
    stages: RwLock<BTreeMap<String, Stage>>,
    token_hashes: RwLock<BTreeMap<String, Vec<String>>>,
    events: Option<Mutex<std::fs::File>>,
    webhook: Option<Webhook>,
    /// Counters of what this process does (BMC operations), for `/metrics`.
    pub metrics: Arc<FleetMetrics>,
    /// When the oldest news of a node not yet committed came in.
    news_since: Mutex<HashMap<String, std::time::Instant>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("store", &self.store.location())
            .finish_non_exhaustive()
    }
}

/// Why an operator's retry was not taken.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RetryRefused {
    #[error("{0} is not a node of this rollout")]
    UnknownNode(String),
    #[error("{node} is {stage}, not failed: only a failed node is retried")]
    NotFailed { node: String, stage: Stage },
}

impl Shared {
    fn observe(&self, node: &str, obs: Observation) {
        self.news_since
            .lock()
            .expect("news lock")
            .entry(node.to_string())
            .or_insert_with(std::time::Instant::now);
        self.inbox.post(node, obs);
    }

    /// What a BMC action came to (from an [`Actuator`]).
    pub fn bmc_result(&self, node: &str, action: BmcAction, outcome: BmcOutcome) {
        self.observe(node, Observation::Bmc { action, outcome });
    }

    /// Takes `node` out of the rollout (see [`Observation::Withdrawn`]).
    pub fn withdraw(&self, node: &str, why: &str) {
        self.observe(node, Observation::Withdrawn { why: why.into() });
    }

    /// The store as it is now, for the fleet view of the running rollout.
    pub fn snapshot(&self) -> Result<Snapshot, StoreError> {
        self.store.read()
    }

    /// Has the controller try a failed node again; `by` names who asked.
    pub fn retry(&self, node: &str, by: &str) -> Result<(), RetryRefused> {
        match self.stage(node) {
            None => Err(RetryRefused::UnknownNode(node.to_string())),
            Some(Stage::Failed) => {
                self.observe(node, Observation::Retry { by: by.to_string() });
                Ok(())
            }
            Some(stage) => Err(RetryRefused::NotFailed {
                node: node.to_string(),
                stage,
            }),
        }
    }

    /// The node's stage as last committed.
    pub fn stage(&self, node: &str) -> Option<Stage> {
        self.stages.read().expect("stages lock").get(node).copied()
    }

    fn event(&self, line: serde_json::Value) {
        if let Some(f) = &self.events {
            let mut f = f.lock().expect("events lock");
            let _ = writeln!(f, "{line}");
        }
        if let Some(w) = &self.webhook {
            w.send(line);
        }
    }
}

/// The rollout decides who may fetch configs and report: a token is handed out with each boot
/// script only while the rollout expects the node to netboot, kept as a hash in the store (all
/// of a node's tokens stay valid, so a node that booted before a restart can still report),
/// and every token of a node expires once it is ready.
impl Enrolment for Shared {
    fn install_token(&self, node: &str) -> Option<String> {
        if !matches!(
            self.stage(node),
            Some(Stage::PoweringOn | Stage::Netbooting)
        ) {
            return None;
        }
        let mut hashes = self.token_hashes.write().expect("tokens lock");
        let list = hashes.entry(node.to_string()).or_default();
        if list.len() >= MAX_TOKENS_PER_NODE {
            tracing::warn!(node, "enrolment token limit reached; no new token");
            return None;
        }
        let token = hex::encode(rand::random::<[u8; 32]>());
        let hash = enrol::token_hash(&token);
        if let Err(e) = self.store.add_token_hash(node, &hash) {
            tracing::error!(node, "storing an enrolment token: {e}");
            return None;
        }
        list.push(hash);
        Some(token)
    }

    fn verify(&self, node: &str, presented: Option<&str>) -> Result<(), Refusal> {
        let presented = presented.ok_or(Refusal::Missing)?;
        let hashes = self.token_hashes.read().expect("tokens lock");
        if !hashes
            .get(node)
            .is_some_and(|l| l.iter().any(|h| enrol::token_matches(presented, h)))
        {
            return Err(Refusal::WrongToken);
        }
        if self.stage(node) == Some(Stage::Ready) {
            return Err(Refusal::Expired);
        }
        Ok(())
    }

    /// Kept first, then handed to the controller.
    fn report(&self, node: &str, _mac: &[u8; 6], report: &Report) {
        let stored = StoredReport {
            at_ms: now_ms(),
            report: report.clone(),
        };
        if let Err(e) = self.store.add_report(node, &stored) {
            tracing::error!(node, "storing a phone-home report: {e}");
        }
        self.observe(node, Observation::Report(stored));
    }
}

/// Runs BMC actions without blocking the controller; results come back as observations.
pub trait Actuator: Send + Sync {
    fn start(&self, node: &str, action: BmcAction);
}

/// The real one: kiln-bmc drivers on a tokio runtime.
#[derive(Debug)]
pub struct BmcActuator {
    pub runtime: tokio::runtime::Handle,
    pub targets: HashMap<String, Option<BmcTarget>>,
    pub shared: Arc<Shared>,
    /// Bound on one whole action (session, boot device and power).
    pub timeout: Duration,
    /// Where each node's BMC password is kept (and the directory a relative file is in): it
    /// is read again for every action, so a password put right is used by the next try.
    pub passwords: HashMap<String, (SecretRef, PathBuf)>,
}

impl Actuator for BmcActuator {
    fn start(&self, node: &str, action: BmcAction) {
        let target =
            self.targets
                .get(node)
                .cloned()
                .flatten()
                .map(|mut t| match self.passwords.get(node) {
                    Some((secret, base)) => secret.resolve(base).map(|p| {
                        t.password = Password::new(p);
                        t
                    }),
                    None => Ok(t),
                });
        let shared = self.shared.clone();
        let node = node.to_string();
        let timeout = self.timeout;
        self.runtime.spawn(async move {
            let started = std::time::Instant::now();
            let outcome = match target {
                None => BmcOutcome::Failed {
                    kind: "config".into(),
                    message: "the inventory gives this node no bmc".into(),
                    transient: false,
                },
                Some(Err(e)) => BmcOutcome::Failed {
                    kind: "config".into(),
                    message: format!("reading the BMC password: {e}"),
                    transient: false,
                },
                Some(Ok(t)) => match tokio::time::timeout(timeout, bmc_action(t, action)).await {
                    Ok(o) => o,
                    Err(_) => BmcOutcome::Failed {
                        kind: "timeout".into(),
                        message: format!(
                            "no result within {}",
                            humantime::format_duration(timeout)
                        ),
                        transient: true,
                    },
                },
            };
            shared
                .metrics
                .bmc_operation(action, started.elapsed(), &outcome);
            shared.bmc_result(&node, action, outcome);
        });
    }
}

async fn bmc_action(target: BmcTarget, action: BmcAction) -> BmcOutcome {
    let failed = |e: kiln_bmc::BmcError| BmcOutcome::Failed {
        kind: e.kind().to_string(),
        message: e.to_string(),
        transient: e.is_transient(),
    };
    let driver = match kiln_bmc::connect(target) {
        Ok(d) => d,
        Err(e) => return failed(e),
    };
    let run = async {
        match action {
            BmcAction::NetbootOnce | BmcAction::NetbootIfOff => {
                driver
                    .set_boot_override(BootOverride {
                        device: BootDevice::Pxe,
                        persistent: false,
                        uefi: false,
                    })
                    .await?;
                match (driver.power_status().await?, action) {
                    (PowerState::On, BmcAction::NetbootOnce) => {
                        driver.power(PowerAction::Cycle).await?;
                        Ok(Some(
                            "the node was on: power-cycled into the network boot".to_string(),
                        ))
                    }
                    (PowerState::On, _) => Ok(Some(
                        "already on when asked again after a restart: not powered twice"
                            .to_string(),
                    )),
                    _ => {
                        driver.power(PowerAction::On).await?;
                        Ok(None)
                    }
                }
            }
            BmcAction::BootFromDisk => {
                driver
                    .set_boot_override(BootOverride {
                        device: BootDevice::Disk,
                        persistent: true,
                        uefi: false,
                    })
                    .await?;
                Ok(None)
            }
        }
    };
    match run.await {
        Ok(note) => BmcOutcome::Done { note },
        Err(e) => failed(e),
    }
}

/// Observations not yet applied, per node, in arrival order.
#[derive(Debug, Clone, Default, PartialEq)]
struct NodeEvents(Vec<Observation>);

impl Resource for NodeEvents {
    const KIND: &'static str = "FleetNodeEvents";
}

/// A node's committed progress.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeStatus(pub NodeProgress);

impl Resource for NodeStatus {
    const KIND: &'static str = "FleetNodeStatus";
}

struct Inbox {
    shared: Arc<Shared>,
}

impl Controller for Inbox {
    fn name(&self) -> &'static str {
        INBOX
    }
    fn inputs(&self) -> Vec<&'static str> {
        vec![]
    }
    fn outputs(&self) -> Vec<&'static str> {
        vec![NodeEvents::KIND]
    }
    fn reconcile(&mut self, ctx: &mut Ctx<'_>) -> Result<(), ReconcileError> {
        for (node, obs) in self.shared.inbox.take() {
            let mut events = ctx.get::<NodeEvents>(&node)?.unwrap_or_default();
            events.0.push(obs);
            ctx.put(&node, events)?;
        }
        Ok(())
    }
}

/// What a pass changes of a node (and puts back when its commit fails).
#[derive(Clone)]
struct NodeRun {
    progress: NodeProgress,
    /// Observations of this node already applied.
    applied: usize,
    bmc_busy: bool,
}

struct RolloutController {
    shared: Arc<Shared>,
    limits: Limits,
    nodes: BTreeMap<String, NodeRun>,
    /// Each node's boot MACs, for its netboot trace.
    macs: BTreeMap<String, Vec<String>>,
    actuator: Arc<dyn Actuator>,
    /// The netboot trace, for the last event of a node that never got going.
    trace_file: PathBuf,
    started_ms: u64,
}

impl RolloutController {
    /// What the netboot trace says about a node that has not started installing: its last
    /// event, or that it never showed up, naming the machines outside the inventory that did
    /// (a wrong MAC in the inventory looks exactly like that).
    fn netboot_hint(&self, macs: &[String]) -> String {
        let since = self.started_ms;
        let Ok(events) = kiln_netboot::trace::read_matching(&self.trace_file, |e| {
            e.at_ms >= since
                && (macs.contains(&e.mac)
                    || matches!(e.kind, kiln_netboot::trace::EventKind::DhcpIgnored { .. }))
        }) else {
            return "the netboot trace could not be read".into();
        };
        if let Some(last) = events.iter().rev().find(|e| macs.contains(&e.mac)) {
            return format!("last netboot event: {}", last.kind.describe());
        }
        let mut strangers: Vec<&str> = events.iter().map(|e| e.mac.as_str()).collect();
        strangers.sort_unstable();
        strangers.dedup();
        if strangers.is_empty() {
            "the node was never seen on the boot network".into()
        } else {
            strangers.truncate(8);
            format!(
                "the node was never seen on the boot network; machines not in the inventory \
                 asked to boot: {}",
                strangers.join(", ")
            )
        }
    }
}

impl Controller for RolloutController {
    fn name(&self) -> &'static str {
        ROLLOUT
    }
    fn inputs(&self) -> Vec<&'static str> {
        vec![NodeEvents::KIND]
    }
    fn outputs(&self) -> Vec<&'static str> {
        vec![NodeStatus::KIND]
    }
    fn reconcile(&mut self, ctx: &mut Ctx<'_>) -> Result<(), ReconcileError> {
        let now = now_ms();
        let mut load = Load::of(self.nodes.values().map(|n| &n.progress));
        // Each changed node as it was before this pass, to put back if the commit fails.
        let mut changed: Vec<(String, NodeRun)> = Vec::new();
        let mut commands: Vec<(String, BmcAction)> = Vec::new();
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        for name in names {
            let events = ctx.get::<NodeEvents>(&name)?.unwrap_or_default();
            let expiring = {
                let n = &self.nodes[&name];
                n.progress.stage == Stage::Netbooting
                    && now.saturating_sub(n.progress.since_ms)
                        > self.limits.netbooting.as_millis() as u64
            };
            let hint = if expiring {
                Some(self.netboot_hint(&self.macs[&name]))
            } else {
                None
            };
            let run = self.nodes.get_mut(&name).expect("known node");
            let before = run.clone();
            let fresh = &events.0[run.applied.min(events.0.len())..];
            run.applied = events.0.len();
            if fresh.iter().any(|o| matches!(o, Observation::Bmc { .. })) {
                run.bmc_busy = false;
            }
            let asked = stage::step(
                &mut run.progress,
                fresh,
                StepInput {
                    now_ms: now,
                    limits: &self.limits,
                    load,
                    bmc_busy: run.bmc_busy,
                    netboot_hint: hint.as_deref(),
                },
            );
            for Command::Bmc(action) in asked {
                run.bmc_busy = true;
                commands.push((name.clone(), action));
            }
            if run.progress != before.progress {
                load.count(before.progress.stage, -1);
                load.count(run.progress.stage, 1);
            }
            if run.progress != before.progress || run.applied != before.applied {
                changed.push((name, before));
            }
        }
        let commit: Vec<(String, NodeProgress)> = changed
            .iter()
            .filter(|(name, before)| self.nodes[name].progress != before.progress)
            .map(|(name, _)| (name.clone(), self.nodes[name].progress.clone()))
            .collect();
        // Committed first, in one batch: a crash after this resumes from here. When the
        // commit fails, the pass never happened: the next one takes the same step again.
        if !commit.is_empty()
            && let Err(e) = self.shared.store.put_nodes(&commit)
        {
            for (name, before) in changed {
                self.nodes.insert(name, before);
            }
            return Err(e.into());
        }
        for (name, before) in &changed {
            let after = &self.nodes[name].progress;
            if after == &before.progress {
                continue;
            }
            self.shared
                .stages
                .write()
                .expect("stages lock")
                .insert(name.clone(), after.stage);
            for (left, entered) in stage::stage_changes(&before.progress.history, &after.history) {
                announce(&self.shared, name, &left, &entered, after, self.started_ms);
            }
        }
        {
            let mut news = self.shared.news_since.lock().expect("news lock");
            for (name, before) in &changed {
                if self.nodes[name].applied != before.applied
                    && let Some(since) = news.remove(name)
                {
                    self.shared.metrics.committed(since.elapsed());
                }
            }
        }
        for (name, action) in commands {
            self.actuator.start(&name, action);
        }
        for (name, run) in &self.nodes {
            ctx.put(name, NodeStatus(run.progress.clone()))?;
        }
        Ok(())
    }
}

/// One progress line per stage change on stderr, and one JSON event per change: from `left`
/// into `entered`, the node now being `after`.
fn announce(
    shared: &Shared,
    node: &str,
    left: &StageEntry,
    entered: &StageEntry,
    after: &NodeProgress,
    started: u64,
) {
    let took = entered.at_ms.saturating_sub(left.at_ms) as f64 / 1000.0;
    let note = entered
        .note
        .as_deref()
        .map(|n| format!(": {n}"))
        .unwrap_or_default();
    eprintln!(
        "[{:>7.1}s] {node:<16} {} → {} ({took:.1}s){note}",
        entered.at_ms.saturating_sub(started) as f64 / 1000.0,
        left.stage,
        entered.stage,
    );
    shared.event(serde_json::json!({
        "atMs": entered.at_ms,
        "node": node,
        "from": left.stage,
        "stage": entered.stage,
        "secondsInPrevious": took,
        "note": entered.note,
        "failure": after.failure,
        "slot": after.slot,
        "imageSha256": after.image_sha256,
    }));
}

/// The JSON-lines log of stage changes at `path`, appended to; or why it cannot be opened.
pub(crate) fn open_event_log(
    path: Option<&std::path::Path>,
) -> Result<Option<Mutex<std::fs::File>>, (PathBuf, std::io::Error)> {
    path.map(|path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map(Mutex::new)
            .map_err(|e| (path.to_path_buf(), e))
    })
    .transpose()
}

/// A rollout, ready to run.
pub struct Rollout {
    pub shared: Arc<Shared>,
    runtime: Runtime,
    nodes: Vec<String>,
    limits: Limits,
}

impl std::fmt::Debug for Rollout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rollout")
            .field("nodes", &self.nodes)
            .finish()
    }
}

/// How to start a rollout.
#[derive(Debug, Clone)]
pub struct RolloutOptions {
    pub limits: Limits,
    /// sha256 of the root image the nodes install.
    pub image_sha256: String,
    /// JSON lines of every stage change.
    pub events: Option<PathBuf>,
    /// Where the netboot services keep their trace.
    pub trace_file: PathBuf,
    /// Install nodes again that an earlier rollout left ready.
    pub reinstall: bool,
    /// Where the rollout counts what it does (the store may count into it too).
    pub metrics: Arc<FleetMetrics>,
}

#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("opening the event log {path}: {source}")]
    Events {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What a node starts this run as: a fresh node, or what the store says, with in-flight
/// BMC actions forgotten (they are asked again) and failures retried.
fn resume(stored: Option<&NodeProgress>, opts: &RolloutOptions, now: u64) -> NodeProgress {
    let Some(p) = stored else {
        return NodeProgress::new(now);
    };
    let mut p = p.clone();
    match p.stage {
        Stage::Failed => {
            let why = p
                .failure
                .as_ref()
                .map(|f| format!("retrying after {} failed: {}", f.stage, f.reason))
                .unwrap_or_else(|| "retrying".into());
            p.start_over(now, why);
            p
        }
        Stage::Ready if opts.reinstall => {
            p.start_over(now, "reinstalling (--reinstall)".into());
            p
        }
        Stage::Ready if p.image_sha256.as_deref() != Some(opts.image_sha256.as_str()) => {
            // Installed with another image: left alone without explicit consent.
            p
        }
        _ => {
            p.take_over();
            p
        }
    }
}

impl Rollout {
    /// Resumes every node from `store` and wires the controllers.
    pub fn new(
        targets: &[Target],
        opts: &RolloutOptions,
        store: Box<dyn RolloutStore>,
        webhook: Option<Webhook>,
        actuator: impl FnOnce(Arc<Shared>) -> Arc<dyn Actuator>,
    ) -> Result<Rollout, RolloutError> {
        let snapshot: Snapshot = store.read()?;
        let now = now_ms();
        let events = open_event_log(opts.events.as_deref())
            .map_err(|(path, source)| RolloutError::Events { path, source })?;
        let mut token_hashes: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (node, hash) in &snapshot.token_hashes {
            token_hashes
                .entry(node.clone())
                .or_default()
                .push(hash.clone());
        }
        let resumed: Vec<(String, NodeProgress)> = targets
            .iter()
            .map(|t| (t.name.clone(), resume(snapshot.node(&t.name), opts, now)))
            .collect();
        store.put_nodes(&resumed)?;
        // Reports kept but not yet applied when the last run stopped are news to this one.
        let mut kept: BTreeMap<&str, Vec<&StoredReport>> = BTreeMap::new();
        for (node, r) in &snapshot.reports {
            kept.entry(node.as_str()).or_default().push(r);
        }
        let unapplied: Vec<(String, StoredReport)> = resumed
            .iter()
            .flat_map(|(node, p)| {
                p.unapplied(kept.remove(node.as_str()).unwrap_or_default())
                    .into_iter()
                    .map(|r| (node.clone(), r.clone()))
            })
            .collect();
        let mut nodes = BTreeMap::new();
        let mut stages = BTreeMap::new();
        for (t, (_, progress)) in targets.iter().zip(resumed) {
            stages.insert(t.name.clone(), progress.stage);
            nodes.insert(
                t.name.clone(),
                NodeRun {
                    progress,
                    applied: 0,
                    bmc_busy: false,
                },
            );
        }
        store.set_rollout(&RolloutInfo {
            image_sha256: opts.image_sha256.clone(),
            started_ms: now,
            nodes: targets.iter().map(|t| t.name.clone()).collect(),
            machines: targets
                .iter()
                .map(|t| {
                    let info = MachineInfo {
                        role: t.role,
                        macs: t.macs.clone(),
                    };
                    (t.name.clone(), info)
                })
                .collect(),
        })?;
        let shared = Arc::new(Shared {
            store,
            inbox: Mailbox::default(),
            stages: RwLock::new(stages),
            token_hashes: RwLock::new(token_hashes),
            events,
            webhook,
            metrics: opts.metrics.clone(),
            news_since: Mutex::default(),
        });
        let mut runtime = Runtime::new();
        shared.inbox.connect(runtime.trigger(), INBOX);
        for (node, r) in unapplied {
            tracing::info!(node, phase = ?r.report.phase, "applying a report the last run kept");
            shared.inbox.post(&node, Observation::Report(r));
        }
        let actuator = actuator(shared.clone());
        runtime
            .register(Box::new(Inbox {
                shared: shared.clone(),
            }))
            .expect("fresh runtime");
        runtime
            .register(Box::new(RolloutController {
                shared: shared.clone(),
                limits: opts.limits.clone(),
                nodes,
                macs: targets
                    .iter()
                    .map(|t| (t.name.clone(), t.macs.clone()))
                    .collect(),
                actuator,
                trace_file: opts.trace_file.clone(),
                started_ms: now,
            }))
            .expect("fresh runtime");
        Ok(Rollout {
            shared,
            runtime,
            nodes: targets.iter().map(|t| t.name.clone()).collect(),
            limits: opts.limits.clone(),
        })
    }

    /// Runs until every node is ready or failed (or `stop` is triggered); returns each node's
    /// final progress. Nodes held back by `max_unavailable` once nothing is left in progress
    /// stay pending.
    pub fn run(mut self, resync: Duration) -> Vec<(String, NodeProgress)> {
        let limits = self.limits.clone();
        self.runtime
            .run_to_end::<NodeStatus>(resync, &self.nodes, |all| {
                all.iter().all(|s| s.0.stage.is_done())
                    || limits.halted(&Load::of(all.iter().map(|s| &s.0)))
            })
            .into_iter()
            .map(|(n, s)| (n, s.0))
            .collect()
    }

    /// Stops [`Rollout::run`] from another thread (a signal handler).
    pub fn stopper(&self) -> Trigger {
        self.runtime.trigger()
    }
}

#[cfg(test)]
mod tests {
    use kiln_spec::enrol::Phase;

    use super::*;

    /// A state directory, options and the one node `node-01` of a rollout.
    fn one_node() -> (tempfile::TempDir, RolloutOptions, [Target; 1]) {
        let dir = tempfile::tempdir().unwrap();
        let opts = RolloutOptions {
            limits: Limits::default(),
            image_sha256: "0".repeat(64),
            events: None,
            trace_file: dir.path().join("trace.jsonl"),
            reinstall: false,
            metrics: Arc::default(),
        };
        let targets = [Target {
            name: "node-01".into(),
            role: NodeRole::Worker,
            macs: vec!["52:54:00:00:00:01".into()],
            bmc: None,
        }];
        (dir, opts, targets)
    }

    /// Answers every BMC action at once, as done.
    struct AnsweringBmcs(Arc<Shared>);

    impl Actuator for AnsweringBmcs {
        fn start(&self, node: &str, action: BmcAction) {
            self.0
                .bmc_result(node, action, BmcOutcome::Done { note: None });
        }
    }

    #[test]
    fn a_report_kept_by_a_run_that_died_before_applying_it_is_applied_by_the_next() {
        let (dir, opts, targets) = one_node();
        let node = targets[0].name.as_str();
        // The last run committed the node as rebooting after its install, then kept the
        // agent's report and died before its engine applied it.
        let start = now_ms();
        let kept = |phase, at_ms| {
            let mut report = Report::new(phase, None);
            report.image_sha256 = Some(opts.image_sha256.clone());
            StoredReport { at_ms, report }
        };
        let mut progress = NodeProgress::new(start);
        let limits = Limits::default();
        for (at, obs) in [
            (start + 1, None),
            (
                start + 2,
                Some(Observation::Bmc {
                    action: BmcAction::NetbootOnce,
                    outcome: BmcOutcome::Done { note: None },
                }),
            ),
            (
                start + 3,
                Some(Observation::Report(kept(
                    Phase::InstallerStarted,
                    start + 3,
                ))),
            ),
            (
                start + 4,
                Some(Observation::Report(kept(Phase::Installed, start + 4))),
            ),
        ] {
            let input = StepInput {
                now_ms: at,
                limits: &limits,
                load: Load::default(),
                bmc_busy: false,
                netboot_hint: None,
            };
            stage::step(&mut progress, obs.as_slice(), input);
        }
        assert_eq!(progress.stage, Stage::Rebooting);
        let store = crate::store::Store::open(dir.path()).unwrap();
        store.put_nodes(&[(node.into(), progress)]).unwrap();
        store
            .add_report(node, &kept(Phase::AgentReady, start + 5))
            .unwrap();

        let rollout = Rollout::new(&targets, &opts, Box::new(store), None, |shared| {
            Arc::new(AnsweringBmcs(shared)) as Arc<dyn Actuator>
        })
        .unwrap();
        // A hang guard only: without the kept report the node would wait for its deadline.
        let stop = rollout.stopper();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(60));
            stop.stop();
        });
        let end = rollout.run(Duration::from_millis(50));
        assert_eq!(end[0].1.stage, Stage::Ready, "{:?}", end[0].1.history);
        assert_eq!(end[0].1.installs, 1);
        assert_eq!(end[0].1.reports_through_ms, Some(start + 5));
    }

    #[test]
    fn the_bmc_actuator_counts_each_operation_in_the_rollouts_metrics() {
        let (dir, opts, targets) = one_node();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let mut actuator = None;
        let store = Box::new(crate::store::Store::open(dir.path()).unwrap());
        let rollout = Rollout::new(&targets, &opts, store, None, |shared| {
            let a: Arc<dyn Actuator> = Arc::new(BmcActuator {
                runtime: rt.handle().clone(),
                // The inventory gave it no BMC: the operation fails at once, as a config error.
                targets: HashMap::from([("node-01".to_string(), None)]),
                shared,
                timeout: Duration::from_secs(5),
                passwords: HashMap::new(),
            });
            actuator = Some(a.clone());
            a
        })
        .unwrap();
        actuator.unwrap().start("node-01", BmcAction::NetbootOnce);
        let counted =
            "kiln_fleet_bmc_operation_errors_total{action=\"netboot-once\",kind=\"config\"} 1";
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let metrics = &rollout.shared.metrics;
        while !metrics
            .render(&Snapshot::default(), 0, None)
            .lines()
            .any(|l| l == counted)
        {
            assert!(std::time::Instant::now() < deadline, "never counted");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
