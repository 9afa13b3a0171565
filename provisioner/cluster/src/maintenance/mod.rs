//! Node maintenance against the API server: `enter` (preflight, cordon, Ceph noout, live
//! migration, eviction, wait until the node is empty) and `exit`; progress is recorded in a node
//! annotation so that running `enter` again after an interruption resumes.

mod plan;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, PersistentVolumeClaim, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::Client;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, EvictParams, GroupVersionKind, ListParams,
    Patch, PatchParams, PostParams,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

pub use self::plan::*;
use crate::Error;
use crate::ceph::CephAdmin;
use crate::error::api_code;

/// Node annotation holding [`MaintenanceState`] as JSON.
pub const ANNOTATION: &str = "kiln.dev/maintenance";
/// Label on the migrations kiln creates, naming the node being evacuated.
pub const MIGRATION_LABEL: &str = "kiln.dev/maintenance-node";

const PARALLEL_REQUESTS: usize = 16;
const POLL: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MaintenancePhase {
    Cordoned,
    Migrating,
    Draining,
    /// The node is empty; stays so until `exit`.
    InMaintenance,
}

impl std::fmt::Display for MaintenancePhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MaintenancePhase::Cordoned => "cordoned",
            MaintenancePhase::Migrating => "migrating",
            MaintenancePhase::Draining => "draining",
            MaintenancePhase::InMaintenance => "in-maintenance",
        })
    }
}

/// What maintenance did so far, kept on the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MaintenanceState {
    pub phase: MaintenancePhase,
    pub started: String,
    /// OSDs kiln set `noout` on (cleared by `exit`).
    #[serde(default)]
    pub noout_osds: Vec<u32>,
}

impl MaintenanceState {
    pub fn from_node(node: &Node) -> Option<MaintenanceState> {
        let raw = node.metadata.annotations.as_ref()?.get(ANNOTATION)?;
        serde_json::from_str(raw).ok()
    }
}

#[derive(Debug, Clone)]
pub struct EnterOptions {
    /// Only fetch and plan.
    pub dry_run: bool,
    /// For the whole run.
    pub timeout: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct EnterReport {
    pub plan: MaintenancePlan,
    pub dry_run: bool,
    /// Whether this run continued an interrupted one.
    pub resumed: bool,
    pub migrated: usize,
    pub evicted: usize,
}

fn vmi_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("kubevirt.io", "v1", "VirtualMachineInstance"),
        "virtualmachineinstances",
    )
}

fn vmim_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("kubevirt.io", "v1", "VirtualMachineInstanceMigration"),
        "virtualmachineinstancemigrations",
    )
}

fn parse<T: serde::de::DeserializeOwned>(o: DynamicObject) -> Option<T> {
    serde_json::to_value(o)
        .ok()
        .and_then(|v| serde_json::from_value(v).ok())
}

/// Lists custom objects; none when their CRD is not installed (no KubeVirt on the cluster).
/// Right after an API server (re)start, custom resource storage answers 429 "storage is
/// (re)initializing" for a moment: retried for up to 10 s.
async fn list_custom<T: serde::de::DeserializeOwned>(
    client: &Client,
    ar: &ApiResource,
    lp: &ListParams,
) -> Result<Vec<T>, Error> {
    let api: Api<DynamicObject> = Api::all_with(client.clone(), ar);
    let mut attempts = 0;
    loop {
        match api.list(lp).await {
            Ok(list) => return Ok(list.items.into_iter().filter_map(parse).collect()),
            Err(e) if api_code(&e) == Some(404) => return Ok(Vec::new()),
            Err(e) if api_code(&e) == Some(429) && attempts < 20 => {
                attempts += 1;
                tokio::time::sleep(POLL).await;
            }
            Err(e) => {
                return Err(Error::Kube {
                    context: format!("listing {}", ar.plural),
                    error: e,
                });
            }
        }
    }
}

fn on_node(node: &str) -> ListParams {
    ListParams::default().fields(&format!("spec.nodeName={node}"))
}

/// Reads everything maintenance of `node` depends on.
pub async fn fetch_facts(client: &Client, node: &str) -> Result<NodeFacts, Error> {
    let node_obj = Api::<Node>::all(client.clone())
        .get(node)
        .await
        .map_err(Error::kube(format!("reading node {node}")))?;
    let pods = Api::<Pod>::all(client.clone())
        .list(&on_node(node))
        .await
        .map_err(Error::kube(format!("listing pods on {node}")))?;
    let vmis: Vec<Vmi> = list_custom(client, &vmi_resource(), &ListParams::default()).await?;
    let vmis: Vec<Vmi> = vmis
        .into_iter()
        .filter(|v| v.status.node_name.as_deref() == Some(node))
        .collect();
    let namespaces: BTreeSet<String> = vmis
        .iter()
        .filter_map(|v| v.metadata.namespace.clone())
        .collect();
    let mut pvcs = Vec::new();
    for ns in namespaces {
        let list = Api::<PersistentVolumeClaim>::namespaced(client.clone(), &ns)
            .list(&ListParams::default())
            .await
            .map_err(Error::kube(format!(
                "listing PersistentVolumeClaims in {ns}"
            )))?;
        pvcs.extend(list.items);
    }
    let pdbs = Api::<PodDisruptionBudget>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(Error::kube("listing PodDisruptionBudgets"))?;
    Ok(NodeFacts {
        node: node_obj,
        pods: pods.items,
        vmis,
        pvcs,
        pdbs: pdbs.items,
    })
}

/// Cordons (`true`) or uncordons a node.
pub async fn set_unschedulable(
    client: &Client,
    node: &str,
    unschedulable: bool,
) -> Result<(), Error> {
    let value = if unschedulable {
        json!(true)
    } else {
        serde_json::Value::Null
    };
    Api::<Node>::all(client.clone())
        .patch(
            node,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"unschedulable": value}})),
        )
        .await
        .map_err(Error::kube(format!(
            "{} node {node}",
            if unschedulable {
                "cordoning"
            } else {
                "uncordoning"
            }
        )))?;
    Ok(())
}

async fn record(
    client: &Client,
    node: &str,
    state: Option<&MaintenanceState>,
) -> Result<(), Error> {
    let value = match state {
        Some(s) => json!(serde_json::to_string(s).expect("state serializes")),
        None => serde_json::Value::Null,
    };
    Api::<Node>::all(client.clone())
        .patch(
            node,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {ANNOTATION: value}}})),
        )
        .await
        .map_err(Error::kube(format!(
            "recording maintenance state on node {node}"
        )))?;
    Ok(())
}

/// Deterministic, so that a resumed run finds the migrations of the interrupted one.
pub fn migration_name(node: &str, vmi: &str) -> String {
    let name = format!("kiln-{node}-{vmi}");
    if name.len() <= 253 {
        return name;
    }
    use sha2::Digest;
    let hash = hex::encode(&sha2::Sha256::digest(name.as_bytes())[..4]);
    format!("{}-{hash}", &name[..244])
}

/// Puts `node` into maintenance. See the module docs; safe to run again at any point.
pub async fn enter(
    client: &Client,
    node: &str,
    ceph: &dyn CephAdmin,
    opts: &EnterOptions,
) -> Result<EnterReport, Error> {
    let deadline = Instant::now() + opts.timeout;
    let facts = fetch_facts(client, node).await?;
    let previous = MaintenanceState::from_node(&facts.node);
    let plan = plan(&facts);
    for line in plan.render().lines() {
        tracing::info!("{line}");
    }
    let mut report = EnterReport {
        plan: plan.clone(),
        dry_run: opts.dry_run,
        resumed: previous.is_some(),
        migrated: 0,
        evicted: 0,
    };
    if opts.dry_run {
        return Ok(report);
    }
    if !plan.blockers.is_empty() {
        return Err(Error::Blocked {
            node: node.to_string(),
            report: plan.render(),
        });
    }
    if let Some(p) = &previous {
        tracing::info!(
            "resuming maintenance started {} (was {})",
            p.started,
            p.phase
        );
    }
    let mut state = previous.unwrap_or_else(|| MaintenanceState {
        phase: MaintenancePhase::Cordoned,
        started: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        noout_osds: Vec::new(),
    });
    state.phase = MaintenancePhase::Cordoned;
    record(client, node, Some(&state)).await?;
    set_unschedulable(client, node, true).await?;
    tracing::info!("cordoned {node}");

    let mut osds: BTreeSet<u32> = state.noout_osds.iter().copied().collect();
    osds.extend(&plan.osds);
    let osds: Vec<u32> = osds.into_iter().collect();
    if !osds.is_empty() {
        let ceph_osds = osds.clone();
        ceph.add_noout(&ceph_osds)?;
        tracing::info!("set noout on {} OSDs", osds.len());
    }
    state.noout_osds = osds;
    state.phase = MaintenancePhase::Migrating;
    record(client, node, Some(&state)).await?;

    let to_migrate: Vec<&VmPlan> = plan
        .vms
        .iter()
        .filter(|v| v.action == VmAction::Migrate)
        .collect();
    report.migrated = migrate(client, node, &to_migrate, deadline, opts.timeout).await?;

    state.phase = MaintenancePhase::Draining;
    record(client, node, Some(&state)).await?;
    report.evicted = drain(client, &plan.evictions, deadline, opts.timeout).await?;
    wait_empty(client, node, deadline, opts.timeout).await?;

    state.phase = MaintenancePhase::InMaintenance;
    record(client, node, Some(&state)).await?;
    tracing::info!("{node} is in maintenance: cordoned and empty");
    Ok(report)
}

/// Creates one migration per VMI (reusing those of an interrupted run) and waits for all.
async fn migrate(
    client: &Client,
    node: &str,
    vms: &[&VmPlan],
    deadline: Instant,
    timeout: Duration,
) -> Result<usize, Error> {
    if vms.is_empty() {
        return Ok(0);
    }
    let ar = vmim_resource();
    let names: BTreeMap<String, (String, String)> = vms
        .iter()
        .map(|v| {
            (
                format!("{}/{}", v.namespace, migration_name(node, &v.name)),
                (v.namespace.clone(), v.name.clone()),
            )
        })
        .collect();
    // Owned items: borrowed ones make this future not `Send` (higher-ranked lifetimes).
    let owned: Vec<VmPlan> = vms.iter().map(|v| (*v).clone()).collect();
    let ar_ref = &ar;
    futures::stream::iter(owned)
        .map(|vm| async move { start_migration(client, ar_ref, node, &vm).await })
        .buffer_unordered(PARALLEL_REQUESTS)
        .try_collect::<Vec<()>>()
        .await?;
    tracing::info!("migrating {} virtual machines", vms.len());
    let selector = ListParams::default().labels(&format!("{MIGRATION_LABEL}={node}"));
    let mut last_done = usize::MAX;
    loop {
        let migrations: Vec<Vmim> = list_custom(client, &ar, &selector).await?;
        let phases: BTreeMap<String, Option<String>> = migrations
            .into_iter()
            .map(|m| {
                let key = format!(
                    "{}/{}",
                    m.metadata.namespace.clone().unwrap_or_default(),
                    m.metadata.name.clone().unwrap_or_default()
                );
                (key, m.status.and_then(|s| s.phase))
            })
            .collect();
        let mut pending = Vec::new();
        for (key, (namespace, vmi)) in &names {
            match phases.get(key).cloned().flatten().as_deref() {
                Some("Succeeded") => {}
                Some("Failed") => {
                    return Err(Error::MigrationFailed {
                        migration: key.clone(),
                        vmi: format!("{namespace}/{vmi}"),
                        reason: "phase Failed; `kiln node maintenance enter` again retries it"
                            .into(),
                    });
                }
                phase => pending.push(format!(
                    "VirtualMachineInstanceMigration {key} to reach phase Succeeded (now {})",
                    phase.unwrap_or("unset")
                )),
            }
        }
        let done = names.len() - pending.len();
        if done != last_done {
            tracing::info!("migrations: {done}/{} succeeded", names.len());
            last_done = done;
        }
        if pending.is_empty() {
            return Ok(names.len());
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                after: timeout,
                condition: with_more(pending),
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn start_migration(
    client: &Client,
    ar: &ApiResource,
    node: &str,
    vm: &VmPlan,
) -> Result<(), Error> {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &vm.namespace, ar);
    let name = migration_name(node, &vm.name);
    let context = || {
        format!(
            "creating VirtualMachineInstanceMigration {}/{name}",
            vm.namespace
        )
    };
    // A failed migration of an interrupted run is retried; any other one is still current.
    if let Some(existing) = api.get_opt(&name).await.map_err(Error::kube(context()))? {
        let existing: Option<Vmim> = parse(existing);
        if existing
            .and_then(|m| m.status)
            .and_then(|s| s.phase)
            .as_deref()
            != Some("Failed")
        {
            return Ok(());
        }
        api.delete(&name, &DeleteParams::default())
            .await
            .map_err(Error::kube(context()))?;
    }
    let migration: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstanceMigration",
        "metadata": {"name": name, "namespace": vm.namespace, "labels": {MIGRATION_LABEL: node}},
        "spec": {"vmiName": vm.name},
    }))
    .expect("a valid object");
    match api.create(&PostParams::default(), &migration).await {
        Ok(_) => Ok(()),
        Err(e) if api_code(&e) == Some(409) => Ok(()),
        Err(e) => Err(Error::Kube {
            context: context(),
            error: e,
        }),
    }
}

/// Evicts every pod through the Eviction API, retrying while a PodDisruptionBudget says no.
async fn drain(
    client: &Client,
    evictions: &[PodEviction],
    deadline: Instant,
    timeout: Duration,
) -> Result<usize, Error> {
    if !evictions.is_empty() {
        tracing::info!("evicting {} pods", evictions.len());
    }
    futures::stream::iter(evictions.to_vec())
        .map(|e| async move { evict(client, &e, deadline, timeout).await })
        .buffer_unordered(PARALLEL_REQUESTS)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(evictions.len())
}

async fn evict(
    client: &Client,
    e: &PodEviction,
    deadline: Instant,
    timeout: Duration,
) -> Result<(), Error> {
    let api: Api<Pod> = Api::namespaced(client.clone(), &e.namespace);
    let mut logged = false;
    loop {
        match api.evict(&e.name, &EvictParams::default()).await {
            Ok(_) => return Ok(()),
            Err(err) if api_code(&err) == Some(404) => return Ok(()),
            Err(err) if api_code(&err) == Some(429) => {
                let by = if e.pdbs.is_empty() {
                    "a PodDisruptionBudget".to_string()
                } else {
                    e.pdbs
                        .iter()
                        .map(|p| format!("PodDisruptionBudget {}/{}", p.namespace, p.name))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                if Instant::now() >= deadline {
                    return Err(Error::Timeout {
                        after: timeout,
                        condition: format!(
                            "eviction of pod {}/{}: {by} to allow a disruption (API server: {})",
                            e.namespace,
                            e.name,
                            message(&err)
                        ),
                    });
                }
                if !logged {
                    tracing::info!(
                        "eviction of {}/{} refused by {by}; retrying",
                        e.namespace,
                        e.name
                    );
                    logged = true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(err) => {
                return Err(Error::Kube {
                    context: format!("evicting pod {}/{}", e.namespace, e.name),
                    error: err,
                });
            }
        }
    }
}

fn message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => s.message.clone(),
        other => other.to_string(),
    }
}

/// Waits until only DaemonSet and mirror pods are left on the node.
async fn wait_empty(
    client: &Client,
    node: &str,
    deadline: Instant,
    timeout: Duration,
) -> Result<(), Error> {
    let api: Api<Pod> = Api::all(client.clone());
    let mut last = usize::MAX;
    loop {
        let pods = api
            .list(&on_node(node))
            .await
            .map_err(Error::kube(format!("listing pods on {node}")))?;
        let left: Vec<String> = pods
            .items
            .iter()
            .filter(|p| skip_reason(p).is_none())
            .map(|p| {
                format!(
                    "{}/{}",
                    p.metadata.namespace.clone().unwrap_or_default(),
                    p.metadata.name.clone().unwrap_or_default()
                )
            })
            .collect();
        if left.is_empty() {
            return Ok(());
        }
        if left.len() != last {
            tracing::info!("waiting for {} pods to leave {node}", left.len());
            last = left.len();
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                after: timeout,
                condition: with_more(
                    left.into_iter()
                        .map(|p| format!("pod {p} to leave node {node}"))
                        .collect(),
                ),
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

fn with_more(mut pending: Vec<String>) -> String {
    let more = pending.len().saturating_sub(1);
    let mut first = pending.swap_remove(0);
    if more > 0 {
        first.push_str(&format!(" (and {more} more)"));
    }
    first
}

/// Takes `node` out of maintenance: uncordon, clear `noout`, drop kiln's migrations and the
/// progress annotation. Safe to run again.
pub async fn exit(client: &Client, node: &str, ceph: &dyn CephAdmin) -> Result<(), Error> {
    let node_obj = Api::<Node>::all(client.clone())
        .get(node)
        .await
        .map_err(Error::kube(format!("reading node {node}")))?;
    let state = MaintenanceState::from_node(&node_obj);
    set_unschedulable(client, node, false).await?;
    tracing::info!("uncordoned {node}");
    if let Some(state) = &state
        && !state.noout_osds.is_empty()
    {
        ceph.rm_noout(&state.noout_osds)?;
        tracing::info!("cleared noout on {} OSDs", state.noout_osds.len());
    }
    let ar = vmim_resource();
    let selector = ListParams::default().labels(&format!("{MIGRATION_LABEL}={node}"));
    let migrations: Vec<Vmim> = list_custom(client, &ar, &selector).await?;
    for m in migrations {
        let (ns, name) = (
            m.metadata.namespace.unwrap_or_default(),
            m.metadata.name.unwrap_or_default(),
        );
        match Api::<DynamicObject>::namespaced_with(client.clone(), &ns, &ar)
            .delete(&name, &DeleteParams::default())
            .await
        {
            Ok(_) => {}
            Err(e) if api_code(&e) == Some(404) => {}
            Err(e) => {
                return Err(Error::Kube {
                    context: format!("deleting migration {ns}/{name}"),
                    error: e,
                });
            }
        }
    }
    record(client, node, None).await
}
