//! `kiln cluster …` (addon bootstrap, status) and the cluster-side part of `kiln node …`
//! (maintenance, cordon). All of it talks to the Kubernetes API server of a kubeconfig.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use kiln_cluster::bootstrap::{self, BootstrapOptions};
use kiln_cluster::ceph::CephCli;
use kiln_cluster::lock::Lock;
use kiln_cluster::maintenance::{self, EnterOptions};
use kiln_cluster::manifests::{self, Source};
use kiln_cluster::{plan, status};

use super::output::OutputArgs;

#[derive(Debug, clap::Args)]
pub struct KubeArgs {
    /// Kubeconfig of the cluster (its current context is used)
    #[arg(long, value_name = "FILE", env = "KUBECONFIG")]
    pub kubeconfig: PathBuf,
}

impl KubeArgs {
    async fn client(&self) -> anyhow::Result<kiln_cluster::kube_client::Client> {
        kiln_cluster::kube_client::from_kubeconfig(&self.kubeconfig)
            .await
            .with_context(|| format!("connecting with {}", self.kubeconfig.display()))
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum ClusterCmd {
    /// Apply the pinned addons the spec's features select (KubeVirt, CDI, Multus, …)
    Bootstrap(BootstrapArgs),
    /// Show nodes, their maintenance state and addon health
    Status(StatusArgs),
    /// Fetch the cluster's admin kubeconfig from its first control plane's agent (HTTPS,
    /// with a client certificate from the fleet's credentials)
    Kubeconfig(KubeconfigArgs),
}

#[derive(Debug, clap::Args)]
pub struct KubeconfigArgs {
    #[command(flatten)]
    pub remote: super::agent::RemoteNodeArgs,
    /// Write the kubeconfig to this file (mode 0600) instead of standard output
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct BootstrapArgs {
    #[command(flatten)]
    pub kube: KubeArgs,
    /// Appliance spec whose features select the addons [on a node: its own]
    #[arg(long, value_name = "FILE")]
    pub spec: Option<PathBuf>,
    /// Read the pinned manifests from this offline mirror instead of downloading them
    #[arg(long, value_name = "DIR")]
    pub mirror: Option<PathBuf>,
    /// Lock file of pinned manifests (default: the one built into kiln)
    #[arg(long, value_name = "FILE")]
    pub lock: Option<PathBuf>,
    /// Ask the API server what would change (server-side dry run); change nothing
    #[arg(long)]
    pub dry_run: bool,
    /// How long to wait for each condition (CRDs Established)
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = super::parse_duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub kube: KubeArgs,
    /// Also read the Ceph cluster's health and placement groups with this command, e.g.
    /// "ceph" on a node with the admin keyring
    #[arg(long, value_name = "COMMAND")]
    pub ceph_command: Option<String>,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum NodeClusterCmd {
    /// Enter or exit maintenance: live-migrate VMs, drain, keep Ceph calm
    #[command(subcommand)]
    Maintenance(MaintenanceCmd),
    /// Mark a node unschedulable
    Cordon(NodeArgs),
    /// Mark a node schedulable again
    Uncordon(NodeArgs),
}

#[derive(Debug, clap::Subcommand)]
pub enum MaintenanceCmd {
    /// Preflight, cordon, migrate VMs, evict pods, set Ceph noout; run again to resume
    Enter(EnterArgs),
    /// Uncordon, clear Ceph noout, forget the maintenance state
    Exit(ExitArgs),
}

#[derive(Debug, clap::Args)]
pub struct NodeArgs {
    /// Kubernetes node name
    pub node: String,
    #[command(flatten)]
    pub kube: KubeArgs,
}

#[derive(Debug, clap::Args)]
pub struct CephArgs {
    /// Command that runs the ceph CLI with admin rights, e.g.
    /// "kubectl -n rook-ceph exec deploy/rook-ceph-tools -- ceph"
    #[arg(long, value_name = "COMMAND", default_value = "ceph")]
    pub ceph_command: String,
}

#[derive(Debug, clap::Args)]
pub struct EnterArgs {
    #[command(flatten)]
    pub target: NodeArgs,
    /// Only show the preflight report
    #[arg(long)]
    pub dry_run: bool,
    /// Give up after this long (run again to resume)
    #[arg(long, value_name = "DURATION", default_value = "15m", value_parser = super::parse_duration)]
    pub timeout: Duration,
    /// Go ahead when Ceph says the node's OSDs cannot stop without data becoming unavailable
    /// (one node, or a pool of one copy)
    #[arg(long)]
    pub allow_storage_outage: bool,
    #[command(flatten)]
    pub ceph: CephArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, clap::Args)]
pub struct ExitArgs {
    #[command(flatten)]
    pub target: NodeArgs,
    #[command(flatten)]
    pub ceph: CephArgs,
}

pub fn run(cmd: ClusterCmd) -> anyhow::Result<()> {
    super::runtime()?.block_on(async {
        match cmd {
            ClusterCmd::Bootstrap(a) => run_bootstrap(a).await,
            ClusterCmd::Kubeconfig(a) => run_kubeconfig(a).await,
            ClusterCmd::Status(a) => {
                let client = a.kube.client().await?;
                let mut st = status::fetch(&client)
                    .await
                    .context("reading cluster status")?;
                if let Some(command) = &a.ceph_command {
                    let cli = CephCli::new(command)?;
                    st.ceph = Some(
                        tokio::task::spawn_blocking(move || cli.status())
                            .await?
                            .context("reading Ceph's status")?,
                    );
                }
                a.output.emit(&st, status::ClusterStatus::render)
            }
        }
    })
}

async fn run_kubeconfig(a: KubeconfigArgs) -> anyhow::Result<()> {
    let api = a
        .remote
        .api()?
        .context("which node? --node NAME: the cluster's first control plane")?;
    let kubeconfig = api.get("/v1/kubeconfig").await?;
    match &a.out {
        None => {
            use std::io::Write;
            std::io::stdout().write_all(&kubeconfig)?;
        }
        Some(path) => {
            kiln_fleet::cluster::write_private(path, &kubeconfig)?;
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(())
}

async fn run_bootstrap(a: BootstrapArgs) -> anyhow::Result<()> {
    let lock = match &a.lock {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            Lock::parse(&text, &path.display().to_string())?
        }
        None => Lock::embedded()?,
    };
    let spec_path = match &a.spec {
        Some(p) => p.clone(),
        None if std::path::Path::new(kiln_installer::plan::APPLIANCE_SPEC_PATH).exists() => {
            PathBuf::from(kiln_installer::plan::APPLIANCE_SPEC_PATH)
        }
        None => anyhow::bail!(
            "which addons? pass --spec FILE: the appliance spec whose features select them"
        ),
    };
    let appliance = kiln_spec::Appliance::load(&spec_path)
        .with_context(|| format!("loading {}", spec_path.display()))?;
    let selected = kiln_overlays::render(&appliance, None)
        .with_context(|| format!("rendering {}", spec_path.display()))?
        .addons;
    let lock = lock.select(&selected, &spec_path.display().to_string())?;
    let source = match &a.mirror {
        Some(dir) => Source::Mirror(dir.clone()),
        None => Source::Cache(kiln_spec::paths::cache_dir().join("manifests")),
    };
    // Everything is fetched and verified before the first request to the cluster.
    let files = manifests::fetch_all(&lock, &source).await?;
    let kiln_objects = plan::kiln_objects()
        .into_iter()
        .filter(|(addon, _)| selected.contains(addon))
        .collect();
    let plan = plan::plan_bootstrap(&files, kiln_objects)?;
    let client = a.kube.client().await?;
    let report = bootstrap::bootstrap(
        &client,
        &plan,
        &BootstrapOptions {
            dry_run: a.dry_run,
            timeout: a.timeout,
        },
    )
    .await?;
    a.output.emit(&report, bootstrap::BootstrapReport::render)
}

pub fn run_node(cmd: NodeClusterCmd) -> anyhow::Result<()> {
    super::runtime()?.block_on(async {
        match cmd {
            NodeClusterCmd::Cordon(a) => {
                maintenance::set_unschedulable(&a.kube.client().await?, &a.node, true).await?;
                println!("node {} cordoned", a.node);
                Ok(())
            }
            NodeClusterCmd::Uncordon(a) => {
                maintenance::set_unschedulable(&a.kube.client().await?, &a.node, false).await?;
                println!("node {} uncordoned", a.node);
                Ok(())
            }
            NodeClusterCmd::Maintenance(MaintenanceCmd::Enter(a)) => {
                let client = a.target.kube.client().await?;
                let ceph = CephCli::new(&a.ceph.ceph_command)?;
                let opts = EnterOptions {
                    dry_run: a.dry_run,
                    timeout: a.timeout,
                    allow_storage_outage: a.allow_storage_outage,
                };
                let report = maintenance::enter(&client, &a.target.node, &ceph, &opts).await?;
                a.output.emit(&report, |r| {
                    let mut text = r.plan.render();
                    if !r.dry_run {
                        text.push_str(&format!(
                            "node {} is in maintenance: {} VMs migrated, {} pods evicted\n",
                            r.plan.node, r.migrated, r.evicted
                        ));
                    }
                    text
                })
            }
            NodeClusterCmd::Maintenance(MaintenanceCmd::Exit(a)) => {
                let ceph = CephCli::new(&a.ceph.ceph_command)?;
                maintenance::exit(&a.target.kube.client().await?, &a.target.node, &ceph).await?;
                println!("node {} left maintenance", a.target.node);
                Ok(())
            }
        }
    })
}
