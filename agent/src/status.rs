//! What the agent reports through its API: node conditions, per-resource state, the last
//! apply, and the event stream.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    pub hostname: Option<String>,
    /// Boot slot from `kiln.slot=` on the kernel command line.
    pub slot: String,
    pub root: String,
    pub config: ConfigReport,
    pub conditions: Vec<Condition>,
    /// The node's part in its Kubernetes cluster, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesReport>,
    /// The A/B slots of an installed node: booted, staged, rollback, last assessment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<kiln_spec::boot::BootStatus>,
    /// The node's part in its Ceph cluster, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ceph: Option<CephReport>,
    pub resources: Vec<ResourceStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_apply: Option<ApplyReport>,
    pub drift_repairs: u64,
    /// An apply interrupted by a crash and finished after restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovered: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigReport {
    pub valid: bool,
    /// Sources read, lowest priority first.
    pub sources: Vec<String>,
    pub errors: Vec<FieldProblem>,
    /// Digest of the desired state being enforced (the last good config).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldProblem {
    pub path: String,
    pub reason: String,
    /// The file the problem is in, when there are several sources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub kind: String,
    pub status: bool,
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// What a node's Kubernetes part is, and what another node needs to join the cluster through
/// it: the API server and the pin of the cluster CA (once the bring-up has made or found it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KubernetesReport {
    pub role: kiln_spec::kubernetes::KubeRole,
    pub api_server: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert_hash: Option<String>,
}

/// The node's Ceph part: the cluster it belongs to, what became of each data disk, and the
/// cluster's health as last read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CephReport {
    /// The node's part: `first-monitor` (what every node was before roles), `monitor` or
    /// `osd`.
    #[serde(default)]
    pub role: kiln_spec::ceph::CephRole,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fsid: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DataDiskReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<kiln_cluster::ceph::CephStatus>,
    /// What the spec asks for that costs safety (pools of one copy).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DataDiskReport {
    pub disk: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub osd: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl NodeStatus {
    pub fn condition(&self, kind: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.kind == kind)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub enum ResourceState {
    Ready,
    /// Changed on the host behind kiln's back and not repaired yet.
    Drifted,
    /// Waiting for something outside the agent (a reboot, a device).
    Pending,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceStatus {
    pub id: String,
    pub state: ResourceState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyReport {
    pub at: String,
    pub actions: Vec<String>,
    pub failed: Vec<FieldProblem>,
    /// The changes repaired drift (the config had not changed).
    pub drift: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub at: String,
    /// `applied`, `drift`, `failed`, `config-invalid`, `recovered`.
    pub kind: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
}

impl Event {
    pub fn new(kind: &str, message: impl Into<String>, resource: Option<String>) -> Event {
        Event {
            at: now(),
            kind: kind.into(),
            message: message.into(),
            resource,
        }
    }
}

/// What `plan` answers: the changes an apply would make now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanReport {
    pub config: ConfigReport,
    pub actions: Vec<PlannedAction>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedAction {
    pub resource: String,
    pub description: String,
    pub action: serde_json::Value,
}

pub fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}
