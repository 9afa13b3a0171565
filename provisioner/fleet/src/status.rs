//! `kiln fleet status`: the store's snapshot as a table or JSON, with the time each node spent
//! in each stage and an estimate of when the rollout ends from the stage durations measured on
//! the nodes that finished.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::stage::{NodeProgress, Stage};
use crate::store::Snapshot;
use crate::upgrade::{SlotTarget, UpgradeStage};

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FleetStatus {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_sha256: Option<String>,
    pub nodes: Vec<NodeStatusView>,
    /// Nodes per stage.
    pub counts: BTreeMap<Stage, usize>,
    /// Seconds until every node is done, from measured stage durations; absent until one node
    /// has finished.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<f64>,
    /// The last rolling upgrade, if there was one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upgrade: Option<UpgradeView>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UpgradeView {
    pub image: String,
    pub image_sha256: String,
    pub nodes: Vec<NodeUpgradeView>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeUpgradeView {
    pub name: String,
    pub stage: UpgradeStage,
    pub seconds_in_stage: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<SlotTarget>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<SlotTarget>,
    pub in_maintenance: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The last rolling upgrade in `snapshot`, in its order.
pub fn upgrade_view(snapshot: &Snapshot, now_ms: u64) -> Option<UpgradeView> {
    let info = snapshot.upgrade.as_ref()?;
    Some(UpgradeView {
        image: info.image.clone(),
        image_sha256: info.image_sha256.clone(),
        nodes: info
            .nodes
            .iter()
            .filter_map(|name| {
                let p = snapshot.upgrade_of(name)?;
                Some(NodeUpgradeView {
                    name: name.clone(),
                    stage: p.stage,
                    seconds_in_stage: secs(now_ms.saturating_sub(p.since_ms)),
                    from: p.from,
                    target: p.target,
                    in_maintenance: p.in_maintenance,
                    note: p.history.last().and_then(|e| e.note.clone()),
                    error: p
                        .failure
                        .as_ref()
                        .map(|f| format!("{}: {}", f.stage, f.reason)),
                })
            })
            .collect(),
    })
}

/// The upgrade as a table.
pub fn upgrade_table(view: &UpgradeView) -> String {
    let slot = |t: Option<SlotTarget>| {
        t.map_or("-".to_string(), |t| {
            format!("{}{}", t.slot.letter(), t.generation)
        })
    };
    let mut s = format!(
        "upgrade to {} ({})\n{:<16} {:<20} {:>9}  {:<4} {:<4} {}\n",
        view.image,
        &view.image_sha256[..view.image_sha256.len().min(12)],
        "NODE",
        "STAGE",
        "IN STAGE",
        "FROM",
        "TO",
        "NOTE"
    );
    for n in &view.nodes {
        let mut note = n
            .error
            .clone()
            .or_else(|| n.note.clone())
            .unwrap_or_default();
        if n.in_maintenance {
            note.push_str(" [in maintenance]");
        }
        let row = format!(
            "{:<16} {:<20} {:>8.0}s  {:<4} {:<4} {}",
            n.name,
            n.stage.as_str(),
            n.seconds_in_stage,
            slot(n.from),
            slot(n.target),
            note.trim()
        );
        s.push_str(row.trim_end());
        s.push('\n');
    }
    s
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatusView {
    pub name: String,
    pub stage: Stage,
    pub seconds_in_stage: f64,
    /// Seconds per stage, in the order the node went through them.
    pub stages: Vec<StageTime>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_phase: Option<kiln_spec::enrol::Phase>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_sha256: Option<String>,
    pub installs: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Phone-home reports received from the node.
    pub reports: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StageTime {
    pub stage: Stage,
    pub seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

const ORDER: [Stage; 4] = [
    Stage::PoweringOn,
    Stage::Netbooting,
    Stage::Installing,
    Stage::Rebooting,
];

fn secs(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

/// Mean seconds per active stage over the nodes that reached `ready`.
fn measured(nodes: &[(String, NodeProgress)], now_ms: u64) -> Option<BTreeMap<Stage, f64>> {
    let done: Vec<&NodeProgress> = nodes
        .iter()
        .map(|(_, p)| p)
        .filter(|p| p.stage == Stage::Ready)
        .collect();
    if done.is_empty() {
        return None;
    }
    let mut sums: BTreeMap<Stage, f64> = BTreeMap::new();
    for p in &done {
        for (stage, ms) in p.stage_durations(now_ms) {
            if ORDER.contains(&stage) {
                *sums.entry(stage).or_default() += secs(ms);
            }
        }
    }
    Some(
        sums.into_iter()
            .map(|(s, total)| (s, total / done.len() as f64))
            .collect(),
    )
}

/// What `kiln fleet status` shows of one node of `snapshot`.
pub fn node_status(
    snapshot: &Snapshot,
    name: &str,
    p: &NodeProgress,
    now_ms: u64,
) -> NodeStatusView {
    NodeStatusView {
        name: name.to_string(),
        stage: p.stage,
        seconds_in_stage: secs(now_ms.saturating_sub(p.since_ms)),
        stages: p
            .stage_durations(now_ms)
            .into_iter()
            .zip(&p.history)
            .map(|((stage, ms), entry)| StageTime {
                stage,
                seconds: secs(ms),
                note: entry.note.clone(),
            })
            .collect(),
        last_phase: p.last_phase,
        slot: p.slot.clone(),
        image_sha256: p.image_sha256.clone(),
        installs: p.installs,
        error: p
            .failure
            .as_ref()
            .map(|f| format!("{}: {}", f.stage, f.reason)),
        reports: snapshot.reports_of(name).count(),
    }
}

pub fn fleet_status(snapshot: &Snapshot, now_ms: u64) -> FleetStatus {
    let mut counts = BTreeMap::new();
    let nodes: Vec<NodeStatusView> = snapshot
        .nodes
        .iter()
        .map(|(name, p)| {
            *counts.entry(p.stage).or_default() += 1;
            node_status(snapshot, name, p, now_ms)
        })
        .collect();
    // Nodes move in parallel: the rollout ends when the slowest remaining node does.
    let eta_seconds = measured(&snapshot.nodes, now_ms).map(|mean| {
        snapshot
            .nodes
            .iter()
            .filter(|(_, p)| !p.stage.is_done())
            .map(|(_, p)| {
                let from = ORDER.iter().position(|s| *s == p.stage).unwrap_or(0);
                let left: f64 = ORDER[from..].iter().filter_map(|s| mean.get(s)).sum();
                let spent = if p.stage.is_active() {
                    secs(now_ms.saturating_sub(p.since_ms))
                } else {
                    0.0
                };
                (left - spent).max(0.0)
            })
            .fold(0.0, f64::max)
    });
    FleetStatus {
        image_sha256: snapshot.rollout.as_ref().map(|r| r.image_sha256.clone()),
        nodes,
        counts,
        eta_seconds,
        upgrade: upgrade_view(snapshot, now_ms),
    }
}

/// The table a person reads.
pub fn table(status: &FleetStatus) -> String {
    let mut s = format!(
        "{:<16} {:<12} {:>9}  {:<10} {:<5} {:<14} {}\n",
        "NODE", "STAGE", "IN STAGE", "PHASE", "SLOT", "IMAGE", "LAST ERROR"
    );
    for n in &status.nodes {
        let row = format!(
            "{:<16} {:<12} {:>8.0}s  {:<10} {:<5} {:<14} {}",
            n.name,
            n.stage.as_str(),
            n.seconds_in_stage,
            n.last_phase.map_or("-", |p| p.as_str()),
            n.slot.as_deref().unwrap_or("-"),
            n.image_sha256
                .as_deref()
                .map_or("-".to_string(), |d| d.chars().take(12).collect()),
            n.error.as_deref().unwrap_or(""),
        );
        s.push_str(row.trim_end());
        s.push('\n');
    }
    let total = status.nodes.len();
    let ready = status.counts.get(&Stage::Ready).copied().unwrap_or(0);
    let failed = status.counts.get(&Stage::Failed).copied().unwrap_or(0);
    const WIDTH: usize = 30;
    let filled = ((ready + failed) * WIDTH).checked_div(total).unwrap_or(0);
    s.push_str(&format!(
        "[{}{}] {ready}/{total} ready, {failed} failed",
        "#".repeat(filled),
        "-".repeat(WIDTH - filled)
    ));
    match status.eta_seconds {
        Some(eta) if ready + failed < total => {
            s.push_str(&format!(", about {eta:.0}s left (measured stage times)\n"));
        }
        _ => s.push('\n'),
    }
    if let Some(u) = &status.upgrade {
        s.push('\n');
        s.push_str(&upgrade_table(u));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stage::StageEntry;
    use crate::store::Snapshot;

    fn progress(path: &[(Stage, u64)]) -> NodeProgress {
        let mut p = NodeProgress::new(0);
        p.history = path
            .iter()
            .map(|&(stage, at_ms)| StageEntry {
                stage,
                at_ms,
                note: None,
            })
            .collect();
        let last = path.last().unwrap();
        p.stage = last.0;
        p.since_ms = last.1;
        p
    }

    #[test]
    fn the_table_shows_stage_times_and_an_estimate_from_finished_nodes() {
        let done = progress(&[
            (Stage::Pending, 0),
            (Stage::PoweringOn, 1_000),
            (Stage::Netbooting, 3_000),
            (Stage::Installing, 33_000),
            (Stage::Rebooting, 63_000),
            (Stage::Ready, 73_000),
        ]);
        let installing = progress(&[
            (Stage::Pending, 0),
            (Stage::PoweringOn, 1_000),
            (Stage::Netbooting, 3_000),
            (Stage::Installing, 70_000),
        ]);
        let mut failed = progress(&[
            (Stage::Pending, 0),
            (Stage::PoweringOn, 1_000),
            (Stage::Failed, 2_000),
        ]);
        failed.failure = Some(crate::stage::Failure {
            stage: Stage::PoweringOn,
            reason: "BMC auth: wrong password".into(),
        });
        let snap = Snapshot {
            nodes: vec![
                ("node-01".into(), done),
                ("node-02".into(), installing),
                ("node-03".into(), failed),
            ],
            ..Snapshot::default()
        };
        let status = fleet_status(&snap, 80_000);
        // node-02 has spent 10 of the measured 30 s installing and has 10 s of rebooting ahead.
        assert_eq!(status.eta_seconds, Some(30.0));
        assert_eq!(status.nodes[0].stages.len(), 6);
        assert_eq!(status.nodes[0].stages[3].seconds, 30.0);
        let text = table(&status);
        let expected = "\
NODE             STAGE         IN STAGE  PHASE      SLOT  IMAGE          LAST ERROR
node-01          ready               7s  -          -     -
node-02          installing         10s  -          -     -
node-03          failed             78s  -          -     -              powering-on: BMC auth: wrong password
[####################----------] 1/3 ready, 1 failed, about 30s left (measured stage times)
";
        assert_eq!(text, expected);
    }

    #[test]
    fn the_upgrade_table_shows_each_nodes_slots_and_its_failure() {
        use crate::store::UpgradeInfo;
        use crate::upgrade::{NodeUpgrade, UpgradeFailure};
        use kiln_spec::layout::Slot;
        let mut done = NodeUpgrade::new(0);
        done.stage = UpgradeStage::Done;
        done.since_ms = 50_000;
        done.from = Some(SlotTarget {
            slot: Slot::A,
            generation: 1,
        });
        done.target = Some(SlotTarget {
            slot: Slot::B,
            generation: 2,
        });
        done.history.last_mut().unwrap().note =
            Some("slot B (generation 2) booted and blessed".into());
        let mut failed = done.clone();
        failed.stage = UpgradeStage::Failed;
        failed.in_maintenance = true;
        failed.failure = Some(UpgradeFailure {
            stage: UpgradeStage::Rebooting,
            reason: "slot B (generation 2) failed and the node is back on slot A: no tries left"
                .into(),
        });
        let snap = Snapshot {
            upgrade: Some(UpgradeInfo {
                image: "http://10.0.0.1/v2".into(),
                image_sha256: "abcdef0123456789".into(),
                started_ms: 0,
                nodes: vec!["node-01".into(), "node-02".into(), "node-03".into()],
            }),
            upgrades: vec![
                ("node-01".into(), done),
                ("node-02".into(), failed),
                ("node-03".into(), NodeUpgrade::new(0)),
            ],
            ..Snapshot::default()
        };
        let view = fleet_status(&snap, 60_000).upgrade.unwrap();
        let expected = "\
upgrade to http://10.0.0.1/v2 (abcdef012345)
NODE             STAGE                 IN STAGE  FROM TO   NOTE
node-01          done                       10s  A1   B2   slot B (generation 2) booted and blessed
node-02          failed                     10s  A1   B2   rebooting: slot B (generation 2) failed and the node is back on slot A: no tries left [in maintenance]
node-03          pending                    60s  -    -
";
        assert_eq!(upgrade_table(&view), expected);
    }
}
