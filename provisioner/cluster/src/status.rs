//! `kiln cluster status`: nodes, their pods, their maintenance state and the health of the
//! addons, read from the conditions their operators report on kiln's custom resources.

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams};
use serde::Serialize;
use serde_json::Value;

use crate::Error;
use crate::error::api_code;
use crate::maintenance::MaintenanceState;

/// The custom resources whose conditions say whether an addon is healthy, and the condition
/// that means healthy.
pub const HEALTH_CHECKS: &[HealthCheck] = &[
    HealthCheck {
        addon: "kubevirt",
        group: "hco.kubevirt.io",
        version: "v1beta1",
        kind: "HyperConverged",
        plural: "hyperconvergeds",
        namespace: "kubevirt-hyperconverged",
        name: "kubevirt-hyperconverged",
        condition: "Available",
    },
    HealthCheck {
        addon: "rook-ceph",
        group: "ceph.rook.io",
        version: "v1",
        kind: "CephCluster",
        plural: "cephclusters",
        namespace: "rook-ceph",
        name: "rook-ceph",
        condition: "Ready",
    },
    HealthCheck {
        addon: "rook-ceph",
        group: "ceph.rook.io",
        version: "v1",
        kind: "CephBlockPool",
        plural: "cephblockpools",
        namespace: "rook-ceph",
        name: "replicapool",
        condition: "Ready",
    },
];

#[derive(Debug, Clone, Copy)]
pub struct HealthCheck {
    pub addon: &'static str,
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    pub namespace: &'static str,
    pub name: &'static str,
    pub condition: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClusterStatus {
    pub nodes: Vec<NodeStatus>,
    pub addons: Vec<AddonHealth>,
    /// The native Ceph cluster's health and placement groups, when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ceph: Option<crate::ceph::CephStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    pub name: String,
    /// Condition Ready of the node; unknown when the kubelet never reported.
    pub ready: Option<bool>,
    pub schedulable: bool,
    /// The pods bound to the node, and how many of them are running.
    pub pods: PodCount,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maintenance: Option<MaintenanceState>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PodCount {
    pub running: usize,
    pub total: usize,
}

impl PodCount {
    /// The pods of `pods` bound to `node`.
    fn on(node: &str, pods: &[Pod]) -> PodCount {
        pods.iter()
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
            .fold(PodCount::default(), |mut count, p| {
                count.total += 1;
                let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
                count.running += usize::from(phase == Some("Running"));
                count
            })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Health {
    Healthy,
    Degraded,
    /// The resource exists but its operator has not reported the condition.
    Unknown,
    Missing,
}

#[derive(Debug, Clone, Serialize)]
pub struct AddonHealth {
    pub addon: String,
    pub resource: String,
    pub health: Health,
    /// `Type=Status (reason: message)` of every condition reported.
    pub conditions: Vec<String>,
}

/// Summarizes nodes, their pods and the health resources (`None` when absent). Pure.
pub fn summarize(
    nodes: &[Node],
    pods: &[Pod],
    resources: &[(HealthCheck, Option<Value>)],
) -> ClusterStatus {
    let nodes = nodes
        .iter()
        .map(|n| {
            let name = n.metadata.name.clone().unwrap_or_default();
            NodeStatus {
                pods: PodCount::on(&name, pods),
                name,
                ready: n
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
                    .map(|c| c.status == "True"),
                schedulable: !n
                    .spec
                    .as_ref()
                    .and_then(|s| s.unschedulable)
                    .unwrap_or(false),
                maintenance: MaintenanceState::from_node(n),
            }
        })
        .collect();
    let addons = resources
        .iter()
        .map(|(check, object)| {
            let resource = format!("{} {}/{}", check.kind, check.namespace, check.name);
            let Some(object) = object else {
                return AddonHealth {
                    addon: check.addon.into(),
                    resource,
                    health: Health::Missing,
                    conditions: vec![],
                };
            };
            let conditions = object["status"]["conditions"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let wanted = conditions.iter().find(|c| c["type"] == check.condition);
            let health = match wanted.map(|c| c["status"].as_str().unwrap_or_default()) {
                Some("True") => Health::Healthy,
                Some(_) => Health::Degraded,
                None => Health::Unknown,
            };
            let conditions = conditions
                .iter()
                .map(|c| {
                    let mut s = format!(
                        "{}={}",
                        c["type"].as_str().unwrap_or("?"),
                        c["status"].as_str().unwrap_or("?")
                    );
                    let detail = [c["reason"].as_str(), c["message"].as_str()]
                        .into_iter()
                        .flatten()
                        .collect::<Vec<_>>()
                        .join(": ");
                    if !detail.is_empty() {
                        s.push_str(&format!(" ({detail})"));
                    }
                    s
                })
                .collect();
            AddonHealth {
                addon: check.addon.into(),
                resource,
                health,
                conditions,
            }
        })
        .collect();
    ClusterStatus {
        nodes,
        addons,
        ceph: None,
    }
}

/// Reads the nodes, the pods and the health resources.
pub async fn fetch(client: &Client) -> Result<ClusterStatus, Error> {
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(Error::kube("listing nodes"))?;
    let pods = Api::<Pod>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(Error::kube("listing pods"))?;
    let mut resources = Vec::new();
    for check in HEALTH_CHECKS {
        let ar = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(check.group, check.version, check.kind),
            check.plural,
        );
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), check.namespace, &ar);
        let object = match api.get_opt(check.name).await {
            Ok(o) => o.map(|o| serde_json::to_value(o).unwrap_or(Value::Null)),
            // The CRD itself is not installed.
            Err(e) if api_code(&e) == Some(404) => None,
            Err(e) => {
                return Err(Error::Kube {
                    context: format!("reading {} {}", check.kind, check.name),
                    error: e,
                });
            }
        };
        resources.push((*check, object));
    }
    Ok(summarize(&nodes.items, &pods.items, &resources))
}

impl ClusterStatus {
    pub fn render(&self) -> String {
        let mut out =
            String::from("NODE                 READY    SCHEDULABLE  RUNNING/PODS  MAINTENANCE\n");
        for n in &self.nodes {
            let ready = match n.ready {
                Some(true) => "yes",
                Some(false) => "no",
                None => "unknown",
            };
            let maintenance = n.maintenance.as_ref().map_or("-".to_string(), |m| {
                format!("{} since {}", m.phase, m.started)
            });
            out.push_str(&format!(
                "{:<20} {:<8} {:<12} {:<13} {}\n",
                n.name,
                ready,
                if n.schedulable { "yes" } else { "no" },
                format!("{}/{}", n.pods.running, n.pods.total),
                maintenance
            ));
        }
        out.push_str("\nADDON       HEALTH    RESOURCE\n");
        for a in &self.addons {
            out.push_str(&format!(
                "{:<11} {:<9} {}",
                a.addon,
                format!("{:?}", a.health).to_lowercase(),
                a.resource
            ));
            if !a.conditions.is_empty() {
                out.push_str(&format!(": {}", a.conditions.join(", ")));
            }
            out.push('\n');
        }
        if let Some(c) = &self.ceph {
            out.push_str(&format!("\nceph {}: {}\n", c.fsid, c.summary()));
        }
        out
    }
}
