//! A further control plane joining the cluster's etcd: a running member (the first control
//! plane's) adds this node's peer URL, asked over etcd's JSON gateway with a client
//! certificate of the etcd CA; the new member then starts with the `--initial-cluster` that
//! answer gives. The answer is kept, so a restarted bring-up starts etcd the same way.

use std::time::Duration;

use kiln_spec::errors::error_chain;
use kiln_spec::kubernetes::KubernetesNode;
use serde_json::{Value, json};

use super::bringup::{BringupError, io};
use super::{ETCD_CLIENT_PORT, Host, api_server_url, etcd_peer_url, paths};
use crate::pki::{Ca, Leaf, Usage};

/// Where the `--initial-cluster` this member joined with is kept.
pub const INITIAL_CLUSTER: &str = "etc/kubernetes/pki/etcd/initial-cluster";

/// One member as the JSON gateway lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Empty until the member has started.
    pub name: String,
    pub peer_urls: Vec<String>,
}

/// The members in a `member/list` or `member/add` answer.
pub fn members(answer: &Value) -> Vec<Member> {
    answer["members"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| Member {
            name: m["name"].as_str().unwrap_or_default().to_string(),
            peer_urls: m["peerURLs"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|u| u.as_str().map(String::from))
                .collect(),
        })
        .collect()
}

/// `--initial-cluster` for the member `name` joining `members` (which include it, not yet
/// named). Pure.
pub fn initial_cluster(members: &[Member], name: &str, own_peer: &str) -> String {
    members
        .iter()
        .flat_map(|m| {
            let member = if m.peer_urls.iter().any(|u| u == own_peer) {
                name
            } else {
                m.name.as_str()
            };
            m.peer_urls.iter().map(move |u| format!("{member}={u}"))
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The first control plane's etcd: the API server's host, etcd's client port.
fn endpoint(node: &KubernetesNode) -> String {
    let api = api_server_url(node);
    let host = api
        .trim_start_matches("https://")
        .rsplit_once(':')
        .map_or(api.as_str(), |(h, _)| h)
        .to_string();
    format!("https://{host}:{ETCD_CLIENT_PORT}")
}

/// Has the cluster take this node in as an etcd member (unless it did before) and returns
/// the `--initial-cluster` to start it with.
pub async fn join(
    node: &KubernetesNode,
    host: &Host,
    etcd_ca: &Ca,
) -> Result<String, BringupError> {
    let kept = host.path(INITIAL_CLUSTER);
    let has_data = host.path(paths::ETCD_DATA).join("member").exists();
    if has_data && let Ok(cluster) = std::fs::read_to_string(&kept) {
        return Ok(cluster.trim().to_string());
    }
    let endpoint = endpoint(node);
    let failed = |reason: String| BringupError::EtcdMember {
        endpoint: endpoint.clone(),
        reason,
    };
    let identity = etcd_ca.issue(&Leaf {
        common_name: "kiln-etcd-join",
        organizations: &[],
        sans: vec![],
        usage: Usage::Client,
    })?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .tls_certs_only([
            reqwest::Certificate::from_pem(etcd_ca.pair.cert_pem.as_bytes())
                .map_err(|e| failed(e.to_string()))?,
        ])
        .identity(
            reqwest::Identity::from_pem(
                format!("{}{}", identity.key_pem, identity.cert_pem).as_bytes(),
            )
            .map_err(|e| failed(e.to_string()))?,
        )
        .build()
        .map_err(|e| failed(e.to_string()))?;
    let call = |path: &'static str, body: Value| {
        let (client, url) = (client.clone(), format!("{endpoint}{path}"));
        async move {
            let resp = client
                .post(&url)
                .json(&body)
                .send()
                .await
                .map_err(|e| error_chain(&e))?;
            let status = resp.status();
            let answer: Value = resp.json().await.map_err(|e| error_chain(&e))?;
            if !status.is_success() {
                return Err(format!("{status}: {answer}"));
            }
            Ok(answer)
        }
    };
    let own_peer = etcd_peer_url(&node.node_ip);
    let listed = members(
        &call("/v3/cluster/member/list", json!({}))
            .await
            .map_err(failed)?,
    );
    let members = match listed.iter().find(|m| m.peer_urls.contains(&own_peer)) {
        // Added by an earlier attempt that never started etcd: start as that member.
        Some(m) if m.name.is_empty() => listed,
        Some(_) => return Err(BringupError::StaleEtcdMember { peer: own_peer }),
        None => members(
            &call(
                "/v3/cluster/member/add",
                json!({"peerURLs": [own_peer.clone()]}),
            )
            .await
            .map_err(failed)?,
        ),
    };
    let cluster = initial_cluster(&members, &host.node_name, &own_peer);
    super::write_file(&host.root, INITIAL_CLUSTER, cluster.as_bytes(), 0o644)
        .map_err(io(format!("writing {}", kept.display())))?;
    Ok(cluster)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_new_member_starts_with_every_member_named() {
        let answer = json!({
            "header": {"cluster_id": "1"},
            "member": {"ID": "2", "peerURLs": ["https://10.0.0.3:2380"]},
            "members": [
                {"ID": "1", "name": "cp-1", "peerURLs": ["https://10.0.0.1:2380"], "clientURLs": ["https://10.0.0.1:2379"]},
                {"ID": "2", "peerURLs": ["https://10.0.0.3:2380"]},
            ],
        });
        let m = members(&answer);
        assert_eq!(m[1].name, "");
        assert_eq!(
            initial_cluster(&m, "cp-2", "https://10.0.0.3:2380"),
            "cp-1=https://10.0.0.1:2380,cp-2=https://10.0.0.3:2380"
        );
    }
}
