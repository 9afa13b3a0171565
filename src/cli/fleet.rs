//! `kiln fleet plan|rollout|status|serve|node-config` (and `upgrade`, in its own module): roll
//! an inventory from powered off to installed and ready over its BMCs and kiln's own netboot
//! services, with progress kept in the state directory and shown in the fleet view.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use kiln_bmc::ipmi::CipherSuite;
use kiln_bmc::{BmcTarget, PowerState};
use kiln_fleet::cluster::{self, FleetSecrets};
use kiln_fleet::metrics::FleetMetrics;
use kiln_fleet::plan::{self, Probe};
use kiln_fleet::rollout::{self, BmcActuator, Rollout, RolloutOptions, Target};
use kiln_fleet::stage::{Limits, Stage};
use kiln_fleet::status;
use kiln_fleet::store::StoreReader;
use kiln_fleet::web::{StateDir, WebConfig};
use kiln_netboot::config::ServeConfig;
use kiln_spec::manifest::Manifest;
use kiln_spec::{Appliance, Inventory};

use super::output::OutputArgs;
use super::parse_duration;

#[derive(Debug, clap::Subcommand)]
pub enum FleetCmd {
    /// Show what a rollout would do to each node, probing BMCs read-only; changes nothing
    Plan(PlanArgs),
    /// Power, netboot and install every selected node, until each is ready or failed
    Rollout(Box<RolloutArgs>),
    /// Progress of the rollout and of the last upgrade kept in the state directory
    Status(StatusArgs),
    /// Serve the fleet view (a live browser page of the rack, its JSON API and Prometheus
    /// metrics) over the state directory, read-only; `kiln fleet rollout --listen` serves the
    /// same with actions
    Serve(ServeArgs),
    /// Rolling A/B upgrade of installed nodes through their agents, a few at a time, each in
    /// cluster maintenance while it reboots; stops at the first failure, resumable
    Upgrade(Box<super::fleet_upgrade::UpgradeArgs>),
    /// Print the custom resource definitions of the fleet as Kubernetes resources (Machine,
    /// Rollout, group kiln.dev) for `kubectl apply -f -`
    Crds,
    /// Create or update a Machine per inventory node in a cluster, each BMC password in a
    /// Secret the Machine names (server-side apply: running it again changes nothing)
    Import(super::fleet_resources::ImportArgs),
    /// Drive a Rollout resource as one replica of the provisioner's controller: the replica
    /// holding the rollout's Lease powers, netboots and installs its Machines, keeping their
    /// progress in their status; the others wait to take over
    Controller(Box<super::fleet_controller::ControllerArgs>),
    /// Print the node config a node installs with, its cluster credentials included (for
    /// nodes installed from the ISO rather than netbooted: copy it to the node's
    /// /etc/kiln/node.override.yaml)
    NodeConfig(NodeConfigArgs),
}

#[derive(Debug, clap::Args)]
pub struct NodeConfigArgs {
    /// The node's name in the inventory
    node: String,
    /// Fleet inventory (kind: Inventory)
    #[arg(long, value_name = "FILE")]
    inventory: PathBuf,
    /// Appliance spec the nodes install from
    #[arg(long, value_name = "FILE")]
    spec: PathBuf,
    /// The rollout's state directory, where the cluster's credentials are kept
    #[arg(long, value_name = "DIR", default_value = "/var/lib/kiln/fleet")]
    state_dir: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct Source {
    /// Fleet inventory (kind: Inventory)
    #[arg(long, value_name = "FILE")]
    inventory: PathBuf,
    #[command(flatten)]
    build: Build,
    /// Which nodes: names, globs, role=R, label=V, comma-separated [default: all]
    #[arg(long, value_name = "SELECTOR")]
    nodes: Option<String>,
    /// Where rollout progress, tokens and the netboot trace are kept
    #[arg(long, value_name = "DIR", default_value = "/var/lib/kiln/fleet")]
    state_dir: PathBuf,
    /// Install again nodes an earlier rollout left ready (with any image)
    #[arg(long)]
    reinstall: bool,
}

#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    #[command(flatten)]
    source: Source,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, clap::Args)]
pub struct RolloutArgs {
    #[command(flatten)]
    source: Source,
    /// Nodes in progress at once
    #[arg(long, value_name = "N", default_value_t = 10)]
    parallel: usize,
    /// Nodes powering on or netbooting at once [default: --parallel]
    #[arg(long, value_name = "N")]
    netboot_parallel: Option<usize>,
    /// Nodes failed or in progress before no more start [default: no limit]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    max_unavailable: Option<u32>,
    #[command(flatten)]
    deadlines: Deadlines,
    /// Append every stage change as a JSON line to this file
    #[arg(long, value_name = "FILE")]
    events: Option<PathBuf>,
    /// POST every stage change as JSON to this URL (best effort)
    #[arg(long, value_name = "URL")]
    webhook: Option<String>,
    #[command(flatten)]
    view: ViewArgs,
}

/// The build nodes install.
#[derive(Debug, Clone, clap::Args)]
pub struct Build {
    /// Build output directory (manifest.json, spec.yaml, pxe/) [default: .]
    #[arg(long, value_name = "DIR", default_value = ".")]
    pub artifacts: PathBuf,
    /// Appliance spec the nodes install from [default: spec.yaml in --artifacts]
    #[arg(long, value_name = "FILE")]
    spec: Option<PathBuf>,
    /// Roll out only a build signed by this key (NAME.pub): manifest.json's signature and
    /// every artifact are checked before any machine is touched
    #[arg(long, value_name = "FILE")]
    trusted_key: Option<PathBuf>,
}

impl Build {
    /// The appliance spec nodes install from: `--spec`, or the build's own.
    pub(super) fn spec_path(&self) -> PathBuf {
        self.spec
            .clone()
            .unwrap_or_else(|| self.artifacts.join("spec.yaml"))
    }

    /// The appliance spec and the sha256 of the build's root image (its signature and every
    /// artifact checked first when a trusted key is given).
    pub(super) fn load(&self) -> anyhow::Result<(Appliance, String)> {
        let spec_path = self.spec_path();
        let artifacts = &self.artifacts;
        let appliance = Appliance::load(&spec_path)
            .with_context(|| format!("loading the appliance spec {}", spec_path.display()))?;
        let manifest_path = artifacts.join("manifest.json");
        let manifest: Manifest = match &self.trusted_key {
            Some(key) => {
                let key = super::key::load_public_key(key)?;
                kiln_image::manifest::verify_bundle(artifacts, &key)
                    .context("checking the build's signature and artifacts")?
            }
            None => std::fs::read_to_string(&manifest_path)
                .map_err(anyhow::Error::from)
                .and_then(|t| Ok(serde_json::from_str(&t)?))
                .with_context(|| {
                    format!("loading the build manifest {}", manifest_path.display())
                })?,
        };
        let image_sha256 = manifest
            .sha256_of(kiln_spec::bootargs::PXE_ROOTFS)
            .with_context(|| {
                format!(
                    "{} lists no {} (build with `kiln build --out DIR`)",
                    manifest_path.display(),
                    kiln_spec::bootargs::PXE_ROOTFS
                )
            })?
            .to_string();
        Ok((appliance, image_sha256))
    }
}

/// How long each stage of a node may take.
#[derive(Debug, Clone, clap::Args)]
pub struct Deadlines {
    /// Deadline for the BMC to power a node on into its network boot
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "2m")]
    power_timeout: Duration,
    /// Deadline from power-on to the installer starting
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "15m")]
    netboot_timeout: Duration,
    /// Deadline from the installer starting to the disk being written
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "30m")]
    install_timeout: Duration,
    /// Deadline from the disk being written to the installed node's agent reporting ready
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "20m")]
    ready_timeout: Duration,
}

impl Deadlines {
    /// The rollout's limits with these deadlines.
    pub(super) fn limits(&self, parallel: usize, netboot_parallel: usize) -> Limits {
        Limits {
            parallel: parallel.max(1),
            netboot_parallel: netboot_parallel.max(1),
            powering_on: self.power_timeout,
            netbooting: self.netboot_timeout,
            installing: self.install_timeout,
            rebooting: self.ready_timeout,
            ..Limits::default()
        }
    }

    /// Bound on one whole BMC action.
    pub(super) fn bmc_action(&self) -> Duration {
        self.power_timeout
    }
}

/// The fleet view of a running rollout.
#[derive(Debug, clap::Args)]
pub struct ViewArgs {
    /// Serve the fleet view (page, JSON API, /metrics) on this address while the rollout
    /// runs, e.g. 127.0.0.1:9180
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Let whoever presents the token in this file act in the view (retry a failed node);
    /// without it the view is read-only
    #[arg(long, value_name = "FILE", requires = "listen")]
    token_file: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// State directory of the rollout
    #[arg(long, value_name = "DIR", default_value = "/var/lib/kiln/fleet")]
    state_dir: PathBuf,
    /// Address to serve on
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9180")]
    listen: SocketAddr,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// State directory of the rollout
    #[arg(long, value_name = "DIR", default_value = "/var/lib/kiln/fleet")]
    state_dir: PathBuf,
    /// Redraw every few seconds until every node is done
    #[arg(long)]
    watch: bool,
    #[command(flatten)]
    output: OutputArgs,
}

pub fn run(cmd: FleetCmd) -> anyhow::Result<()> {
    match cmd {
        FleetCmd::Plan(a) => plan_cmd(a),
        FleetCmd::Rollout(a) => rollout_cmd(*a),
        FleetCmd::Status(a) => status_cmd(a),
        FleetCmd::Serve(a) => serve_cmd(a),
        FleetCmd::Crds => super::fleet_resources::crds_cmd(),
        FleetCmd::Import(a) => super::fleet_resources::import_cmd(a),
        FleetCmd::Controller(a) => super::fleet_controller::run(*a),
        FleetCmd::Upgrade(a) => super::fleet_upgrade::run(*a),
        FleetCmd::NodeConfig(a) => node_config_cmd(a),
    }
}

/// The inventory with each node's part in the cluster (none without the kubernetes feature),
/// in the Ceph cluster (none without `spec.cluster.ceph`) and its agent API filled in, from the fleet's credentials in the state directory (made on
/// first use).
pub(super) fn with_node_parts(
    appliance: &Appliance,
    inventory: &Inventory,
    state_dir: &Path,
) -> anyhow::Result<Inventory> {
    let secrets = FleetSecrets::load_or_create(state_dir)?;
    let members = cluster::members(appliance, inventory, &secrets)
        .map_err(|e| anyhow::anyhow!("the inventory's nodes cannot form the cluster: {e}"))?;
    let ceph = cluster::ceph_members(appliance, inventory, &secrets)
        .map_err(|e| anyhow::anyhow!("the inventory's nodes cannot form the Ceph cluster: {e}"))?;
    let apis = cluster::remote_apis(inventory, &secrets)?;
    Ok(cluster::with_members(inventory, &members, &ceph, &apis))
}

fn node_config_cmd(a: NodeConfigArgs) -> anyhow::Result<()> {
    let inventory = Inventory::load(&a.inventory)
        .with_context(|| format!("loading the inventory {}", a.inventory.display()))?;
    let appliance = Appliance::load(&a.spec)
        .with_context(|| format!("loading the appliance spec {}", a.spec.display()))?;
    let Some(index) = inventory.spec.nodes.iter().position(|n| n.name == a.node) else {
        bail!("{} has no node named {:?}", a.inventory.display(), a.node);
    };
    let inventory = with_node_parts(&appliance, &inventory, &a.state_dir)?;
    let node = &inventory.spec.nodes[index];
    let spec = appliance
        .for_node(node, None)
        .map_err(|e| anyhow::anyhow!("node {}: {e}", node.name))?;
    let config = kiln_spec::nodeconfig::node_config_for(&spec, None, &spec.spec.hostname);
    print!("{}", config.to_yaml());
    Ok(())
}

/// What every fleet command starts from.
struct Loaded {
    inventory: Inventory,
    inventory_dir: PathBuf,
    appliance: Appliance,
    image_sha256: String,
}

fn load(src: &Source) -> anyhow::Result<Loaded> {
    let inventory = Inventory::load(&src.inventory)
        .with_context(|| format!("loading the inventory {}", src.inventory.display()))?;
    let (appliance, image_sha256) = src.build.load()?;
    Ok(Loaded {
        inventory_dir: src
            .inventory
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf),
        inventory,
        appliance,
        image_sha256,
    })
}

fn bmc_target(node: &kiln_spec::InventoryNode, base: &Path) -> anyhow::Result<Option<BmcTarget>> {
    node.bmc
        .as_ref()
        .map(|b| {
            let timeout = BmcTarget::rollout_timeout(b.protocol);
            BmcTarget::from_inventory(b, base, timeout, 3, CipherSuite::Suite3)
                .with_context(|| format!("node {}: reading its BMC password", node.name))
        })
        .transpose()
}

/// The earlier rollout's state, if there is one; `None` when there is none yet.
fn earlier(state_dir: &Path) -> anyhow::Result<Option<kiln_fleet::store::Snapshot>> {
    match StoreReader::open(state_dir) {
        Ok(r) => Ok(Some(r.read()?)),
        Err(kiln_fleet::store::StoreError::Missing(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn plan_cmd(a: PlanArgs) -> anyhow::Result<()> {
    let l = load(&a.source)?;
    let nodes =
        plan::select(&l.inventory, a.source.nodes.as_deref()).map_err(anyhow::Error::msg)?;
    let snapshot = earlier(&a.source.state_dir)?;
    let mut plans = plan::plan(
        &l.appliance,
        &nodes,
        &l.image_sha256,
        snapshot.as_ref(),
        a.source.reinstall,
    );
    let seats = cluster::seats(&l.appliance, &l.inventory)
        .map_err(|e| anyhow::anyhow!("the inventory's nodes cannot form the cluster: {e}"))?;
    let ceph = cluster::ceph_seats(&l.appliance, &l.inventory)
        .map_err(|e| anyhow::anyhow!("the inventory's nodes cannot form the Ceph cluster: {e}"))?;
    for warning in cluster::seat_warnings(&seats)
        .into_iter()
        .chain(cluster::ceph_seat_warnings(&ceph))
    {
        eprintln!("warning: {warning}");
    }
    let rt = super::runtime()?;
    let probes = rt.block_on(async {
        let tasks: Vec<_> = nodes
            .iter()
            .map(|n| {
                let target = bmc_target(n, &l.inventory_dir);
                tokio::spawn(async move {
                    match target {
                        Ok(Some(t)) => Some(probe(t).await),
                        Ok(None) => None,
                        Err(e) => Some(Probe {
                            reachable: false,
                            authenticated: false,
                            power: None,
                            one_time_boot: false,
                            error: Some(format!("{e:#}")),
                        }),
                    }
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.ok().flatten());
        }
        out
    });
    for (p, probe) in plans.iter_mut().zip(probes) {
        p.probe = probe;
        let parts: Vec<String> = (seats.get(&p.name).map(cluster::Seat::describe).into_iter())
            .chain(ceph.get(&p.name).map(cluster::CephSeat::describe))
            .collect();
        p.cluster = (!parts.is_empty()).then(|| parts.join("; "));
    }
    a.output.emit(&plans, |p| plan::table(p))
}

/// Read-only questions only: who answers, whether the credentials work, the power state and
/// whether a one-time boot device can be set.
async fn probe(target: BmcTarget) -> Probe {
    let failed = |e: kiln_bmc::BmcError, reachable: bool| Probe {
        reachable,
        authenticated: false,
        power: None,
        one_time_boot: false,
        error: Some(e.to_string()),
    };
    let driver = match kiln_bmc::connect(target) {
        Ok(d) => d,
        Err(e) => return failed(e, false),
    };
    match driver.probe().await {
        Err(e) => {
            let reachable = matches!(e, kiln_bmc::BmcError::Auth(_));
            failed(e, reachable)
        }
        Ok(caps) => Probe {
            reachable: true,
            authenticated: caps.authenticated,
            power: caps.power.map(|p: PowerState| p.to_string()),
            one_time_boot: caps.boot_override,
            error: None,
        },
    }
}

fn rollout_cmd(a: RolloutArgs) -> anyhow::Result<()> {
    let mut l = load(&a.source)?;
    l.inventory = with_node_parts(&l.appliance, &l.inventory, &a.source.state_dir)?;
    let nodes =
        plan::select(&l.inventory, a.source.nodes.as_deref()).map_err(anyhow::Error::msg)?;
    let netboot = l.inventory.spec.netboot.clone().with_context(|| {
        format!(
            "{} has no spec.netboot section: say which interface the nodes boot on \
             (interface, mode proxy|dhcp, poolStart/poolEnd for dhcp)",
            a.source.inventory.display()
        )
    })?;
    // Every node's spec must render before any machine is touched.
    let mut problems = Vec::new();
    let mut targets = Vec::new();
    for n in &nodes {
        if let Err(e) = l.appliance.for_node(n, None) {
            problems.push(format!("node {}: {e}", n.name));
        }
        match bmc_target(n, &l.inventory_dir) {
            Ok(bmc) => targets.push(Target::of(n, bmc)),
            Err(e) => problems.push(format!("{e:#}")),
        }
    }
    if !problems.is_empty() {
        bail!("nothing was started:\n  {}", problems.join("\n  "));
    }
    let state_dir = a.source.state_dir.clone();
    let pxe_state = state_dir.join("pxe");
    let limits = Limits {
        max_unavailable: a.max_unavailable.map(|m| m as usize),
        ..a.deadlines
            .limits(a.parallel, a.netboot_parallel.unwrap_or(a.parallel))
    };
    let opts = RolloutOptions {
        limits,
        image_sha256: l.image_sha256.clone(),
        events: a.events.clone(),
        trace_file: pxe_state.join(kiln_netboot::trace::TRACE_FILE),
        reinstall: a.source.reinstall,
        metrics: Arc::default(),
    };
    let rt = super::runtime()?;
    let bmc_targets: HashMap<String, Option<BmcTarget>> = targets
        .iter()
        .map(|t| (t.name.clone(), t.bmc.clone()))
        .collect();
    let handle = rt.handle().clone();
    let timeout = a.deadlines.bmc_action();
    let passwords = nodes
        .iter()
        .filter_map(|n| {
            let bmc = n.bmc.as_ref()?;
            let secret = (bmc.password_ref.clone(), l.inventory_dir.clone());
            Some((n.name.clone(), secret))
        })
        .collect();
    let webhook = a
        .webhook
        .clone()
        .map(|url| kiln_fleet::webhook::Webhook::start(rt.handle(), url))
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let store = kiln_fleet::store::Store::open(&state_dir).context("opening the rollout state")?;
    let rollout = Rollout::new(&targets, &opts, Box::new(store), webhook, |shared| {
        Arc::new(BmcActuator {
            runtime: handle,
            targets: bmc_targets,
            shared,
            timeout,
            passwords,
        })
    })
    .context("opening the rollout state")?;
    eprintln!(
        "rolling out image {} to {} node(s); state in {}",
        &l.image_sha256[..12],
        targets.len(),
        state_dir.display()
    );
    let shutdown = kiln_netboot::server::CancellationToken::new();
    let spec = a.source.build.spec_path();
    let sources = NetbootSources {
        netboot: &netboot,
        artifacts: &a.source.build.artifacts,
        inventory_file: &a.source.inventory,
        inventory: tokio::sync::watch::channel(l.inventory.clone()).1,
        spec: &spec,
        pxe_state: &pxe_state,
    };
    let (server, trace) = rt.block_on(start_netboot(
        sources,
        rollout.shared.clone(),
        shutdown.clone(),
    ))?;
    let view = match a.view.listen {
        Some(listen) => Some(start_view(
            &rt,
            listen,
            WebConfig {
                source: rollout.shared.clone(),
                trace_file: opts.trace_file.clone(),
                netboot: Some(trace),
                metrics: rollout.shared.metrics.clone(),
                action_token_sha256: a.view.token_file.as_deref().map(read_token).transpose()?,
                poll: VIEW_POLL,
            },
            shutdown.clone(),
        )?),
        None => None,
    };
    let stopper = rollout.stopper();
    rt.spawn(async move {
        super::wait_for_signal().await;
        eprintln!("stopping: progress is kept; run the same command again to resume");
        stopper.stop();
    });
    let results = rollout.run(Duration::from_secs(1));
    shutdown.cancel();
    if let Err(e) = rt.block_on(server) {
        eprintln!("netboot services: {e}");
    }
    if let Some(Ok(Err(e))) = view.map(|v| rt.block_on(v)) {
        eprintln!("fleet view: {e}");
    }
    report_results(&results)
}

/// Prints the nodes' final table; an error names the failed ones, or says how many were left
/// unfinished (a rollout stopped early).
pub(super) fn report_results(
    results: &[(String, kiln_fleet::stage::NodeProgress)],
) -> anyhow::Result<()> {
    let view = status::fleet_status(
        &kiln_fleet::store::Snapshot {
            nodes: results.to_vec(),
            ..Default::default()
        },
        rollout::now_ms(),
    );
    print!("{}", status::table(&view));
    let failed: Vec<&str> = results
        .iter()
        .filter(|(_, p)| p.stage == Stage::Failed)
        .map(|(n, _)| n.as_str())
        .collect();
    let unfinished = results.iter().filter(|(_, p)| !p.stage.is_done()).count();
    if !failed.is_empty() {
        let held = results
            .iter()
            .filter(|(_, p)| p.stage == Stage::Pending)
            .count();
        let held = if held > 0 {
            format!(" ({held} not started: too many unavailable)")
        } else {
            String::new()
        };
        bail!(
            "{} of {} node(s) failed: {}{held}",
            failed.len(),
            results.len(),
            failed.join(", ")
        );
    }
    if unfinished > 0 {
        bail!("stopped with {unfinished} node(s) unfinished");
    }
    Ok(())
}

fn status_cmd(a: StatusArgs) -> anyhow::Result<()> {
    loop {
        let snapshot = match StoreReader::open(&a.state_dir) {
            Ok(r) => r.read()?,
            Err(kiln_fleet::store::StoreError::Missing(p)) => {
                bail!(
                    "no rollout state at {} (run `kiln fleet rollout` first)",
                    p.display()
                )
            }
            Err(e) => return Err(e.into()),
        };
        let s = status::fleet_status(&snapshot, rollout::now_ms());
        if a.watch {
            // Clear the screen, then the table.
            print!("\x1b[2J\x1b[H");
        }
        a.output.emit(&s, status::table)?;
        let done = s.nodes.iter().all(|n| n.stage.is_done());
        if !a.watch || done {
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// How often the fleet view looks at the store for changes to push to open pages.
const VIEW_POLL: Duration = Duration::from_millis(500);

fn serve_cmd(a: ServeArgs) -> anyhow::Result<()> {
    // Fails now, not on the first page load, when there is nothing to show.
    StoreReader::open(&a.state_dir)?;
    let rt = super::runtime()?;
    let shutdown = kiln_netboot::server::CancellationToken::new();
    let view = start_view(
        &rt,
        a.listen,
        WebConfig {
            source: Arc::new(StateDir(a.state_dir.clone())),
            trace_file: a
                .state_dir
                .join("pxe")
                .join(kiln_netboot::trace::TRACE_FILE),
            netboot: None,
            metrics: Arc::new(FleetMetrics::new()),
            action_token_sha256: None,
            poll: VIEW_POLL,
        },
        shutdown.clone(),
    )?;
    rt.block_on(async {
        super::wait_for_signal().await;
        shutdown.cancel();
        view.await
    })?
    .context("fleet view")
}

/// The token's hash, from a file that holds only the token.
fn read_token(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the view's token from {}", path.display()))?;
    if text.trim().len() < 16 {
        bail!(
            "{}: the token must be at least 16 characters (e.g. `openssl rand -hex 32`)",
            path.display()
        );
    }
    Ok(WebConfig::token_sha256(&text))
}

/// Binds the fleet view (so a busy address fails the command at once) and serves it on `rt`
/// until `shutdown`.
fn start_view(
    rt: &tokio::runtime::Runtime,
    listen: SocketAddr,
    config: WebConfig,
    shutdown: kiln_netboot::server::CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<std::io::Result<()>>> {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(listen))
        .with_context(|| format!("binding the fleet view to {listen}"))?;
    let addr = listener.local_addr()?;
    eprintln!("fleet view on http://{addr}/");
    Ok(
        rt.spawn(kiln_fleet::web::serve(listener, config, async move {
            shutdown.cancelled().await
        })),
    )
}

/// Where the netboot services get what they serve.
pub(super) struct NetbootSources<'a> {
    pub netboot: &'a kiln_spec::inventory::InventoryNetboot,
    pub artifacts: &'a Path,
    /// The inventory file (for its settings) and the inventory served, node parts filled in
    /// (each new one sent is served from then on).
    pub inventory_file: &'a Path,
    pub inventory: tokio::sync::watch::Receiver<Inventory>,
    pub spec: &'a Path,
    pub pxe_state: &'a Path,
}

/// Starts kiln's netboot services for the rollout and waits until they listen, so no node is
/// powered on before its boot can be answered; also gives the trace they record into, which
/// the fleet view shows.
pub(super) async fn start_netboot(
    src: NetbootSources<'_>,
    shared: Arc<rollout::Shared>,
    shutdown: kiln_netboot::server::CancellationToken,
) -> anyhow::Result<(
    tokio::task::JoinHandle<anyhow::Result<()>>,
    Arc<kiln_netboot::trace::Trace>,
)> {
    let netboot = src.netboot;
    let trace = kiln_netboot::server::open_trace(src.pxe_state)?;
    let http = match netboot.http_port {
        Some(port) => {
            let (ip, _) = kiln_netboot::server::interface_ipv4(&netboot.interface)?;
            Some(std::net::SocketAddr::from((ip, port)))
        }
        None => None,
    };
    let config = ServeConfig {
        interface: Some(netboot.interface.clone()),
        mode: Some(netboot.mode),
        artifacts: Some(src.artifacts.join("pxe")),
        manifest: Some(src.artifacts.join("manifest.json")),
        inventory: Some(src.inventory_file.to_path_buf()),
        spec: Some(src.spec.to_path_buf()),
        http,
        state: Some(src.pxe_state.to_path_buf()),
        pool_start: netboot.pool_start,
        pool_end: netboot.pool_end,
        ..ServeConfig::default()
    };
    let resolved = config.resolve().map_err(|errors| {
        anyhow::anyhow!("invalid netboot settings:\n  {}", errors.join("\n  "))
    })?;
    let listen = resolved.settings.http_listen;
    let inventory = src.inventory;
    let served_trace = trace.clone();
    let mut server = tokio::spawn(async move {
        kiln_netboot::server::serve(
            resolved.settings,
            inventory,
            resolved.appliance,
            shared,
            served_trace,
            shutdown,
        )
        .await
        .context("netboot services")
    });
    let started = std::time::Instant::now();
    loop {
        if server.is_finished() {
            return match (&mut server).await {
                Ok(Err(e)) => Err(e),
                Ok(Ok(())) => bail!("the netboot services stopped at once"),
                Err(e) => bail!("the netboot services panicked: {e}"),
            };
        }
        let probe = tokio::net::TcpStream::connect(listen);
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(200), probe).await {
            return Ok((server, trace));
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("the netboot services did not listen on {listen} within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
