//! How a netbooted node and the provisioner talk during a rollout: the node's enrolment token
//! (on its kernel command line, presented with every per-node request), the reports it posts to
//! the phone-home URL, and the enrolment record the installer leaves for the agent so the
//! installed node can say it is ready.
//!
//! Phases are a closed set: they become metric labels and rollout stages, so a client cannot
//! invent new ones.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The node's enrolment token on the kernel command line.
pub const TOKEN_ARG: &str = "kiln.token";
/// Where the node reports progress (`http://SERVER/phone-home/MAC`).
pub const PHONE_HOME_ARG: &str = "kiln.phone-home";
/// Where the node fetches its own appliance spec (`http://SERVER/config/MAC`).
pub const CONFIG_ARG: &str = "kiln.config";
/// `kiln.install=auto`: install without questions.
pub const INSTALL_ARG: &str = "kiln.install";

/// Longest `message` a report may carry, in bytes; longer ones are refused, not cut.
pub const MAX_MESSAGE_BYTES: usize = 2048;

/// The request header carrying the token: `Authorization: Bearer TOKEN`.
pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// The token from an `Authorization` header value, if it is a bearer token.
pub fn token_from_header(value: &str) -> Option<&str> {
    value
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// What the provisioner stores instead of a token: its sha256, hex.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Compares a presented token with a stored hash without leaking, through timing, how much
/// of it matched.
pub fn token_matches(presented: &str, stored_hash: &str) -> bool {
    let a = token_hash(presented);
    a.len() == stored_hash.len()
        && a.bytes()
            .zip(stored_hash.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Where a node is in its own install, as it reports it.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// The live system is up and the installer runs.
    InstallerStarted,
    /// The plan is made; `message` names the disk.
    Planned,
    /// An install step started; `message` names it.
    Installing,
    /// The disk is written; the node reboots into it.
    Installed,
    /// The install failed; `message` says why (the planner's explanation when it refused).
    Failed,
    /// The installed node's agent converged once.
    AgentReady,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::InstallerStarted => "installer-started",
            Phase::Planned => "planned",
            Phase::Installing => "installing",
            Phase::Installed => "installed",
            Phase::Failed => "failed",
            Phase::AgentReady => "agent-ready",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One phone-home report: `POST` JSON to the phone-home URL with the bearer token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Report {
    pub phase: Phase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The slot the node runs from (`A`/`B`), with [`Phase::AgentReady`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,
    /// sha256 of the root image installed or running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_sha256: Option<String>,
}

impl Report {
    pub fn new(phase: Phase, message: impl Into<Option<String>>) -> Report {
        Report {
            phase,
            message: message.into(),
            slot: None,
            image_sha256: None,
        }
    }

    /// Why the provisioner refuses this report, if it does: sizes are bounded so a client
    /// cannot grow the trace or the store without limit.
    pub fn problem(&self) -> Option<String> {
        if self
            .message
            .as_ref()
            .is_some_and(|m| m.len() > MAX_MESSAGE_BYTES)
        {
            return Some(format!("message longer than {MAX_MESSAGE_BYTES} bytes"));
        }
        if self.slot.as_ref().is_some_and(|s| s != "A" && s != "B") {
            return Some("slot must be A or B".into());
        }
        if self
            .image_sha256
            .as_ref()
            .is_some_and(|d| d.len() != 64 || !d.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Some("imageSha256 must be 64 hex digits".into());
        }
        None
    }
}

/// What the installer leaves for the installed node's agent (mode 0600, kept on `KILN_STATE`
/// like the node config): where to report, with which token, and the image it installed.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Enrolment {
    pub phone_home: String,
    pub token: String,
    pub image_sha256: String,
}

impl std::fmt::Debug for Enrolment {
    // The token stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enrolment")
            .field("phone_home", &self.phone_home)
            .field("token", &"…")
            .field("image_sha256", &self.image_sha256)
            .finish()
    }
}

/// Where [`Enrolment`] lives on the installed system.
pub const ENROLMENT_PATH: &str = "/var/lib/kiln/enrolment.json";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_checked_against_their_hash() {
        let h = token_hash("secret");
        assert_eq!(
            h,
            "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b"
        );
        assert!(token_matches("secret", &h));
        assert!(!token_matches("secreT", &h));
        assert!(!token_matches("", &h));
        assert_eq!(token_from_header("Bearer abc"), Some("abc"));
        assert_eq!(token_from_header("Basic abc"), None);
        assert_eq!(token_from_header("Bearer "), None);
    }

    #[test]
    fn reports_are_a_closed_bounded_vocabulary() {
        let r: Report =
            serde_json::from_str(r#"{"phase":"agent-ready","slot":"A","imageSha256":"aa"}"#)
                .unwrap();
        assert_eq!(r.phase, Phase::AgentReady);
        assert_eq!(r.problem().unwrap(), "imageSha256 must be 64 hex digits");
        assert!(serde_json::from_str::<Report>(r#"{"phase":"made-up"}"#).is_err());
        assert!(serde_json::from_str::<Report>(r#"{"phase":"planned","x":1}"#).is_err());
        let long = Report::new(Phase::Failed, "x".repeat(MAX_MESSAGE_BYTES + 1));
        assert!(long.problem().is_some());
        assert_eq!(Report::new(Phase::Installed, None).problem(), None);
        for p in [
            Phase::InstallerStarted,
            Phase::Planned,
            Phase::Installing,
            Phase::Installed,
            Phase::Failed,
            Phase::AgentReady,
        ] {
            assert_eq!(
                serde_json::to_string(&p).unwrap(),
                format!("\"{}\"", p.as_str())
            );
        }
    }
}
