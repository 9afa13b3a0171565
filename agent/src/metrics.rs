//! Prometheus metrics, served as text on the API's `/metrics`.

use std::sync::Mutex;
use std::time::Duration;

use kiln_spec::boot::EntryState;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::engine::{Observer, ReconcileError};
use crate::plan::Action;
use crate::status::NodeStatus;

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
struct ConditionLabel {
    r#type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SlotLabels {
    /// `booted`, `staged` or `rollback`.
    role: &'static str,
    slot: String,
    /// `good`, `on-trial`, `bad`, or `unknown` without a boot entry.
    state: String,
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

    /// One reconcile of `controller`: how long it took and whether it succeeded.
    pub fn reconciled(&self, controller: &str, took: Duration, ok: bool) {
        self.reconciles
            .get_or_create(&ReconcileLabels {
                controller: controller.into(),
                result: if ok { "ok" } else { "error" }.into(),
            })
            .inc();
        self.durations
            .get_or_create(&ControllerLabel {
                controller: controller.into(),
            })
            .observe(took.as_secs_f64());
    }

    pub fn drift_repairs(&self, n: usize) {
        self.drift.inc_by(n as u64);
    }

    pub fn managed(&self, n: usize) {
        self.managed.set(n as i64);
    }

    /// The text exposition format: this process's counters, and the node's conditions and
    /// boot slots as `status` has them now.
    pub fn render(&self, status: &NodeStatus) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode_registry(&mut out, &status_registry(status));
        if let Ok(r) = self.registry.lock() {
            let _ = encode_registry(&mut out, &r);
        }
        let _ = encode_eof(&mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Each condition (1 true, 0 false), and each boot slot the node has (booted, staged,
/// rollback) with its state and generation. Without the ESP's entries (a node not installed
/// by kiln, an ESP that cannot be read) the booted slot is the kernel command line's.
fn status_registry(status: &NodeStatus) -> Registry {
    let mut registry = Registry::with_prefix("kiln_agent");
    let conditions = Family::<ConditionLabel, Gauge>::default();
    for c in &status.conditions {
        conditions
            .get_or_create(&ConditionLabel {
                r#type: c.kind.clone(),
            })
            .set(i64::from(c.status));
    }
    registry.register(
        "condition",
        "The node's conditions: 1 when true, 0 when false",
        conditions,
    );
    let slots = Family::<SlotLabels, Gauge>::default();
    let generations = Family::<SlotLabels, Gauge>::default();
    let slot = |role, letter: &str, state: &str, generation: Option<u32>| {
        let labels = SlotLabels {
            role,
            slot: letter.into(),
            state: state.into(),
        };
        slots.get_or_create(&labels).set(1);
        if let Some(g) = generation {
            generations.get_or_create(&labels).set(i64::from(g));
        }
    };
    match &status.boot {
        Some(boot) => {
            let roles = [
                ("booted", Some(&boot.booted)),
                ("staged", boot.staged.as_ref()),
                ("rollback", boot.rollback.as_ref()),
            ];
            for (role, report) in roles {
                if let Some(r) = report {
                    slot(role, r.slot.letter(), &entry_state(r.state), r.generation);
                }
            }
        }
        None if !status.slot.is_empty() => slot("booted", &status.slot, UNKNOWN_STATE, None),
        None => {}
    }
    registry.register(
        "boot_slot_info",
        "The node's A/B slots by role, with their loader state",
        slots,
    );
    registry.register(
        "boot_slot_generation",
        "The generation of each of the node's A/B slots",
        generations,
    );
    registry
}

/// A slot's state without a boot entry to read it from.
const UNKNOWN_STATE: &str = "unknown";

/// The loader state as the API spells it (`good`, `on-trial`, `bad`), so metrics and status
/// agree.
fn entry_state(state: Option<EntryState>) -> String {
    state
        .and_then(|s| serde_json::to_value(s).ok())
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_else(|| UNKNOWN_STATE.into())
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
        self.0.metrics.reconciled(controller, took, result.is_ok());
    }
}

#[cfg(test)]
mod tests {
    use kiln_spec::boot::{BootStatus, EntryState, SlotReport};
    use kiln_spec::layout::Slot;

    use super::*;
    use crate::status::Condition;

    fn condition(kind: &str, status: bool) -> Condition {
        Condition {
            kind: kind.into(),
            status,
            reason: "Test".into(),
            message: String::new(),
        }
    }

    fn slot(slot: Slot, generation: u32, state: EntryState) -> SlotReport {
        SlotReport {
            slot,
            generation: Some(generation),
            state: Some(state),
            tries_left: None,
            image: None,
        }
    }

    #[test]
    fn conditions_and_slots_of_the_status_join_the_counters() {
        let status = NodeStatus {
            slot: "B".into(),
            conditions: vec![condition("Ready", true), condition("CephHealthy", false)],
            boot: Some(BootStatus {
                booted: slot(Slot::B, 4, EntryState::OnTrial),
                staged: None,
                rollback: Some(slot(Slot::A, 3, EntryState::Good)),
                next_boot: None,
                last_assessment: None,
            }),
            ..NodeStatus::default()
        };
        let m = Metrics::new();
        m.drift_repairs(2);
        m.reconciled("host", Duration::from_millis(3), true);
        let text = m.render(&status);
        for line in [
            "kiln_agent_condition{type=\"Ready\"} 1",
            "kiln_agent_condition{type=\"CephHealthy\"} 0",
            "kiln_agent_boot_slot_info{role=\"booted\",slot=\"B\",state=\"on-trial\"} 1",
            "kiln_agent_boot_slot_info{role=\"rollback\",slot=\"A\",state=\"good\"} 1",
            "kiln_agent_boot_slot_generation{role=\"booted\",slot=\"B\",state=\"on-trial\"} 4",
            "kiln_agent_boot_slot_generation{role=\"rollback\",slot=\"A\",state=\"good\"} 3",
            "kiln_agent_drift_repairs_total 2",
            "kiln_agent_reconciles_total{controller=\"host\",result=\"ok\"} 1",
            "kiln_agent_reconcile_duration_seconds_count{controller=\"host\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line} in:\n{text}");
        }
        assert!(!text.contains("role=\"staged\""), "{text}");
        assert_eq!(text.matches("# EOF").count(), 1, "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn without_boot_entries_the_booted_slot_is_the_command_lines() {
        let status = NodeStatus {
            slot: "A".into(),
            ..NodeStatus::default()
        };
        let text = Metrics::new().render(&status);
        assert!(
            text.lines().any(|l| l
                == "kiln_agent_boot_slot_info{role=\"booted\",slot=\"A\",state=\"unknown\"} 1"),
            "{text}"
        );
        assert!(!text.contains("kiln_agent_boot_slot_generation"), "{text}");
        let unknown = Metrics::new().render(&NodeStatus::default());
        assert!(!unknown.contains("kiln_agent_boot_slot_info"), "{unknown}");
    }
}
