//! The rolling upgrade of one node, as a pure function like the rollout's [`crate::stage`]:
//! given what the node last was, what its agent answered since and the time, it says what the
//! node is now and what the provisioner must ask next.
//!
//! `Pending → Preflight → EnteringMaintenance → Writing → Rebooting → LeavingMaintenance →
//! Done`, or `Failed(stage, reason)`. Maintenance is skipped for nodes outside a cluster.
//! Preflight and resume read the node's own A/B record, so a node that already runs the image
//! is done, and an upgrade interrupted at any point is picked up from what the node says.

use std::time::Duration;

use kiln_agent::status::NodeStatus;
use kiln_spec::boot::{BootStatus, EntryState};
use kiln_spec::layout::Slot;
use serde::{Deserialize, Serialize};

use crate::stage::{Failure, StageEntry};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpgradeStage {
    Pending,
    Preflight,
    EnteringMaintenance,
    Writing,
    Rebooting,
    LeavingMaintenance,
    Done,
    Failed,
}

impl UpgradeStage {
    pub fn as_str(self) -> &'static str {
        match self {
            UpgradeStage::Pending => "pending",
            UpgradeStage::Preflight => "preflight",
            UpgradeStage::EnteringMaintenance => "entering-maintenance",
            UpgradeStage::Writing => "writing",
            UpgradeStage::Rebooting => "rebooting",
            UpgradeStage::LeavingMaintenance => "leaving-maintenance",
            UpgradeStage::Done => "done",
            UpgradeStage::Failed => "failed",
        }
    }

    /// The stages in which the node counts as unavailable.
    pub fn is_active(self) -> bool {
        !matches!(
            self,
            UpgradeStage::Pending | UpgradeStage::Done | UpgradeStage::Failed
        )
    }

    pub fn is_done(self) -> bool {
        matches!(self, UpgradeStage::Done | UpgradeStage::Failed)
    }
}

impl std::fmt::Display for UpgradeStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the provisioner asks of a node (its agent, or the cluster about it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpgradeAction {
    /// Read the agent's status.
    Status,
    EnterMaintenance,
    /// Write the image into the other slot and reboot.
    Upgrade,
    ExitMaintenance,
}

/// The slot and boot entry generation an upgrade wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlotTarget {
    pub slot: Slot,
    pub generation: u32,
}

/// What came back from an action.
#[derive(Debug, Clone, PartialEq)]
pub enum UpgradeObservation {
    /// The agent's status, or why it could not be read.
    Status(Result<Box<NodeStatus>, String>),
    /// Maintenance entered or left (which, by the action), or why not.
    Maintenance(Result<String, String>),
    /// The agent wrote the slot and reboots into it, or refused.
    Written(Result<SlotTarget, String>),
}

pub type UpgradeFailure = Failure<UpgradeStage>;
pub type UpgradeEntry = StageEntry<UpgradeStage>;

/// A node's upgrade progress, as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeUpgrade {
    pub stage: UpgradeStage,
    pub since_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<UpgradeFailure>,
    pub history: Vec<UpgradeEntry>,
    /// The action the node waits on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_on: Option<UpgradeAction>,
    /// When the next status read may go out (while the node reboots).
    #[serde(default)]
    pub next_poll_ms: u64,
    /// The slot the node ran before, and the one written for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<SlotTarget>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<SlotTarget>,
    /// Whether this run put the node into maintenance (so it takes it out again).
    #[serde(default)]
    pub in_maintenance: bool,
    /// The last thing the node said while it was waited on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
}

impl NodeUpgrade {
    pub fn new(now_ms: u64) -> NodeUpgrade {
        NodeUpgrade {
            stage: UpgradeStage::Pending,
            since_ms: now_ms,
            failure: None,
            history: vec![UpgradeEntry {
                stage: UpgradeStage::Pending,
                at_ms: now_ms,
                note: None,
            }],
            waiting_on: None,
            next_poll_ms: 0,
            from: None,
            target: None,
            in_maintenance: false,
            last_seen: None,
        }
    }

    fn enter(&mut self, stage: UpgradeStage, now_ms: u64, note: Option<String>) {
        self.stage = stage;
        self.since_ms = now_ms;
        self.waiting_on = None;
        self.next_poll_ms = 0;
        self.history.push(UpgradeEntry {
            stage,
            at_ms: now_ms,
            note,
        });
    }

    fn fail(&mut self, now_ms: u64, reason: String) {
        self.failure = Some(UpgradeFailure {
            stage: self.stage,
            reason: reason.clone(),
        });
        self.enter(UpgradeStage::Failed, now_ms, Some(reason));
    }

    /// What this node starts a run as, from what an earlier run stored: failures are tried
    /// again, and an interrupted write starts over at the preflight, which reads what the node
    /// has since become.
    pub fn resume(stored: Option<&NodeUpgrade>, now_ms: u64) -> NodeUpgrade {
        let Some(stored) = stored else {
            return NodeUpgrade::new(now_ms);
        };
        let mut node = stored.clone();
        match node.stage {
            UpgradeStage::Failed => {
                let why = node
                    .failure
                    .take()
                    .map(|f| format!("retrying after {} failed: {}", f.stage, f.reason))
                    .unwrap_or_else(|| "retrying".into());
                let in_maintenance = node.in_maintenance;
                let history = std::mem::take(&mut node.history);
                node = NodeUpgrade::new(now_ms);
                node.history = history;
                node.in_maintenance = in_maintenance;
                node.enter(UpgradeStage::Pending, now_ms, Some(why));
            }
            UpgradeStage::Writing => {
                node.enter(
                    UpgradeStage::Preflight,
                    now_ms,
                    Some("resumed: reading what the node runs now".into()),
                );
                node.waiting_on = Some(UpgradeAction::Status);
            }
            _ => {
                node.waiting_on = node.stage_action();
            }
        }
        node
    }

    /// The action a node in its stage waits on, if it waits on one.
    fn stage_action(&self) -> Option<UpgradeAction> {
        match self.stage {
            UpgradeStage::Preflight | UpgradeStage::Rebooting => Some(UpgradeAction::Status),
            UpgradeStage::EnteringMaintenance => Some(UpgradeAction::EnterMaintenance),
            UpgradeStage::Writing => Some(UpgradeAction::Upgrade),
            UpgradeStage::LeavingMaintenance => Some(UpgradeAction::ExitMaintenance),
            _ => None,
        }
    }
}

/// The rolling upgrade's settings.
#[derive(Debug, Clone)]
pub struct UpgradeLimits {
    /// Nodes out of service at once.
    pub max_unavailable: usize,
    /// Whether nodes go through cluster maintenance.
    pub maintenance: bool,
    /// How often a rebooting node's status is read.
    pub poll: Duration,
    /// Deadline to enter maintenance (VM migrations, evictions).
    pub maintenance_timeout: Duration,
    /// Deadline for the slot write.
    pub write_timeout: Duration,
    /// Deadline from the write to the new slot reported good (or rolled back).
    pub boot_timeout: Duration,
}

impl Default for UpgradeLimits {
    fn default() -> UpgradeLimits {
        UpgradeLimits {
            max_unavailable: 1,
            maintenance: false,
            poll: Duration::from_secs(5),
            maintenance_timeout: Duration::from_secs(20 * 60),
            write_timeout: Duration::from_secs(30 * 60),
            boot_timeout: Duration::from_secs(30 * 60),
        }
    }
}

impl UpgradeLimits {
    fn deadline(&self, stage: UpgradeStage) -> Option<Duration> {
        match stage {
            UpgradeStage::Preflight => Some(Duration::from_secs(5 * 60)),
            UpgradeStage::EnteringMaintenance | UpgradeStage::LeavingMaintenance => {
                Some(self.maintenance_timeout)
            }
            UpgradeStage::Writing => Some(self.write_timeout),
            UpgradeStage::Rebooting => Some(self.boot_timeout),
            _ => None,
        }
    }
}

/// Context of one step besides the node.
#[derive(Debug, Clone, Copy)]
pub struct UpgradeInput<'a> {
    pub now_ms: u64,
    pub limits: &'a UpgradeLimits,
    /// Nodes of the run out of service before this node's step.
    pub unavailable: usize,
    /// A node of the run failed: nobody else starts.
    pub halted: bool,
    /// An action of this node is in flight.
    pub busy: bool,
    /// sha256 of the root image the run installs.
    pub image_sha256: &'a str,
}

/// How a node's status reads for the preflight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Preflight {
    /// Ready to be upgraded from this slot.
    Go(SlotTarget),
    /// Already runs the image, blessed.
    AlreadyDone(SlotTarget),
    /// Already booted the image, which is still on trial.
    OnTrial(SlotTarget),
}

fn current(boot: &BootStatus) -> Option<SlotTarget> {
    Some(SlotTarget {
        slot: boot.booted.slot,
        generation: boot.booted.generation?,
    })
}

/// Whether a node whose agent says `status` may be upgraded to the image `image_sha256`.
pub fn preflight(status: &NodeStatus, image_sha256: &str) -> Result<Preflight, String> {
    let boot = status.boot.as_ref().ok_or(
        "the node reports no A/B boot slots: it was not installed by kiln's installer, or its \
         agent predates upgrades",
    )?;
    let here = current(boot).ok_or("the booted slot has no boot entry")?;
    let runs_image = boot
        .booted
        .image
        .as_ref()
        .is_some_and(|i| i.rootfs_sha256 == image_sha256);
    match boot.booted.state {
        Some(EntryState::Good) if runs_image => return Ok(Preflight::AlreadyDone(here)),
        Some(EntryState::OnTrial) if runs_image => return Ok(Preflight::OnTrial(here)),
        Some(EntryState::Good) => {}
        _ => {
            return Err(format!(
                "slot {} is still on trial with another image; wait for its verdict",
                here.slot.letter()
            ));
        }
    }
    if let Some(c) = status.conditions.iter().find(|c| c.kind == "Ready")
        && !c.status
    {
        return Err(format!("not ready: {} {}", c.reason, c.message));
    }
    if let Some(c) = status
        .conditions
        .iter()
        .find(|c| c.kind == "Failed" && c.status)
    {
        return Err(format!(
            "the agent reports a failure: {}: {}",
            c.reason, c.message
        ));
    }
    Ok(Preflight::Go(here))
}

/// How a status read while the node reboots ends the wait, if it does: `Ok` once the written
/// slot booted and was blessed, `Err` once the node reports the written slot failed.
fn verdict(boot: &BootStatus, target: SlotTarget) -> Option<Result<(), String>> {
    if current(boot) == Some(target) && boot.booted.state == Some(EntryState::Good) {
        return Some(Ok(()));
    }
    let a = boot.last_assessment.as_ref()?;
    (a.slot == target.slot && a.generation == target.generation && !a.good).then(|| {
        Err(format!(
            "slot {} (generation {}) failed and the node is back on slot {}: {}",
            target.slot.letter(),
            target.generation,
            boot.booted.slot.letter(),
            a.reason
        ))
    })
}

fn describe(status: &NodeStatus) -> String {
    match &status.boot {
        Some(b) => format!(
            "slot {} {}",
            b.booted.slot.letter(),
            b.booted
                .state
                .map_or("without an entry".to_string(), |s| kiln_spec::serde_name(
                    &s
                ))
        ),
        None => "no boot slots".into(),
    }
}

/// Applies `observations` (in order) and the clock to `node`; returns the actions to start.
pub fn step(
    node: &mut NodeUpgrade,
    observations: &[UpgradeObservation],
    input: UpgradeInput<'_>,
) -> Vec<UpgradeAction> {
    let now = input.now_ms;
    for obs in observations {
        observe(node, obs, &input);
    }
    if node.stage == UpgradeStage::Pending
        && !input.halted
        && input.unavailable < input.limits.max_unavailable.max(1)
    {
        node.enter(UpgradeStage::Preflight, now, None);
        node.waiting_on = Some(UpgradeAction::Status);
    }
    if let Some(limit) = input.limits.deadline(node.stage)
        && now.saturating_sub(node.since_ms) > limit.as_millis() as u64
    {
        let mut reason = format!("timed out after {}", humantime::format_duration(limit));
        if let Some(seen) = &node.last_seen {
            reason.push_str("; last seen: ");
            reason.push_str(seen);
        }
        node.fail(now, reason);
    }
    match node.waiting_on {
        Some(action) if !input.busy && node.next_poll_ms <= now => vec![action],
        _ => Vec::new(),
    }
}

fn next_after_boot(node: &mut NodeUpgrade, now: u64, note: String) {
    if node.in_maintenance {
        node.enter(UpgradeStage::LeavingMaintenance, now, Some(note));
        node.waiting_on = Some(UpgradeAction::ExitMaintenance);
    } else {
        node.enter(UpgradeStage::Done, now, Some(note));
    }
}

fn observe(node: &mut NodeUpgrade, obs: &UpgradeObservation, input: &UpgradeInput<'_>) {
    let now = input.now_ms;
    match (node.stage, obs) {
        (UpgradeStage::Preflight, UpgradeObservation::Status(Err(e))) => {
            node.fail(now, format!("the agent cannot be reached: {e}"));
        }
        (UpgradeStage::Preflight, UpgradeObservation::Status(Ok(status))) => {
            match preflight(status, input.image_sha256) {
                Err(e) => node.fail(now, e),
                Ok(Preflight::AlreadyDone(here)) => next_after_boot(
                    node,
                    now,
                    format!("slot {} runs the image, blessed", here.slot.letter()),
                ),
                Ok(Preflight::OnTrial(here)) => {
                    node.target = Some(here);
                    node.enter(
                        UpgradeStage::Rebooting,
                        now,
                        Some(format!(
                            "slot {} runs the image on trial",
                            here.slot.letter()
                        )),
                    );
                    node.waiting_on = Some(UpgradeAction::Status);
                }
                Ok(Preflight::Go(here)) => {
                    node.from = Some(here);
                    if input.limits.maintenance && !node.in_maintenance {
                        node.enter(UpgradeStage::EnteringMaintenance, now, None);
                        node.waiting_on = Some(UpgradeAction::EnterMaintenance);
                    } else {
                        node.enter(UpgradeStage::Writing, now, None);
                        node.waiting_on = Some(UpgradeAction::Upgrade);
                    }
                }
            }
        }
        (UpgradeStage::EnteringMaintenance, UpgradeObservation::Maintenance(r)) => match r {
            Ok(note) => {
                node.in_maintenance = true;
                node.enter(UpgradeStage::Writing, now, Some(note.clone()));
                node.waiting_on = Some(UpgradeAction::Upgrade);
            }
            Err(e) => node.fail(now, format!("entering maintenance: {e}")),
        },
        (UpgradeStage::Writing, UpgradeObservation::Written(r)) => match r {
            Ok(target) => {
                node.target = Some(*target);
                node.enter(
                    UpgradeStage::Rebooting,
                    now,
                    Some(format!(
                        "slot {} written (generation {}); rebooting",
                        target.slot.letter(),
                        target.generation
                    )),
                );
                node.waiting_on = Some(UpgradeAction::Status);
                node.next_poll_ms = now + input.limits.poll.as_millis() as u64;
            }
            Err(e) => node.fail(now, e.clone()),
        },
        (UpgradeStage::Rebooting, UpgradeObservation::Status(r)) => {
            node.next_poll_ms = now + input.limits.poll.as_millis() as u64;
            let (Ok(status), Some(target)) = (r, node.target) else {
                if let Err(e) = r {
                    node.last_seen = Some(format!("unreachable: {e}"));
                }
                return;
            };
            node.last_seen = Some(describe(status));
            match status.boot.as_ref().and_then(|b| verdict(b, target)) {
                None => {}
                Some(Ok(())) => next_after_boot(
                    node,
                    now,
                    format!(
                        "slot {} (generation {}) booted and blessed",
                        target.slot.letter(),
                        target.generation
                    ),
                ),
                Some(Err(e)) => node.fail(now, e),
            }
        }
        (UpgradeStage::LeavingMaintenance, UpgradeObservation::Maintenance(r)) => match r {
            Ok(note) => {
                node.in_maintenance = false;
                node.enter(UpgradeStage::Done, now, Some(note.clone()));
            }
            Err(e) => node.fail(now, format!("leaving maintenance: {e}")),
        },
        // Late answers to a stage left behind change nothing.
        _ => {}
    }
}

/// The order nodes are upgraded in: in waves of `max_unavailable`, in the given order.
pub fn waves(nodes: &[String], max_unavailable: usize) -> Vec<Vec<String>> {
    nodes
        .chunks(max_unavailable.max(1))
        .map(<[String]>::to_vec)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_agent::status::Condition;
    use kiln_spec::boot::{Assessment, SlotImage, SlotReport};

    const NEW: &str = "2222";

    fn slot(slot: Slot, generation: u32, state: EntryState, image: &str) -> SlotReport {
        SlotReport {
            slot,
            generation: Some(generation),
            state: Some(state),
            tries_left: None,
            image: Some(SlotImage {
                rootfs_sha256: image.into(),
                source: "test".into(),
                written: "now".into(),
            }),
        }
    }

    fn status(booted: SlotReport, assessment: Option<Assessment>) -> Box<NodeStatus> {
        Box::new(NodeStatus {
            conditions: vec![Condition {
                kind: "Ready".into(),
                status: true,
                reason: "Converged".into(),
                message: String::new(),
            }],
            boot: Some(BootStatus {
                booted,
                staged: None,
                rollback: None,
                next_boot: None,
                last_assessment: assessment,
            }),
            ..Default::default()
        })
    }

    fn on_a() -> Box<NodeStatus> {
        status(slot(Slot::A, 1, EntryState::Good, "1111"), None)
    }

    const B2: SlotTarget = SlotTarget {
        slot: Slot::B,
        generation: 2,
    };

    struct Run {
        limits: UpgradeLimits,
        now: u64,
    }

    impl Run {
        fn new(limits: UpgradeLimits) -> Run {
            Run { limits, now: 0 }
        }

        /// A node taken through its preflight (on slot A) and, with maintenance, into it:
        /// what it is once it waits on the slot write.
        fn writing(&mut self) -> NodeUpgrade {
            use UpgradeObservation as O;
            let mut n = NodeUpgrade::new(0);
            self.step(&mut n, &[], 0, false);
            self.step(&mut n, &[O::Status(Ok(on_a()))], 1, false);
            if self.limits.maintenance {
                self.step(&mut n, &[O::Maintenance(Ok("drained".into()))], 1, false);
            }
            assert_eq!(n.stage, UpgradeStage::Writing);
            n
        }

        /// A node whose slot B (generation 2) was written: it waits for the reboot.
        fn rebooting(&mut self) -> NodeUpgrade {
            let mut n = self.writing();
            self.step(&mut n, &[UpgradeObservation::Written(Ok(B2))], 1, false);
            n
        }

        fn step(
            &mut self,
            node: &mut NodeUpgrade,
            obs: &[UpgradeObservation],
            unavailable: usize,
            halted: bool,
        ) -> Vec<UpgradeAction> {
            self.now += 1000;
            step(
                node,
                obs,
                UpgradeInput {
                    now_ms: self.now,
                    limits: &self.limits,
                    unavailable,
                    halted,
                    busy: false,
                    image_sha256: NEW,
                },
            )
        }
    }

    fn stages(n: &NodeUpgrade) -> Vec<UpgradeStage> {
        n.history.iter().map(|e| e.stage).collect()
    }

    #[test]
    fn a_node_in_a_cluster_goes_through_maintenance_and_ends_blessed() {
        use UpgradeAction as A;
        use UpgradeObservation as O;
        let mut run = Run::new(UpgradeLimits {
            maintenance: true,
            ..UpgradeLimits::default()
        });
        let mut n = NodeUpgrade::new(0);
        assert_eq!(run.step(&mut n, &[], 0, false), [A::Status]);
        assert_eq!(
            run.step(&mut n, &[O::Status(Ok(on_a()))], 1, false),
            [A::EnterMaintenance]
        );
        assert_eq!(
            run.step(&mut n, &[O::Maintenance(Ok("drained".into()))], 1, false),
            [A::Upgrade]
        );
        // The first status read waits one poll interval.
        assert!(run.step(&mut n, &[O::Written(Ok(B2))], 1, false).is_empty());
        run.now += 5000;
        assert_eq!(run.step(&mut n, &[], 1, false), [A::Status]);
        // Unreachable, then still on A: keep waiting.
        run.now += 5000;
        let waiting = run.step(
            &mut n,
            &[O::Status(Err("connection refused".into()))],
            1,
            false,
        );
        assert!(waiting.is_empty());
        assert_eq!(n.stage, UpgradeStage::Rebooting);
        let on_b = status(slot(Slot::B, 2, EntryState::OnTrial, NEW), None);
        run.step(&mut n, &[O::Status(Ok(on_b))], 1, false);
        assert_eq!(n.stage, UpgradeStage::Rebooting);
        assert_eq!(n.last_seen.as_deref(), Some("slot B on-trial"));
        let blessed = status(slot(Slot::B, 2, EntryState::Good, NEW), None);
        assert_eq!(
            run.step(&mut n, &[O::Status(Ok(blessed))], 1, false),
            [A::ExitMaintenance]
        );
        run.step(&mut n, &[O::Maintenance(Ok("uncordoned".into()))], 1, false);
        assert_eq!(
            stages(&n),
            [
                UpgradeStage::Pending,
                UpgradeStage::Preflight,
                UpgradeStage::EnteringMaintenance,
                UpgradeStage::Writing,
                UpgradeStage::Rebooting,
                UpgradeStage::LeavingMaintenance,
                UpgradeStage::Done
            ]
        );
        assert!(!n.in_maintenance);
        assert_eq!(
            n.from,
            Some(SlotTarget {
                slot: Slot::A,
                generation: 1
            })
        );
    }

    #[test]
    fn a_rolled_back_node_fails_with_the_reason_and_stays_in_maintenance() {
        use UpgradeObservation as O;
        let mut run = Run::new(UpgradeLimits {
            maintenance: true,
            ..UpgradeLimits::default()
        });
        let mut n = run.rebooting();
        let back = status(
            slot(Slot::A, 1, EntryState::Good, "1111"),
            Some(Assessment {
                slot: Slot::B,
                generation: 2,
                good: false,
                reason: "used up its 3 boot tries".into(),
                at: "now".into(),
            }),
        );
        run.now += 5000;
        assert!(
            run.step(&mut n, &[O::Status(Ok(back))], 1, false)
                .is_empty()
        );
        assert_eq!(n.stage, UpgradeStage::Failed);
        let f = n.failure.as_ref().unwrap();
        assert_eq!(f.stage, UpgradeStage::Rebooting);
        assert_eq!(
            f.reason,
            "slot B (generation 2) failed and the node is back on slot A: used up its 3 boot tries"
        );
        assert!(n.in_maintenance);
        // Run again: tried from the start, still known to be in maintenance.
        let again = NodeUpgrade::resume(Some(&n), run.now);
        assert_eq!(again.stage, UpgradeStage::Pending);
        assert!(again.in_maintenance);
        assert!(
            again
                .history
                .last()
                .unwrap()
                .note
                .as_deref()
                .unwrap()
                .starts_with("retrying after rebooting failed: slot B (generation 2) failed")
        );
    }

    #[test]
    fn admission_honours_max_unavailable_and_a_halt() {
        let mut run = Run::new(UpgradeLimits {
            max_unavailable: 2,
            ..UpgradeLimits::default()
        });
        let mut n = NodeUpgrade::new(0);
        assert!(run.step(&mut n, &[], 2, false).is_empty());
        assert!(run.step(&mut n, &[], 0, true).is_empty());
        assert_eq!(n.stage, UpgradeStage::Pending);
        assert_eq!(run.step(&mut n, &[], 1, false), [UpgradeAction::Status]);
        assert_eq!(
            waves(&["a".into(), "b".into(), "c".into()], 2),
            [vec!["a".to_string(), "b".into()], vec!["c".into()]]
        );
    }

    #[test]
    fn preflight_refuses_unready_or_trial_nodes_and_skips_upgraded_ones() {
        let mut unready = on_a();
        unready.conditions[0].status = false;
        unready.conditions[0].reason = "Converging".into();
        assert_eq!(
            preflight(&unready, NEW),
            Err("not ready: Converging ".into())
        );
        let trial = status(slot(Slot::B, 2, EntryState::OnTrial, "3333"), None);
        assert!(
            preflight(&trial, NEW)
                .unwrap_err()
                .contains("still on trial")
        );
        let done = status(slot(Slot::B, 2, EntryState::Good, NEW), None);
        assert_eq!(preflight(&done, NEW), Ok(Preflight::AlreadyDone(B2)));
        let no_slots = NodeStatus::default();
        assert!(preflight(&no_slots, NEW).unwrap_err().contains("no A/B"));
    }

    #[test]
    fn an_interrupted_write_resumes_from_what_the_node_runs() {
        use UpgradeObservation as O;
        let mut run = Run::new(UpgradeLimits::default());
        let n = run.writing();
        // Stopped here; the node wrote B and rebooted into it meanwhile.
        let mut resumed = NodeUpgrade::resume(Some(&n), run.now);
        assert_eq!(resumed.stage, UpgradeStage::Preflight);
        let on_b = status(slot(Slot::B, 2, EntryState::OnTrial, NEW), None);
        run.step(&mut resumed, &[O::Status(Ok(on_b))], 1, false);
        assert_eq!(resumed.stage, UpgradeStage::Rebooting);
        let blessed = status(slot(Slot::B, 2, EntryState::Good, NEW), None);
        run.now += 5000;
        run.step(&mut resumed, &[O::Status(Ok(blessed))], 1, false);
        assert_eq!(resumed.stage, UpgradeStage::Done);
    }

    #[test]
    fn a_node_that_never_comes_back_fails_naming_what_was_last_seen() {
        use UpgradeObservation as O;
        let mut run = Run::new(UpgradeLimits::default());
        let mut n = run.rebooting();
        run.now += 10_000;
        run.step(
            &mut n,
            &[O::Status(Err("no route to host".into()))],
            1,
            false,
        );
        run.now += 31 * 60 * 1000;
        run.step(&mut n, &[], 1, false);
        assert_eq!(n.stage, UpgradeStage::Failed);
        assert_eq!(
            n.failure.unwrap().reason,
            "timed out after 30m; last seen: unreachable: no route to host"
        );
    }
}
