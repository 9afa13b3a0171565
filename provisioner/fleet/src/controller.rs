//! The provisioner as a Kubernetes controller: the rollout engine of `kiln fleet rollout`, over
//! a store kept in the cluster instead of the embedded one — each Machine's progress in its
//! status (server-side apply), an Event on the Machine for every stage change, the counts in
//! the Rollout's status — run by whichever replica holds the rollout's Lease.

use std::collections::{BTreeMap, BTreeSet};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use k8s_openapi::api::core::v1::{ObjectReference, Secret};
use kiln_bmc::{BmcTarget, Password};
use kiln_spec::Inventory;
use kiln_spec::inventory::{InventoryNode, InventorySpec, Metadata};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};
use kube_lease_manager::{LeaseManagerBuilder, LeaseManagerError};

use crate::crd::{Machine, MachineStatus, PASSWORD_KEY, RolloutResource, RolloutStatus};
use crate::metrics::FleetMetrics;
use crate::rollout::{Actuator, Rollout, RolloutError, RolloutOptions, Shared, Target};
use crate::stage::{Failure, Limits, NodeProgress, Stage, StageEntry};
use crate::store::{RolloutInfo, RolloutStore, Snapshot, StoreError, StoredReport};

/// The field manager of everything the controller writes.
pub const FIELD_MANAGER: &str = "kiln-fleet-controller";
/// Phone-home reports kept in a Machine's status.
const REPORTS_KEPT: usize = 32;
/// The Rollout's counts are written at most this often while it runs (and once at the end).
const ROLLOUT_STATUS_EVERY: Duration = Duration::from_secs(1);

/// How hard the controller may drive the API server. Client defaults elsewhere (5 QPS, burst
/// 10) were the bottleneck of large bare-metal scale tests, so these are higher and settable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientLimits {
    pub qps: NonZeroU32,
    pub burst: NonZeroU32,
    /// Requests in flight at once when a reconcile pass writes many Machines.
    pub concurrency: usize,
}

impl Default for ClientLimits {
    fn default() -> ClientLimits {
        ClientLimits {
            qps: NonZeroU32::new(200).expect("non-zero"),
            burst: NonZeroU32::new(400).expect("non-zero"),
            concurrency: 32,
        }
    }
}

struct Cached {
    status: Option<MachineStatus>,
    reference: ObjectReference,
    /// Held while the Machine's status is written, so the last write sends the newest state.
    write: Arc<tokio::sync::Mutex<()>>,
}

/// A replica's API requests: within its rate limit, counted in its metrics.
#[derive(Clone, Debug)]
pub(crate) struct Requests {
    limiter: Arc<DefaultDirectRateLimiter>,
    metrics: Arc<FleetMetrics>,
}

impl Requests {
    pub(crate) async fn call<T>(
        &self,
        what: impl Into<String>,
        request: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, StoreError> {
        self.limiter.until_ready().await;
        self.metrics.api_request();
        request.await.map_err(kube_err(what))
    }
}

/// The rollout's state in the cluster. Reads come from what it wrote (it is the only writer
/// while it holds the lease), so only writes cost requests.
pub struct KubeStore {
    runtime: tokio::runtime::Handle,
    namespace: String,
    rollout: String,
    machines: Api<Machine>,
    rollouts: Api<RolloutResource>,
    recorder: Recorder,
    requests: Requests,
    concurrency: usize,
    cache: Mutex<BTreeMap<String, Cached>>,
    info: Mutex<Option<RolloutInfo>>,
    rollout_status: Mutex<(Option<RolloutStatus>, Option<Instant>)>,
}

impl std::fmt::Debug for KubeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeStore")
            .field("rollout", &self.location())
            .finish_non_exhaustive()
    }
}

fn kube_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> StoreError {
    let what = what.into();
    move |source| StoreError::Kube { what, source }
}

impl KubeStore {
    /// Reads every Machine of `namespace` (the progress a previous leader left) once; returns
    /// them with the store.
    pub async fn open(
        client: Client,
        namespace: &str,
        rollout: &str,
        identity: &str,
        limits: ClientLimits,
        metrics: Arc<FleetMetrics>,
    ) -> Result<(KubeStore, Vec<Machine>), StoreError> {
        let store = KubeStore {
            runtime: tokio::runtime::Handle::current(),
            namespace: namespace.into(),
            rollout: rollout.into(),
            machines: Api::namespaced(client.clone(), namespace),
            rollouts: Api::namespaced(client.clone(), namespace),
            recorder: Recorder::new(
                client,
                Reporter {
                    controller: FIELD_MANAGER.into(),
                    instance: Some(identity.into()),
                },
            ),
            requests: Requests {
                limiter: Arc::new(RateLimiter::direct(
                    Quota::per_second(limits.qps).allow_burst(limits.burst),
                )),
                metrics,
            },
            concurrency: limits.concurrency.max(1),
            cache: Mutex::default(),
            info: Mutex::default(),
            rollout_status: Mutex::default(),
        };
        let machines = store.list_machines().await?;
        let mut cache = store.cache.lock().expect("cache lock");
        for m in &machines {
            let status = m.status.clone().filter(|s| s.rollout == rollout);
            cache.insert(
                m.name_any(),
                Cached {
                    status,
                    reference: m.object_ref(&()),
                    write: Arc::default(),
                },
            );
        }
        drop(cache);
        Ok((store, machines))
    }

    /// Every Machine of the namespace, a page at a time.
    async fn list_machines(&self) -> Result<Vec<Machine>, StoreError> {
        let mut all = Vec::new();
        let mut params = ListParams::default().limit(500);
        loop {
            let page = self
                .call("listing Machines", self.machines.list(&params))
                .await?;
            all.extend(page.items);
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(next) => params = params.continue_token(&next),
                None => return Ok(all),
            }
        }
    }

    /// One request, within the rate limit.
    async fn call<T>(
        &self,
        what: impl Into<String>,
        request: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, StoreError> {
        self.requests.call(what, request).await
    }

    /// What changes the Machines' metadata beside the store (their finalizers).
    pub(crate) fn holder(&self) -> crate::follow::Holder {
        crate::follow::Holder {
            machines: self.machines.clone(),
            requests: self.requests.clone(),
            concurrency: self.concurrency,
        }
    }

    /// Runs `f` to its end from synchronous code: the engine's thread, or a handler on a
    /// multi-threaded runtime (which it leaves to other tasks meanwhile).
    fn block<T>(&self, f: impl Future<Output = T>) -> T {
        match tokio::runtime::Handle::try_current() {
            Ok(_) => tokio::task::block_in_place(|| self.runtime.block_on(f)),
            Err(_) => self.runtime.block_on(f),
        }
    }

    /// Writes the Machine's whole status as the cache has it (server-side apply: the fields
    /// are the controller's).
    async fn write_status(&self, name: &str) -> Result<(), StoreError> {
        let lock = match self.cache.lock().expect("cache lock").get(name) {
            Some(c) => c.write.clone(),
            None => return Err(self.unknown(name)),
        };
        let _writing = lock.lock().await;
        let status = self.cache.lock().expect("cache lock")[name].status.clone();
        let patch = serde_json::json!({
            "apiVersion": "kiln.dev/v1alpha1",
            "kind": "Machine",
            "status": status,
        });
        let written = self
            .call(
                format!("writing the status of Machine {name}"),
                self.machines.patch_status(
                    name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&patch),
                ),
            )
            .await;
        match written {
            // Deleted (and let go of): there is no status left to keep.
            Err(StoreError::Kube {
                source: kube::Error::Api(e),
                ..
            }) if e.code == 404 => {
                tracing::debug!(machine = name, "not written: the Machine is gone");
                Ok(())
            }
            other => other.map(drop),
        }
    }

    fn unknown(&self, name: &str) -> StoreError {
        StoreError::UnknownNode {
            node: name.into(),
            store: self.location(),
        }
    }

    /// Changes the node's cached status with `f`, then writes it.
    fn update(&self, name: &str, f: impl FnOnce(&mut MachineStatus)) -> Result<(), StoreError> {
        {
            let mut cache = self.cache.lock().expect("cache lock");
            let Some(status) = cache.get_mut(name).and_then(|c| c.status.as_mut()) else {
                return Err(self.unknown(name));
            };
            f(status);
        }
        self.block(self.write_status(name))
    }

    /// The Rollout's counts, written when they changed (at most every
    /// [`ROLLOUT_STATUS_EVERY`], and at once when every Machine is done).
    async fn write_rollout_status(&self) {
        let status = {
            let cache = self.cache.lock().expect("cache lock");
            let mut s = RolloutStatus::default();
            for stage in cache
                .values()
                .filter_map(|c| c.status.as_ref())
                .map(|st| st.progress.stage)
            {
                s.total += 1;
                s.ready += u32::from(stage == Stage::Ready);
                s.failed += u32::from(stage == Stage::Failed);
                *s.stages.entry(stage.as_str().to_string()).or_default() += 1;
            }
            s.started_ms = self
                .info
                .lock()
                .expect("info lock")
                .as_ref()
                .map(|i| i.started_ms);
            s
        };
        {
            let mut last = self.rollout_status.lock().expect("status lock");
            let all_done = status.ready + status.failed == status.total;
            let due = last.1.is_none_or(|t| t.elapsed() >= ROLLOUT_STATUS_EVERY);
            if last.0.as_ref() == Some(&status) || !(due || all_done) {
                return;
            }
            *last = (Some(status.clone()), Some(Instant::now()));
        }
        let patch = serde_json::json!({
            "apiVersion": "kiln.dev/v1alpha1",
            "kind": "Rollout",
            "status": status,
        });
        let written = self
            .call(
                format!("writing the status of Rollout {}", self.rollout),
                self.rollouts.patch_status(
                    &self.rollout,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&patch),
                ),
            )
            .await;
        if let Err(e) = written {
            // Counts only: the next change writes them again.
            self.rollout_status.lock().expect("status lock").0 = None;
            tracing::warn!("{e}");
        }
    }

    /// An Event on the Machine for its stage change, as `kubectl describe machine` shows it.
    async fn stage_event(
        &self,
        reference: &ObjectReference,
        from: Stage,
        to: &StageEntry,
        failure: Option<&Failure>,
    ) {
        let mut note = format!("{from} → {}", to.stage);
        if let Some(why) = to.note.as_deref() {
            note.push_str(": ");
            note.push_str(why);
        }
        if let Some(f) = failure {
            note = format!("{} failed: {}", f.stage, f.reason);
        }
        // An Event's note is at most 1 kB.
        if note.len() > 1000 {
            note = note.chars().take(900).collect();
        }
        let event = Event {
            type_: if to.stage == Stage::Failed {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: event_reason(to.stage),
            note: Some(note),
            action: "Rollout".into(),
            secondary: None,
        };
        let sent = self
            .call(
                "recording an Event",
                self.recorder.publish(&event, reference),
            )
            .await;
        if let Err(e) = sent {
            tracing::warn!("{e}");
        }
    }
}

/// The reason of the Event a Machine gets on entering `stage`: `PoweringOn`, `Ready`, …
pub fn event_reason(stage: Stage) -> String {
    stage
        .as_str()
        .split('-')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_uppercase().chain(c).collect::<String>())
                .unwrap_or_default()
        })
        .collect()
}

impl RolloutStore for KubeStore {
    fn location(&self) -> String {
        format!("Rollout {}/{}", self.namespace, self.rollout)
    }

    fn read(&self) -> Result<Snapshot, StoreError> {
        let cache = self.cache.lock().expect("cache lock");
        let mut snapshot = Snapshot {
            rollout: self.info.lock().expect("info lock").clone(),
            ..Snapshot::default()
        };
        for (name, status) in cache
            .iter()
            .filter_map(|(n, c)| Some((n, c.status.as_ref()?)))
        {
            snapshot.nodes.push((name.clone(), status.progress.clone()));
            snapshot
                .reports
                .extend(status.reports.iter().map(|r| (name.clone(), r.clone())));
            snapshot.token_hashes.extend(
                status
                    .enrolment_token_hashes
                    .iter()
                    .map(|h| (name.clone(), h.clone())),
            );
        }
        Ok(snapshot)
    }

    fn put_nodes(&self, nodes: &[(String, NodeProgress)]) -> Result<(), StoreError> {
        let mut changes = Vec::new();
        {
            let mut cache = self.cache.lock().expect("cache lock");
            for (name, progress) in nodes {
                let Some(c) = cache.get_mut(name) else {
                    return Err(self.unknown(name));
                };
                match &mut c.status {
                    Some(s) => {
                        for (left, entered) in
                            crate::stage::stage_changes(&s.progress.history, &progress.history)
                        {
                            let failure = progress
                                .failure
                                .clone()
                                .filter(|_| entered.stage == Stage::Failed);
                            changes.push((c.reference.clone(), left.stage, entered, failure));
                        }
                        s.progress = progress.clone();
                    }
                    None => {
                        c.status = Some(MachineStatus {
                            rollout: self.rollout.clone(),
                            progress: progress.clone(),
                            reports: Vec::new(),
                            hardware: None,
                            enrolment_token_hashes: Vec::new(),
                        });
                    }
                }
            }
        }
        self.block(async {
            futures::stream::iter(nodes)
                .map(|(name, _)| self.write_status(name))
                .buffer_unordered(self.concurrency)
                .try_collect::<Vec<()>>()
                .await?;
            futures::stream::iter(&changes)
                .for_each_concurrent(self.concurrency, |(reference, from, to, failure)| {
                    self.stage_event(reference, *from, to, failure.as_ref())
                })
                .await;
            self.write_rollout_status().await;
            Ok(())
        })
    }

    fn set_rollout(&self, info: &RolloutInfo) -> Result<(), StoreError> {
        *self.info.lock().expect("info lock") = Some(info.clone());
        Ok(())
    }

    fn add_report(&self, node: &str, report: &StoredReport) -> Result<(), StoreError> {
        self.update(node, |s| {
            let mut report = report.clone();
            // Kept once, in its own field, not in every report's copy.
            if let Some(hardware) = report.report.hardware.take() {
                s.hardware = Some(hardware);
            }
            s.reports.push(report);
            let extra = s.reports.len().saturating_sub(REPORTS_KEPT);
            s.reports.drain(..extra);
        })
    }

    fn add_token_hash(&self, node: &str, hash: &str) -> Result<(), StoreError> {
        self.update(node, |s| s.enrolment_token_hashes.push(hash.to_string()))
    }
}

/// The Machines as an inventory (names, roles, boot MACs, labels), for selectors and the
/// netboot services' per-MAC decisions. BMCs stay out: their passwords live in Secrets.
pub fn inventory_of(machines: &[Machine]) -> Inventory {
    let nodes = machines
        .iter()
        .map(|m| {
            let mut labels = m.labels().clone();
            labels.remove("kiln.dev/role");
            InventoryNode {
                name: m.name_any(),
                role: m.spec.role,
                boot_macs: m.spec.boot_macs.clone(),
                boot_address: m.spec.boot_address,
                bmc: None,
                labels,
                overrides: m.spec.overrides.clone(),
            }
        })
        .collect();
    Inventory {
        api_version: "kiln.dev/v1alpha1".into(),
        kind: "Inventory".into(),
        metadata: Metadata::default(),
        spec: InventorySpec {
            netboot: None,
            nodes,
        },
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("{what}: {source}")]
    Kube {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("leader election: {0}")]
    Lease(#[from] LeaseManagerError),
    #[error("the leader election stopped")]
    LeaseEnded,
    #[error("Rollout {rollout}: {reason}")]
    Rollout { rollout: String, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Engine(#[from] RolloutError),
}

/// One replica of the controller.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    pub namespace: String,
    /// The Rollout resource it drives.
    pub rollout: String,
    /// This replica's name in the Lease (unique among the replicas).
    pub identity: String,
    /// How long a lead lasts without renewal: a dead leader's successor takes over after it.
    pub lease: Duration,
    pub client: ClientLimits,
    /// How often the engine looks at deadlines and retries.
    pub resync: Duration,
    /// Stage deadlines and BMC retries; parallelism comes from the Rollout.
    pub limits: Limits,
    /// The netboot services' trace (named in netboot timeouts).
    pub trace_file: std::path::PathBuf,
}

/// How a replica's run ended.
#[derive(Debug)]
pub enum ReplicaEnd {
    /// It led the rollout to its end: every Machine is ready or failed.
    Finished(Vec<(String, NodeProgress)>),
    /// Another replica holds the lease now.
    LostLead,
    /// Asked to stop.
    Stopped,
}

/// The Rollout resource `name` of `namespace`.
pub async fn read_rollout(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<RolloutResource, ControllerError> {
    Api::<RolloutResource>::namespaced(client.clone(), namespace)
        .get(name)
        .await
        .map_err(|source| ControllerError::Kube {
            what: format!("reading Rollout {namespace}/{name}"),
            source,
        })
}

/// The Lease the replicas of one rollout share.
pub fn lease_name(rollout: &str) -> String {
    format!("kiln-rollout-{rollout}")
}

/// The Machines the Rollout selects, as rollout targets with their BMCs (passwords read from
/// their Secrets).
async fn targets(
    client: &Client,
    namespace: &str,
    rollout: &RolloutResource,
    inventory: &Inventory,
    machines: &[Machine],
) -> Result<Vec<Target>, ControllerError> {
    let refused = |reason| ControllerError::Rollout {
        rollout: rollout.name_any(),
        reason,
    };
    let chosen =
        crate::plan::select(inventory, rollout.spec.selector.as_deref()).map_err(refused)?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let mut out = Vec::new();
    for node in chosen {
        let m = machines
            .iter()
            .find(|m| m.name_any() == node.name)
            .expect("selected from these machines");
        let bmc = match &m.spec.bmc {
            None => None,
            Some(b) => {
                let secret = secrets.get(&b.credentials_secret).await.map_err(|source| {
                    ControllerError::Kube {
                        what: format!(
                            "Machine {}: reading its BMC Secret {}",
                            node.name, b.credentials_secret
                        ),
                        source,
                    }
                })?;
                let password = secret
                    .data
                    .as_ref()
                    .and_then(|d| d.get(PASSWORD_KEY))
                    .map(|v| String::from_utf8_lossy(&v.0).trim_end().to_string())
                    .ok_or_else(|| {
                        refused(format!(
                            "Machine {}: Secret {} has no `{PASSWORD_KEY}`",
                            node.name, b.credentials_secret
                        ))
                    })?;
                Some(BmcTarget {
                    protocol: b.protocol,
                    host: b.address.clone(),
                    port: b.port.unwrap_or_else(|| b.protocol.default_port()),
                    username: b.username.clone(),
                    password: Password::new(password),
                    ca_cert: None,
                    insecure: b.insecure,
                    plain_http: b.allow_plain_http,
                    timeout: BmcTarget::rollout_timeout(b.protocol),
                    retries: 3,
                    cipher_suite: kiln_bmc::ipmi::CipherSuite::Suite3,
                })
            }
        };
        out.push(Target::of(node, bmc));
    }
    Ok(out)
}

/// Stops the engine when the replica's run is dropped (its runtime shut down, its task
/// aborted), so a dead replica never acts again.
struct StopOnDrop(kiln_agent::engine::Trigger);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// Aborts the task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs one replica: waits for the rollout's Lease, then drives the Rollout with the same
/// engine as `kiln fleet rollout` until every selected Machine is done, the lead is lost or
/// `stop` fires. Once it leads, `actuator` makes what acts on the selected machines (the BMC
/// drivers)
/// and `serve` starts what the machines reach (the netboot services, reporting into the
/// rollout's [`Shared`]) for the Machines as an inventory, a new one sent on each change of
/// them; what `serve` returns is kept until the replica stops leading. No machine is powered
/// before `serve` is done. The driven Machines carry [`crate::follow::FINALIZER`] while the
/// rollout runs; one deleted meanwhile is withdrawn (failed where it stands) and let go.
pub async fn run_replica<G, S>(
    client: Client,
    config: ReplicaConfig,
    actuator: impl FnOnce(Arc<Shared>, &[Target]) -> Arc<dyn Actuator>,
    serve: impl FnOnce(Arc<Shared>, tokio::sync::watch::Receiver<Inventory>) -> S,
    stop: kiln_netboot::server::CancellationToken,
) -> Result<ReplicaEnd, ControllerError>
where
    S: Future<Output = Result<G, String>>,
{
    let secs = config.lease.as_secs().max(3);
    // Renewed once a third of the lease has passed (as Kubernetes' own leader election
    // does), so a leader whose API server answers late for up to two thirds of it keeps
    // the lead rather than handing a live rollout over.
    let manager = LeaseManagerBuilder::new(client.clone(), lease_name(&config.rollout))
        .with_namespace(&config.namespace)
        .with_identity(&config.identity)
        .with_duration(secs)
        .with_grace(secs * 2 / 3)
        .with_field_manager(FIELD_MANAGER)
        .build()
        .await?;
    let (mut leading, lease_task) = manager.watch().await;
    while !*leading.borrow_and_update() {
        tokio::select! {
            changed = leading.changed() => {
                if changed.is_err() {
                    return Err(lease_ended(lease_task).await);
                }
            }
            () = stop.cancelled() => return Ok(ReplicaEnd::Stopped),
        }
    }
    tracing::info!(identity = %config.identity, rollout = %config.rollout, "leading");
    let resource = read_rollout(&client, &config.namespace, &config.rollout).await?;
    let metrics = Arc::new(FleetMetrics::new());
    let (store, machines) = KubeStore::open(
        client.clone(),
        &config.namespace,
        &config.rollout,
        &config.identity,
        config.client,
        metrics.clone(),
    )
    .await?;
    let holder = store.holder();
    // A Machine deleted while no replica led is not driven; one this rollout held is let go.
    let (deleting, machines): (Vec<Machine>, Vec<Machine>) =
        machines.into_iter().partition(crate::follow::being_deleted);
    let ours: Vec<&Machine> = deleting
        .iter()
        .filter(|m| {
            m.status
                .as_ref()
                .is_none_or(|s| s.rollout == config.rollout)
        })
        .collect();
    holder.set(&ours, false).await?;
    let inventory = inventory_of(&machines);
    let targets = targets(&client, &config.namespace, &resource, &inventory, &machines).await?;
    let driven: BTreeSet<String> = targets.iter().map(|t| t.name.clone()).collect();
    let held: Vec<&Machine> = machines
        .iter()
        .filter(|m| driven.contains(&m.name_any()))
        .collect();
    holder.set(&held, true).await?;
    let parallel = resource.spec.parallelism.max(1) as usize;
    let opts = RolloutOptions {
        limits: Limits {
            parallel,
            netboot_parallel: parallel,
            max_unavailable: resource.spec.max_unavailable.map(|m| m.max(1) as usize),
            ..config.limits.clone()
        },
        image_sha256: resource.spec.image_sha256.clone(),
        events: None,
        trace_file: config.trace_file.clone(),
        reinstall: false,
        metrics,
    };
    let rollout = Rollout::new(&targets, &opts, Box::new(store), None, |shared| {
        actuator(shared, &targets)
    })?;
    let stop_engine = StopOnDrop(rollout.stopper());
    let (inventories, served) = tokio::sync::watch::channel(inventory);
    let known = machines.into_iter().map(|m| (m.name_any(), m)).collect();
    let _following = AbortOnDrop(tokio::spawn(crate::follow::follow(
        holder.clone(),
        rollout.shared.clone(),
        driven.clone(),
        known,
        inventories,
    )));
    let _served = serve(rollout.shared.clone(), served)
        .await
        .map_err(|reason| ControllerError::Rollout {
            rollout: config.rollout.clone(),
            reason,
        })?;
    let resync = config.resync;
    let mut engine = tokio::task::spawn_blocking(move || rollout.run(resync));
    let end = tokio::select! {
        done = &mut engine => ReplicaEnd::Finished(done.expect("the rollout engine panicked")),
        () = lost(&mut leading) => {
            stop_engine.0.stop();
            let _ = engine.await;
            ReplicaEnd::LostLead
        }
        () = stop.cancelled() => {
            stop_engine.0.stop();
            let _ = engine.await;
            ReplicaEnd::Stopped
        }
    };
    if let ReplicaEnd::Finished(nodes) = &end {
        let count = |stage| nodes.iter().filter(|(_, p)| p.stage == stage).count();
        tracing::info!(
            rollout = %config.rollout,
            ready = count(Stage::Ready),
            failed = count(Stage::Failed),
            held_back = count(Stage::Pending),
            "the rollout is over; letting go of its Machines"
        );
        if let Err(e) = holder.release(&driven).await {
            tracing::warn!(
                "the rollout is over, but its finalizer ({}) is still on some Machines: {e}",
                crate::follow::FINALIZER
            );
        }
    }
    // Closing the channel releases the Lease (when still held).
    drop(leading);
    let _ = lease_task.await;
    Ok(end)
}

async fn lost(leading: &mut tokio::sync::watch::Receiver<bool>) {
    loop {
        if leading.changed().await.is_err() || !*leading.borrow_and_update() {
            return;
        }
    }
}

async fn lease_ended(
    task: tokio::task::JoinHandle<Result<kube_lease_manager::LeaseManager, LeaseManagerError>>,
) -> ControllerError {
    match task.await {
        Ok(Err(e)) => e.into(),
        _ => ControllerError::LeaseEnded,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_events_are_named_in_pascal_case() {
        assert_eq!(event_reason(Stage::PoweringOn), "PoweringOn");
        assert_eq!(event_reason(Stage::Ready), "Ready");
    }

    #[test]
    fn machines_give_back_the_inventory_they_were_imported_from_less_the_bmcs() {
        let inventory = Inventory::from_yaml(
            r#"
apiVersion: kiln.dev/v1alpha1
kind: Inventory
spec:
  nodes:
    - name: node-01
      role: storage
      bootMACs: ["52:54:00:00:00:01"]
      bootAddress: 10.0.0.11
      labels: {rack: r1}
      bmc: {protocol: ipmi, address: 10.0.0.1, username: admin, passwordRef: {file: p}}
      overrides:
        install: {disk: {minSize: 20GiB, transport: [nvme]}, wipe: kilnOnly}
"#,
        )
        .unwrap();
        let back = inventory_of(&crate::crd::machines_from(&inventory, "ns").machines);
        let mut want = inventory.spec.nodes.clone();
        want[0].bmc = None;
        assert_eq!(back.spec.nodes, want);
    }
}
