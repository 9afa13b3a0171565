//! `kiln agent run`: wires the engine, the controllers, the file watcher and the API, and
//! speaks the systemd notification protocol.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::api::{self, ApiState};
use crate::apply::StateStore;
use crate::ceph::{CephController, CephHostFor};
use crate::controllers::{
    ConfigController, HostController, INSTALLED_CONFIG, OVERRIDE_CONFIG, RenderController, Shared,
    Sources,
};
use crate::engine::{EngineError, Runtime};
use crate::host::Host;
use crate::kubernetes::{HostFor, KubernetesController};
use crate::metrics::EngineMetrics;
use crate::notify;
use crate::remote::{self, RemoteApiController};
use crate::status::Event;
use crate::sysroot::Sysroot;
use kiln_cluster::ceph::bootstrap::CephHost;
use kiln_cluster::node::bringup::{Processes, Supervisor};
use kiln_cluster::node::systemd::Systemd;

#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The host's root: `/` on a node, a directory tree elsewhere.
    pub root: PathBuf,
    /// The installed node config; default `<root>/var/lib/kiln/node.yaml`.
    pub config: Option<PathBuf>,
    /// The local override; default `<root>/etc/kiln/node.override.yaml` (optional).
    pub override_config: Option<PathBuf>,
    pub socket: PathBuf,
    /// Every controller re-runs this often even without events.
    pub resync: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{op}: {source}")]
    Io { op: String, source: std::io::Error },
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    State(#[from] crate::apply::StateError),
}

fn io(op: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
    let op = op.into();
    move |source| AgentError::Io { op, source }
}

/// `kiln.slot=A` from the kernel command line.
pub fn boot_slot(cmdline: &str) -> Option<String> {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("kiln.slot="))
        .map(String::from)
}

/// The agent's controllers on one runtime: config → render → host, and config → kubernetes
/// → host (the node status).
pub fn agent_runtime(
    host: Host,
    sources: Sources,
    shared: Arc<Shared>,
    slot: String,
    recovered: Option<String>,
    remote_api: tokio::sync::watch::Sender<Option<kiln_spec::remote::RemoteApi>>,
) -> Result<Runtime, AgentError> {
    let mut rt = Runtime::new();
    rt.set_observer(Box::new(EngineMetrics(shared.clone())));
    let kubernetes = KubernetesController::new(
        kubernetes_host(host.sysroot.root().to_path_buf()),
        Box::new(|h: &kiln_cluster::node::Host| {
            node_supervisor(&h.root, &h.path(kiln_cluster::node::paths::LOGS))
        }),
        rt.trigger(),
    )
    .map_err(io("starting the Kubernetes controller's runtime"))?;
    rt.register(Box::new(ConfigController { sources }))?;
    rt.register(Box::new(RenderController))?;
    rt.register(Box::new(kubernetes))?;
    rt.register(Box::new(CephController::new(
        ceph_host(host.sysroot.root().to_path_buf()),
        Box::new(|h: &CephHost| {
            node_supervisor(&h.root, &h.root.join(kiln_cluster::node::paths::LOGS))
        }),
        rt.trigger(),
    )))?;
    rt.register(Box::new(RemoteApiController { wanted: remote_api }))?;
    rt.register(Box::new(HostController::new(host, shared, slot, recovered)))?;
    Ok(rt)
}

/// The node's name: the node config's host name, else the running one.
fn node_name(root: &Path, spec: &kiln_spec::NodeSpec) -> String {
    spec.hostname
        .clone()
        .or_else(|| Host::real(root).hostname())
        .unwrap_or_else(|| "localhost".into())
}

/// The appliance's Kubernetes paths below the agent's root.
fn kubernetes_host(root: PathBuf) -> HostFor {
    Box::new(move |spec| kiln_cluster::node::Host {
        root: root.clone(),
        ..kiln_cluster::node::Host::appliance(&node_name(&root, spec))
    })
}

/// The appliance's Ceph paths below the agent's root.
fn ceph_host(root: PathBuf) -> CephHostFor {
    Box::new(move |spec| CephHost {
        root: root.clone(),
        ..CephHost::appliance(&node_name(&root, spec))
    })
}

/// systemd units on a node booted with systemd; child processes of the agent elsewhere (they
/// stop with it).
fn node_supervisor(root: &Path, log_dir: &Path) -> Box<dyn Supervisor> {
    if root == Path::new("/") && Systemd::booted() {
        Box::new(Systemd::new())
    } else {
        Box::new(Processes::new(log_dir.to_path_buf(), vec![]))
    }
}

/// How long the ready announcement waits for the boot assessment's verdict (an unhealthy
/// node keeps being assessed after it).
const ASSESSMENT_WAIT: Duration = Duration::from_secs(15);
/// How long the ready announcement waits for the remote API's listener.
const REMOTE_API_WAIT: Duration = Duration::from_secs(60);

/// Runs until SIGTERM or SIGINT.
pub fn run(opts: AgentOptions) -> Result<(), AgentError> {
    let sysroot = Sysroot::new(&opts.root);
    let cmdline = sysroot
        .read("/proc/cmdline")
        .map_err(io("reading /proc/cmdline"))?
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let slot = boot_slot(&cmdline).unwrap_or_else(|| "unknown".into());
    let sources = Sources {
        installed: opts
            .config
            .clone()
            .unwrap_or_else(|| sysroot.path(INSTALLED_CONFIG)),
        overrides: vec![
            opts.override_config
                .clone()
                .unwrap_or_else(|| sysroot.path(OVERRIDE_CONFIG)),
        ],
    };
    let shared = Arc::new(Shared::new());
    let recovered = StateStore::new(&sysroot).recover()?.map(|j| {
        let msg = format!(
            "an apply of {} action(s) started {} was interrupted; converging again",
            j.actions.len(),
            j.started
        );
        tracing::warn!("{msg}");
        msg
    });

    let (remote_api, wanted_remote_api) = tokio::sync::watch::channel(None);
    let mut rt = agent_runtime(
        Host::real(&opts.root),
        sources.clone(),
        shared.clone(),
        slot.clone(),
        recovered.clone(),
        remote_api,
    )?;
    let trigger = rt.trigger();
    rt.run_until_idle();
    if let Some(msg) = recovered {
        shared.emit(Event::new("recovered", msg, None));
    }
    crate::watch::spawn(sysroot.clone(), shared.clone(), trigger.clone(), "host")
        .map_err(io("starting the file watcher"))?;
    let assessed = {
        let (sysroot, shared) = (sysroot.clone(), shared.clone());
        let (done, assessed) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("kiln-boot-assessment".into())
            .spawn(move || {
                crate::slots::assess(sysroot, shared);
                let _ = done.send(());
            })
            .map_err(io("starting the boot assessment"))?;
        assessed
    };

    let tokio_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io("starting the async runtime"))?;
    let listener = tokio_rt.block_on(async {
        if let Some(dir) = opts.socket.parent() {
            std::fs::create_dir_all(dir)?;
        }
        // A socket file left by a previous run that nobody answers on.
        if opts.socket.exists() && tokio::net::UnixStream::connect(&opts.socket).await.is_err() {
            std::fs::remove_file(&opts.socket)?;
        }
        let l = tokio::net::UnixListener::bind(&opts.socket)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&opts.socket, std::fs::Permissions::from_mode(0o600))?;
        Ok::<_, std::io::Error>(l)
    });
    let listener = listener.map_err(io(format!("listening on {}", opts.socket.display())))?;

    let watchdog = notify::watchdog_interval();
    let engine = {
        let resync = opts.resync;
        let tick = watchdog.unwrap_or(Duration::from_secs(30)).min(resync);
        std::thread::Builder::new()
            .name("kiln-engine".into())
            .spawn(move || {
                rt.run(resync, tick, |_| {
                    if watchdog.is_some() {
                        let _ = notify::notify("WATCHDOG=1");
                    }
                })
            })
            .map_err(io("starting the engine thread"))?
    };

    let state = Arc::new(ApiState {
        shared: shared.clone(),
        trigger: trigger.clone(),
        host: Host::real(&opts.root),
        sources,
        apply_controller: "config",
    });
    let served = tokio_rt.block_on(async {
        let hup_trigger = trigger.clone();
        tokio::spawn(async move {
            let Ok(mut hup) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            else {
                return;
            };
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading the node config");
                hup_trigger.wake("config");
            }
        });
        let (serving, mut remote_served) = tokio::sync::watch::channel(false);
        tokio::spawn(remote::serve(
            wanted_remote_api,
            api::router(state.clone()),
            shared.clone(),
            serving,
        ));
        // Ready means reachable: an administrator told so can ask the agent over the network
        // at once. An address that does not come up holds the announcement back no longer
        // than this (the event stream says why).
        let _ =
            tokio::time::timeout(REMOTE_API_WAIT, remote_served.wait_for(|served| *served)).await;
        // A healthy node's slot is blessed before it says it is ready, so whoever powers it
        // off then finds the verdict on its disk.
        let _ = tokio::task::spawn_blocking(move || assessed.recv_timeout(ASSESSMENT_WAIT)).await;
        let hostname = shared
            .status
            .read()
            .ok()
            .and_then(|s| s.hostname.clone())
            .unwrap_or_else(|| "localhost".into());
        announce_ready(&sysroot, &hostname, &slot);
        if let Some(enrolment) = crate::enrolment::load(&sysroot) {
            let slot = slot.clone();
            let _ = std::thread::Builder::new()
                .name("kiln-ready-report".into())
                .spawn(move || crate::enrolment::report_ready(enrolment, slot));
        }
        axum::serve(listener, api::router(state))
            .with_graceful_shutdown(async {
                let mut term =
                    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    {
                        Ok(t) => t,
                        Err(_) => return std::future::pending().await,
                    };
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
                tracing::info!("stopping");
            })
            .await
    });
    let _ = notify::notify("STOPPING=1");
    trigger.stop();
    let _ = engine.join();
    let _ = std::fs::remove_file(&opts.socket);
    served.map_err(io("serving the API"))
}

/// `READY=1` to systemd, and the line the install test and the console show.
fn announce_ready(sysroot: &Sysroot, hostname: &str, slot: &str) {
    let line = format!("kiln-agent ready node={hostname} slot={slot}");
    if let Err(e) = notify::notify("READY=1") {
        tracing::warn!("notifying systemd: {e}");
    }
    println!("{line}");
    let _ = std::io::stdout().flush();
    if sysroot.is_live()
        && let Ok(mut console) = std::fs::OpenOptions::new().write(true).open("/dev/console")
    {
        let _ = writeln!(console, "{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_slot_from_the_command_line() {
        assert_eq!(boot_slot("root=x kiln.slot=B quiet").as_deref(), Some("B"));
        assert_eq!(boot_slot("root=x quiet"), None);
    }
}
