//! How a netbooted node and the provisioner talk during a rollout: the node's enrolment token
//! (on its kernel command line, presented with every per-node request), the reports it posts to
//! the phone-home URL, and the enrolment record the installer leaves for the agent so the
//! installed node can say it is ready.
//!
//! Phases are a closed set: they become metric labels and rollout stages, so a client cannot
//! invent new ones.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::hardware::{Firmware, HardwareInventory, Nic, Transport};

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
    /// What the installer found on the machine, with [`Phase::Planned`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware: Option<HardwareSummary>,
}

/// Most disks a report's hardware lists (the rest are only counted): the report fits the
/// phone-home body limit on any machine.
pub const MAX_HARDWARE_DISKS: usize = 24;
/// Most NICs a report's hardware lists.
pub const MAX_HARDWARE_NICS: usize = 16;
/// Longest name, model or serial in a report's hardware, in bytes (longer ones are cut).
pub const MAX_HARDWARE_TEXT: usize = 64;

/// The machine as the installer saw it: what an operator looks up about a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HardwareSummary {
    pub firmware: Firmware,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub disks: Vec<DiskSummary>,
    /// Disks on the machine (more than listed when over [`MAX_HARDWARE_DISKS`]).
    pub disks_total: u32,
    pub nics: Vec<Nic>,
    pub nics_total: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DiskSummary {
    pub dev_path: String,
    pub size_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    pub transport: Transport,
    #[serde(default)]
    pub rotational: bool,
    #[serde(default)]
    pub removable: bool,
}

fn clip(text: &str) -> String {
    let mut end = text.len().min(MAX_HARDWARE_TEXT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

impl HardwareSummary {
    /// The summary of `hw`, cut to the bounds a report keeps.
    pub fn of(hw: &HardwareInventory) -> HardwareSummary {
        HardwareSummary {
            firmware: hw.firmware,
            cpus: hw.cpus,
            memory_bytes: hw.memory_bytes,
            disks: hw
                .disks
                .iter()
                .take(MAX_HARDWARE_DISKS)
                .map(|d| DiskSummary {
                    dev_path: clip(&d.dev_path),
                    size_bytes: d.size_bytes,
                    model: d.model.as_deref().map(clip),
                    serial: d.serial.as_deref().map(clip),
                    transport: d.transport,
                    rotational: d.rotational,
                    removable: d.removable,
                })
                .collect(),
            disks_total: hw.disks.len() as u32,
            nics: hw
                .nics
                .iter()
                .take(MAX_HARDWARE_NICS)
                .map(|n| Nic {
                    name: clip(&n.name),
                    mac: clip(&n.mac),
                })
                .collect(),
            nics_total: hw.nics.len() as u32,
        }
    }

    fn problem(&self) -> Option<String> {
        if self.disks.len() > MAX_HARDWARE_DISKS || self.nics.len() > MAX_HARDWARE_NICS {
            return Some(format!(
                "hardware lists more than {MAX_HARDWARE_DISKS} disks or {MAX_HARDWARE_NICS} NICs"
            ));
        }
        let texts = self.disks.iter().flat_map(|d| {
            [Some(&d.dev_path), d.model.as_ref(), d.serial.as_ref()]
                .into_iter()
                .flatten()
        });
        let mut texts = texts.chain(self.nics.iter().flat_map(|n| [&n.name, &n.mac]));
        texts
            .any(|t| t.len() > MAX_HARDWARE_TEXT)
            .then(|| format!("a hardware name longer than {MAX_HARDWARE_TEXT} bytes"))
    }
}

impl Report {
    pub fn new(phase: Phase, message: impl Into<Option<String>>) -> Report {
        Report {
            phase,
            message: message.into(),
            slot: None,
            image_sha256: None,
            hardware: None,
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
        self.hardware.as_ref().and_then(HardwareSummary::problem)
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
