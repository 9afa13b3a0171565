//! The provisioner's Prometheus metrics. What the store knows (nodes per stage, how long the
//! finished stages took) is computed from a snapshot at each scrape, so a view that only reads
//! the state directory reports it too; BMC operations are counted by the process that makes
//! them; the netboot services' counters join when they run in the same process. One
//! exposition, one `# EOF`.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::stage::{BmcAction, BmcOutcome, Stage};
use crate::store::Snapshot;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabel {
    stage: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabel {
    action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    action: &'static str,
    kind: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// One second to four and a half hours: a stage of a rollout.
fn stage_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 15))
}

/// 10 ms to 80 s: one BMC session's worth of requests.
fn bmc_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 14))
}

/// 1 ms to 30 s: from a node's news to its committed effect.
fn lag_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// Lag samples kept for [`FleetMetrics::lag_quantiles`] (the oldest go first).
const LAG_SAMPLES: usize = 1 << 18;

/// The BMC operations this process made; [`FleetMetrics::render`] adds what a snapshot of the
/// store shows. Shared (`Arc`) by the rollout's BMC tasks and whatever serves `/metrics`.
#[derive(Debug)]
pub struct FleetMetrics {
    registry: Registry,
    bmc_durations: Histograms<ActionLabel>,
    bmc_errors: Family<ErrorLabels, Counter>,
    lag: Histogram,
    lag_samples: std::sync::Mutex<std::collections::VecDeque<Duration>>,
    api_requests: Counter,
}

impl Default for FleetMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl FleetMetrics {
    pub fn new() -> FleetMetrics {
        let mut registry = Registry::with_prefix("kiln_fleet");
        let bmc_durations: Histograms<ActionLabel> = Family::new_with_constructor(bmc_histogram);
        let bmc_errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "bmc_operation_duration_seconds",
            "Time one BMC action of the rollout took, failed ones included",
            bmc_durations.clone(),
        );
        registry.register(
            "bmc_operation_errors",
            "BMC actions that failed, by action and kind of failure",
            bmc_errors.clone(),
        );
        let lag = lag_histogram();
        registry.register(
            "event_to_commit_seconds",
            "Time from a node's news (a BMC result, a phone-home report) to its effect being \
             committed: how far the controller lags behind the fleet",
            lag.clone(),
        );
        let api_requests = Counter::default();
        registry.register(
            "api_requests",
            "Requests to the Kubernetes API server made for the rollout's state",
            api_requests.clone(),
        );
        FleetMetrics {
            registry,
            lag,
            lag_samples: Default::default(),
            api_requests,
            bmc_durations,
            bmc_errors,
        }
    }

    /// One BMC action the rollout made: how long it took, and its kind of failure if it failed.
    pub fn bmc_operation(&self, action: BmcAction, took: Duration, outcome: &BmcOutcome) {
        let action = action.as_str();
        self.bmc_durations
            .get_or_create(&ActionLabel { action })
            .observe(took.as_secs_f64());
        if let BmcOutcome::Failed { kind, .. } = outcome {
            self.bmc_errors
                .get_or_create(&ErrorLabels {
                    action,
                    kind: kind.clone(),
                })
                .inc();
        }
    }

    /// A node's news took `lag` to be committed.
    pub fn committed(&self, lag: Duration) {
        self.lag.observe(lag.as_secs_f64());
        let mut samples = self.lag_samples.lock().expect("lag lock");
        if samples.len() == LAG_SAMPLES {
            samples.pop_front();
        }
        samples.push_back(lag);
    }

    /// The lags at quantiles `qs` (0..=1) of the recent samples; none before the first.
    pub fn lag_quantiles(&self, qs: &[f64]) -> Option<Vec<Duration>> {
        let mut sorted: Vec<Duration> = self
            .lag_samples
            .lock()
            .expect("lag lock")
            .iter()
            .copied()
            .collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_unstable();
        let last = sorted.len() - 1;
        Some(
            qs.iter()
                .map(|q| sorted[((last as f64) * q.clamp(0.0, 1.0)).round() as usize])
                .collect(),
        )
    }

    /// One request to the API server was made.
    pub fn api_request(&self) {
        self.api_requests.inc();
    }

    pub fn api_requests(&self) -> u64 {
        self.api_requests.get()
    }

    /// The whole exposition: the fleet as `snapshot` has it at `now_ms`, this process's BMC
    /// counters, and the netboot services' counters when given.
    pub fn render(
        &self,
        snapshot: &Snapshot,
        now_ms: u64,
        netboot: Option<&kiln_netboot::trace::Trace>,
    ) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode_registry(&mut out, &snapshot_registry(snapshot, now_ms));
        let _ = encode_registry(&mut out, &self.registry);
        if let Some(trace) = netboot {
            trace.encode_counters(&mut out);
        }
        let _ = encode_eof(&mut out);
        out
    }
}

/// Nodes per stage, the durations of every finished stage in every node's history, and the
/// installs started.
fn snapshot_registry(snapshot: &Snapshot, now_ms: u64) -> Registry {
    let mut registry = Registry::with_prefix("kiln_fleet");
    let nodes = Family::<StageLabel, Gauge>::default();
    let durations: Histograms<StageLabel> = Family::new_with_constructor(stage_histogram);
    let installs = Counter::<u64>::default();
    // Every stage is present, 0 when empty: a dashboard's series do not come and go.
    for stage in Stage::ALL {
        nodes
            .get_or_create(&StageLabel {
                stage: stage.as_str(),
            })
            .set(0);
    }
    for (_, p) in &snapshot.nodes {
        nodes
            .get_or_create(&StageLabel {
                stage: p.stage.as_str(),
            })
            .inc();
        installs.inc_by(u64::from(p.installs));
        // The last entry is the stage the node is in: not finished.
        let finished = p.history.len().saturating_sub(1);
        for (stage, ms) in p.stage_durations(now_ms).into_iter().take(finished) {
            durations
                .get_or_create(&StageLabel {
                    stage: stage.as_str(),
                })
                .observe(ms as f64 / 1000.0);
        }
    }
    registry.register("nodes", "Nodes of the rollout per stage", nodes);
    registry.register(
        "stage_duration_seconds",
        "Time nodes spent in each stage they finished",
        durations,
    );
    // A counter: the store keeps each node's count across retries and resumed rollouts.
    registry.register(
        "installs",
        "Installer starts on the rollout's nodes, retries and reinstalls included",
        installs,
    );
    registry
}

#[cfg(test)]
mod tests {
    use kiln_spec::enrol::{Phase, Report};

    use super::*;
    use crate::stage::{Limits, Load, NodeProgress, Observation, StepInput, step};

    /// A node from `NodeProgress::new(0)` through the stage machine, one step per entry.
    fn stepped(story: &[(u64, Vec<Observation>)]) -> NodeProgress {
        let limits = Limits::default();
        let mut p = NodeProgress::new(0);
        for (at, obs) in story {
            let input = StepInput {
                now_ms: *at,
                limits: &limits,
                load: Load::default(),
                bmc_busy: false,
                netboot_hint: None,
            };
            step(&mut p, obs, input);
        }
        p
    }

    fn done(action: BmcAction) -> Observation {
        Observation::Bmc {
            action,
            outcome: BmcOutcome::Done { note: None },
        }
    }

    fn report(phase: Phase) -> Observation {
        Observation::Report(crate::store::StoredReport {
            at_ms: 0,
            report: Report::new(phase, None),
        })
    }

    fn auth_failure() -> BmcOutcome {
        BmcOutcome::Failed {
            kind: "auth".into(),
            message: "wrong password".into(),
            transient: false,
        }
    }

    #[test]
    fn the_fleet_by_stage_with_finished_stage_durations_installs_and_bmc_operations() {
        // pending 1 s, powering-on 2 s, netbooting 3 s, installing 4 s, rebooting 5 s, ready.
        let ready = stepped(&[
            (1_000, vec![]),
            (3_000, vec![done(BmcAction::NetbootOnce)]),
            (6_000, vec![report(Phase::InstallerStarted)]),
            (10_000, vec![report(Phase::Installed)]),
            (
                15_000,
                vec![report(Phase::AgentReady), done(BmcAction::BootFromDisk)],
            ),
        ]);
        // pending 1.5 s, then powering-on 2.5 s until its BMC refused the password.
        let failed = stepped(&[
            (1_500, vec![]),
            (
                4_000,
                vec![Observation::Bmc {
                    action: BmcAction::NetbootOnce,
                    outcome: auth_failure(),
                }],
            ),
        ]);
        assert_eq!(ready.stage, Stage::Ready);
        assert_eq!(failed.stage, Stage::Failed);
        let snapshot = Snapshot {
            nodes: vec![
                ("node-01".into(), ready),
                ("node-02".into(), failed),
                ("node-03".into(), NodeProgress::new(0)),
            ],
            ..Snapshot::default()
        };
        let m = FleetMetrics::new();
        m.bmc_operation(
            BmcAction::NetbootOnce,
            Duration::from_millis(300),
            &auth_failure(),
        );
        m.bmc_operation(
            BmcAction::BootFromDisk,
            Duration::from_millis(40),
            &BmcOutcome::Done { note: None },
        );
        let text = m.render(&snapshot, 20_000, None);
        for line in [
            "kiln_fleet_nodes{stage=\"pending\"} 1",
            "kiln_fleet_nodes{stage=\"powering-on\"} 0",
            "kiln_fleet_nodes{stage=\"netbooting\"} 0",
            "kiln_fleet_nodes{stage=\"installing\"} 0",
            "kiln_fleet_nodes{stage=\"rebooting\"} 0",
            "kiln_fleet_nodes{stage=\"ready\"} 1",
            "kiln_fleet_nodes{stage=\"failed\"} 1",
            "kiln_fleet_stage_duration_seconds_count{stage=\"pending\"} 2",
            "kiln_fleet_stage_duration_seconds_sum{stage=\"pending\"} 2.5",
            "kiln_fleet_stage_duration_seconds_sum{stage=\"powering-on\"} 4.5",
            "kiln_fleet_stage_duration_seconds_bucket{le=\"2.0\",stage=\"powering-on\"} 1",
            "kiln_fleet_stage_duration_seconds_bucket{le=\"4.0\",stage=\"powering-on\"} 2",
            "kiln_fleet_stage_duration_seconds_sum{stage=\"netbooting\"} 3.0",
            "kiln_fleet_stage_duration_seconds_sum{stage=\"installing\"} 4.0",
            "kiln_fleet_stage_duration_seconds_sum{stage=\"rebooting\"} 5.0",
            "kiln_fleet_installs_total 1",
            "kiln_fleet_bmc_operation_duration_seconds_count{action=\"netboot-once\"} 1",
            "kiln_fleet_bmc_operation_duration_seconds_sum{action=\"boot-from-disk\"} 0.04",
            "kiln_fleet_bmc_operation_errors_total{action=\"netboot-once\",kind=\"auth\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line} in:\n{text}");
        }
        // The stage a node is in has not finished: node-03's pending, node-01's ready and
        // node-02's failed are not durations yet.
        for stage in ["ready", "failed"] {
            let series = format!("kiln_fleet_stage_duration_seconds_count{{stage=\"{stage}\"}}");
            assert!(!text.contains(&series), "{series} in:\n{text}");
        }
        assert!(
            !text.contains("kiln_fleet_bmc_operation_errors_total{action=\"boot-from-disk\""),
            "an operation that was done counted as an error:\n{text}"
        );
        assert_eq!(text.matches("# EOF").count(), 1, "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn the_netboot_counters_join_the_same_exposition() {
        let dir = tempfile::tempdir().unwrap();
        let trace = kiln_netboot::trace::Trace::open(dir.path()).unwrap();
        let kernel = kiln_netboot::trace::EventKind::Http {
            client: std::net::Ipv4Addr::new(10, 0, 0, 5).into(),
            method: "GET".into(),
            path: "/boot/vmlinuz".into(),
            status: 200,
            bytes: 4096,
            duration_ms: 2,
            error: None,
        };
        trace.record("52:54:00:00:00:01", kernel);
        let text = FleetMetrics::new().render(&Snapshot::default(), 0, Some(&trace));
        for line in [
            "kiln_fleet_nodes{stage=\"pending\"} 0",
            "kiln_netboot_events_total{service=\"http\",event=\"get\",result=\"ok\"} 1",
            "kiln_netboot_bytes_total{service=\"http\"} 4096",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line} in:\n{text}");
        }
        assert_eq!(text.matches("# EOF").count(), 1, "{text}");
    }
}
