//! The agent's controllers, layered like machined: config (read and merge sources) → render
//! (desired resources) → host (the only one that touches the OS) → status.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use kiln_spec::nodeconfig::merge;
use kiln_spec::{NodeConfig, NodeSpec, SpecError, ValidationErrors};
use tokio::sync::broadcast;

use crate::apply::{self, StateStore};
use crate::ceph::CephState;
use crate::desired::{self, Desired};
use crate::engine::{Controller, Ctx, ReconcileError, Resource};
use crate::host::Host;
use crate::kubernetes::KubernetesState;
use crate::metrics::Metrics;
use crate::plan::{self, Action, Record};
use crate::status::{
    ApplyReport, Condition, ConfigReport, Event, FieldProblem, NodeStatus, PlanReport,
    PlannedAction, ResourceState, ResourceStatus, now,
};

/// Where the node config comes from, lowest priority first. The first source must exist;
/// later ones (local overrides) are optional.
#[derive(Debug, Clone)]
pub struct Sources {
    pub installed: PathBuf,
    pub overrides: Vec<PathBuf>,
}

/// Production locations, relative to the host root.
pub const INSTALLED_CONFIG: &str = "/var/lib/kiln/node.yaml";
pub const OVERRIDE_CONFIG: &str = "/etc/kiln/node.override.yaml";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergedConfig {
    pub spec: NodeSpec,
    pub sources: Vec<String>,
}
impl Resource for MergedConfig {
    const KIND: &'static str = "MergedConfig";
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigState(pub ConfigReport);
impl Resource for ConfigState {
    const KIND: &'static str = "ConfigState";
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredState {
    pub desired: Desired,
    /// [`Desired::generation`], computed once per change.
    pub generation: String,
}
impl Resource for DesiredState {
    const KIND: &'static str = "DesiredState";
}

/// Problems found while rendering the merged config (collisions with generated files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderState(pub Vec<FieldProblem>);
impl Resource for RenderState {
    const KIND: &'static str = "RenderState";
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatusResource(pub NodeStatus);
impl Resource for NodeStatusResource {
    const KIND: &'static str = "NodeStatus";
}

pub const ID: &str = "node";

fn problems(errors: ValidationErrors, source: Option<&str>) -> Vec<FieldProblem> {
    errors
        .0
        .into_iter()
        .map(|e| FieldProblem {
            path: e.path,
            reason: e.reason,
            source: source.map(String::from),
        })
        .collect()
}

/// Reads, validates and merges the sources. All problems of all sources at once.
pub fn load(sources: &Sources) -> Result<MergedConfig, Vec<FieldProblem>> {
    let mut specs = Vec::new();
    let mut names = Vec::new();
    let mut errs = Vec::new();
    let all = std::iter::once((&sources.installed, true))
        .chain(sources.overrides.iter().map(|p| (p, false)));
    for (path, required) in all {
        let shown = path.display().to_string();
        match NodeConfig::load(path) {
            Ok(c) => {
                specs.push(c.spec);
                names.push(shown);
            }
            Err(SpecError::Read { source, .. })
                if !required && source.kind() == std::io::ErrorKind::NotFound => {}
            Err(SpecError::Read { source, .. }) => errs.push(FieldProblem {
                path: String::new(),
                reason: format!("reading: {source}"),
                source: Some(shown),
            }),
            Err(SpecError::Parse { message, .. }) => errs.push(FieldProblem {
                path: String::new(),
                reason: message,
                source: Some(shown),
            }),
            Err(SpecError::Invalid { errors, .. }) => errs.extend(problems(errors, Some(&shown))),
        }
    }
    if !errs.is_empty() {
        return Err(errs);
    }
    let spec = merge(&specs);
    let mut merged_errs = ValidationErrors::default();
    spec.validate_into("spec", &mut merged_errs);
    if !merged_errs.is_empty() {
        return Err(problems(merged_errs, Some("merged sources")));
    }
    Ok(MergedConfig {
        spec,
        sources: names,
    })
}

/// Config layer: re-reads every source on each reconcile. An invalid config leaves the last
/// good `MergedConfig` in place, so the host keeps the last good state.
#[derive(Debug)]
pub struct ConfigController {
    pub sources: Sources,
}

impl Controller for ConfigController {
    fn name(&self) -> &'static str {
        "config"
    }
    fn inputs(&self) -> Vec<&'static str> {
        vec![]
    }
    fn outputs(&self) -> Vec<&'static str> {
        vec![MergedConfig::KIND, ConfigState::KIND]
    }
    fn reconcile(&mut self, ctx: &mut Ctx<'_>) -> Result<(), ReconcileError> {
        match load(&self.sources) {
            Ok(m) => {
                let report = ConfigReport {
                    valid: true,
                    sources: m.sources.clone(),
                    ..ConfigReport::default()
                };
                ctx.put(ID, m)?;
                ctx.put(ID, ConfigState(report))?;
            }
            Err(errors) => {
                ctx.put(
                    ID,
                    ConfigState(ConfigReport {
                        valid: false,
                        errors,
                        ..ConfigReport::default()
                    }),
                )?;
            }
        }
        Ok(())
    }
}

/// Spec layer: merged config → desired host resources (pure).
#[derive(Debug)]
pub struct RenderController;

impl Controller for RenderController {
    fn name(&self) -> &'static str {
        "render"
    }
    fn inputs(&self) -> Vec<&'static str> {
        vec![MergedConfig::KIND]
    }
    fn outputs(&self) -> Vec<&'static str> {
        vec![DesiredState::KIND, RenderState::KIND]
    }
    fn reconcile(&mut self, ctx: &mut Ctx<'_>) -> Result<(), ReconcileError> {
        let Some(m) = ctx.get::<MergedConfig>(ID)? else {
            return Ok(());
        };
        match desired::render(&m.spec) {
            Ok(d) => {
                let generation = d.generation();
                ctx.put(
                    ID,
                    DesiredState {
                        desired: d,
                        generation,
                    },
                )?;
                ctx.put(ID, RenderState(vec![]))?;
            }
            Err(e) => {
                ctx.put(ID, RenderState(problems(e, None)))?;
            }
        }
        Ok(())
    }
}

/// State shared between the engine thread, the API and the file watcher.
#[derive(Debug)]
pub struct Shared {
    pub status: RwLock<NodeStatus>,
    pub events: broadcast::Sender<Event>,
    pub metrics: Metrics,
    /// Host paths the agent manages, for the file watcher.
    pub managed: RwLock<BTreeSet<String>>,
    pub watch_changed: std::sync::Mutex<Option<std::sync::mpsc::Sender<()>>>,
}

impl Shared {
    pub fn new() -> Shared {
        Shared {
            status: RwLock::default(),
            events: broadcast::channel(1024).0,
            metrics: Metrics::new(),
            managed: RwLock::default(),
            watch_changed: std::sync::Mutex::new(None),
        }
    }

    pub fn emit(&self, e: Event) {
        tracing::info!(kind = %e.kind, resource = e.resource.as_deref().unwrap_or(""), "{}", e.message);
        let _ = self.events.send(e);
    }
}

impl Default for Shared {
    fn default() -> Self {
        Self::new()
    }
}

/// Status layer and the only controller that changes the host: diff → apply → verify.
#[derive(Debug)]
pub struct HostController {
    pub host: Host,
    pub store: StateStore,
    pub shared: Arc<Shared>,
    pub slot: String,
    /// Generation last applied without failure: differences found while it is still the
    /// desired one are drift.
    applied: Option<String>,
    digests: plan::DigestCache,
    drift_repairs: u64,
    last_apply: Option<ApplyReport>,
    recovered: Option<String>,
}

impl HostController {
    pub fn new(
        host: Host,
        shared: Arc<Shared>,
        slot: String,
        recovered: Option<String>,
    ) -> HostController {
        let store = StateStore::new(&host.sysroot);
        HostController {
            host,
            store,
            shared,
            slot,
            applied: None,
            digests: plan::DigestCache::default(),
            drift_repairs: 0,
            last_apply: None,
            recovered,
        }
    }
}

impl Controller for HostController {
    fn name(&self) -> &'static str {
        "host"
    }
    fn inputs(&self) -> Vec<&'static str> {
        vec![
            DesiredState::KIND,
            ConfigState::KIND,
            RenderState::KIND,
            KubernetesState::KIND,
            CephState::KIND,
        ]
    }
    fn outputs(&self) -> Vec<&'static str> {
        vec![NodeStatusResource::KIND]
    }
    fn reconcile(&mut self, ctx: &mut Ctx<'_>) -> Result<(), ReconcileError> {
        let mut config = ctx.get::<ConfigState>(ID)?.map(|c| c.0).unwrap_or_default();
        let render = ctx.get::<RenderState>(ID)?.map(|r| r.0).unwrap_or_default();
        if !render.is_empty() {
            config.valid = false;
            config.errors.extend(render);
        }
        self.report_rejection(&config);
        let Some(DesiredState {
            desired,
            generation,
        }) = ctx.get::<DesiredState>(ID)?
        else {
            let status = self.no_config_status(config);
            return self.publish(ctx, status);
        };
        config.generation = Some(generation);
        let outcome = self.converge(&desired, config.generation.as_deref())?;
        self.watch(&desired, &outcome.record)?;
        let kubernetes = ctx.get::<KubernetesState>(ID)?;
        let mut status = build_status(
            self,
            &config,
            &desired,
            &outcome.actual,
            &outcome.failed,
            &outcome.remaining,
            &outcome.drift,
        );
        if let Some(k) = kubernetes {
            status
                .conditions
                .push(cond("KubernetesReady", k.ready, &k.reason, &k.message));
            status.kubernetes = Some(k.report);
        }
        if let Some(c) = ctx.get::<CephState>(ID)? {
            status
                .conditions
                .push(cond("CephHealthy", c.healthy, &c.reason, &c.message));
            status.ceph = Some(c.report);
        }
        self.publish(ctx, status)?;
        if outcome.failed.is_empty() && outcome.remaining.is_empty() {
            self.applied = config.generation;
            Ok(())
        } else {
            Err(format!(
                "{} action(s) failed, {} still to do",
                outcome.failed.len(),
                outcome.remaining.len()
            )
            .into())
        }
    }
}

/// What one pass of diff → apply → verify found and did.
struct Converged {
    /// The host as observed after the pass.
    actual: plan::Actual,
    record: Record,
    failed: Vec<(Action, String)>,
    /// What the host still lacks after the apply.
    remaining: Vec<Action>,
    /// Resources repaired because they drifted from an already applied generation.
    drift: BTreeSet<String>,
}

impl HostController {
    /// Emits one event when the config turns invalid or its problems change.
    fn report_rejection(&self, config: &ConfigReport) {
        if config.valid {
            return;
        }
        let unchanged = self
            .shared
            .status
            .read()
            .is_ok_and(|s| !s.config.valid && s.config.errors == config.errors);
        if unchanged {
            return;
        }
        let list: Vec<String> = config
            .errors
            .iter()
            .map(|e| format!("{}: {}", e.path, e.reason))
            .collect();
        self.shared.emit(Event::new(
            "config-invalid",
            format!(
                "node config rejected, keeping the last good state: {}",
                list.join("; ")
            ),
            None,
        ));
    }

    fn converge(
        &mut self,
        desired: &Desired,
        generation: Option<&str>,
    ) -> Result<Converged, ReconcileError> {
        let record = self.store.record()?;
        let actual = plan::observe_cached(&self.host, desired, &record, &mut self.digests)?;
        let actions = plan::plan(desired, &actual, &record);
        if actions.is_empty() {
            return Ok(Converged {
                actual,
                record,
                failed: vec![],
                remaining: vec![],
                drift: BTreeSet::new(),
            });
        }
        let drift = self.applied.as_deref() == generation;
        let outcome = apply::apply(
            &self.host,
            &self.store,
            desired,
            &actions,
            &mut self.digests,
        )?;
        let drift = self.report_apply(&outcome, drift);
        let record = self.store.record()?;
        let actual = plan::observe_cached(&self.host, desired, &record, &mut self.digests)?;
        let remaining = plan::plan(desired, &actual, &record);
        Ok(Converged {
            actual,
            record,
            failed: outcome.failed,
            remaining,
            drift,
        })
    }

    /// Metrics, events and the last-apply report for one apply; returns the resources
    /// repaired as drift.
    fn report_apply(&mut self, outcome: &apply::Outcome, drift: bool) -> BTreeSet<String> {
        self.shared
            .metrics
            .actions(outcome.done.len(), &outcome.failed);
        let mut drift_ids = BTreeSet::new();
        if drift {
            drift_ids = outcome.done.iter().map(Action::resource).collect();
            self.drift_repairs += drift_ids.len() as u64;
            self.shared.metrics.drift_repairs(drift_ids.len());
            for id in &drift_ids {
                self.shared.emit(Event::new(
                    "drift",
                    format!("repaired drift of {id}"),
                    Some(id.clone()),
                ));
            }
        }
        // One log line per apply, not per action: an apply of thousands of files would
        // flood the journal. Each action is still an event on the stream.
        tracing::info!(
            "applied {} action(s), {} failed",
            outcome.done.len(),
            outcome.failed.len()
        );
        for a in &outcome.done {
            let _ =
                self.shared
                    .events
                    .send(Event::new("applied", a.to_string(), Some(a.resource())));
        }
        for (a, why) in &outcome.failed {
            self.shared.emit(Event::new(
                "failed",
                format!("{a}: {why}"),
                Some(a.resource()),
            ));
        }
        self.last_apply = Some(ApplyReport {
            at: now(),
            actions: outcome.done.iter().map(ToString::to_string).collect(),
            failed: outcome
                .failed
                .iter()
                .map(|(a, why)| FieldProblem {
                    path: a.resource(),
                    reason: why.clone(),
                    source: None,
                })
                .collect(),
            drift,
        });
        drift_ids
    }

    /// Hands the managed paths to the inotify watcher when they change.
    fn watch(&self, desired: &Desired, record: &Record) -> Result<(), ReconcileError> {
        let mut managed: BTreeSet<String> = desired
            .files
            .keys()
            .chain(desired.dirs.keys())
            .cloned()
            .collect();
        managed.extend(record.paths.keys().cloned());
        self.shared.metrics.managed(managed.len());
        let mut current = self.shared.managed.write().map_err(|_| "lock poisoned")?;
        if *current != managed {
            *current = managed;
            if let Some(tx) = self
                .shared
                .watch_changed
                .lock()
                .map_err(|_| "lock poisoned")?
                .as_ref()
            {
                let _ = tx.send(());
            }
        }
        Ok(())
    }

    fn no_config_status(&self, config: ConfigReport) -> NodeStatus {
        let mut status = self.base_status(config);
        status.conditions = vec![
            cond(
                "Ready",
                false,
                "NoValidConfig",
                "no valid node config has been loaded",
            ),
            cond(
                "Failed",
                true,
                "NoValidConfig",
                &first_error(&status.config),
            ),
        ];
        status
    }
}

impl HostController {
    fn base_status(&self, config: ConfigReport) -> NodeStatus {
        NodeStatus {
            hostname: self.host.hostname(),
            slot: self.slot.clone(),
            root: self.host.sysroot.root().display().to_string(),
            config,
            conditions: vec![],
            kubernetes: None,
            boot: None,
            ceph: None,
            resources: vec![],
            last_apply: self.last_apply.clone(),
            drift_repairs: self.drift_repairs,
            recovered: self.recovered.clone(),
        }
    }

    fn publish(&self, ctx: &mut Ctx<'_>, status: NodeStatus) -> Result<(), ReconcileError> {
        ctx.put(ID, NodeStatusResource(status.clone()))?;
        *self.shared.status.write().map_err(|_| "lock poisoned")? = status;
        Ok(())
    }
}

fn first_error(c: &ConfigReport) -> String {
    c.errors
        .first()
        .map(|e| {
            let src = e
                .source
                .as_deref()
                .map(|s| format!("{s}: "))
                .unwrap_or_default();
            format!("{src}{} {}", e.path, e.reason)
        })
        .unwrap_or_default()
}

fn cond(kind: &str, status: bool, reason: &str, message: &str) -> Condition {
    Condition {
        kind: kind.into(),
        status,
        reason: reason.into(),
        message: message.into(),
    }
}

fn build_status(
    hc: &HostController,
    config: &ConfigReport,
    desired: &Desired,
    actual: &plan::Actual,
    failed: &[(Action, String)],
    remaining: &[Action],
    drift_ids: &BTreeSet<String>,
) -> NodeStatus {
    let mut status = hc.base_status(config.clone());
    // Resource ids of the desired state; `path:` actions belong to file or dir resources.
    let normalise = |id: String| match id.strip_prefix("path:") {
        Some(p) if desired.dirs.contains_key(p) => format!("dir:{p}"),
        Some(p) => format!("file:{p}"),
        None => id,
    };
    let failed_by: BTreeMap<String, &String> = failed
        .iter()
        .map(|(a, why)| (normalise(a.resource()), why))
        .collect();
    let remaining_ids: BTreeSet<String> =
        remaining.iter().map(|a| normalise(a.resource())).collect();
    let mut ids: Vec<String> = Vec::new();
    ids.extend(desired.users.keys().map(|u| format!("user:{u}")));
    ids.extend(desired.dirs.keys().map(|d| format!("dir:{d}")));
    ids.extend(desired.files.keys().map(|f| format!("file:{f}")));
    ids.extend(desired.units.keys().map(|u| format!("unit:{u}")));
    ids.extend(desired.sysctls.keys().map(|k| format!("sysctl:{k}")));
    ids.extend(desired.modules.iter().map(|m| format!("module:{m}")));
    if desired.hostname.is_some() {
        ids.push("hostname".into());
    }
    let cmdline: BTreeSet<&str> = actual.cmdline.split_whitespace().collect();
    let missing_args: Vec<&String> = desired
        .kernel_args
        .iter()
        .filter(|a| !cmdline.contains(a.as_str()))
        .collect();
    for id in ids {
        let (state, reason) = if let Some(why) = failed_by.get(&id) {
            (ResourceState::Failed, Some((*why).clone()))
        } else if remaining_ids.contains(&id) {
            (
                ResourceState::Drifted,
                Some("differs from the desired state".to_string()),
            )
        } else {
            (ResourceState::Ready, None)
        };
        status.resources.push(ResourceStatus { id, state, reason });
    }
    for a in &missing_args {
        status.resources.push(ResourceStatus {
            id: format!("kernel-arg:{a}"),
            state: ResourceState::Pending,
            reason: Some("takes effect at the next boot".into()),
        });
    }
    let mut c = Vec::new();
    c.push(if config.valid {
        cond("ConfigValid", true, "Loaded", &config.sources.join(", "))
    } else {
        cond("ConfigValid", false, "Rejected", &first_error(config))
    });
    let ready = failed.is_empty() && remaining.is_empty();
    c.push(if ready {
        cond("Ready", true, "Converged", "")
    } else {
        cond(
            "Ready",
            false,
            "NotConverged",
            &format!("{} change(s) outstanding", failed.len() + remaining.len()),
        )
    });
    c.push(match failed.first() {
        Some((a, why)) => cond("Failed", true, "ActionFailed", &format!("{a}: {why}")),
        None if !config.valid => cond("Failed", true, "ConfigRejected", &first_error(config)),
        None => cond("Failed", false, "NoFailures", ""),
    });
    c.push(if !remaining.is_empty() {
        cond(
            "Drifted",
            true,
            "Unrepaired",
            &remaining_ids.iter().cloned().collect::<Vec<_>>().join(", "),
        )
    } else if !drift_ids.is_empty() {
        cond(
            "Drifted",
            false,
            "Repaired",
            &drift_ids.iter().cloned().collect::<Vec<_>>().join(", "),
        )
    } else {
        cond("Drifted", false, "NoDrift", "")
    });
    c.push(if missing_args.is_empty() {
        cond("PendingReboot", false, "KernelArgsActive", "")
    } else {
        let list: Vec<&str> = missing_args.iter().map(|s| s.as_str()).collect();
        cond("PendingReboot", true, "KernelArgsChanged", &list.join(" "))
    });
    if desired.kvm {
        c.push(if actual.kvm_device {
            cond("KvmReady", true, "DevKvmPresent", "")
        } else {
            cond(
                "KvmReady",
                false,
                "NoDevKvm",
                "/dev/kvm is missing (no hardware virtualization?)",
            )
        });
    }
    if !desired.data_disks.is_empty() {
        let missing: Vec<&String> = actual
            .data_disks
            .iter()
            .filter(|(_, ok)| !**ok)
            .map(|(l, _)| l)
            .collect();
        c.push(if missing.is_empty() {
            cond("DataDisksPresent", true, "Found", "")
        } else {
            let list: Vec<&str> = missing.iter().map(|s| s.as_str()).collect();
            cond("DataDisksPresent", false, "Missing", &list.join(" "))
        });
    }
    status.conditions = c;
    status
}

/// What an apply would change now: reads the sources fresh (like an apply does) and diffs
/// against the host without changing anything.
pub fn plan_now(host: &Host, sources: &Sources) -> Result<PlanReport, ReconcileError> {
    let merged = match load(sources) {
        Ok(m) => m,
        Err(errors) => {
            return Ok(PlanReport {
                config: ConfigReport {
                    valid: false,
                    errors,
                    ..ConfigReport::default()
                },
                actions: vec![],
            });
        }
    };
    let desired = match desired::render(&merged.spec) {
        Ok(d) => d,
        Err(e) => {
            return Ok(PlanReport {
                config: ConfigReport {
                    valid: false,
                    sources: merged.sources,
                    errors: problems(e, None),
                    generation: None,
                },
                actions: vec![],
            });
        }
    };
    let store = StateStore::new(&host.sysroot);
    let record = store.record()?;
    let actual = plan::observe(host, &desired, &record)?;
    let actions = plan::plan(&desired, &actual, &record)
        .into_iter()
        .map(|a| PlannedAction {
            resource: a.resource(),
            description: a.to_string(),
            action: serde_json::to_value(&a).unwrap_or_default(),
        })
        .collect();
    Ok(PlanReport {
        config: ConfigReport {
            valid: true,
            sources: merged.sources,
            errors: vec![],
            generation: Some(desired.generation()),
        },
        actions,
    })
}
