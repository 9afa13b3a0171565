//! Who may fetch a node's config and report for it: the HTTP server asks an [`Enrolment`],
//! keyed by inventory node name. [`MemoryEnrolment`] serves plain `kiln pxe serve`; a rollout
//! controller running the server in-process brings its own (durable tokens, and it watches
//! the reports).

use std::collections::BTreeMap;
use std::sync::Mutex;

use axum::http::StatusCode;
use kiln_spec::Inventory;
use kiln_spec::enrol::{Phase, Report, token_hash, token_matches};

/// Why a per-node request is refused. The texts name no token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "no token: send the node's kiln.token from its kernel command line as \
         Authorization: Bearer TOKEN"
    )]
    Missing,
    /// Not this node's token, which includes another node's.
    #[error("the token is not this node's")]
    WrongToken,
    #[error("this node's token has expired")]
    Expired,
}

impl Refusal {
    pub fn status(self) -> StatusCode {
        match self {
            Refusal::Missing => StatusCode::UNAUTHORIZED,
            Refusal::WrongToken | Refusal::Expired => StatusCode::FORBIDDEN,
        }
    }
}

/// The tokens guarding the per-node endpoints (`/config/MAC`, `/phone-home/MAC`).
pub trait Enrolment: Send + Sync + std::fmt::Debug {
    /// Whether `node` installs if it netboots now, and with which token on its kernel
    /// command line; `None`: it boots from its own disk (installed, or not expected to
    /// install), so a reboot can never start a second, unasked install.
    fn install_token(&self, node: &str) -> Option<String>;
    /// Whether `presented` (the bearer token, if any) lets a request act for `node`.
    fn verify(&self, node: &str, presented: Option<&str>) -> Result<(), Refusal>;
    /// Called with every report the server accepted (verified and well-formed).
    fn report(&self, _node: &str, _mac: &[u8; 6], _report: &Report) {}
}

/// A random 256-bit token per inventory node, made at start and kept in memory only: the
/// plaintext to render scripts, its sha256 to check requests. A node's token expires when
/// the node reports [`Phase::AgentReady`]: once installed, nobody fetches its config again.
pub struct MemoryEnrolment {
    nodes: Mutex<BTreeMap<String, Issued>>,
}

struct Issued {
    token: String,
    hash: String,
    expired: bool,
}

impl MemoryEnrolment {
    pub fn new(inventory: &Inventory) -> MemoryEnrolment {
        let nodes = inventory
            .spec
            .nodes
            .iter()
            .map(|n| {
                let token = hex::encode(rand::random::<[u8; 32]>());
                let issued = Issued {
                    hash: token_hash(&token),
                    token,
                    expired: false,
                };
                (n.name.clone(), issued)
            })
            .collect();
        MemoryEnrolment {
            nodes: Mutex::new(nodes),
        }
    }

    fn nodes(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Issued>> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl std::fmt::Debug for MemoryEnrolment {
    // Names and states only: the tokens stay out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let nodes = self.nodes();
        f.debug_map()
            .entries(
                nodes
                    .iter()
                    .map(|(n, i)| (n, if i.expired { "expired" } else { "issued" })),
            )
            .finish()
    }
}

impl Enrolment for MemoryEnrolment {
    fn install_token(&self, node: &str) -> Option<String> {
        self.nodes()
            .get(node)
            .filter(|i| !i.expired)
            .map(|i| i.token.clone())
    }

    fn verify(&self, node: &str, presented: Option<&str>) -> Result<(), Refusal> {
        let presented = presented.ok_or(Refusal::Missing)?;
        let nodes = self.nodes();
        let issued = nodes.get(node).ok_or(Refusal::WrongToken)?;
        if !token_matches(presented, &issued.hash) {
            return Err(Refusal::WrongToken);
        }
        if issued.expired {
            return Err(Refusal::Expired);
        }
        Ok(())
    }

    fn report(&self, node: &str, _mac: &[u8; 6], report: &Report) {
        if report.phase == Phase::AgentReady
            && let Some(issued) = self.nodes().get_mut(node)
        {
            issued.expired = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enrolment() -> MemoryEnrolment {
        let inv = Inventory::from_yaml(
            "apiVersion: kiln.dev/v1alpha1\nkind: Inventory\nspec:\n  nodes:\n    \
             - {name: node-01, bootMACs: [\"52:54:00:00:00:01\"]}\n    \
             - {name: node-02, bootMACs: [\"52:54:00:00:00:02\"]}\n",
        )
        .unwrap();
        MemoryEnrolment::new(&inv)
    }

    #[test]
    fn each_node_has_its_own_random_token() {
        let e = enrolment();
        let one = e.install_token("node-01").unwrap();
        let two = e.install_token("node-02").unwrap();
        assert_eq!(one.len(), 64);
        assert!(one.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(one, two);
        assert_ne!(one, enrolment().install_token("node-01").unwrap());
        assert_eq!(e.install_token("node-09"), None);
        let debug = format!("{e:?}");
        assert!(
            !debug.contains(&one) && debug.contains("node-01"),
            "{debug}"
        );
    }

    #[test]
    fn requests_need_the_nodes_own_live_token() {
        let e = enrolment();
        let one = e.install_token("node-01").unwrap();
        let two = e.install_token("node-02").unwrap();
        assert_eq!(e.verify("node-01", None), Err(Refusal::Missing));
        assert_eq!(e.verify("node-01", Some("x")), Err(Refusal::WrongToken));
        assert_eq!(e.verify("node-01", Some(&two)), Err(Refusal::WrongToken));
        assert_eq!(e.verify("node-09", Some(&one)), Err(Refusal::WrongToken));
        assert_eq!(e.verify("node-01", Some(&one)), Ok(()));
        assert_eq!(Refusal::Missing.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(Refusal::WrongToken.status(), StatusCode::FORBIDDEN);

        let mac = [0x52, 0x54, 0, 0, 0, 1];
        e.report("node-01", &mac, &Report::new(Phase::Installed, None));
        assert_eq!(e.verify("node-01", Some(&one)), Ok(()));
        e.report("node-01", &mac, &Report::new(Phase::AgentReady, None));
        assert_eq!(e.verify("node-01", Some(&one)), Err(Refusal::Expired));
        assert_eq!(Refusal::Expired.status(), StatusCode::FORBIDDEN);
        assert_eq!(e.install_token("node-01"), None, "no new script carries it");
        assert_eq!(e.verify("node-02", Some(&two)), Ok(()), "others unaffected");
    }
}
