//! The agent's network API (NodeConfig `spec.remoteApi`): HTTPS with client certificates, for
//! administrators' tools on other hosts (`kiln cluster kubeconfig --node`). Both sides trust
//! one CA, the fleet's admin CA: the node proves itself with a certificate the CA issued for
//! its name and address, and admits only clients whose certificates the CA issued.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::errors::ValidationErrors;

pub const DEFAULT_PORT: u16 = 7443;

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RemoteApi {
    /// Address and port to listen on [default: `0.0.0.0:7443`].
    #[serde(default = "default_listen")]
    pub listen: String,
    /// PEM: the CA whose client certificates are admitted.
    pub client_ca: String,
    /// PEM: this node's server certificate, issued by that CA.
    pub cert: String,
    /// PEM: its private key.
    pub key: String,
}

fn default_listen() -> String {
    format!("0.0.0.0:{DEFAULT_PORT}")
}

impl std::fmt::Debug for RemoteApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteApi")
            .field("listen", &self.listen)
            .field("cert", &self.cert)
            .field("key", &"(secret)")
            .finish_non_exhaustive()
    }
}

impl RemoteApi {
    pub fn validate_into(&self, at: &str, errs: &mut ValidationErrors) {
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            errs.push(
                format!("{at}.listen"),
                format!(
                    "{:?} is not an address and port like 0.0.0.0:7443",
                    self.listen
                ),
            );
        }
        if !self
            .client_ca
            .trim_start()
            .starts_with("-----BEGIN CERTIFICATE-----")
        {
            errs.push(format!("{at}.clientCa"), "not a PEM certificate");
        }
        crate::check::check_pem_pair(at, &self.cert, &self.key, errs);
    }
}
