//! A client of a node agent's network API (`spec.remoteApi`), for administrators: it proves
//! itself with a certificate from the fleet's admin CA and trusts only a node certificate the
//! same CA issued for the node's name.

use std::net::SocketAddr;
use std::time::Duration;

use kiln_spec::InventoryNode;
use kiln_spec::errors::error_chain;

use crate::cluster::{FleetSecrets, node_address};

#[derive(Debug, thiserror::Error)]
pub enum NodeApiError {
    #[error(
        "node {node}: the inventory gives no address to reach its agent at (a static address in overrides.network or bootAddress); pass --address"
    )]
    NoAddress { node: String },
    #[error(transparent)]
    Secrets(#[from] crate::cluster::ClusterError),
    #[error("the client for node {node}'s agent: {reason}")]
    Client { node: String, reason: String },
    #[error("node {node}'s agent at {address}: {reason}")]
    Unreachable {
        node: String,
        address: SocketAddr,
        reason: String,
    },
    #[error("node {node}'s agent answered {status}: {body}")]
    Status {
        node: String,
        status: u16,
        body: String,
    },
}

/// How long a read of a node's agent may take.
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a change may take: an upgrade answers once the slot is written and checked.
pub const CHANGE_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// One node's agent API.
#[derive(Debug)]
pub struct NodeApi {
    node: String,
    address: SocketAddr,
    client: reqwest::Client,
}

impl NodeApi {
    /// The agent of `node`, at `address` or else at its inventory address and the default
    /// port. Its certificate must name the node, wherever it is reached.
    pub fn new(
        node: &InventoryNode,
        secrets: &FleetSecrets,
        address: Option<SocketAddr>,
    ) -> Result<NodeApi, NodeApiError> {
        let address = address
            .or_else(|| {
                node_address(node).map(|ip| SocketAddr::new(ip, kiln_spec::remote::DEFAULT_PORT))
            })
            .ok_or_else(|| NodeApiError::NoAddress {
                node: node.name.clone(),
            })?;
        let (pair, ca) = secrets.admin_identity()?;
        let client_err = |e: reqwest::Error| NodeApiError::Client {
            node: node.name.clone(),
            reason: e.to_string(),
        };
        let identity =
            reqwest::Identity::from_pem(format!("{}{}", pair.key_pem, pair.cert_pem).as_bytes())
                .map_err(client_err)?;
        let ca = reqwest::Certificate::from_pem(ca.as_bytes()).map_err(client_err)?;
        let client = reqwest::Client::builder()
            .tls_certs_only([ca])
            .identity(identity)
            .resolve(&node.name, address)
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(client_err)?;
        Ok(NodeApi {
            node: node.name.clone(),
            address,
            client,
        })
    }

    /// The body of a `GET` of `path` that the agent answered 200.
    pub async fn get(&self, path: &str) -> Result<Vec<u8>, NodeApiError> {
        self.request(reqwest::Method::GET, path, READ_TIMEOUT).await
    }

    /// The body of a `method` request of `path` that the agent answered 200 within `timeout`.
    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        timeout: Duration,
    ) -> Result<Vec<u8>, NodeApiError> {
        let port = self.address.port();
        let url = format!("https://{}:{port}{path}", self.node);
        let unreachable = |e: reqwest::Error| NodeApiError::Unreachable {
            node: self.node.clone(),
            address: self.address,
            reason: error_chain(&e),
        };
        let resp = self
            .client
            .request(method, &url)
            .timeout(timeout)
            .send()
            .await
            .map_err(unreachable)?;
        let status = resp.status().as_u16();
        let body = resp.bytes().await.map_err(unreachable)?;
        if status != 200 {
            return Err(NodeApiError::Status {
                node: self.node.clone(),
                status,
                body: String::from_utf8_lossy(&body).trim().to_string(),
            });
        }
        Ok(body.to_vec())
    }
}
