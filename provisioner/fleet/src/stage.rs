//! The rollout state machine of one node, as a pure function: given what the node last was,
//! what has happened since and the time, it says what the node is now and what the provisioner
//! must do. The controller around it does the IO (BMC calls, the store) and feeds results back
//! in as observations.
//!
//! `Pending → PoweringOn → Netbooting → Installing → Rebooting → Ready`, or `Failed(stage,
//! reason)` from any of the active stages. Only transient BMC failures are retried; every
//! stage has a deadline, and a failure names the stage it happened in.

use std::time::Duration;

use kiln_spec::enrol::Phase;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::store::StoredReport;

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    Pending,
    PoweringOn,
    Netbooting,
    Installing,
    Rebooting,
    Ready,
    Failed,
}

impl Stage {
    /// Every stage, in the order a node goes through them.
    pub const ALL: [Stage; 7] = [
        Stage::Pending,
        Stage::PoweringOn,
        Stage::Netbooting,
        Stage::Installing,
        Stage::Rebooting,
        Stage::Ready,
        Stage::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Pending => "pending",
            Stage::PoweringOn => "powering-on",
            Stage::Netbooting => "netbooting",
            Stage::Installing => "installing",
            Stage::Rebooting => "rebooting",
            Stage::Ready => "ready",
            Stage::Failed => "failed",
        }
    }

    /// The stages that hold one of the rollout's parallel slots.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            Stage::PoweringOn | Stage::Netbooting | Stage::Installing | Stage::Rebooting
        )
    }

    pub fn is_done(self) -> bool {
        matches!(self, Stage::Ready | Stage::Failed)
    }
}

impl BmcAction {
    pub fn as_str(self) -> &'static str {
        match self {
            BmcAction::NetbootOnce => "netboot-once",
            BmcAction::NetbootIfOff => "netboot-if-off",
            BmcAction::BootFromDisk => "boot-from-disk",
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the provisioner asks a node's BMC to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum BmcAction {
    /// One-time boot from the network, then power on (or cycle, if it was on).
    NetbootOnce,
    /// The same, asked again after the provisioner stopped (or lost its lead) while a
    /// `NetbootOnce` was in flight: the boot override again, but power on only a machine that
    /// is off, so no machine is powered twice.
    NetbootIfOff,
    /// Boot from disk from now on.
    BootFromDisk,
}

/// How a BMC action ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum BmcOutcome {
    /// Done; `note` says anything an operator should know (a node that was on was cycled).
    Done { note: Option<String> },
    Failed {
        /// `auth`, `timeout`, … (kiln-bmc's error kinds).
        kind: String,
        message: String,
        transient: bool,
    },
}

/// Something that happened to a node, in the order it happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Observation {
    Bmc {
        action: BmcAction,
        outcome: BmcOutcome,
    },
    /// A phone-home report, as it was kept when it came.
    Report(StoredReport),
    /// An operator asked to try a failed node again; `by` says who (kept in its history).
    Retry { by: String },
    /// The node left the rollout (its Machine was deleted): it fails where it stands and is
    /// never acted on again.
    Withdrawn { why: String },
}

/// Where a node failed and why; `S` is the stage type (the rollout's, or the upgrade's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Failure<S = Stage> {
    pub stage: S,
    pub reason: String,
}

/// One entry of a node's stage history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StageEntry<S = Stage> {
    pub stage: S,
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Each stage change from one state of a node's history to a later one, oldest first, as
/// (the entry left, the entry entered): one per entry `after` gained, so a stage passed
/// through within one step (several reports taken at once) is told too. A history that does
/// not continue `before` (another rollout's) is told as its one change, if any.
pub fn stage_changes<S: Clone + PartialEq>(
    before: &[StageEntry<S>],
    after: &[StageEntry<S>],
) -> Vec<(StageEntry<S>, StageEntry<S>)> {
    if after.len() >= before.len() && after.starts_with(before) {
        let start = before.len().max(1);
        return after
            .get(start..)
            .unwrap_or_default()
            .iter()
            .zip(&after[start - 1..])
            .map(|(entered, left)| (left.clone(), entered.clone()))
            .collect();
    }
    match (before.last(), after.last()) {
        (Some(left), Some(entered)) if left.stage != entered.stage => {
            vec![(left.clone(), entered.clone())]
        }
        _ => Vec::new(),
    }
}

/// A node's rollout progress: what the store keeps and `kiln fleet status` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeProgress {
    pub stage: Stage,
    pub since_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<Failure>,
    pub history: Vec<StageEntry>,
    /// A BMC action the node waits on, and how many times it was tried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_on: Option<BmcAction>,
    #[serde(default)]
    pub attempts: u32,
    /// When the next try of `waiting_on` may start (after a transient failure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at_ms: Option<u64>,
    /// The last phase the node reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_phase: Option<Phase>,
    /// The installer started on this node this many times in this rollout.
    #[serde(default)]
    pub installs: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_sha256: Option<String>,
    /// Set by `agent-ready` while the boot device is still being switched to disk.
    #[serde(default)]
    pub agent_ready: bool,
    /// When the newest report applied to this node came: a provisioner that takes the
    /// rollout over applies the reports kept after it (its predecessor may have died between
    /// keeping a report and committing what it changed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reports_through_ms: Option<u64>,
}

impl NodeProgress {
    pub fn new(now_ms: u64) -> NodeProgress {
        NodeProgress {
            stage: Stage::Pending,
            since_ms: now_ms,
            failure: None,
            history: vec![StageEntry {
                stage: Stage::Pending,
                at_ms: now_ms,
                note: None,
            }],
            waiting_on: None,
            attempts: 0,
            retry_at_ms: None,
            last_phase: None,
            installs: 0,
            slot: None,
            image_sha256: None,
            agent_ready: false,
            reports_through_ms: Some(now_ms),
        }
    }

    /// The reports among `kept` that came after the newest one applied, oldest first.
    pub fn unapplied<'a>(
        &self,
        kept: impl IntoIterator<Item = &'a StoredReport>,
    ) -> Vec<&'a StoredReport> {
        // Progress kept before this was recorded: what came after its stage began.
        let through = self.reports_through_ms.unwrap_or(self.since_ms);
        let mut later: Vec<&StoredReport> =
            kept.into_iter().filter(|r| r.at_ms > through).collect();
        later.sort_by_key(|r| r.at_ms);
        later
    }

    fn enter(&mut self, stage: Stage, now_ms: u64, note: Option<String>) {
        self.stage = stage;
        self.since_ms = now_ms;
        self.history.push(StageEntry {
            stage,
            at_ms: now_ms,
            note,
        });
    }

    fn fail(&mut self, now_ms: u64, reason: String) {
        self.failure = Some(Failure {
            stage: self.stage,
            reason: reason.clone(),
        });
        self.waiting_on = None;
        self.retry_at_ms = None;
        self.enter(Stage::Failed, now_ms, Some(reason));
    }

    /// The node as a fresh one that waits to be powered on again, keeping its history (with
    /// `why`) and its install count.
    pub fn start_over(&mut self, now_ms: u64, why: String) {
        let mut fresh = NodeProgress::new(now_ms);
        fresh.history = std::mem::take(&mut self.history);
        fresh.history.push(StageEntry {
            stage: Stage::Pending,
            at_ms: now_ms,
            note: Some(why),
        });
        fresh.installs = self.installs;
        *self = fresh;
    }

    /// Whether the node's BMC action was started and its outcome not yet seen.
    pub fn bmc_in_flight(&self) -> bool {
        self.waiting_on.is_some() && self.retry_at_ms.is_some_and(|t| t >= IN_FLIGHT)
    }

    /// The node as a new run of the provisioner takes it over: a BMC action in flight when the
    /// last one stopped is asked again (a `NetbootOnce` as `NetbootIfOff`: it may have powered
    /// the machine already), a wait for a retry is cut short.
    pub fn take_over(&mut self) {
        if self.bmc_in_flight() && self.waiting_on == Some(BmcAction::NetbootOnce) {
            self.waiting_on = Some(BmcAction::NetbootIfOff);
        }
        if self.waiting_on.is_some() {
            self.retry_at_ms = None;
            self.attempts = 0;
        }
    }

    fn wait_on(&mut self, action: BmcAction) {
        self.waiting_on = Some(action);
        self.attempts = 0;
        self.retry_at_ms = None;
    }

    /// Milliseconds spent in each stage so far (the current one up to `now_ms`).
    pub fn stage_durations(&self, now_ms: u64) -> Vec<(Stage, u64)> {
        self.history
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let end = self
                    .history
                    .get(i + 1)
                    .map_or(now_ms, |next| next.at_ms)
                    .max(e.at_ms);
                (e.stage, end - e.at_ms)
            })
            .collect()
    }
}

/// `retry_at_ms` of a node whose BMC action runs: no retry until its outcome arrives. The
/// largest integer a Kubernetes API server takes (stores written earlier hold `u64::MAX`).
const IN_FLIGHT: u64 = i64::MAX as u64;

/// The rollout's bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Nodes in an active stage at once.
    pub parallel: usize,
    /// Nodes powering on or netbooting at once (the netboot services' load).
    pub netboot_parallel: usize,
    /// Nodes failed or in an active stage before no more start (a rollout that keeps failing
    /// stops taking machines down); none: only `parallel` counts.
    pub max_unavailable: Option<usize>,
    /// Tries of one BMC action when its failures are transient.
    pub bmc_attempts: u32,
    pub bmc_retry_after: Duration,
    pub powering_on: Duration,
    pub netbooting: Duration,
    pub installing: Duration,
    pub rebooting: Duration,
}

impl Limits {
    /// Whether the rollout stopped taking machines: too many failed, nothing in progress.
    pub fn halted(&self, load: &Load) -> bool {
        load.active == 0 && self.max_unavailable.is_some_and(|max| load.failed >= max)
    }
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            parallel: 10,
            netboot_parallel: 10,
            max_unavailable: None,
            bmc_attempts: 3,
            bmc_retry_after: Duration::from_secs(2),
            powering_on: Duration::from_secs(120),
            netbooting: Duration::from_secs(900),
            installing: Duration::from_secs(1800),
            rebooting: Duration::from_secs(1200),
        }
    }
}

impl Limits {
    fn deadline(&self, stage: Stage) -> Option<Duration> {
        match stage {
            Stage::PoweringOn => Some(self.powering_on),
            Stage::Netbooting => Some(self.netbooting),
            Stage::Installing => Some(self.installing),
            Stage::Rebooting => Some(self.rebooting),
            _ => None,
        }
    }
}

/// How busy the fleet is right now, for admission of pending nodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    pub active: usize,
    pub netbooting: usize,
    pub failed: usize,
}

impl Load {
    pub fn of<'a>(nodes: impl IntoIterator<Item = &'a NodeProgress>) -> Load {
        let mut load = Load::default();
        for n in nodes {
            load.count(n.stage, 1);
        }
        load
    }

    /// Counts a node in `stage` (`delta` 1), or no longer (-1).
    pub fn count(&mut self, stage: Stage, delta: isize) {
        let add = |n: &mut usize| *n = n.saturating_add_signed(delta);
        if stage.is_active() {
            add(&mut self.active);
        }
        if matches!(stage, Stage::PoweringOn | Stage::Netbooting) {
            add(&mut self.netbooting);
        }
        if stage == Stage::Failed {
            add(&mut self.failed);
        }
    }

    /// Whether one more node may start under `limits`.
    fn admits(&self, limits: &Limits) -> bool {
        self.active < limits.parallel
            && self.netbooting < limits.netboot_parallel
            && limits
                .max_unavailable
                .is_none_or(|max| self.active + self.failed < max)
    }
}

/// What the controller must do after a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Bmc(BmcAction),
}

/// Context a step needs besides the node itself.
#[derive(Debug, Clone, Copy)]
pub struct StepInput<'a> {
    pub now_ms: u64,
    pub limits: &'a Limits,
    /// The fleet's load before this node's step.
    pub load: Load,
    /// Whether a BMC action for this node is in flight (so it is not started twice).
    pub bmc_busy: bool,
    /// What the netboot trace says about the node (its last event, or that it was never
    /// seen), named in a netboot timeout.
    pub netboot_hint: Option<&'a str>,
}

/// Applies `observations` (in order) and the clock to `node`; returns the commands to run.
pub fn step(
    node: &mut NodeProgress,
    observations: &[Observation],
    input: StepInput<'_>,
) -> Vec<Command> {
    let now = input.now_ms;
    for obs in observations {
        observe(node, obs, input.limits, now);
    }
    let mut commands = Vec::new();
    if node.stage == Stage::Pending && input.load.admits(input.limits) {
        node.enter(Stage::PoweringOn, now, None);
        node.wait_on(BmcAction::NetbootOnce);
    }
    if let Some(limit) = input.limits.deadline(node.stage)
        && now.saturating_sub(node.since_ms) > limit.as_millis() as u64
    {
        let mut reason = format!("timed out after {}", humantime::format_duration(limit));
        if node.stage == Stage::Netbooting
            && let Some(hint) = input.netboot_hint
        {
            reason.push_str("; ");
            reason.push_str(hint);
        }
        node.fail(now, reason);
    }
    if let Some(action) = node.waiting_on
        && !input.bmc_busy
        && node.retry_at_ms.is_none_or(|t| t <= now)
    {
        node.attempts += 1;
        node.retry_at_ms = Some(IN_FLIGHT);
        commands.push(Command::Bmc(action));
    }
    commands
}

fn observe(node: &mut NodeProgress, obs: &Observation, limits: &Limits, now: u64) {
    if let Observation::Report(r) = obs {
        node.reports_through_ms = Some(node.reports_through_ms.map_or(r.at_ms, |t| t.max(r.at_ms)));
    }
    match obs {
        Observation::Retry { by } => {
            if let Some(f) = node.failure.clone().filter(|_| node.stage == Stage::Failed) {
                node.start_over(
                    now,
                    format!("retry asked by {by} after {} failed: {}", f.stage, f.reason),
                );
            }
        }
        // A finished node's story is told.
        Observation::Bmc { .. } | Observation::Report(_) | Observation::Withdrawn { .. }
            if node.stage.is_done() => {}
        Observation::Withdrawn { why } => node.fail(now, format!("withdrawn: {why}")),
        Observation::Bmc { action, outcome } => {
            if node.waiting_on != Some(*action) {
                return; // an answer to a question no longer asked
            }
            match outcome {
                BmcOutcome::Done { note } => {
                    node.waiting_on = None;
                    node.retry_at_ms = None;
                    match action {
                        BmcAction::NetbootOnce | BmcAction::NetbootIfOff => {
                            node.enter(Stage::Netbooting, now, note.clone());
                        }
                        BmcAction::BootFromDisk => {
                            if node.agent_ready {
                                node.enter(Stage::Ready, now, note.clone());
                            }
                        }
                    }
                }
                BmcOutcome::Failed {
                    kind,
                    message,
                    transient,
                } => {
                    if *transient && node.attempts < limits.bmc_attempts {
                        node.retry_at_ms = Some(now + limits.bmc_retry_after.as_millis() as u64);
                    } else {
                        let tries = if node.attempts > 1 {
                            format!(" (after {} tries)", node.attempts)
                        } else {
                            String::new()
                        };
                        node.fail(now, format!("BMC {kind}: {message}{tries}"));
                    }
                }
            }
        }
        Observation::Report(StoredReport { report: r, .. }) => {
            node.last_phase = Some(r.phase);
            match r.phase {
                Phase::InstallerStarted => {
                    node.installs += 1;
                    if matches!(node.stage, Stage::PoweringOn | Stage::Netbooting) {
                        node.waiting_on = None;
                        node.retry_at_ms = None;
                        node.enter(Stage::Installing, now, None);
                    }
                }
                Phase::Planned | Phase::Installing => {
                    if matches!(node.stage, Stage::PoweringOn | Stage::Netbooting) {
                        node.enter(Stage::Installing, now, None);
                    }
                }
                Phase::Installed => {
                    if let Some(d) = &r.image_sha256 {
                        node.image_sha256 = Some(d.clone());
                    }
                    if node.stage == Stage::Installing {
                        node.enter(Stage::Rebooting, now, None);
                        node.wait_on(BmcAction::BootFromDisk);
                    }
                }
                Phase::Failed => {
                    let why = r
                        .message
                        .clone()
                        .unwrap_or_else(|| "no reason given".into());
                    node.fail(now, format!("the installer failed: {why}"));
                }
                Phase::AgentReady => {
                    node.slot.clone_from(&r.slot);
                    if r.image_sha256.is_some() {
                        node.image_sha256.clone_from(&r.image_sha256);
                    }
                    if node.stage == Stage::Installing {
                        // `installed` was lost (the provisioner was down): the node's own
                        // agent is the better news anyway.
                        node.enter(
                            Stage::Rebooting,
                            now,
                            Some("the installed node reported ready before its install did".into()),
                        );
                        node.wait_on(BmcAction::BootFromDisk);
                    }
                    if node.stage == Stage::Rebooting {
                        node.agent_ready = true;
                        if node.waiting_on.is_none() {
                            node.enter(Stage::Ready, now, None);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use kiln_spec::enrol::Report;

    use super::*;

    fn input(now_ms: u64, limits: &Limits) -> StepInput<'_> {
        StepInput {
            now_ms,
            limits,
            load: Load::default(),
            bmc_busy: false,
            netboot_hint: None,
        }
    }

    fn done(action: BmcAction) -> Observation {
        Observation::Bmc {
            action,
            outcome: BmcOutcome::Done { note: None },
        }
    }

    fn kept(report: Report) -> Observation {
        Observation::Report(StoredReport { at_ms: 0, report })
    }

    fn report(phase: Phase) -> Observation {
        kept(Report::new(phase, None))
    }

    #[test]
    fn each_stage_passed_through_in_one_step_is_a_change_of_its_own() {
        let l = Limits::default();
        let mut n = NodeProgress::new(0);
        step(&mut n, &[done(BmcAction::NetbootOnce)], input(1, &l));
        step(&mut n, &[done(BmcAction::NetbootOnce)], input(2, &l));
        let before = n.clone();
        // The installer's reports, taken in one pass.
        step(
            &mut n,
            &[
                report(Phase::InstallerStarted),
                report(Phase::Installing),
                report(Phase::Installed),
            ],
            input(3, &l),
        );
        let told: Vec<(Stage, Stage)> = stage_changes(&before.history, &n.history)
            .into_iter()
            .map(|(left, entered)| (left.stage, entered.stage))
            .collect();
        assert_eq!(
            told,
            [
                (Stage::Netbooting, Stage::Installing),
                (Stage::Installing, Stage::Rebooting)
            ]
        );
        assert!(stage_changes(&n.history, &n.history).is_empty());
        // Another rollout's history: its one change.
        let fresh = NodeProgress::new(4);
        let told = stage_changes(&n.history, &fresh.history);
        assert_eq!(told.len(), 1);
        assert_eq!(
            (told[0].0.stage, told[0].1.stage),
            (Stage::Rebooting, Stage::Pending)
        );
    }

    fn stages(n: &NodeProgress) -> Vec<Stage> {
        n.history.iter().map(|e| e.stage).collect()
    }

    #[test]
    fn a_node_goes_from_pending_to_ready() {
        let l = Limits::default();
        let mut n = NodeProgress::new(0);
        assert_eq!(
            step(&mut n, &[], input(1, &l)),
            vec![Command::Bmc(BmcAction::NetbootOnce)]
        );
        // Asked once: no second power-on while the first is in flight.
        assert_eq!(step(&mut n, &[], input(2, &l)), vec![]);
        step(&mut n, &[done(BmcAction::NetbootOnce)], input(3, &l));
        assert_eq!(n.stage, Stage::Netbooting);
        step(&mut n, &[report(Phase::InstallerStarted)], input(4, &l));
        step(
            &mut n,
            &[report(Phase::Planned), report(Phase::Installing)],
            input(5, &l),
        );
        assert_eq!(n.stage, Stage::Installing);
        let cmds = step(&mut n, &[report(Phase::Installed)], input(6, &l));
        assert_eq!(cmds, vec![Command::Bmc(BmcAction::BootFromDisk)]);
        let mut ready = Report::new(Phase::AgentReady, None);
        ready.slot = Some("A".into());
        // The agent may come up before the BMC has answered.
        step(&mut n, &[kept(ready)], input(7, &l));
        assert_eq!(n.stage, Stage::Rebooting);
        step(&mut n, &[done(BmcAction::BootFromDisk)], input(8, &l));
        assert_eq!(n.stage, Stage::Ready);
        assert_eq!(n.slot.as_deref(), Some("A"));
        assert_eq!(n.installs, 1);
        assert_eq!(
            stages(&n),
            [
                Stage::Pending,
                Stage::PoweringOn,
                Stage::Netbooting,
                Stage::Installing,
                Stage::Rebooting,
                Stage::Ready
            ]
        );
        assert_eq!(
            n.stage_durations(10),
            [
                (Stage::Pending, 1),
                (Stage::PoweringOn, 2),
                (Stage::Netbooting, 1),
                (Stage::Installing, 2),
                (Stage::Rebooting, 2),
                (Stage::Ready, 2)
            ]
        );
    }

    #[test]
    fn a_ready_agent_stands_in_for_a_lost_installed_report() {
        let l = Limits::default();
        let mut n = NodeProgress::new(0);
        step(&mut n, &[], input(0, &l));
        step(
            &mut n,
            &[
                done(BmcAction::NetbootOnce),
                report(Phase::InstallerStarted),
            ],
            input(1, &l),
        );
        let cmds = step(&mut n, &[report(Phase::AgentReady)], input(2, &l));
        assert_eq!(cmds, vec![Command::Bmc(BmcAction::BootFromDisk)]);
        step(&mut n, &[done(BmcAction::BootFromDisk)], input(3, &l));
        assert_eq!(n.stage, Stage::Ready);
    }

    #[test]
    fn parallelism_caps_admission() {
        let l = Limits {
            parallel: 2,
            netboot_parallel: 1,
            ..Limits::default()
        };
        let mut n = NodeProgress::new(0);
        let mut i = input(1, &l);
        i.load = Load {
            active: 1,
            netbooting: 1,
            failed: 0,
        };
        assert_eq!(step(&mut n, &[], i), vec![]);
        assert_eq!(n.stage, Stage::Pending);
        i.load = Load {
            active: 1,
            netbooting: 0,
            failed: 0,
        };
        assert_eq!(step(&mut n, &[], i).len(), 1);
        assert_eq!(n.stage, Stage::PoweringOn);
    }

    #[test]
    fn max_unavailable_counts_failed_and_active_nodes() {
        let l = Limits {
            parallel: 10,
            max_unavailable: Some(3),
            ..Limits::default()
        };
        let mut n = NodeProgress::new(0);
        let mut i = input(1, &l);
        i.load = Load {
            active: 1,
            netbooting: 0,
            failed: 2,
        };
        assert_eq!(step(&mut n, &[], i), vec![]);
        assert_eq!(n.stage, Stage::Pending);
        assert!(!l.halted(&i.load), "a node is still in progress");
        i.load.active = 0;
        i.load.failed = 3;
        assert!(l.halted(&i.load));
        i.load.failed = 1;
        assert!(!l.halted(&i.load));
        assert_eq!(step(&mut n, &[], i).len(), 1);
        assert_eq!(n.stage, Stage::PoweringOn);
    }

    #[test]
    fn transient_bmc_failures_are_retried_and_others_fail_the_node() {
        let l = Limits::default();
        let transient = Observation::Bmc {
            action: BmcAction::NetbootOnce,
            outcome: BmcOutcome::Failed {
                kind: "timeout".into(),
                message: "no answer".into(),
                transient: true,
            },
        };
        let mut n = NodeProgress::new(0);
        step(&mut n, &[], input(0, &l));
        // Retried after the backoff, not before.
        assert_eq!(
            step(&mut n, std::slice::from_ref(&transient), input(10, &l)),
            vec![]
        );
        assert_eq!(step(&mut n, &[], input(2010, &l)).len(), 1);
        step(&mut n, std::slice::from_ref(&transient), input(2020, &l));
        assert_eq!(step(&mut n, &[], input(4020, &l)).len(), 1);
        step(&mut n, &[transient], input(4030, &l));
        assert_eq!(n.stage, Stage::Failed);
        assert_eq!(
            n.failure.as_ref().unwrap().reason,
            "BMC timeout: no answer (after 3 tries)"
        );

        let mut n = NodeProgress::new(0);
        step(&mut n, &[], input(0, &l));
        let auth = Observation::Bmc {
            action: BmcAction::NetbootOnce,
            outcome: BmcOutcome::Failed {
                kind: "auth".into(),
                message: "wrong password".into(),
                transient: false,
            },
        };
        step(&mut n, &[auth], input(5, &l));
        assert_eq!(
            n.failure,
            Some(Failure {
                stage: Stage::PoweringOn,
                reason: "BMC auth: wrong password".into()
            })
        );
    }

    #[test]
    fn an_operators_retry_starts_a_failed_node_over_and_nothing_else() {
        let l = Limits::default();
        let retry = Observation::Retry {
            by: "the fleet view".into(),
        };
        let mut n = NodeProgress::new(0);
        step(&mut n, &[], input(0, &l));
        let before = n.clone();
        step(&mut n, std::slice::from_ref(&retry), input(1, &l));
        assert_eq!(n, before, "a node that has not failed is left alone");
        let auth = Observation::Bmc {
            action: BmcAction::NetbootOnce,
            outcome: BmcOutcome::Failed {
                kind: "auth".into(),
                message: "wrong password".into(),
                transient: false,
            },
        };
        step(&mut n, &[auth], input(2, &l));
        assert_eq!(n.stage, Stage::Failed);
        // Admitted again in the same step, asking its BMC once more.
        let commands = step(&mut n, &[retry], input(3, &l));
        assert_eq!(commands, vec![Command::Bmc(BmcAction::NetbootOnce)]);
        assert_eq!(n.stage, Stage::PoweringOn);
        assert_eq!(n.failure, None);
        assert_eq!(
            stages(&n),
            [
                Stage::Pending,
                Stage::PoweringOn,
                Stage::Failed,
                Stage::Pending,
                Stage::PoweringOn
            ]
        );
        assert_eq!(
            n.history[3].note.as_deref(),
            Some(
                "retry asked by the fleet view after powering-on failed: BMC auth: wrong password"
            )
        );
    }

    #[test]
    fn deadlines_fail_the_stage_they_expire_in() {
        let l = Limits::default();
        let mut n = NodeProgress::new(0);
        step(&mut n, &[], input(0, &l));
        step(&mut n, &[done(BmcAction::NetbootOnce)], input(1, &l));
        let mut i = input(1 + 901_000, &l);
        i.netboot_hint = Some("last netboot event: offer sent, address 10.77.0.100");
        step(&mut n, &[], i);
        assert_eq!(
            n.failure,
            Some(Failure {
                stage: Stage::Netbooting,
                reason: "timed out after 15m; last netboot event: offer sent, address 10.77.0.100"
                    .into()
            })
        );
    }

    #[test]
    fn an_installer_failure_names_its_reason_and_late_news_changes_nothing() {
        let l = Limits::default();
        let mut n = NodeProgress::new(0);
        step(&mut n, &[], input(0, &l));
        step(
            &mut n,
            &[
                done(BmcAction::NetbootOnce),
                report(Phase::InstallerStarted),
                kept(Report::new(
                    Phase::Failed,
                    Some("refusing to erase /dev/vda".to_string()),
                )),
            ],
            input(1, &l),
        );
        assert_eq!(
            n.failure,
            Some(Failure {
                stage: Stage::Installing,
                reason: "the installer failed: refusing to erase /dev/vda".into()
            })
        );
        let before = n.clone();
        assert_eq!(
            step(&mut n, &[report(Phase::Installed)], input(2, &l)),
            vec![]
        );
        assert_eq!(n.stage, before.stage);
    }
}
