//! How a worker comes to trust the cluster (kubeadm's token discovery with CA pinning): it
//! reads the public `cluster-info` ConfigMap without trusting the server yet, accepts the CA
//! in it only if its public-key hash is the pinned one, then proves its bootstrap token
//! against the now-trusted API server. A wrong pin or a refused token stops the join before
//! anything is written or started.

use std::time::Duration;

use base64::Engine as _;

use crate::pki::ca_cert_hash;
use kiln_spec::errors::error_chain;

pub const CLUSTER_INFO_PATH: &str = "/api/v1/namespaces/kube-public/configmaps/cluster-info";

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("reaching the API server at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("the API server at {url} answered {status} for the cluster-info ConfigMap{hint}")]
    NoClusterInfo {
        url: String,
        status: u16,
        hint: &'static str,
    },
    #[error("cluster-info from {url} is not usable: {reason}")]
    BadClusterInfo { url: String, reason: String },
    #[error(
        "the API server at {url} presents a CA whose hash is {found}, not the pinned {expected}: refusing to join that cluster"
    )]
    CaMismatch {
        url: String,
        expected: String,
        found: String,
    },
    #[error(
        "the API server at {url} refused the bootstrap token ({status}): it is wrong, expired or deleted; ask the first control plane for a valid one"
    )]
    TokenRefused { url: String, status: u16 },
}

fn client(ca_pem: Option<&str>) -> Result<reqwest::Client, String> {
    // The API server's own request limit: a control plane busy bringing up other nodes may
    // answer late, and a join that gives up sooner only asks again, adding to its load.
    let b = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(15))
        .timeout(Duration::from_secs(60));
    let b = match ca_pem {
        // Not trusted yet: only the pinned hash decides what is accepted.
        None => b.danger_accept_invalid_certs(true),
        Some(pem) => b.tls_certs_only([
            reqwest::Certificate::from_pem(pem.as_bytes()).map_err(|e| e.to_string())?
        ]),
    };
    b.build().map_err(|e| e.to_string())
}

/// Finds the cluster's CA at `api_server` and checks it against `ca_cert_hash`, then checks
/// that the API server accepts `token`. Returns the CA (PEM).
pub async fn discover(api_server: &str, ca_hash: &str, token: &str) -> Result<String, JoinError> {
    let url = format!("{}{CLUSTER_INFO_PATH}", api_server.trim_end_matches('/'));
    let unreachable = |e: String| JoinError::Unreachable {
        url: api_server.to_string(),
        reason: e,
    };
    let bad = |reason: String| JoinError::BadClusterInfo {
        url: api_server.to_string(),
        reason,
    };
    let insecure = client(None).map_err(unreachable)?;
    let resp = insecure
        .get(&url)
        .send()
        .await
        .map_err(|e| unreachable(error_chain(&e)))?;
    let status = resp.status().as_u16();
    if status != 200 {
        return Err(JoinError::NoClusterInfo {
            url: api_server.to_string(),
            status,
            hint: if status == 403 || status == 404 {
                " (is this kiln's first control plane, and has it finished its bring-up?)"
            } else {
                ""
            },
        });
    }
    let body: serde_json::Value = resp.json().await.map_err(|e| bad(e.to_string()))?;
    let kubeconfig = body["data"]["kubeconfig"]
        .as_str()
        .ok_or_else(|| bad("no data.kubeconfig".into()))?;
    let kubeconfig: serde_json::Value =
        serde_saphyr::from_str(kubeconfig).map_err(|e| bad(format!("kubeconfig: {e}")))?;
    let ca_b64 = kubeconfig["clusters"][0]["cluster"]["certificate-authority-data"]
        .as_str()
        .ok_or_else(|| bad("no certificate-authority-data".into()))?;
    let ca_pem = base64::engine::general_purpose::STANDARD
        .decode(ca_b64)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| bad("certificate-authority-data is not base64 PEM".into()))?;
    let found = ca_cert_hash(&ca_pem).map_err(|e| bad(e.to_string()))?;
    if !found.eq_ignore_ascii_case(ca_hash) {
        return Err(JoinError::CaMismatch {
            url: api_server.to_string(),
            expected: ca_hash.to_string(),
            found,
        });
    }

    let trusted = client(Some(&ca_pem)).map_err(unreachable)?;
    let resp = trusted
        .get(&url)
        .bearer_auth(token)
        .send()
        .await
        .map_err(|e| unreachable(error_chain(&e)))?;
    match resp.status().as_u16() {
        200 => Ok(ca_pem),
        status @ 401 => Err(JoinError::TokenRefused {
            url: api_server.to_string(),
            status,
        }),
        status => Err(JoinError::NoClusterInfo {
            url: api_server.to_string(),
            status,
            hint: "",
        }),
    }
}
