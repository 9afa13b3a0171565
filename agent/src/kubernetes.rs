//! The Kubernetes controller: brings the node's part of the cluster up from `spec.kubernetes`
//! (kiln-cluster's bring-up: credentials, configs, services, airgap images), then keeps its
//! routes to the other nodes' pods in step with the cluster and reports whether the node is
//! Ready as the API server sees it.
//!
//! Once the node is up, a watch on the cluster's Nodes wakes the controller at each change, so
//! routes follow nodes joining and leaving at once.
//!
//! A bring-up takes seconds on hardware and minutes under emulation, so it runs on a thread of
//! its own and wakes the controller at each step; the engine stays free for the other
//! controllers meanwhile. A failed bring-up fails the reconcile, so the engine retries it with
//! its backoff. A changed `spec.kubernetes` brings the node up again: files are rewritten and
//! services whose command line changed restart; existing certificates are kept.

use std::thread::JoinHandle;

use kiln_cluster::node::bringup::{self, Supervisor};
use kiln_cluster::node::routes::{self, Routes};
use kiln_cluster::node::{Host, api_server_url};
use kiln_spec::NodeSpec;
use kiln_spec::kubernetes::KubernetesNode;

use crate::controllers::{ID, MergedConfig};
use crate::engine::{Background, Controller, Ctx, ReconcileError, Resource, Trigger};
use crate::status::KubernetesReport;

pub const NAME: &str = "kubernetes";

/// The node's Kubernetes condition, as `kiln node status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesState {
    pub ready: bool,
    /// `BringingUp`, `BringupFailed`, `ServiceStopped`, `NodeReady`, `NodeNotReady`,
    /// `Unreachable`, `PodRoutesFailed`.
    pub reason: String,
    pub message: String,
    pub report: KubernetesReport,
}
impl Resource for KubernetesState {
    const KIND: &'static str = "KubernetesState";
}

/// Where and how this node runs its services: the appliance's paths and systemd on a node;
/// tests give each node of a machine its own.
pub type HostFor = Box<dyn Fn(&NodeSpec) -> Host + Send>;
pub type SupervisorFor = Box<dyn Fn(&Host) -> Box<dyn Supervisor> + Send>;

/// A bring-up's supervisor and, when it succeeded, the cluster CA's pin.
type Finished = (Box<dyn Supervisor>, Result<String, String>);

enum Job {
    Running(Background<Finished>),
    Up {
        supervisor: Box<dyn Supervisor>,
        ca_cert_hash: String,
    },
    /// `reported`: the failure has been published and returned to the engine once; the next
    /// reconcile (the engine's retry) starts again.
    Failed {
        supervisor: Box<dyn Supervisor>,
        error: String,
        reported: bool,
    },
}

struct Current {
    node: KubernetesNode,
    host_name: String,
    job: Job,
}

pub struct KubernetesController {
    host_for: HostFor,
    supervisor_for: SupervisorFor,
    trigger: Trigger,
    current: Option<Current>,
    /// The routes to other nodes' pods this node has set.
    routes: Routes,
    probe: tokio::runtime::Runtime,
    watch: Option<NodeWatch>,
}

/// A thread watching the cluster's Nodes for one node, waking the controller at each change:
/// routes and the node's condition follow the cluster at once, not at the next resync. It
/// stops when this drops.
struct NodeWatch {
    node: String,
    _stop: tokio::sync::oneshot::Sender<()>,
    thread: JoinHandle<()>,
}

impl NodeWatch {
    fn start(host: Host, trigger: Trigger) -> NodeWatch {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let node = host.node_name.clone();
        let thread = std::thread::spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return tracing::warn!("watching nodes: {e}"),
            };
            rt.block_on(async {
                tokio::select! {
                    _ = stopped => {}
                    watched = routes::watch_nodes(&host, || trigger.wake(NAME)) => {
                        if let Err(e) = watched {
                            tracing::debug!("watching nodes: {e}");
                        }
                    }
                }
            });
        });
        NodeWatch {
            node,
            _stop: stop,
            thread,
        }
    }
}

impl std::fmt::Debug for KubernetesController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesController")
            .finish_non_exhaustive()
    }
}

impl KubernetesController {
    pub fn new(
        host_for: HostFor,
        supervisor_for: SupervisorFor,
        trigger: Trigger,
    ) -> std::io::Result<KubernetesController> {
        Ok(KubernetesController {
            host_for,
            supervisor_for,
            trigger,
            current: None,
            routes: Routes::new(),
            probe: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
            watch: None,
        })
    }

    /// Starts a bring-up of `node` on a thread, with the supervisor of the last one if any
    /// (it knows what already runs).
    fn start(
        &self,
        node: &KubernetesNode,
        host: Host,
        supervisor: Option<Box<dyn Supervisor>>,
    ) -> Job {
        let mut supervisor = supervisor.unwrap_or_else(|| (self.supervisor_for)(&host));
        let node = node.clone();
        Job::Running(Background::spawn(
            NAME,
            self.trigger.clone(),
            move |progress| {
                let result = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())
                    .and_then(|rt| {
                        rt.block_on(bringup::bring_up(
                            &node,
                            &host,
                            supervisor.as_mut(),
                            progress,
                        ))
                        .map(|outcome| outcome.ca_cert_hash)
                        .map_err(|e| e.to_string())
                    });
                (supervisor, result)
            },
        ))
    }
}

fn state(
    node: &KubernetesNode,
    ca_cert_hash: Option<&str>,
    ready: bool,
    reason: &str,
    message: String,
) -> KubernetesState {
    KubernetesState {
        ready,
        reason: reason.into(),
        message,
        report: KubernetesReport {
            role: node.role,
            api_server: api_server_url(node),
            ca_cert_hash: ca_cert_hash.map(str::to_string),
        },
    }
}

impl Controller for KubernetesController {
    fn name(&self) -> &'static str {
        NAME
    }
    fn inputs(&self) -> Vec<&'static str> {
        vec![MergedConfig::KIND]
    }
    fn outputs(&self) -> Vec<&'static str> {
        vec![KubernetesState::KIND]
    }
    fn reconcile(&mut self, ctx: &mut Ctx<'_>) -> Result<(), ReconcileError> {
        let Some(merged) = ctx.get::<MergedConfig>(ID)? else {
            return Ok(());
        };
        let Some(node) = merged.spec.kubernetes.clone() else {
            // Leaving the cluster is not automatic: what runs keeps running.
            self.watch = None;
            ctx.remove::<KubernetesState>(ID)?;
            return Ok(());
        };
        let host = (self.host_for)(&merged.spec);
        let current = match self.current.take() {
            Some(c) => Some(Current {
                job: collect(c.job)?,
                node: c.node,
                host_name: c.host_name,
            }),
            None => None,
        };
        let wanted = |c: &Current| c.node == node && c.host_name == host.node_name;
        let current = match current {
            Some(Current {
                job:
                    Job::Failed {
                        supervisor,
                        error,
                        reported: false,
                    },
                node: n,
                host_name,
            }) => {
                ctx.put(ID, state(&n, None, false, "BringupFailed", error.clone()))?;
                self.current = Some(Current {
                    node: n,
                    host_name,
                    job: Job::Failed {
                        supervisor,
                        error: error.clone(),
                        reported: true,
                    },
                });
                return Err(format!("bringing up Kubernetes: {error}").into());
            }
            Some(
                c @ Current {
                    job: Job::Running(_),
                    ..
                },
            ) => c,
            Some(
                c @ Current {
                    job: Job::Up { .. },
                    ..
                },
            ) if wanted(&c) => c,
            other => {
                let previous = match other.map(|c| c.job) {
                    Some(Job::Up { supervisor: s, .. })
                    | Some(Job::Failed { supervisor: s, .. }) => Some(s),
                    _ => None,
                };
                Current {
                    node: node.clone(),
                    host_name: host.node_name.clone(),
                    job: self.start(&node, host.clone(), previous),
                }
            }
        };
        let Current {
            node,
            host_name,
            job,
        } = current;
        let (job, s) = match job {
            Job::Running(job) => {
                let s = state(&node, None, false, "BringingUp", job.step());
                (Job::Running(job), s)
            }
            Job::Up {
                mut supervisor,
                ca_cert_hash,
            } => match supervisor.check(None) {
                // The next reconcile (the engine's retry) brings the node up again, which
                // starts what stopped and leaves what runs alone.
                Err(e) => {
                    let error = e.to_string();
                    let stopped = state(
                        &node,
                        Some(&ca_cert_hash),
                        false,
                        "ServiceStopped",
                        error.clone(),
                    );
                    let job = Job::Failed {
                        supervisor,
                        error: error.clone(),
                        reported: true,
                    };
                    self.current = Some(Current {
                        node,
                        host_name,
                        job,
                    });
                    ctx.put(ID, stopped)?;
                    return Err(format!("a Kubernetes service stopped: {error}").into());
                }
                Ok(()) => {
                    // A watch that ended (its credentials were not there yet) starts again.
                    if self
                        .watch
                        .as_ref()
                        .is_none_or(|w| w.node != host.node_name || w.thread.is_finished())
                    {
                        self.watch = Some(NodeWatch::start(host.clone(), self.trigger.clone()));
                    }
                    // One read of the Nodes serves the routes and the node's own condition.
                    let observed = self.probe.block_on(routes::list_nodes(&host));
                    let (ready, reason, message) = match observed {
                        Err(e) => (false, "Unreachable", e),
                        Ok(nodes) => {
                            let wanted = routes::wanted(&nodes, &host.node_name);
                            match (
                                bringup::node_ready(&nodes, &host.node_name),
                                routes::apply(&mut self.routes, &wanted),
                            ) {
                                (Err(e), _) => (false, "NodeNotReady", e),
                                (Ok(_), Err(e)) => (false, "PodRoutesFailed", e),
                                (Ok((true, message)), Ok(())) => (true, "NodeReady", message),
                                (Ok((false, message)), Ok(())) => (false, "NodeNotReady", message),
                            }
                        }
                    };
                    let s = state(&node, Some(&ca_cert_hash), ready, reason, message);
                    (
                        Job::Up {
                            supervisor,
                            ca_cert_hash,
                        },
                        s,
                    )
                }
            },
            Job::Failed {
                supervisor,
                error,
                reported,
            } => {
                let s = state(&node, None, false, "BringupFailed", error.clone());
                (
                    Job::Failed {
                        supervisor,
                        error,
                        reported,
                    },
                    s,
                )
            }
        };
        self.current = Some(Current {
            node,
            host_name,
            job,
        });
        ctx.put(ID, s)?;
        Ok(())
    }
}

/// A finished bring-up's outcome; a running one as it is.
fn collect(job: Job) -> Result<Job, ReconcileError> {
    match job {
        Job::Running(mut running) => Ok(match running.take() {
            None => Job::Running(running),
            Some(done) => {
                let (supervisor, result) = done?;
                match result {
                    Ok(ca_cert_hash) => Job::Up {
                        supervisor,
                        ca_cert_hash,
                    },
                    Err(error) => Job::Failed {
                        supervisor,
                        error,
                        reported: false,
                    },
                }
            }
        }),
        job => Ok(job),
    }
}
