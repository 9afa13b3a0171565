//! `kiln fleet controller`: one replica of the provisioner as a Kubernetes controller. The
//! replica that holds the Rollout's Lease serves netboot for its Machines and drives them with
//! the rollout engine of `kiln fleet rollout`, their progress kept in the Machines' status.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use kiln_fleet::controller::{self, ClientLimits, ReplicaConfig, ReplicaEnd};
use kiln_fleet::credentials;
use kiln_fleet::rollout::{Actuator, BmcActuator, Shared, Target};
use kiln_netboot::server::CancellationToken;
use kiln_spec::Inventory;
use kiln_spec::inventory::{InventoryNetboot, NetbootMode};
use tokio::sync::watch;

use super::fleet::{
    Build, Deadlines, NetbootSources, report_results, start_netboot, with_node_parts,
};
use super::parse_duration;

#[derive(Debug, clap::Args)]
#[command(
    override_usage = "kiln fleet controller --kubeconfig <FILE> --rollout <NAME>
       --interface <IFACE> [OPTIONS]"
)]
pub struct ControllerArgs {
    /// kubeconfig of the cluster that keeps the Machines and the Rollout
    #[arg(long, value_name = "FILE")]
    kubeconfig: PathBuf,
    /// Namespace of the Machines, their BMC Secrets and the Rollout
    #[arg(long, value_name = "NAME", default_value = "kiln-system")]
    namespace: String,
    /// The Rollout resource to drive
    #[arg(long, value_name = "NAME")]
    rollout: String,
    /// The build (its root image must be the Rollout's imageSha256)
    #[command(flatten)]
    build: Build,
    /// This replica's netboot state and its copy of the fleet's credentials (shared through
    /// the Secret kiln-fleet-credentials: the first replica to lead puts its own there)
    #[arg(long, value_name = "DIR", default_value = "/var/lib/kiln/fleet")]
    state_dir: PathBuf,
    /// Interface on the machines' boot network
    #[arg(long, value_name = "IFACE")]
    interface: String,
    /// Who hands out addresses on the boot network: proxy (another DHCP server does) or dhcp
    #[arg(long, value_name = "MODE", default_value = "proxy", value_parser = parse_mode)]
    mode: NetbootMode,
    /// First address of the pool (dhcp mode)
    #[arg(long, value_name = "IP")]
    pool_start: Option<Ipv4Addr>,
    /// Last address of the pool (dhcp mode)
    #[arg(long, value_name = "IP")]
    pool_end: Option<Ipv4Addr>,
    /// HTTP port for scripts, images, node configs and phone-home [default: 8080]
    #[arg(long, value_name = "PORT")]
    http_port: Option<u16>,
    /// This replica's name in the Lease [default: host name and process id]
    #[arg(long, value_name = "NAME")]
    identity: Option<String>,
    /// How long a lead lasts unrenewed: another replica takes over this long after the
    /// leader dies
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "15s")]
    lease: Duration,
    /// API requests per second, on average
    #[arg(long, value_name = "N", default_value_t = ClientLimits::default().qps)]
    qps: std::num::NonZeroU32,
    /// API requests allowed at once above --qps
    #[arg(long, value_name = "N", default_value_t = ClientLimits::default().burst)]
    burst: std::num::NonZeroU32,
    /// Machine status writes in flight at once
    #[arg(long, value_name = "N", default_value_t = ClientLimits::default().concurrency)]
    concurrency: usize,
    #[command(flatten)]
    deadlines: Deadlines,
}

fn parse_mode(s: &str) -> Result<NetbootMode, String> {
    serde_json::from_value(serde_json::Value::String(s.into()))
        .map_err(|_| format!("{s:?}: expected proxy or dhcp"))
}

/// Stops the netboot services, and what feeds them the Machines, when the replica stops
/// leading.
struct Serving(CancellationToken, tokio::task::JoinHandle<()>);

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.cancel();
        self.1.abort();
    }
}

/// The Machines as the netboot services serve them: with the boot network's settings and
/// each node's part in the cluster.
fn served(
    machines: &Inventory,
    netboot: &InventoryNetboot,
    appliance: &kiln_spec::Appliance,
    state_dir: &std::path::Path,
) -> anyhow::Result<Inventory> {
    let mut inventory = machines.clone();
    inventory.spec.netboot = Some(netboot.clone());
    with_node_parts(appliance, &inventory, state_dir)
}

pub fn run(a: ControllerArgs) -> anyhow::Result<()> {
    let spec = a.build.spec_path();
    let (appliance, image_sha256) = a.build.load()?;
    let rt = super::runtime()?;
    let client = rt
        .block_on(kiln_cluster::kube_client::from_kubeconfig(&a.kubeconfig))
        .with_context(|| format!("connecting with {}", a.kubeconfig.display()))?;
    let resource = rt.block_on(controller::read_rollout(&client, &a.namespace, &a.rollout))?;
    if resource.spec.image_sha256 != image_sha256 {
        bail!(
            "Rollout {} installs image {}, but the build in {} has {}: nothing was started",
            a.rollout,
            resource.spec.image_sha256,
            a.build.artifacts.display(),
            image_sha256
        );
    }
    let identity = a.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "kiln".into());
        format!("{host}-{}", std::process::id())
    });
    let pxe_state = a.state_dir.join("pxe");
    let config = ReplicaConfig {
        namespace: a.namespace.clone(),
        rollout: a.rollout.clone(),
        identity: identity.clone(),
        lease: a.lease,
        client: ClientLimits {
            qps: a.qps,
            burst: a.burst,
            concurrency: a.concurrency,
        },
        resync: Duration::from_secs(1),
        // Parallelism comes from the Rollout.
        limits: a.deadlines.limits(1, 1),
        trace_file: pxe_state.join(kiln_netboot::trace::TRACE_FILE),
    };
    let netboot = InventoryNetboot {
        interface: a.interface.clone(),
        mode: a.mode,
        pool_start: a.pool_start,
        pool_end: a.pool_end,
        http_port: a.http_port,
    };
    let stop = CancellationToken::new();
    let on_signal = stop.clone();
    rt.spawn(async move {
        super::wait_for_signal().await;
        eprintln!("stopping: progress is kept in the Machines; another replica takes over");
        on_signal.cancel();
    });
    eprintln!(
        "replica {identity}: waiting to lead Rollout {}/{}",
        a.namespace, a.rollout
    );
    loop {
        let handle = rt.handle().clone();
        let timeout = a.deadlines.bmc_action();
        let actuator = move |shared: Arc<Shared>, targets: &[Target]| -> Arc<dyn Actuator> {
            Arc::new(BmcActuator {
                runtime: handle,
                targets: targets
                    .iter()
                    .map(|t| (t.name.clone(), t.bmc.clone()))
                    .collect(),
                shared,
                timeout,
                // The passwords were read from the Machines' Secrets when this replica
                // started to lead.
                passwords: HashMap::new(),
            })
        };
        let serve = |shared: Arc<Shared>, machines: watch::Receiver<Inventory>| {
            let (appliance, state_dir, pxe_state, artifacts, spec, netboot) = (
                &appliance,
                &a.state_dir,
                &pxe_state,
                &a.build.artifacts,
                &spec,
                &netboot,
            );
            let (client, namespace) = (client.clone(), &a.namespace);
            async move {
                let sharing = credentials::share(&client, namespace, state_dir)
                    .await
                    .map_err(|e| e.to_string())?;
                eprintln!(
                    "the fleet's credentials: {} Secret {namespace}/{}",
                    match sharing {
                        credentials::Sharing::FromCluster => "taken from",
                        credentials::Sharing::ToCluster => "this replica's, put in",
                    },
                    credentials::CREDENTIALS_SECRET
                );
                let inventory = served(&machines.borrow(), netboot, appliance, state_dir)
                    .map_err(|e| format!("{e:#}"))?;
                eprintln!(
                    "leading: serving netboot for {} Machine(s)",
                    inventory.spec.nodes.len()
                );
                std::fs::create_dir_all(pxe_state).map_err(|e| e.to_string())?;
                // The services read their settings from a file: the Machines, as served.
                let file = pxe_state.join("machines.inventory.json");
                let text = serde_json::to_string_pretty(&inventory).map_err(|e| e.to_string())?;
                std::fs::write(&file, text)
                    .map_err(|e| format!("writing {}: {e}", file.display()))?;
                let (updates, inventories) = watch::channel(inventory);
                let shutdown = CancellationToken::new();
                let sources = NetbootSources {
                    netboot,
                    artifacts,
                    inventory_file: &file,
                    inventory: inventories,
                    spec,
                    pxe_state,
                };
                start_netboot(sources, shared, shutdown.clone())
                    .await
                    .map_err(|e| format!("{e:#}"))?;
                // Each change of the Machines, as the services serve it.
                let (appliance, state_dir, netboot) =
                    (appliance.clone(), state_dir.clone(), netboot.clone());
                let following = tokio::spawn(async move {
                    let mut machines = machines;
                    while machines.changed().await.is_ok() {
                        let changed = machines.borrow_and_update().clone();
                        match served(&changed, &netboot, &appliance, &state_dir) {
                            Ok(inventory) => {
                                eprintln!(
                                    "the Machines changed: serving netboot for {}",
                                    inventory.spec.nodes.len()
                                );
                                updates.send_replace(inventory);
                            }
                            Err(e) => eprintln!(
                                "the Machines changed, but cannot be served (the last \
                                 inventory still is): {e:#}"
                            ),
                        }
                    }
                });
                Ok(Serving(shutdown, following))
            }
        };
        let end = rt.block_on(controller::run_replica(
            client.clone(),
            config.clone(),
            actuator,
            serve,
            stop.clone(),
        ))?;
        match end {
            ReplicaEnd::Finished(results) => return report_results(&results),
            ReplicaEnd::LostLead => {
                eprintln!("replica {identity}: lost the lead; waiting to lead again");
            }
            ReplicaEnd::Stopped => return Ok(()),
        }
    }
}
