//! Prometheus metrics, served as text on the API's `/metrics`.

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::engine::{Observer, ReconcileError};
use crate::plan::Action;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReconcileLabels {
    controller: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ControllerLabel {
    controller: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabel {
    action: String,
}

type Durations = Family<ControllerLabel, Histogram, fn() -> Histogram>;

#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    reconciles: Family<ReconcileLabels, Counter>,
    durations: Durations,
    actions: Counter,
    failures: Family<ActionLabel, Counter>,
    drift: Counter,
    managed: Gauge,
}

fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 4.0, 9))
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("kiln_agent");
        let reconciles = Family::<ReconcileLabels, Counter>::default();
        let durations: Durations = Family::new_with_constructor(duration_histogram);
        let actions = Counter::default();
        let failures = Family::<ActionLabel, Counter>::default();
        let drift = Counter::default();
        let managed = Gauge::default();
        registry.register(
            "reconciles",
            "Reconciles by controller and result",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconcile",
            durations.clone(),
        );
        registry.register("actions", "Host changes made", actions.clone());
        registry.register(
            "action_failures",
            "Host changes that failed, by action",
            failures.clone(),
        );
        registry.register(
            "drift_repairs",
            "Resources repaired after they drifted",
            drift.clone(),
        );
        registry.register(
            "managed_paths",
            "Files and directories under management",
            managed.clone(),
        );
        Metrics {
            registry: Mutex::new(registry),
            reconciles,
            durations,
            actions,
            failures,
            drift,
            managed,
        }
    }

    pub fn actions(&self, done: usize, failed: &[(Action, String)]) {
        self.actions.inc_by(done as u64);
        for (a, _) in failed {
            let label = serde_json::to_value(a)
                .ok()
                .and_then(|v| v.get("action").and_then(|x| x.as_str()).map(String::from))
                .unwrap_or_default();
            self.failures
                .get_or_create(&ActionLabel { action: label })
                .inc();
        }
    }

    pub fn drift_repairs(&self, n: usize) {
        self.drift.inc_by(n as u64);
    }

    pub fn managed(&self, n: usize) {
        self.managed.set(n as i64);
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Ok(r) = self.registry.lock() {
            let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Feeds reconcile counts and durations from the engine.
#[derive(Debug)]
pub struct EngineMetrics(pub std::sync::Arc<crate::controllers::Shared>);

impl Observer for EngineMetrics {
    fn reconciled(
        &self,
        controller: &'static str,
        took: Duration,
        result: Result<(), &ReconcileError>,
    ) {
        let m = &self.0.metrics;
        m.reconciles
            .get_or_create(&ReconcileLabels {
                controller: controller.into(),
                result: if result.is_ok() { "ok" } else { "error" }.into(),
            })
            .inc();
        m.durations
            .get_or_create(&ControllerLabel {
                controller: controller.into(),
            })
            .observe(took.as_secs_f64());
    }
}
