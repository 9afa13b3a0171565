//! Pure maintenance planning: what is on the node (facts fetched from the API server) in, what
//! maintenance will do with each VM and pod out, with the reasons a user needs to see.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, PersistentVolumeClaim, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde::{Deserialize, Serialize};

/// The fields of a KubeVirt `VirtualMachineInstance` (kubevirt.io/v1) maintenance reads.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Vmi {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: VmiSpec,
    #[serde(default)]
    pub status: VmiStatus,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmiSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eviction_strategy: Option<String>,
    #[serde(default)]
    pub volumes: Vec<VmiVolume>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmiVolume {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim: Option<ClaimRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_volume: Option<NameRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_disk: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClaimRef {
    pub claim_name: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NameRef {
    pub name: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmiStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    #[serde(default)]
    pub conditions: Vec<VmiCondition>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VmiCondition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
}

/// The fields of a `VirtualMachineInstanceMigration` maintenance reads.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Vmim {
    pub metadata: ObjectMeta,
    pub spec: VmimSpec,
    #[serde(default)]
    pub status: Option<VmimStatus>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmimSpec {
    pub vmi_name: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VmimStatus {
    #[serde(default)]
    pub phase: Option<String>,
}

/// Everything maintenance looks at, fetched in one go.
#[derive(Debug, Clone, Default)]
pub struct NodeFacts {
    pub node: Node,
    /// Pods bound to the node.
    pub pods: Vec<Pod>,
    /// VMIs running on the node.
    pub vmis: Vec<Vmi>,
    pub pvcs: Vec<PersistentVolumeClaim>,
    pub pdbs: Vec<PodDisruptionBudget>,
    /// The OSDs Ceph's CRUSH map places under the node (native Ceph).
    pub ceph_osds: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmAction {
    /// Live-migrate with a VirtualMachineInstanceMigration.
    Migrate,
    /// Its eviction strategy allows shutting it down: evict its virt-launcher pod.
    ShutDown,
    /// Cannot migrate and must not be shut down: maintenance stops before touching the node.
    Block,
}

#[derive(Debug, Clone, Serialize)]
pub struct VmPlan {
    pub namespace: String,
    pub name: String,
    pub eviction_strategy: String,
    pub live_migratable: bool,
    /// Why it cannot live-migrate.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
    pub action: VmAction,
}

#[derive(Debug, Clone, Serialize)]
pub struct PodEviction {
    pub namespace: String,
    pub name: String,
    /// PodDisruptionBudgets that select the pod.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pdbs: Vec<PdbRef>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PdbRef {
    pub namespace: String,
    pub name: String,
    pub disruptions_allowed: i32,
}

impl std::fmt::Display for PdbRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PodDisruptionBudget {}/{} (allows {} disruptions)",
            self.namespace, self.name, self.disruptions_allowed
        )
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SkippedPod {
    pub namespace: String,
    pub name: String,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct MaintenancePlan {
    pub node: String,
    pub already_cordoned: bool,
    pub vms: Vec<VmPlan>,
    pub evictions: Vec<PodEviction>,
    pub skipped: Vec<SkippedPod>,
    /// Ceph OSD ids on the node (they get `noout`).
    pub osds: Vec<u32>,
    /// Why maintenance cannot start; empty when it can.
    pub blockers: Vec<String>,
    /// What maintenance will cost that the operator accepted.
    pub warnings: Vec<String>,
}

/// The eviction strategy when neither the VMI nor (as far as kiln knows) the cluster sets one:
/// the HyperConverged default kiln deploys.
pub const DEFAULT_EVICTION_STRATEGY: &str = "LiveMigrate";

/// Plans maintenance of the node in `facts`.
pub fn plan(facts: &NodeFacts) -> MaintenancePlan {
    let node = facts.node.metadata.name.clone().unwrap_or_default();
    let pvcs: BTreeMap<(String, String), &PersistentVolumeClaim> = facts
        .pvcs
        .iter()
        .map(|p| ((ns(&p.metadata), name(&p.metadata)), p))
        .collect();

    let mut vms = Vec::new();
    let mut blockers = Vec::new();
    for vmi in &facts.vmis {
        let (namespace, vm_name) = (ns(&vmi.metadata), name(&vmi.metadata));
        let reasons = migration_blockers(vmi, &namespace, &pvcs);
        let strategy = vmi
            .spec
            .eviction_strategy
            .clone()
            .unwrap_or_else(|| DEFAULT_EVICTION_STRATEGY.into());
        let action = match (reasons.is_empty(), strategy.as_str()) {
            (_, "None") => VmAction::ShutDown,
            (true, _) => VmAction::Migrate,
            (false, "LiveMigrateIfPossible") => VmAction::ShutDown,
            (false, _) => VmAction::Block,
        };
        if action == VmAction::Block {
            blockers.push(format!(
                "VirtualMachineInstance {namespace}/{vm_name} cannot live-migrate ({}) and its evictionStrategy {strategy} does not allow shutting it down",
                reasons.join("; ")
            ));
        }
        vms.push(VmPlan {
            namespace,
            name: vm_name,
            eviction_strategy: strategy,
            live_migratable: reasons.is_empty(),
            reasons,
            action,
        });
    }
    let vm_action: BTreeMap<(&str, &str), VmAction> = vms
        .iter()
        .map(|v| ((v.namespace.as_str(), v.name.as_str()), v.action))
        .collect();

    let mut evictions = Vec::new();
    let mut skipped = Vec::new();
    let mut osds = Vec::new();
    for pod in &facts.pods {
        let (namespace, pod_name) = (ns(&pod.metadata), name(&pod.metadata));
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        if labels.get("app").map(String::as_str) == Some("rook-ceph-osd")
            && let Some(id) = labels.get("ceph-osd-id").and_then(|id| id.parse().ok())
        {
            osds.push(id);
        }
        let skip = |reason: String| SkippedPod {
            namespace: namespace.clone(),
            name: pod_name.clone(),
            reason,
        };
        if let Some(reason) = skip_reason(pod) {
            skipped.push(skip(reason));
            continue;
        }
        if let Some(vmi) = owner(pod, "VirtualMachineInstance")
            && vm_action.get(&(namespace.as_str(), vmi)) != Some(&VmAction::ShutDown)
        {
            skipped.push(skip(format!(
                "virt-launcher of VirtualMachineInstance {namespace}/{vmi}: moves with its VM"
            )));
            continue;
        }
        let pdbs = facts
            .pdbs
            .iter()
            .filter(|pdb| ns(&pdb.metadata) == namespace && pdb_selects(pdb, &labels))
            .map(|pdb| PdbRef {
                namespace: namespace.clone(),
                name: name(&pdb.metadata),
                disruptions_allowed: pdb
                    .status
                    .as_ref()
                    .and_then(|s| s.disruptions_allowed)
                    .unwrap_or(0),
            })
            .collect();
        evictions.push(PodEviction {
            namespace,
            name: pod_name,
            pdbs,
        });
    }
    osds.extend(&facts.ceph_osds);
    osds.sort_unstable();
    osds.dedup();
    MaintenancePlan {
        node,
        already_cordoned: facts
            .node
            .spec
            .as_ref()
            .and_then(|s| s.unschedulable)
            .unwrap_or(false),
        vms,
        evictions,
        skipped,
        osds,
        blockers,
        warnings: Vec::new(),
    }
}

/// Why a pod stays: DaemonSet pods come back anyway, mirror pods belong to the kubelet.
pub fn skip_reason(pod: &Pod) -> Option<String> {
    if pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key("kubernetes.io/config.mirror"))
    {
        return Some("mirror pod (static pod of the kubelet)".into());
    }
    owner(pod, "DaemonSet").map(|ds| format!("DaemonSet {ds}"))
}

fn owner<'a>(pod: &'a Pod, kind: &str) -> Option<&'a str> {
    pod.metadata
        .owner_references
        .as_ref()?
        .iter()
        .find(|o| o.kind == kind && o.controller == Some(true))
        .map(|o| o.name.as_str())
}

/// Why a VMI cannot live-migrate: what virt-controller says (condition LiveMigratable), and
/// volumes only this node can reach.
fn migration_blockers(
    vmi: &Vmi,
    namespace: &str,
    pvcs: &BTreeMap<(String, String), &PersistentVolumeClaim>,
) -> Vec<String> {
    let mut reasons = Vec::new();
    if let Some(c) = vmi
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == "LiveMigratable" && c.status == "False")
    {
        let detail = [c.reason.as_deref(), c.message.as_deref()]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(": ");
        reasons.push(format!("LiveMigratable=False: {detail}"));
    }
    for v in &vmi.spec.volumes {
        if v.host_disk.is_some() {
            reasons.push(format!("volume {}: hostDisk is local to the node", v.name));
        }
        let claim = v
            .persistent_volume_claim
            .as_ref()
            .map(|c| &c.claim_name)
            .or(v.data_volume.as_ref().map(|d| &d.name));
        let Some(claim) = claim else { continue };
        match pvcs.get(&(namespace.to_string(), claim.clone())) {
            None => reasons.push(format!(
                "volume {}: PersistentVolumeClaim {claim} not found",
                v.name
            )),
            Some(pvc) => {
                let modes = pvc
                    .spec
                    .as_ref()
                    .and_then(|s| s.access_modes.clone())
                    .unwrap_or_default();
                if !modes.iter().any(|m| m == "ReadWriteMany") {
                    reasons.push(format!(
                        "volume {}: PersistentVolumeClaim {claim} is {} (live migration needs ReadWriteMany)",
                        v.name,
                        if modes.is_empty() { "without access modes".to_string() } else { modes.join(",") }
                    ));
                }
            }
        }
    }
    reasons
}

/// Label selector semantics of PodDisruptionBudgets (policy/v1: an empty selector selects
/// every pod in the namespace).
fn pdb_selects(pdb: &PodDisruptionBudget, labels: &BTreeMap<String, String>) -> bool {
    let Some(selector) = pdb.spec.as_ref().and_then(|s| s.selector.as_ref()) else {
        return false;
    };
    selector_matches(selector, labels)
}

pub(crate) fn selector_matches(
    selector: &LabelSelector,
    labels: &BTreeMap<String, String>,
) -> bool {
    let exact = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    exact
        && selector.match_expressions.iter().flatten().all(|e| {
            let values = e.values.clone().unwrap_or_default();
            let value = labels.get(&e.key);
            match e.operator.as_str() {
                "In" => value.is_some_and(|v| values.contains(v)),
                "NotIn" => !value.is_some_and(|v| values.contains(v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                _ => false,
            }
        })
}

fn ns(m: &ObjectMeta) -> String {
    m.namespace.clone().unwrap_or_default()
}

fn name(m: &ObjectMeta) -> String {
    m.name.clone().unwrap_or_default()
}

impl MaintenancePlan {
    /// The preflight report.
    pub fn render(&self) -> String {
        let mut out = format!(
            "node {}{}\n",
            self.node,
            if self.already_cordoned {
                " (already cordoned)"
            } else {
                ""
            }
        );
        out.push_str(&format!("virtual machines: {}\n", self.vms.len()));
        for vm in &self.vms {
            let action = match vm.action {
                VmAction::Migrate => "migrate",
                VmAction::ShutDown => "shut down",
                VmAction::Block => "BLOCKED",
            };
            out.push_str(&format!(
                "  {action:<9} {}/{} (evictionStrategy {})",
                vm.namespace, vm.name, vm.eviction_strategy
            ));
            if !vm.reasons.is_empty() {
                out.push_str(&format!(": not live-migratable: {}", vm.reasons.join("; ")));
            }
            out.push('\n');
        }
        out.push_str(&format!("pods to evict: {}\n", self.evictions.len()));
        for e in &self.evictions {
            out.push_str(&format!("  {}/{}", e.namespace, e.name));
            let blocking: Vec<String> = e
                .pdbs
                .iter()
                .filter(|p| p.disruptions_allowed < 1)
                .map(ToString::to_string)
                .collect();
            if !blocking.is_empty() {
                out.push_str(&format!(": would block now: {}", blocking.join(", ")));
            }
            out.push('\n');
        }
        out.push_str(&format!("pods left in place: {}\n", self.skipped.len()));
        for s in &self.skipped {
            out.push_str(&format!("  {}/{}: {}\n", s.namespace, s.name, s.reason));
        }
        if self.osds.is_empty() {
            out.push_str("ceph OSDs on the node: none\n");
        } else {
            let ids: Vec<String> = self.osds.iter().map(|id| format!("osd.{id}")).collect();
            out.push_str(&format!(
                "ceph OSDs on the node: {} (noout while in maintenance)\n",
                ids.join(", ")
            ));
        }
        for w in &self.warnings {
            out.push_str(&format!("warning: {w}\n"));
        }
        if !self.blockers.is_empty() {
            out.push_str("blocked:\n");
            for b in &self.blockers {
                out.push_str(&format!("  {b}\n"));
            }
        }
        out
    }
}
