//! Running one operation against many BMCs: a global concurrency limit, one operation at a
//! time per BMC, a timeout per operation, retries with exponential backoff for transient
//! failures, and results delivered as they complete.

use std::collections::HashMap;
use std::sync::Arc;

use kiln_spec::glob::glob_match;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::Serialize;
use tokio::sync::{Mutex, Semaphore, mpsc};
use tokio::time::Instant;

use crate::{BmcDriver, BmcError, BmcTarget, Result};

#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// Operations in flight at once, over all BMCs.
    pub concurrency: usize,
    /// Tries per BMC (1 = no retry); only transient failures are retried.
    pub attempts: u32,
    /// Wait before the first retry; doubles with each further one.
    pub backoff: Duration,
    /// Bound on one try of the operation, session setup included.
    pub timeout: Duration,
}

impl Default for FleetOptions {
    fn default() -> FleetOptions {
        FleetOptions {
            concurrency: 64,
            attempts: 3,
            backoff: Duration::from_millis(500),
            timeout: Duration::from_secs(30),
        }
    }
}

/// One machine of the fleet: its name (inventory node name) and how to reach its BMC.
#[derive(Debug, Clone)]
pub struct Member {
    pub name: String,
    pub target: BmcTarget,
}

/// The result for one machine.
#[derive(Debug)]
pub struct Outcome<T> {
    pub name: String,
    pub bmc: String,
    pub attempts: u32,
    pub elapsed: Duration,
    pub result: Result<T>,
}

/// The JSON form of an outcome: `{"node", "bmc", "ok", "value" | "error", "errorKind"}`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutcomeReport<T: Serialize> {
    pub node: String,
    pub bmc: String,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<T>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<&'static str>,
    pub attempts: u32,
    pub millis: u128,
}

impl<T: Serialize> From<Outcome<T>> for OutcomeReport<T> {
    fn from(o: Outcome<T>) -> OutcomeReport<T> {
        let (value, error, error_kind) = match o.result {
            Ok(v) => (Some(v), None, None),
            Err(e) => (None, Some(e.to_string()), Some(e.kind())),
        };
        OutcomeReport {
            node: o.name,
            bmc: o.bmc,
            ok: error.is_none(),
            value,
            error,
            error_kind,
            attempts: o.attempts,
            millis: o.elapsed.as_millis(),
        }
    }
}

pub type Operation<T> =
    Arc<dyn Fn(Arc<dyn BmcDriver>) -> BoxFuture<'static, Result<T>> + Send + Sync>;

/// Starts `op` on every member and returns a channel that yields each outcome as soon as it
/// is known. Members that share a BMC (same host and port) share its driver and run one
/// after the other. `connect` makes a driver (tests swap in their own).
pub fn run<T: Send + 'static>(
    members: Vec<Member>,
    options: FleetOptions,
    connect: fn(BmcTarget) -> Result<Box<dyn BmcDriver>>,
    op: Operation<T>,
) -> mpsc::Receiver<Outcome<T>> {
    let (tx, rx) = mpsc::channel(members.len().max(1));
    let limit = Arc::new(Semaphore::new(options.concurrency.max(1)));
    type Slot = Arc<Mutex<Option<Arc<dyn BmcDriver>>>>;
    let mut per_bmc: HashMap<String, Slot> = HashMap::new();
    for member in members {
        let slot = per_bmc
            .entry(format!(
                "{:?}:{}",
                member.target.protocol,
                member.target.label()
            ))
            .or_default()
            .clone();
        let (tx, limit, op, options) = (tx.clone(), limit.clone(), op.clone(), options.clone());
        tokio::spawn(async move {
            let start = Instant::now();
            let bmc = member.target.label();
            // The per-BMC lock first, so that waiting for a busy BMC holds no global slot.
            let mut driver_slot = slot.lock().await;
            let _permit = limit
                .acquire()
                .await
                .expect("the semaphore is never closed");
            let mut attempts = 0;
            let result = loop {
                attempts += 1;
                let driver = match &*driver_slot {
                    Some(d) => d.clone(),
                    None => match connect(member.target.clone()) {
                        Ok(d) => driver_slot.insert(Arc::from(d)).clone(),
                        Err(e) => break Err(e),
                    },
                };
                let r = match tokio::time::timeout(options.timeout, op(driver.clone())).await {
                    Ok(r) => r,
                    Err(_) => Err(BmcError::Timeout {
                        target: bmc.clone(),
                        after: options.timeout,
                    }),
                };
                match r {
                    Err(e) if e.is_transient() && attempts < options.attempts => {
                        let wait = options.backoff * 2u32.saturating_pow(attempts - 1);
                        tracing::debug!(node = %member.name, error = %e, ?wait, "retrying");
                        // A fresh session on the next try.
                        let _ = driver.close().await;
                        *driver_slot = None;
                        tokio::time::sleep(wait).await;
                    }
                    r => break r,
                }
            };
            if let Some(d) = driver_slot.as_ref() {
                let _ = d.close().await;
            }
            *driver_slot = None;
            let _ = tx
                .send(Outcome {
                    name: member.name,
                    bmc,
                    attempts,
                    elapsed: start.elapsed(),
                    result,
                })
                .await;
        });
    }
    rx
}

/// Which nodes a selector names: comma-separated names, globs (`node-*`, `rack?-01`) and
/// `role=worker` / `label=value` terms. A node matches if any term matches.
pub fn select<'a>(
    inventory: &'a kiln_spec::Inventory,
    selector: &str,
) -> std::result::Result<Vec<&'a kiln_spec::inventory::InventoryNode>, String> {
    let terms: Vec<&str> = selector
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect();
    if terms.is_empty() {
        return Err("the node selector is empty".into());
    }
    let matches = |node: &kiln_spec::inventory::InventoryNode, term: &str| -> bool {
        match term.split_once('=') {
            Some(("role", want)) => {
                serde_json::to_value(node.role)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    == Some(want.to_string())
            }
            Some((key, want)) => node.labels.get(key).is_some_and(|v| glob_match(want, v)),
            None => glob_match(term, &node.name),
        }
    };
    let mut unmatched = Vec::new();
    for term in &terms {
        if !inventory.spec.nodes.iter().any(|n| matches(n, term)) {
            unmatched.push(*term);
        }
    }
    if !unmatched.is_empty() {
        return Err(format!(
            "no node matches {}",
            unmatched
                .iter()
                .map(|t| format!("{t:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Ok(inventory
        .spec
        .nodes
        .iter()
        .filter(|n| terms.iter().any(|t| matches(n, t)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        BootOverride, Capabilities, ChassisStatus, Identity, PowerAction, PowerState, SelEntry,
        SensorReading,
    };
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn selectors_pick_names_globs_roles_and_labels() {
        let inv = kiln_spec::Inventory::from_yaml(
            r#"
apiVersion: kiln.dev/v1alpha1
kind: Inventory
spec:
  nodes:
    - {name: cp-1, role: control-plane}
    - {name: w-1, role: worker, labels: {rack: a}}
    - {name: w-2, role: worker, labels: {rack: b}}
"#,
        )
        .unwrap();
        let names = |sel: &str| -> Vec<String> {
            select(&inv, sel)
                .unwrap()
                .iter()
                .map(|n| n.name.clone())
                .collect()
        };
        assert_eq!(names("role=worker"), ["w-1", "w-2"]);
        assert_eq!(names("cp-1,rack=b"), ["cp-1", "w-2"]);
        assert_eq!(names("w-*"), ["w-1", "w-2"]);
        let err = select(&inv, "w-9,role=storage").unwrap_err();
        assert!(
            err.contains("\"w-9\"") && err.contains("role=storage"),
            "{err}"
        );
    }

    /// A stand-in driver for the scheduling properties only (the drivers themselves are
    /// tested against ipmi_sim and sushy-emulator): counts how many calls overlap.
    struct Probe {
        port: u16,
    }
    static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
    static MAX_IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
    static FAILED_ONCE: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());

    #[async_trait::async_trait]
    impl BmcDriver for Probe {
        fn protocol(&self) -> crate::BmcProtocol {
            crate::BmcProtocol::Ipmi
        }
        async fn power_status(&self) -> Result<PowerState> {
            let now = IN_FLIGHT.fetch_add(1, Ordering::SeqCst) + 1;
            MAX_IN_FLIGHT.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
            // BMCs on even ports fail once, transiently.
            let mut failed = FAILED_ONCE.lock().unwrap();
            if self.port.is_multiple_of(2) && !failed.contains(&self.port) {
                failed.push(self.port);
                return Err(BmcError::Timeout {
                    target: "probe".into(),
                    after: Duration::from_millis(1),
                });
            }
            Ok(PowerState::On)
        }
        async fn power(&self, _: PowerAction) -> Result<()> {
            Err(BmcError::Unsupported("power".into()))
        }
        async fn boot_override(&self) -> Result<BootOverride> {
            Err(BmcError::Unsupported("boot".into()))
        }
        async fn set_boot_override(&self, _: BootOverride) -> Result<()> {
            Err(BmcError::Unsupported("boot".into()))
        }
        async fn chassis_status(&self) -> Result<ChassisStatus> {
            Err(BmcError::Unsupported("chassis".into()))
        }
        async fn identity(&self) -> Result<Identity> {
            Err(BmcError::Unsupported("identity".into()))
        }
        async fn sel(&self) -> Result<Vec<SelEntry>> {
            Err(BmcError::Unsupported("sel".into()))
        }
        async fn clear_sel(&self) -> Result<()> {
            Err(BmcError::Unsupported("sel".into()))
        }
        async fn sensors(&self) -> Result<Vec<SensorReading>> {
            Err(BmcError::Unsupported("sensors".into()))
        }
        async fn insert_media(&self, _: &str) -> Result<()> {
            Err(BmcError::Unsupported("media".into()))
        }
        async fn eject_media(&self) -> Result<()> {
            Err(BmcError::Unsupported("media".into()))
        }
        async fn probe(&self) -> Result<Capabilities> {
            Err(BmcError::Unsupported("probe".into()))
        }
        async fn close(&self) -> Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn concurrency_is_bounded_and_transient_failures_are_retried() {
        let members: Vec<Member> = (0..30)
            .map(|i| Member {
                name: format!("n{i}"),
                target: BmcTarget {
                    protocol: crate::BmcProtocol::Ipmi,
                    host: "127.0.0.1".into(),
                    port: 1000 + i,
                    username: "u".into(),
                    password: crate::Password::new("p"),
                    ca_cert: None,
                    insecure: false,
                    plain_http: false,
                    timeout: Duration::from_secs(1),
                    retries: 0,
                    cipher_suite: crate::ipmi::CipherSuite::Suite3,
                },
            })
            .collect();
        let options = FleetOptions {
            concurrency: 4,
            attempts: 2,
            backoff: Duration::from_millis(1),
            timeout: Duration::from_secs(5),
        };
        let op: Operation<PowerState> =
            Arc::new(|d| Box::pin(async move { d.power_status().await }));
        let mut rx = run(
            members,
            options,
            |t| Ok(Box::new(Probe { port: t.port })),
            op,
        );
        let mut ok = 0;
        while let Some(o) = rx.recv().await {
            assert!(o.result.is_ok(), "{:?}", o.result);
            let port: u16 = o.bmc.rsplit(':').next().unwrap().parse().unwrap();
            assert_eq!(
                o.attempts,
                if port.is_multiple_of(2) { 2 } else { 1 },
                "{}",
                o.name
            );
            ok += 1;
        }
        assert_eq!(ok, 30);
        assert!(MAX_IN_FLIGHT.load(Ordering::SeqCst) <= 4);
    }
}
