//! kiln's native Ceph (Debian's daemons, no containers):
//!
//! - [`conf`] (pure): the cluster's `ceph.conf`, keyring capabilities and the daemons a node
//!   runs; golden-tested.
//! - [`bootstrap`]: the agent's steps that make a node the cluster's first monitor and turn
//!   its data disks into OSDs, as pveceph does.
//! - [`CephCli`]: the `ceph` command both use, and what maintenance asks of Ceph ([`CephAdmin`]):
//!   per-OSD `noout`, whether OSDs may stop, which OSDs a host holds, the cluster's health.

pub mod bootstrap;
pub mod conf;

use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::Error;

/// What maintenance asks of Ceph. Calls must be idempotent (maintenance resumes by repeating
/// them).
#[async_trait::async_trait]
pub trait CephAdmin: Send + Sync {
    async fn add_noout(&self, osds: &[u32]) -> Result<(), Error>;
    async fn rm_noout(&self, osds: &[u32]) -> Result<(), Error>;
    /// `None` when the OSDs can stop without placement groups becoming inactive; otherwise
    /// Ceph's reason.
    async fn stop_refusal(&self, osds: &[u32]) -> Result<Option<String>, Error>;
    /// The OSDs Ceph's CRUSH map places under host `node`.
    async fn host_osds(&self, node: &str) -> Result<Vec<u32>, Error>;
}

/// Runs `argv`; its standard output, or an error with the command line and the end of its
/// standard error.
pub(crate) fn run(argv: &[String]) -> Result<Vec<u8>, Error> {
    let command = argv.join(" ");
    let (program, args) = argv.split_first().ok_or_else(|| Error::Ceph {
        command: String::new(),
        reason: "empty command".into(),
    })?;
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| Error::Ceph {
            command: command.clone(),
            reason: e.to_string(),
        })?;
    if !output.status.success() {
        return Err(Error::Ceph {
            command,
            reason: format!(
                "{}: {}",
                output.status,
                failure_reason(&String::from_utf8_lossy(&output.stderr))
            ),
        });
    }
    Ok(output.stdout)
}

/// Why a Ceph command failed, from its error output: the first error a Ceph program logged
/// (level -1) other than the harmless ones every run has, else the last lines. ceph-volume
/// buries the cause under its rollback's noise, and the order of its lines varies.
fn failure_reason(stderr: &str) -> String {
    const HARMLESS: [&str; 3] = ["unparsable uuid", "keyring", "AuthRegistry"];
    let logged = stderr.lines().find_map(|l| {
        let l = l.trim_start().strip_prefix("stderr:").unwrap_or(l).trim();
        let mut fields = l.splitn(4, ' ');
        let (_time, _thread, level, message) = (
            fields.next()?,
            fields.next()?,
            fields.next()?,
            fields.next()?,
        );
        let message = without_colours(message);
        (level == "-1" && !HARMLESS.iter().any(|h| message.contains(h))).then_some(message)
    });
    logged.unwrap_or_else(|| {
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        lines[lines.len().saturating_sub(4)..].join(" / ")
    })
}

/// `text` without terminal colour codes (`ESC[0;31m`).
fn without_colours(text: &str) -> String {
    let mut parts = text.split('\x1b');
    let mut out = parts.next().unwrap_or_default().to_string();
    for p in parts {
        out.push_str(p.split_once('m').map_or("", |(_, rest)| rest));
    }
    out.trim().to_string()
}

/// The `ceph` CLI through a command prefix: `ceph` on a node with the admin keyring,
/// `nsenter … ceph` into a test node's namespaces, or
/// `kubectl -n rook-ceph exec deploy/rook-ceph-tools -- ceph`.
#[derive(Debug, Clone)]
pub struct CephCli {
    prefix: Vec<String>,
}

impl CephCli {
    /// `prefix` is split on whitespace; it must end with the `ceph` executable.
    pub fn new(prefix: &str) -> Result<CephCli, Error> {
        let prefix: Vec<String> = prefix.split_whitespace().map(str::to_string).collect();
        if prefix.is_empty() {
            return Err(Error::Ceph {
                command: String::new(),
                reason: "empty ceph command".into(),
            });
        }
        Ok(CephCli { prefix })
    }

    pub fn from_argv(prefix: Vec<String>) -> CephCli {
        CephCli { prefix }
    }

    /// The full command line for `ceph <args>`.
    pub fn command_line(&self, args: &[&str]) -> Vec<String> {
        let mut argv = self.prefix.clone();
        argv.extend(args.iter().map(|a| a.to_string()));
        argv
    }

    /// Runs `ceph <args>`; blocking (a `ceph` call starts Python: a fraction of a second on
    /// hardware, many seconds under emulation).
    pub fn run(&self, args: &[&str]) -> Result<Vec<u8>, Error> {
        run(&self.command_line(args))
    }

    /// `ceph <args> --format json`, parsed.
    pub fn json<T: serde::de::DeserializeOwned>(&self, args: &[&str]) -> Result<T, Error> {
        let mut all = args.to_vec();
        all.extend(["--format", "json"]);
        let out = self.run(&all)?;
        serde_json::from_slice(&out).map_err(|e| Error::Ceph {
            command: self.command_line(&all).join(" "),
            reason: format!("unexpected output: {e}"),
        })
    }

    pub fn status(&self) -> Result<CephStatus, Error> {
        self.json::<RawStatus>(&["status"]).map(CephStatus::from)
    }

    /// Runs `ceph <args>` off the async runtime.
    async fn run_async(&self, args: Vec<String>) -> Result<Vec<u8>, Error> {
        let cli = self.clone();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            cli.run(&args)
        })
        .await
        .map_err(|e| Error::Ceph {
            command: "ceph".into(),
            reason: e.to_string(),
        })?
    }

    async fn osd_verb(&self, verb: &str, osds: &[u32]) -> Result<Vec<u8>, Error> {
        let mut args = vec!["osd".to_string(), verb.to_string()];
        args.extend(osd_names(osds));
        self.run_async(args).await
    }
}

fn osd_names(osds: &[u32]) -> Vec<String> {
    osds.iter().map(|id| format!("osd.{id}")).collect()
}

#[async_trait::async_trait]
impl CephAdmin for CephCli {
    async fn add_noout(&self, osds: &[u32]) -> Result<(), Error> {
        if !osds.is_empty() {
            self.osd_verb("add-noout", osds).await?;
        }
        Ok(())
    }

    async fn rm_noout(&self, osds: &[u32]) -> Result<(), Error> {
        if !osds.is_empty() {
            self.osd_verb("rm-noout", osds).await?;
        }
        Ok(())
    }

    async fn stop_refusal(&self, osds: &[u32]) -> Result<Option<String>, Error> {
        if osds.is_empty() {
            return Ok(None);
        }
        // Ceph answers EBUSY with its reason when stopping would make data unavailable, and
        // EAGAIN while it cannot tell (placement groups of unknown state): both mean no.
        match self.osd_verb("ok-to-stop", osds).await {
            Ok(_) => Ok(None),
            Err(Error::Ceph { reason, .. })
                if reason.contains("Error EBUSY: ") || reason.contains("Error EAGAIN: ") =>
            {
                Ok(Some(
                    reason
                        .rsplit("Error ")
                        .next()
                        .and_then(|r| r.split_once(": "))
                        .map_or(reason.as_str(), |(_, r)| r)
                        .to_string(),
                ))
            }
            Err(e) => Err(e),
        }
    }

    async fn host_osds(&self, node: &str) -> Result<Vec<u32>, Error> {
        let out = self
            .run_async(
                ["osd", "ls-tree", node, "--format", "json"]
                    .map(String::from)
                    .to_vec(),
            )
            .await;
        match out {
            // A host Ceph has never seen has no OSDs.
            Err(Error::Ceph { reason, .. }) if reason.contains("ENOENT") => Ok(Vec::new()),
            Err(e) => Err(e),
            Ok(out) => serde_json::from_slice(&out).map_err(|e| Error::Ceph {
                command: format!("ceph osd ls-tree {node}"),
                reason: format!("unexpected output: {e}"),
            }),
        }
    }
}

/// The parts of `ceph status --format json` kiln reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CephStatus {
    pub fsid: String,
    /// `HEALTH_OK`, `HEALTH_WARN` or `HEALTH_ERR`.
    pub health: String,
    /// One line per health check Ceph raises.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<String>,
    /// The monitors in quorum, by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quorum: Vec<String>,
    pub osds: usize,
    pub osds_up: usize,
    pub osds_in: usize,
    pub pgs: u64,
    /// `active+clean: 33`, …
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pg_states: Vec<String>,
}

impl CephStatus {
    pub fn healthy(&self) -> bool {
        self.health == "HEALTH_OK"
    }

    /// One line: `HEALTH_OK; quorum a, b; 3/3 OSDs up, 3 in; 33 PGs: 33 active+clean`.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{}; quorum {}; {}/{} OSDs up, {} in; {} PGs",
            self.health,
            if self.quorum.is_empty() {
                "(none)".to_string()
            } else {
                self.quorum.join(", ")
            },
            self.osds_up,
            self.osds,
            self.osds_in,
            self.pgs
        );
        if !self.pg_states.is_empty() {
            s.push_str(&format!(": {}", self.pg_states.join(", ")));
        }
        for c in &self.checks {
            s.push_str(&format!("; {c}"));
        }
        s
    }
}

#[derive(Deserialize)]
struct RawStatus {
    fsid: String,
    health: RawHealth,
    #[serde(default)]
    quorum_names: Vec<String>,
    osdmap: RawOsdMap,
    pgmap: RawPgMap,
}

#[derive(Deserialize)]
struct RawHealth {
    status: String,
    #[serde(default)]
    checks: std::collections::BTreeMap<String, RawCheck>,
}

#[derive(Deserialize)]
struct RawCheck {
    summary: RawSummary,
}

#[derive(Deserialize)]
struct RawSummary {
    message: String,
}

#[derive(Deserialize)]
struct RawOsdMap {
    num_osds: usize,
    num_up_osds: usize,
    num_in_osds: usize,
}

#[derive(Deserialize)]
struct RawPgMap {
    num_pgs: u64,
    #[serde(default)]
    pgs_by_state: Vec<RawPgState>,
}

#[derive(Deserialize)]
struct RawPgState {
    state_name: String,
    count: u64,
}

impl From<RawStatus> for CephStatus {
    fn from(r: RawStatus) -> CephStatus {
        CephStatus {
            fsid: r.fsid,
            health: r.health.status,
            checks: r
                .health
                .checks
                .into_iter()
                .map(|(name, c)| format!("{name}: {}", c.summary.message))
                .collect(),
            quorum: r.quorum_names,
            osds: r.osdmap.num_osds,
            osds_up: r.osdmap.num_up_osds,
            osds_in: r.osdmap.num_in_osds,
            pgs: r.pgmap.num_pgs,
            pg_states: r
                .pgmap
                .pgs_by_state
                .into_iter()
                .map(|s| format!("{} {}", s.count, s.state_name))
                .collect(),
        }
    }
}

/// Parses `ceph status --format json`.
pub fn parse_status(json: &[u8]) -> Result<CephStatus, serde_json::Error> {
    serde_json::from_slice::<RawStatus>(json).map(CephStatus::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn command_lines_and_failures() {
        let cli = CephCli::new("kubectl -n rook-ceph exec deploy/rook-ceph-tools -- ceph").unwrap();
        assert_eq!(
            cli.command_line(&["osd", "add-noout", "osd.3", "osd.7"])
                .join(" "),
            "kubectl -n rook-ceph exec deploy/rook-ceph-tools -- ceph osd add-noout osd.3 osd.7"
        );
        // A real process: `false` stands in for a ceph that refuses.
        let err = CephCli::new("false")
            .unwrap()
            .add_noout(&[1])
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("ceph admin command `false osd add-noout osd.1`: exit status: 1"),
            "{err}"
        );
        // Nothing to do runs nothing.
        let absent = CephCli::new("/nonexistent/ceph").unwrap();
        absent.rm_noout(&[]).await.unwrap();
        assert_eq!(absent.stop_refusal(&[]).await.unwrap(), None);
        assert!(CephCli::new(" ").is_err());
        // A refusal is an answer, not a failure: `sh` prints what ceph prints on EBUSY.
        let refusing = CephCli::from_argv(
            [
                "sh",
                "-c",
                "echo 'Error EBUSY: unsafe to stop osd(s) at this time (8 PGs are or would become offline)' >&2; exit 16",
                "ceph",
            ]
            .map(String::from)
            .to_vec(),
        );
        assert_eq!(
            refusing.stop_refusal(&[0]).await.unwrap().as_deref(),
            Some("unsafe to stop osd(s) at this time (8 PGs are or would become offline)")
        );
    }

    #[test]
    fn a_failure_is_the_first_error_logged_else_the_last_lines() {
        let volume = "Running command: /usr/bin/ceph-osd --mkfs -i 3\n \
             stderr: 2026-12-05T10:18:42.825+0000 7fdb -1 auth: unable to find a keyring on /etc/ceph/ceph.keyring\n \
             stderr: 2026-12-05T10:18:53.693+0000 7f07 -1 bluestore(/var/lib/ceph/osd/ceph-3/) _read_fsid unparsable uuid\n \
             stderr: 2026-12-05T10:18:53.693+0000 7f07 -1 bluestore(/var/lib/ceph/osd/ceph-3//block) _write_bdev_label failed to write to /var/lib/ceph/osd/ceph-3//block: (1) Operation not permitted\n \
             stderr: 2026-12-05T10:18:53.977+0000 7f07 -1 \x1b[0;31m ** ERROR: error creating empty object store in /var/lib/ceph/osd/ceph-3/: (1) Operation not permitted\x1b[0m\n\
             --> Was unable to complete a new OSD, will rollback changes\n stderr: purged osd.3\n\
             -->  RuntimeError: Unable to find any LV for zapping OSD: 3\n";
        assert_eq!(
            failure_reason(volume),
            "bluestore(/var/lib/ceph/osd/ceph-3//block) _write_bdev_label failed to write to /var/lib/ceph/osd/ceph-3//block: (1) Operation not permitted"
        );
        assert_eq!(
            without_colours("\x1b[0;31m ** ERROR: no store\x1b[0m"),
            "** ERROR: no store"
        );
        assert_eq!(failure_reason("a\n\nb\nc\nd\ne\n"), "b / c / d / e");
    }

    #[test]
    fn status_summarises_health_osds_and_pgs() {
        let json = br#"{"fsid":"0b72ae7b-5a17-4f09-8572-829a37973a44",
            "health":{"status":"HEALTH_WARN","checks":{"OSD_DOWN":{"severity":"HEALTH_WARN",
              "summary":{"message":"1 osds down","count":1},"muted":false}},"mutes":[]},
            "election_epoch":3,"quorum":[0],"quorum_names":["a"],
            "osdmap":{"epoch":20,"num_osds":3,"num_up_osds":2,"osd_up_since":0,
              "num_in_osds":3,"osd_in_since":0,"num_remapped_pgs":0},
            "pgmap":{"pgs_by_state":[{"state_name":"active+undersized+degraded","count":33}],
              "num_pgs":33,"num_pools":2,"num_objects":4}}"#;
        let s = parse_status(json).unwrap();
        assert!(!s.healthy());
        assert_eq!(
            s.summary(),
            "HEALTH_WARN; quorum a; 2/3 OSDs up, 3 in; 33 PGs: 33 active+undersized+degraded; OSD_DOWN: 1 osds down"
        );
        assert_eq!(s.quorum, ["a"]);
    }
}
