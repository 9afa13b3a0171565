//! `kiln agent …` and the node-local part of `kiln node …`.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use kiln_agent::slots::{UpgradeReport, UpgradeRequest};
use kiln_agent::status::{NodeStatus, PlanReport};
use kiln_agent::{AgentOptions, Client, DEFAULT_SOCKET};
use kiln_spec::boot::BootEntryName;

use super::output::OutputArgs;

#[derive(Debug, clap::Subcommand)]
pub enum NodeLocalCmd {
    /// Show this node's (or, with --node, another node's) conditions and managed resources
    Status(LocalArgs),
    /// Show what an apply would change now, without changing anything (this node's or --node's)
    Plan(LocalArgs),
    /// Re-read the node config and converge the host now
    Apply(LocalArgs),
    /// Write a signed build into the slot this node (or --node) did not boot, on trial for
    /// the next boot: the agent blesses it once healthy, or the node falls back by itself
    Upgrade(UpgradeArgs),
    /// Make the other slot's good image the default again (takes effect at the next boot)
    Rollback(RollbackArgs),
}

#[derive(Debug, clap::Args)]
pub struct UpgradeArgs {
    /// The build to install: its output directory on the node, or that directory's URL
    #[arg(long, value_name = "DIR|URL")]
    pub image: String,
    /// Reboot into the new slot once it is written
    #[arg(long)]
    pub reboot: bool,
    /// Check the image and show the plan; write nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Take a build without a signature (only if the node's image allows it with
    /// spec.upgrade.allowUnsigned); its files are still checked against its manifest
    #[arg(long)]
    pub allow_unsigned: bool,
    #[command(flatten)]
    pub local: LocalArgs,
}

#[derive(Debug, clap::Args)]
pub struct RollbackArgs {
    /// Reboot into the other slot at once
    #[arg(long)]
    pub reboot: bool,
    #[command(flatten)]
    pub local: LocalArgs,
}

#[derive(Debug, clap::Args)]
pub struct LocalArgs {
    /// The agent's API socket
    #[arg(long, value_name = "PATH", env = "KILN_AGENT_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    #[command(flatten)]
    pub remote: RemoteNodeArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// Another node's agent, over its network API (`spec.remoteApi`) with the fleet's
/// credentials.
#[derive(Debug, clap::Args)]
pub struct RemoteNodeArgs {
    /// Ask this inventory node's agent over the network instead of this node's on its socket
    #[arg(long, value_name = "NAME", requires = "inventory")]
    pub node: Option<String>,
    /// Fleet inventory naming the node and its address
    #[arg(long, value_name = "FILE")]
    pub inventory: Option<PathBuf>,
    /// The fleet's state directory, which keeps its credentials
    #[arg(long, value_name = "DIR", default_value = "/var/lib/kiln/fleet")]
    pub state_dir: PathBuf,
    /// Reach the agent here (HOST:PORT, a forwarded port) instead of the node's inventory
    /// address; the node's certificate must still name the node
    #[arg(long, value_name = "ADDRESS")]
    pub address: Option<std::net::SocketAddr>,
}

impl RemoteNodeArgs {
    /// The named node's agent API; `None` without `--node`.
    pub fn api(&self) -> anyhow::Result<Option<kiln_fleet::remote::NodeApi>> {
        let (Some(name), Some(inventory_path)) = (&self.node, &self.inventory) else {
            return Ok(None);
        };
        let inventory = kiln_spec::Inventory::load(inventory_path)
            .with_context(|| format!("loading the inventory {}", inventory_path.display()))?;
        let node = inventory
            .spec
            .nodes
            .iter()
            .find(|n| &n.name == name)
            .with_context(|| format!("{} has no node named {name:?}", inventory_path.display()))?;
        let secrets = kiln_fleet::cluster::FleetSecrets::load(&self.state_dir)?;
        Ok(Some(kiln_fleet::remote::NodeApi::new(
            node,
            &secrets,
            self.address,
        )?))
    }
}

impl LocalArgs {
    /// A `GET` of `path` from the agent this command talks to: another node's over the
    /// network (`--node`), else this node's on its socket.
    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.call(reqwest::Method::GET, path).await
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
    ) -> anyhow::Result<T> {
        match self.remote.api()? {
            Some(api) => {
                let timeout = if method == reqwest::Method::GET {
                    kiln_fleet::remote::READ_TIMEOUT
                } else {
                    kiln_fleet::remote::CHANGE_TIMEOUT
                };
                Ok(serde_json::from_slice(
                    &api.request(method, path, timeout).await?,
                )?)
            }
            None => Ok(Client::new(&self.socket)
                .json(method.as_str(), path, &[])
                .await?
                .1),
        }
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum AgentCmd {
    /// Run the node agent (kiln-agent.service runs it with the defaults)
    Run(RunArgs),
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Root of the host tree to manage
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub root: PathBuf,
    /// Node config [ROOT/var/lib/kiln/node.yaml]
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Local override [ROOT/etc/kiln/node.override.yaml]
    #[arg(long = "override", value_name = "FILE")]
    pub override_config: Option<PathBuf>,
    /// API socket
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Seconds between full resyncs (file events act at once)
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub resync_secs: u64,
}

pub fn run(cmd: AgentCmd) -> anyhow::Result<()> {
    match cmd {
        AgentCmd::Run(a) => {
            if a.resync_secs == 0 {
                bail!("--resync-secs must be at least 1");
            }
            kiln_agent::run(AgentOptions {
                root: a.root,
                config: a.config,
                override_config: a.override_config,
                socket: a.socket,
                resync: Duration::from_secs(a.resync_secs),
            })
            .context("running the node agent")
        }
    }
}

pub fn run_node(cmd: NodeLocalCmd) -> anyhow::Result<()> {
    let rt = super::runtime()?;
    match cmd {
        NodeLocalCmd::Status(a) => {
            let status: NodeStatus = rt
                .block_on(a.get("/v1/status"))
                .context("asking the agent for its status")?;
            a.output.emit(&status, status_text)
        }
        NodeLocalCmd::Plan(a) => {
            let plan: PlanReport = rt
                .block_on(a.get("/v1/plan"))
                .context("asking the agent for a plan")?;
            a.output.emit(&plan, plan_text)?;
            if !plan.config.valid {
                bail!(
                    "the node config is invalid ({} problem(s))",
                    plan.config.errors.len()
                );
            }
            Ok(())
        }
        NodeLocalCmd::Apply(a) => {
            if a.remote.node.is_some() {
                bail!("kiln node apply runs on the node itself; --node is for status and plan");
            }
            let client = Client::new(&a.socket);
            let (_, status): (_, NodeStatus) = rt
                .block_on(client.json("POST", "/v1/apply", &[422]))
                .context("asking the agent to apply")?;
            a.output.emit(&status, status_text)?;
            if !status.config.valid {
                bail!("the node config was rejected; the last good state stays applied");
            }
            if let Some(c) = status.condition("Failed").filter(|c| c.status) {
                bail!("apply failed: {}", c.message);
            }
            Ok(())
        }
        NodeLocalCmd::Upgrade(a) => {
            let query = serde_urlencoded::to_string(UpgradeRequest {
                image: a.image.clone(),
                reboot: a.reboot,
                dry_run: a.dry_run,
                allow_unsigned: a.allow_unsigned,
            })?;
            let report: UpgradeReport = rt
                .block_on(
                    a.local
                        .call(reqwest::Method::POST, &format!("/v1/upgrade?{query}")),
                )
                .context("upgrading through the agent")?;
            a.local.output.emit(&report, upgrade_text)
        }
        NodeLocalCmd::Rollback(a) => {
            let path = format!("/v1/rollback?reboot={}", a.reboot);
            let entry: BootEntryName = rt
                .block_on(a.local.call(reqwest::Method::POST, &path))
                .context("rolling back through the agent")?;
            a.local.output.emit(&entry, |e| {
                format!(
                    "slot {} is the default ({}){}\n",
                    e.slot.letter(),
                    e.file_name(),
                    if a.reboot {
                        "; rebooting"
                    } else {
                        "; it boots next time"
                    }
                )
            })
        }
    }
}

fn upgrade_text(r: &UpgradeReport) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{} slot {} (booted: {}), image signed by {}:",
        if r.applied {
            "upgraded"
        } else {
            "would upgrade"
        },
        r.plan.target.letter(),
        r.plan.booted.letter(),
        r.signed_by
    );
    for s in &r.plan.steps {
        let _ = writeln!(o, "  - {s}");
    }
    if r.applied {
        let _ = writeln!(
            o,
            "done in {:.1} s; {}",
            r.seconds,
            if r.rebooting {
                "rebooting into it now"
            } else {
                "reboot to try it (kiln node status shows it staged)"
            }
        );
    }
    o
}

fn yes_no(b: bool) -> &'static str {
    if b { "True" } else { "False" }
}

fn status_text(s: &NodeStatus) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "node {}  slot {}  root {}",
        s.hostname.as_deref().unwrap_or("?"),
        s.slot,
        s.root
    );
    let _ = writeln!(
        o,
        "config: {}  {}",
        if s.config.valid { "valid" } else { "REJECTED" },
        s.config.sources.join(", ")
    );
    for e in &s.config.errors {
        let src = e
            .source
            .as_deref()
            .map(|x| format!("{x}: "))
            .unwrap_or_default();
        let _ = writeln!(o, "  {src}{}: {}", e.path, e.reason);
    }
    if let Some(k) = &s.kubernetes {
        let _ = writeln!(
            o,
            "kubernetes: {}  API {}  CA {}",
            kiln_spec::serde_name(&k.role),
            k.api_server,
            k.ca_cert_hash.as_deref().unwrap_or("(not yet known)")
        );
    }
    if let Some(b) = &s.boot {
        let slot = |r: &kiln_spec::boot::SlotReport| {
            let image = r
                .image
                .as_ref()
                .map(|i| {
                    format!(
                        " image {}",
                        &i.rootfs_sha256[..i.rootfs_sha256.len().min(16)]
                    )
                })
                .unwrap_or_default();
            let state = r
                .state
                .map(|s| kiln_spec::serde_name(&s))
                .unwrap_or("no entry".into());
            format!(
                "{} (generation {}, {state}){image}",
                r.slot.letter(),
                r.generation.map_or("-".into(), |g| g.to_string())
            )
        };
        let _ = writeln!(o, "boot: booted {}", slot(&b.booted));
        if let Some(r) = &b.staged {
            let _ = writeln!(o, "  staged {}", slot(r));
        }
        if let Some(r) = &b.rollback {
            let _ = writeln!(o, "  rollback {}", slot(r));
        }
        if let Some(a) = &b.last_assessment {
            let _ = writeln!(
                o,
                "  last assessment: slot {} generation {} {}: {}",
                a.slot.letter(),
                a.generation,
                if a.good { "good" } else { "FAILED" },
                a.reason
            );
        }
    }
    if let Some(c) = &s.ceph {
        let _ = writeln!(
            o,
            "ceph: {} of cluster {}  {}",
            match c.role {
                kiln_spec::ceph::CephRole::FirstMonitor => "first monitor",
                kiln_spec::ceph::CephRole::Monitor => "monitor",
                kiln_spec::ceph::CephRole::Osd => "OSD node",
            },
            c.fsid.as_deref().unwrap_or("(not yet made)"),
            c.status
                .as_ref()
                .map(|st| st.summary())
                .unwrap_or_else(|| "(health not yet read)".into())
        );
        for d in &c.disks {
            let what = match (d.osd, &d.error) {
                (Some(id), _) => format!("osd.{id}"),
                (None, Some(e)) => format!("no OSD: {e}"),
                (None, None) => "no OSD".into(),
            };
            let _ = writeln!(o, "  {}: {what}", d.disk);
        }
        for w in &c.warnings {
            let _ = writeln!(o, "  warning: {w}");
        }
    }
    let _ = writeln!(
        o,
        "\n{:<18} {:<7} {:<20} MESSAGE",
        "CONDITION", "STATUS", "REASON"
    );
    for c in &s.conditions {
        let _ = writeln!(
            o,
            "{:<18} {:<7} {:<20} {}",
            c.kind,
            yes_no(c.status),
            c.reason,
            c.message
        );
    }
    let _ = writeln!(o, "\n{:<60} STATE", "RESOURCE");
    for r in &s.resources {
        let why = r
            .reason
            .as_deref()
            .map(|x| format!("  ({x})"))
            .unwrap_or_default();
        let _ = writeln!(o, "{:<60} {:?}{why}", r.id, r.state);
    }
    if let Some(a) = &s.last_apply {
        let _ = writeln!(
            o,
            "\nlast apply {}: {} change(s), {} failure(s){}",
            a.at,
            a.actions.len(),
            a.failed.len(),
            if a.drift { " (drift repair)" } else { "" }
        );
    }
    let _ = writeln!(o, "drift repairs: {}", s.drift_repairs);
    if let Some(r) = &s.recovered {
        let _ = writeln!(o, "recovered: {r}");
    }
    o
}

fn plan_text(p: &PlanReport) -> String {
    let mut o = String::new();
    if !p.config.valid {
        let _ = writeln!(o, "the node config is invalid:");
        for e in &p.config.errors {
            let src = e
                .source
                .as_deref()
                .map(|x| format!("{x}: "))
                .unwrap_or_default();
            let _ = writeln!(o, "  {src}{}: {}", e.path, e.reason);
        }
        return o;
    }
    if p.actions.is_empty() {
        let _ = writeln!(o, "no changes: the host matches the node config");
    }
    for a in &p.actions {
        let _ = writeln!(o, "  {}", a.description);
    }
    o
}
