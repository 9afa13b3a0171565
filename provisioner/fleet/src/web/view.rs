//! What the fleet view shows, as pure functions of the store's snapshot and the netboot trace:
//! one page of the fleet table, and one node's boot-chain timeline.

use std::collections::BTreeMap;

use kiln_netboot::trace::{Event, EventKind};
use kiln_spec::inventory::NodeRole;
use serde::{Deserialize, Serialize};

use crate::stage::{NodeProgress, Stage};
use crate::status::{FleetStatus, NodeStatusView, fleet_status, node_status};
use crate::store::Snapshot;

/// Most rows one page carries: the browser stays responsive with any fleet size.
pub const MAX_PER_PAGE: usize = 500;

/// Which rows of the fleet table (`GET /api/fleet?page=1&per=100&stage=failed&q=rack1`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct FleetQuery {
    /// 1-based.
    pub page: usize,
    pub per: usize,
    pub stage: Option<Stage>,
    /// Part of a node's name.
    pub q: Option<String>,
}

impl Default for FleetQuery {
    fn default() -> Self {
        FleetQuery {
            page: 1,
            per: 100,
            stage: None,
            q: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FleetPage {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_sha256: Option<String>,
    /// Nodes per stage, every stage named (0 when none).
    pub counts: BTreeMap<Stage, usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<f64>,
    pub fleet_size: usize,
    /// Nodes the query's filters keep.
    pub matching: usize,
    pub page: usize,
    pub pages: usize,
    pub nodes: Vec<NodeRow>,
}

/// One row of the fleet table.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRow {
    #[serde(flatten)]
    pub status: NodeStatusView,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<NodeRole>,
    /// How far the node is from powered off (0) to ready (1).
    pub progress: f64,
    /// What the rollout last asked of the node's BMC and whether it still waits on it.
    pub bmc: String,
}

/// A failed node's bar stays where it failed.
fn progress(p: &NodeProgress) -> f64 {
    let stage = match (&p.failure, p.stage) {
        (Some(f), Stage::Failed) => f.stage,
        (_, s) => s,
    };
    // `Stage::ALL` is the way to ready, then `failed`.
    let ready = Stage::ALL.len() - 2;
    let at = Stage::ALL.iter().position(|s| *s == stage).unwrap_or(0);
    at.min(ready) as f64 / ready as f64
}

fn bmc(p: &NodeProgress, now_ms: u64) -> String {
    let Some(action) = p.waiting_on else {
        if p.failure
            .as_ref()
            .is_some_and(|f| f.reason.starts_with("BMC "))
        {
            return "failed".into();
        }
        let powered = p.history.iter().any(|e| e.stage == Stage::PoweringOn);
        return if powered && p.stage != Stage::PoweringOn {
            "done".into()
        } else {
            "-".into()
        };
    };
    let action = action.as_str();
    match p.retry_at_ms {
        _ if p.bmc_in_flight() => format!("{action}: try {} in flight", p.attempts),
        Some(t) if t > now_ms => format!(
            "{action}: try {} failed, again in {}s",
            p.attempts,
            (t - now_ms).div_ceil(1000)
        ),
        _ => format!("{action}: waiting"),
    }
}

fn row(snapshot: &Snapshot, status: NodeStatusView, now_ms: u64) -> NodeRow {
    let progress_of = snapshot.node(&status.name);
    NodeRow {
        role: snapshot
            .rollout
            .as_ref()
            .and_then(|r| r.machines.get(&status.name))
            .map(|m| m.role),
        progress: progress_of.map_or(0.0, progress),
        bmc: progress_of.map_or_else(|| "-".into(), |p| bmc(p, now_ms)),
        status,
    }
}

/// One page of the fleet table.
pub fn fleet_page(snapshot: &Snapshot, query: &FleetQuery, now_ms: u64) -> FleetPage {
    let FleetStatus {
        image_sha256,
        nodes,
        counts: present,
        eta_seconds,
        upgrade: _,
    } = fleet_status(snapshot, now_ms);
    let mut counts: BTreeMap<Stage, usize> = Stage::ALL.iter().map(|s| (*s, 0)).collect();
    counts.extend(present);
    let fleet_size = nodes.len();
    let needle = query.q.as_deref().map(str::to_lowercase);
    let kept: Vec<NodeStatusView> = nodes
        .into_iter()
        .filter(|n| query.stage.is_none_or(|s| n.stage == s))
        .filter(|n| {
            needle
                .as_deref()
                .is_none_or(|q| n.name.to_lowercase().contains(q))
        })
        .collect();
    let per = query.per.clamp(1, MAX_PER_PAGE);
    let matching = kept.len();
    let pages = matching.div_ceil(per).max(1);
    let page = query.page.clamp(1, pages);
    let nodes = kept
        .into_iter()
        .skip((page - 1) * per)
        .take(per)
        .map(|s| row(snapshot, s, now_ms))
        .collect();
    FleetPage {
        image_sha256,
        counts,
        eta_seconds,
        fleet_size,
        matching,
        page,
        pages,
        nodes,
    }
}

/// One node's page: its row, its stage history and its boot chain.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeDetail {
    #[serde(flatten)]
    pub row: NodeRow,
    pub macs: Vec<String>,
    pub timeline: Vec<Step>,
}

/// One step of a node's story, from the rollout, the netboot services or the node itself.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Step {
    pub at_ms: u64,
    /// Seconds since the node's first step.
    pub offset_seconds: f64,
    /// `rollout`, `dhcp`, `tftp`, `ipxe`, `kernel`, `initrd`, `rootfs`, `http`, `installer`,
    /// `agent`: where in the boot chain it happened.
    pub part: &'static str,
    pub what: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}

/// Where an HTTP request falls in the boot chain, by the file it asked for.
fn http_part(path: &str) -> &'static str {
    let file = path.rsplit('/').next().unwrap_or(path);
    match file {
        f if f.ends_with(".ipxe") => "ipxe",
        "vmlinuz" => "kernel",
        "initrd.img" => "initrd",
        f if f.ends_with(".squashfs") => "rootfs",
        _ => "http",
    }
}

fn event_step(e: &Event) -> Option<Step> {
    let (part, bytes, duration_ms) = match &e.kind {
        EventKind::DhcpReceived { .. }
        | EventKind::DhcpSent { .. }
        | EventKind::DhcpIgnored { .. } => ("dhcp", None, None),
        EventKind::Tftp {
            bytes, duration_ms, ..
        } => ("tftp", Some(*bytes), Some(*duration_ms)),
        EventKind::Http {
            path,
            bytes,
            duration_ms,
            ..
        } => (http_part(path), Some(*bytes), Some(*duration_ms)),
        // The store's copy of each report is the one told (it exists without a trace too).
        EventKind::PhoneHome { .. } => return None,
    };
    Some(Step {
        at_ms: e.at_ms,
        offset_seconds: 0.0,
        part,
        what: e.kind.describe(),
        bytes,
        duration_ms,
        failure: e.kind.failure(),
    })
}

/// `name`'s page, or `None` when the store has no such node. `trace` holds the events of the
/// node's boot MACs.
pub fn node_detail(
    snapshot: &Snapshot,
    name: &str,
    trace: &[Event],
    now_ms: u64,
) -> Option<NodeDetail> {
    let progress = snapshot.node(name)?;
    let status = node_status(snapshot, name, progress, now_ms);
    let mut timeline: Vec<Step> = progress
        .history
        .iter()
        .map(|e| Step {
            at_ms: e.at_ms,
            offset_seconds: 0.0,
            part: "rollout",
            what: match &e.note {
                Some(note) => format!("{}: {note}", e.stage),
                None => e.stage.to_string(),
            },
            bytes: None,
            duration_ms: None,
            failure: (e.stage == Stage::Failed).then(|| {
                progress
                    .failure
                    .as_ref()
                    .map_or_else(|| "failed".into(), |f| format!("{}: {}", f.stage, f.reason))
            }),
        })
        .collect();
    timeline.extend(trace.iter().filter_map(event_step));
    timeline.extend(snapshot.reports_of(name).map(|r| {
        let phase = r.report.phase;
        let kind = EventKind::from(r.report.clone());
        Step {
            at_ms: r.at_ms,
            offset_seconds: 0.0,
            part: if phase == kiln_spec::enrol::Phase::AgentReady {
                "agent"
            } else {
                "installer"
            },
            what: kind.describe(),
            bytes: None,
            duration_ms: None,
            failure: kind.failure(),
        }
    }));
    // Stable: at one millisecond the rollout's own entry comes first.
    timeline.sort_by_key(|s| s.at_ms);
    let first = timeline.first().map_or(0, |s| s.at_ms);
    for s in &mut timeline {
        s.offset_seconds = s.at_ms.saturating_sub(first) as f64 / 1000.0;
    }
    let macs = snapshot
        .rollout
        .as_ref()
        .and_then(|r| r.machines.get(name))
        .map(|m| m.macs.clone())
        .unwrap_or_default();
    Some(NodeDetail {
        row: row(snapshot, status, now_ms),
        macs,
        timeline,
    })
}
