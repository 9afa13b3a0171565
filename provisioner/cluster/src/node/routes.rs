//! Pod routes between nodes: each node announces its `podCidr` on its Node object
//! ([`ANNOTATION`]), and every node routes the other nodes' pod networks through their
//! addresses (host-gateway style: the nodes share a link, no overlay). kiln assigns the pod
//! networks in the node config, so the controller-manager's node IPAM is off and
//! `spec.podCIDR` stays empty.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::process::Command;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams, Patch, PatchParams};

use super::Host;
use super::paths;

/// The Node annotation that carries the node's pod network.
pub const ANNOTATION: &str = "kiln.dev/pod-cidr";

/// Pod networks and the node addresses they are reached through.
pub type Routes = BTreeMap<IpNet, IpAddr>;

/// The routes a node wants: every other node's announced pod network through its internal
/// address. Nodes without both are left out (they have not announced yet). Pure.
pub fn wanted(nodes: &[Node], own: &str) -> Routes {
    nodes
        .iter()
        .filter(|n| n.metadata.name.as_deref() != Some(own))
        .filter_map(|n| {
            let cidr = n.metadata.annotations.as_ref()?.get(ANNOTATION)?;
            let address = n
                .status
                .as_ref()?
                .addresses
                .as_ref()?
                .iter()
                .find(|a| a.type_ == "InternalIP")?;
            Some((cidr.parse().ok()?, address.address.parse().ok()?))
        })
        .collect()
}

async fn kubelet_client(host: &Host) -> Result<kube::Client, String> {
    let conf = host.path(paths::KUBELET_KUBECONFIG);
    crate::kube_client::from_kubeconfig(&conf)
        .await
        .map_err(|e| format!("{}: {e}", conf.display()))
}

/// Announces `pod_cidr` on the host's own Node, with the kubelet's credentials (a kubelet
/// may change its own Node).
pub async fn announce(host: &Host, pod_cidr: &str) -> Result<(), String> {
    let nodes: Api<Node> = Api::all(kubelet_client(host).await?);
    let patch = serde_json::json!({"metadata": {"annotations": {ANNOTATION: pod_cidr}}});
    nodes
        .patch(
            &host.node_name,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .map(|_| ())
        .map_err(|e| format!("announcing the pod network on node {}: {e}", host.node_name))
}

/// Every Node, read with the kubelet's credentials (nodes read every Node, as kube-proxy
/// does): what the routes and the node's own Ready condition are derived from.
pub async fn list_nodes(host: &Host) -> Result<Vec<Node>, String> {
    let nodes: Api<Node> = Api::all(kubelet_client(host).await?);
    nodes
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .map_err(|e| format!("listing nodes: {e}"))
}

/// Calls `changed` whenever a Node changes (and once when the watch starts), with the
/// kubelet's credentials, until the returned future is dropped; the watcher lists again after
/// errors, with its backoff. What lets routes and the node's condition follow the cluster at
/// once instead of at the next resync.
pub async fn watch_nodes(host: &Host, changed: impl Fn()) -> Result<(), String> {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, watcher};
    let nodes: Api<Node> = Api::all(kubelet_client(host).await?);
    let events = watcher(nodes, watcher::Config::default()).default_backoff();
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone) => {
                changed()
            }
            Ok(_) => {}
            Err(e) => tracing::debug!("watching nodes: {e}"),
        }
    }
    Ok(())
}

/// Makes the kernel's routes match `wanted`, given the ones this node set before
/// (`installed`, updated as routes change, so a failure part way loses nothing).
pub fn apply(installed: &mut Routes, wanted: &Routes) -> Result<(), String> {
    let ip = |args: &[String]| -> Result<(), String> {
        let out = Command::new("ip")
            .args(args)
            .output()
            .map_err(|e| format!("ip (iproute2): {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    };
    let stale: Vec<IpNet> = installed
        .keys()
        .filter(|c| !wanted.contains_key(c))
        .copied()
        .collect();
    for cidr in stale {
        ip(&["route".into(), "del".into(), cidr.to_string()])?;
        installed.remove(&cidr);
    }
    for (cidr, via) in wanted {
        if installed.get(cidr) != Some(via) {
            ip(&[
                "route".into(),
                "replace".into(),
                cidr.to_string(),
                "via".into(),
                via.to_string(),
            ])?;
            installed.insert(*cidr, *via);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, cidr: Option<&str>, address: Option<&str>) -> Node {
        let mut n = serde_json::json!({"metadata": {"name": name}});
        if let Some(c) = cidr {
            n["metadata"]["annotations"] = serde_json::json!({ ANNOTATION: c });
        }
        if let Some(a) = address {
            n["status"] = serde_json::json!({"addresses": [
                {"type": "Hostname", "address": name},
                {"type": "InternalIP", "address": a},
            ]});
        }
        serde_json::from_value(n).unwrap()
    }

    #[test]
    fn routes_every_other_announced_node() {
        let nodes = [
            node("a", Some("10.42.0.0/24"), Some("192.168.77.10")),
            node("b", Some("10.42.1.0/24"), Some("192.168.77.11")),
            node("c", None, Some("192.168.77.12")),
            node("d", Some("10.42.3.0/24"), None),
            node("e", Some("not a network"), Some("192.168.77.14")),
        ];
        let routes = wanted(&nodes, "a");
        assert_eq!(
            routes,
            BTreeMap::from([(
                "10.42.1.0/24".parse().unwrap(),
                "192.168.77.11".parse().unwrap()
            )])
        );
    }
}
