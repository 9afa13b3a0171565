//! The Ceph controller: makes the node its Ceph cluster's first monitor from `spec.ceph`
//! (kiln-cluster's native bootstrap: keys, monitor, manager, an OSD on each data disk of usage
//! `ceph-osd`, pools), then keeps its daemons running and reports the cluster's health.
//!
//! The bootstrap and each health probe (a `ceph` call starts Python: seconds under emulation)
//! run in the background and wake the controller when they end. A failed bootstrap fails the
//! reconcile, so the engine retries it with its backoff; a daemon that stops brings the
//! bootstrap back, which starts what stopped and leaves the rest alone.

use std::time::Duration;

use kiln_cluster::ceph::CephStatus;
use kiln_cluster::ceph::bootstrap::{self, CephHost, Outcome};
use kiln_cluster::node::bringup::Supervisor;
use kiln_spec::NodeSpec;
use kiln_spec::ceph::CephNode;
use kiln_spec::nodeconfig::DataUsage;

use crate::controllers::{ID, MergedConfig};
use crate::engine::{Background, Controller, Ctx, ReconcileError, Resource, Trigger};
use crate::status::{CephReport, DataDiskReport};

pub const NAME: &str = "ceph";
/// How often the cluster's health is read once the node is up.
const PROBE_EVERY: Duration = Duration::from_secs(10);

/// The node's Ceph condition, as `kiln node status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CephState {
    pub healthy: bool,
    /// `BringingUp`, `BringupFailed`, `DaemonStopped`, `DataDiskFailed`, `Unreachable`,
    /// `HealthOk`, `HealthWarn`, `HealthErr`.
    pub reason: String,
    pub message: String,
    pub report: CephReport,
}
impl Resource for CephState {
    const KIND: &'static str = "CephState";
}

pub type CephHostFor = Box<dyn Fn(&NodeSpec) -> CephHost + Send>;
pub type SupervisorFor = Box<dyn Fn(&CephHost) -> Box<dyn Supervisor> + Send>;

/// What the node config asks for.
#[derive(Debug, Clone, PartialEq)]
struct Wanted {
    node: CephNode,
    disks: Vec<String>,
    host: CephHost,
}

type Bootstrapped = (Box<dyn Supervisor>, Result<Outcome, String>);

enum Phase {
    Bootstrapping(Background<Bootstrapped>),
    Up {
        supervisor: Box<dyn Supervisor>,
        outcome: Outcome,
        probe: Background<Result<CephStatus, String>>,
        /// Boxed: a status is large beside the other phases.
        status: Option<Box<Result<CephStatus, String>>>,
    },
    /// Returned to the engine once; the next reconcile (its retry) starts again.
    Failed(Box<dyn Supervisor>),
}

struct Current {
    wanted: Wanted,
    phase: Phase,
}

pub struct CephController {
    host_for: CephHostFor,
    supervisor_for: SupervisorFor,
    trigger: Trigger,
    current: Option<Current>,
}

impl std::fmt::Debug for CephController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CephController").finish_non_exhaustive()
    }
}

impl CephController {
    pub fn new(
        host_for: CephHostFor,
        supervisor_for: SupervisorFor,
        trigger: Trigger,
    ) -> CephController {
        CephController {
            host_for,
            supervisor_for,
            trigger,
            current: None,
        }
    }

    fn bootstrap(&self, wanted: &Wanted, supervisor: Box<dyn Supervisor>) -> Phase {
        let wanted = wanted.clone();
        Phase::Bootstrapping(Background::spawn(
            NAME,
            self.trigger.clone(),
            move |progress| {
                let mut supervisor = supervisor;
                let result = bootstrap::bootstrap(
                    &wanted.node,
                    &wanted.disks,
                    &wanted.host,
                    supervisor.as_mut(),
                    progress,
                )
                .map_err(|e| kiln_spec::errors::error_chain(&e));
                (supervisor, result)
            },
        ))
    }

    fn probe(&self, host: &CephHost, after: Duration) -> Background<Result<CephStatus, String>> {
        let cli = host.cli();
        Background::spawn(NAME, self.trigger.clone(), move |_| {
            std::thread::sleep(after);
            cli.status().map_err(|e| e.to_string())
        })
    }
}

impl Controller for CephController {
    fn name(&self) -> &'static str {
        NAME
    }
    fn inputs(&self) -> Vec<&'static str> {
        vec![MergedConfig::KIND]
    }
    fn outputs(&self) -> Vec<&'static str> {
        vec![CephState::KIND]
    }
    fn reconcile(&mut self, ctx: &mut Ctx<'_>) -> Result<(), ReconcileError> {
        let Some(merged) = ctx.get::<MergedConfig>(ID)? else {
            return Ok(());
        };
        let Some(node) = merged.spec.ceph.clone() else {
            // Leaving the cluster is not automatic: what runs keeps running.
            ctx.remove::<CephState>(ID)?;
            return Ok(());
        };
        let wanted = Wanted {
            node,
            disks: merged
                .spec
                .data_disks
                .iter()
                .filter(|d| d.usage == DataUsage::CephOsd)
                .map(|d| d.path())
                .collect(),
            host: (self.host_for)(&merged.spec),
        };
        let phase = match self.current.take() {
            None => self.bootstrap(&wanted, (self.supervisor_for)(&wanted.host)),
            Some(c) if c.wanted != wanted => {
                // A changed spec bootstraps again with what already runs.
                let supervisor = match c.phase {
                    Phase::Up { supervisor, .. } | Phase::Failed(supervisor) => supervisor,
                    Phase::Bootstrapping(mut job) => match job.take() {
                        Some(done) => done?.0,
                        None => {
                            // Its supervisor holds the daemons: the new wish starts when the
                            // running bootstrap ends (which wakes this controller), and the
                            // engine goes on meanwhile.
                            let message = format!(
                                "the node config changed; bootstrapping again once the running \
                                 bootstrap ends (now: {})",
                                job.step()
                            );
                            let state = bringing_up(&c.wanted, message);
                            self.current = Some(Current {
                                wanted: c.wanted,
                                phase: Phase::Bootstrapping(job),
                            });
                            ctx.put(ID, state)?;
                            return Ok(());
                        }
                    },
                };
                self.bootstrap(&wanted, supervisor)
            }
            Some(c) => c.phase,
        };
        let (phase, state, failure) = self.advance(&wanted, phase)?;
        self.current = Some(Current { wanted, phase });
        ctx.put(ID, state)?;
        match failure {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }
}

/// The state while a bootstrap runs: nothing read from the cluster yet.
fn bringing_up(wanted: &Wanted, message: String) -> CephState {
    CephState {
        healthy: false,
        reason: "BringingUp".into(),
        message,
        report: CephReport {
            role: wanted.node.role,
            warnings: wanted.node.warnings(),
            ..CephReport::default()
        },
    }
}

impl CephController {
    /// Moves `phase` on with what has finished; the state to report and an error for the
    /// engine when a failure is new.
    fn advance(
        &self,
        wanted: &Wanted,
        phase: Phase,
    ) -> Result<(Phase, CephState, Option<String>), ReconcileError> {
        let report = |outcome: Option<&Outcome>, status: Option<&CephStatus>| CephReport {
            role: wanted.node.role,
            fsid: outcome.map(|o| o.fsid.clone()),
            disks: outcome
                .map(|o| {
                    o.disks
                        .iter()
                        .map(|d| DataDiskReport {
                            disk: d.disk.clone(),
                            osd: d.osd.as_ref().ok().copied(),
                            error: d.osd.as_ref().err().cloned(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            status: status.cloned(),
            warnings: wanted.node.warnings(),
        };
        let state = |healthy: bool, reason: &str, message: String, report: CephReport| CephState {
            healthy,
            reason: reason.into(),
            message,
            report,
        };
        Ok(match phase {
            Phase::Bootstrapping(mut job) => match job.take() {
                None => {
                    let s = bringing_up(wanted, job.step());
                    (Phase::Bootstrapping(job), s, None)
                }
                Some(done) => {
                    let (supervisor, result) = done?;
                    match result {
                        Ok(outcome) => {
                            let probe = self.probe(&wanted.host, Duration::ZERO);
                            let phase = Phase::Up {
                                supervisor,
                                outcome,
                                probe,
                                status: None,
                            };
                            return self.advance(wanted, phase);
                        }
                        Err(error) => {
                            let s =
                                state(false, "BringupFailed", error.clone(), report(None, None));
                            let failure = format!("bootstrapping Ceph: {error}");
                            (Phase::Failed(supervisor), s, Some(failure))
                        }
                    }
                }
            },
            Phase::Failed(supervisor) => {
                // The engine's retry.
                let phase = self.bootstrap(wanted, supervisor);
                return self.advance(wanted, phase);
            }
            Phase::Up {
                mut supervisor,
                outcome,
                mut probe,
                mut status,
            } => {
                if let Err(e) = supervisor.check(None) {
                    let error = kiln_spec::errors::error_chain(&e);
                    let s = state(
                        false,
                        "DaemonStopped",
                        error.clone(),
                        report(Some(&outcome), None),
                    );
                    let failure = format!("a Ceph daemon stopped: {error}");
                    return Ok((Phase::Failed(supervisor), s, Some(failure)));
                }
                if let Some(done) = probe.take() {
                    status = Some(Box::new(done?));
                    probe = self.probe(&wanted.host, PROBE_EVERY);
                }
                let failed: Vec<String> = outcome
                    .disks
                    .iter()
                    .filter_map(|d| d.osd.as_ref().err().cloned())
                    .collect();
                let s = match (status.as_deref(), failed.is_empty()) {
                    (_, false) => state(
                        false,
                        "DataDiskFailed",
                        failed.join("; "),
                        report(
                            Some(&outcome),
                            status.as_deref().and_then(|s| s.as_ref().ok()),
                        ),
                    ),
                    (None, true) => state(
                        false,
                        "BringingUp",
                        "reading the cluster's health".into(),
                        report(Some(&outcome), None),
                    ),
                    (Some(Err(e)), true) => state(
                        false,
                        "Unreachable",
                        e.clone(),
                        report(Some(&outcome), None),
                    ),
                    (Some(Ok(st)), true) => {
                        let reason = match st.health.as_str() {
                            "HEALTH_OK" => "HealthOk",
                            "HEALTH_WARN" => "HealthWarn",
                            _ => "HealthErr",
                        };
                        state(
                            st.healthy(),
                            reason,
                            st.summary(),
                            report(Some(&outcome), Some(st)),
                        )
                    }
                };
                let phase = Phase::Up {
                    supervisor,
                    outcome,
                    probe,
                    status,
                };
                (phase, s, None)
            }
        })
    }
}
