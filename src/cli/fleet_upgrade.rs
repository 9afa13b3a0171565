//! `kiln fleet upgrade`: a rolling A/B upgrade of an inventory's nodes through their agents'
//! network APIs, a few nodes at a time, each in cluster maintenance while it reboots when the
//! fleet has a cluster; it stops at the first node that fails and resumes from the state
//! directory.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use kiln_cluster::ceph::CephCli;
use kiln_cluster::maintenance::EnterOptions;
use kiln_fleet::cluster::FleetSecrets;
use kiln_fleet::remote::NodeApi;
use kiln_fleet::rolling::{
    AgentActuator, ClusterAccess, RollingUpgrade, UpgradeOptions, read_status, request_upgrade,
};
use kiln_fleet::upgrade::{self, Preflight, UpgradeLimits, UpgradeStage};
use kiln_fleet::{plan, status};
use kiln_installer::upgrade::{ImageRef, ROOTFS};
use kiln_spec::Inventory;
use serde::Serialize;

use super::cluster::CephArgs;
use super::output::OutputArgs;
use super::parse_duration;

#[derive(Debug, clap::Args)]
#[command(
    override_usage = "kiln fleet upgrade --inventory <FILE> --image <URL> --trusted-key <FILE>
       [OPTIONS]"
)]
pub struct UpgradeArgs {
    /// Fleet inventory (kind: Inventory)
    #[arg(long, value_name = "FILE")]
    inventory: PathBuf,
    /// Base URL of the signed build the nodes download (manifest.json, its signature, pxe/)
    #[arg(long, value_name = "URL")]
    image: String,
    /// Upgrade only to a build signed by this key (NAME.pub); each node also checks the
    /// signature against the keys its running image trusts
    #[arg(long, value_name = "FILE")]
    trusted_key: PathBuf,
    /// Which nodes: names, globs, role=R, label=V, comma-separated [default: all]; they go in
    /// inventory order
    #[arg(long, value_name = "SELECTOR")]
    nodes: Option<String>,
    /// Nodes out of service at once
    #[arg(long, value_name = "N", default_value_t = 1)]
    max_unavailable: usize,
    /// Kubeconfig of the nodes' cluster: each node enters maintenance (VMs migrated, pods
    /// evicted, Ceph noout) before its upgrade and leaves it once its new slot is blessed
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    #[command(flatten)]
    ceph: CephArgs,
    /// Enter maintenance even when Ceph says a node's OSDs cannot stop without data becoming
    /// unavailable
    #[arg(long)]
    allow_storage_outage: bool,
    /// Deadline to enter (or leave) maintenance
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "20m")]
    maintenance_timeout: Duration,
    /// Deadline from the slot written to the new slot booted and blessed
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "30m")]
    boot_timeout: Duration,
    /// The fleet's state directory: its credentials, and the upgrade's progress
    #[arg(long, value_name = "DIR", default_value = "/var/lib/kiln/fleet")]
    state_dir: PathBuf,
    /// Show the order and each node's preflight (its agent checks the image without writing
    /// it); change nothing
    #[arg(long)]
    dry_run: bool,
    /// Append every stage change as a JSON line to this file
    #[arg(long, value_name = "FILE")]
    events: Option<PathBuf>,
    #[command(flatten)]
    output: OutputArgs,
}

/// One node's line of a dry run.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct DryRunNode {
    wave: usize,
    node: String,
    /// What the node runs now.
    current: Option<String>,
    /// What would happen, or why it would not.
    verdict: String,
    ok: bool,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct DryRun {
    image: String,
    image_sha256: String,
    maintenance: bool,
    nodes: Vec<DryRunNode>,
}

impl DryRun {
    fn render(&self) -> String {
        let mut s = format!(
            "upgrade to {} ({}){}\n",
            self.image,
            &self.image_sha256[..12.min(self.image_sha256.len())],
            if self.maintenance {
                ", each node in maintenance"
            } else {
                ", no cluster maintenance (no --kubeconfig)"
            }
        );
        for n in &self.nodes {
            s.push_str(&format!(
                "wave {:<3} {:<16} {:<28} {}\n",
                n.wave,
                n.node,
                n.current.as_deref().unwrap_or("-"),
                n.verdict
            ));
        }
        s
    }
}

pub fn run(a: UpgradeArgs) -> anyhow::Result<()> {
    let source = ImageRef::parse(&a.image);
    if !matches!(source, ImageRef::Url(_)) {
        bail!(
            "--image {}: give the build's base URL (http:// or https://), which every node \
             downloads from",
            a.image
        );
    }
    // The operator's key first: nothing is asked of any node for a build it does not sign.
    let key = super::key::load_public_key(&a.trusted_key)?;
    let signed = kiln_installer::upgrade::fetch_manifest(
        &source,
        &kiln_installer::upgrade::Trust::signed_by(vec![key]),
        kiln_installer::FETCH_PATIENCE,
    )
    .context("checking the build's signature")?;
    let image_sha256 = signed
        .manifest
        .sha256_of(ROOTFS)
        .with_context(|| format!("{}: the manifest lists no {ROOTFS}", a.image))?
        .to_string();
    let inventory = Inventory::load(&a.inventory)
        .with_context(|| format!("loading the inventory {}", a.inventory.display()))?;
    let selected = plan::select(&inventory, a.nodes.as_deref()).map_err(anyhow::Error::msg)?;
    let secrets = FleetSecrets::load(&a.state_dir)?;
    let mut apis = BTreeMap::new();
    let mut problems = Vec::new();
    for n in &selected {
        match NodeApi::new(n, &secrets, None) {
            Ok(api) => {
                apis.insert(n.name.clone(), Arc::new(api));
            }
            Err(e) => problems.push(e.to_string()),
        }
    }
    if !problems.is_empty() {
        bail!("nothing was started:\n  {}", problems.join("\n  "));
    }
    let order: Vec<String> = selected.iter().map(|n| n.name.clone()).collect();
    let rt = super::runtime()?;
    let cluster = match &a.kubeconfig {
        None => None,
        Some(path) => Some(Arc::new(ClusterAccess {
            client: rt
                .block_on(kiln_cluster::kube_client::from_kubeconfig(path))
                .with_context(|| format!("connecting with {}", path.display()))?,
            ceph: Box::new(CephCli::new(&a.ceph.ceph_command)?),
            enter: EnterOptions {
                dry_run: false,
                timeout: a.maintenance_timeout,
                allow_storage_outage: a.allow_storage_outage,
            },
        })),
    };
    eprintln!(
        "build {} signed by {}",
        &image_sha256[..12],
        signed.signed_by
    );
    if a.dry_run {
        let report = rt.block_on(dry_run(&a, &order, &apis, &image_sha256, cluster.is_some()));
        a.output.emit(&report, DryRun::render)?;
        let refused = report.nodes.iter().filter(|n| !n.ok).count();
        if refused > 0 {
            bail!("{refused} node(s) would not be upgraded");
        }
        return Ok(());
    }
    let opts = UpgradeOptions {
        state_dir: a.state_dir.clone(),
        limits: UpgradeLimits {
            max_unavailable: a.max_unavailable.max(1),
            maintenance: cluster.is_some(),
            maintenance_timeout: a.maintenance_timeout,
            boot_timeout: a.boot_timeout,
            ..UpgradeLimits::default()
        },
        image: a.image.clone(),
        image_sha256: image_sha256.clone(),
        events: a.events.clone(),
    };
    let handle = rt.handle().clone();
    let image = a.image.clone();
    let rolling = RollingUpgrade::new(&order, &opts, |shared| {
        Arc::new(AgentActuator {
            runtime: handle,
            apis,
            image,
            cluster,
            shared,
        })
    })
    .context("opening the upgrade state")?;
    eprintln!(
        "upgrading {} node(s), {} at a time; state in {}",
        order.len(),
        opts.limits.max_unavailable,
        a.state_dir.display()
    );
    let stopper = rolling.stopper();
    rt.spawn(async move {
        super::wait_for_signal().await;
        eprintln!("stopping: progress is kept; run the same command again to resume");
        stopper.stop();
    });
    let results = rolling.run(Duration::from_secs(1));
    let snapshot = kiln_fleet::store::Snapshot {
        upgrade: Some(kiln_fleet::store::UpgradeInfo {
            image: opts.image.clone(),
            image_sha256: opts.image_sha256.clone(),
            started_ms: 0,
            nodes: order.clone(),
        }),
        upgrades: results.clone(),
        ..Default::default()
    };
    if let Some(view) = status::upgrade_view(&snapshot, kiln_fleet::rollout::now_ms()) {
        print!("{}", status::upgrade_table(&view));
    }
    if let Some((node, p)) = results
        .iter()
        .find(|(_, p)| p.stage == UpgradeStage::Failed)
    {
        let reason = p.failure.as_ref().map_or("", |f| f.reason.as_str());
        let left = results.iter().filter(|(_, p)| !p.stage.is_done()).count();
        bail!(
            "node {node} failed: {reason}; stopped with {left} node(s) not upgraded (run the \
             same command again to retry)"
        );
    }
    let unfinished = results.iter().filter(|(_, p)| !p.stage.is_done()).count();
    if unfinished > 0 {
        bail!("stopped with {unfinished} node(s) unfinished");
    }
    Ok(())
}

/// Each node's preflight, in upgrade order: its status, and its agent's own dry run of the
/// upgrade (which fetches and checks the image, and plans the slot write).
async fn dry_run(
    a: &UpgradeArgs,
    order: &[String],
    apis: &BTreeMap<String, Arc<NodeApi>>,
    image_sha256: &str,
    maintenance: bool,
) -> DryRun {
    let mut nodes = Vec::new();
    for (i, wave) in upgrade::waves(order, a.max_unavailable).iter().enumerate() {
        for name in wave {
            let api = &apis[name];
            let mut row = DryRunNode {
                wave: i + 1,
                node: name.clone(),
                current: None,
                verdict: String::new(),
                ok: false,
            };
            match read_status(api).await {
                Err(e) => row.verdict = format!("cannot be reached: {e}"),
                Ok(st) => {
                    row.current = st.boot.as_ref().map(|b| {
                        format!(
                            "slot {} gen {} {}",
                            b.booted.slot.letter(),
                            b.booted.generation.map_or("-".into(), |g| g.to_string()),
                            b.booted.image.as_ref().map_or("-".to_string(), |i| i
                                .rootfs_sha256
                                .chars()
                                .take(12)
                                .collect())
                        )
                    });
                    match upgrade::preflight(&st, image_sha256) {
                        Err(e) => row.verdict = format!("refused: {e}"),
                        Ok(Preflight::AlreadyDone(_)) => {
                            row.ok = true;
                            row.verdict = "already runs this build".into();
                        }
                        Ok(Preflight::OnTrial(_)) => {
                            row.ok = true;
                            row.verdict = "runs this build on trial: waits for its verdict".into();
                        }
                        Ok(Preflight::Go(_)) => match request_upgrade(api, &a.image, true).await {
                            Err(e) => row.verdict = format!("refused: {e}"),
                            Ok(r) => {
                                row.ok = true;
                                row.verdict = format!(
                                    "would write slot {} (generation {}) and reboot",
                                    r.plan.target.letter(),
                                    r.plan.entry.generation
                                );
                            }
                        },
                    }
                }
            }
            nodes.push(row);
        }
    }
    DryRun {
        image: a.image.clone(),
        image_sha256: image_sha256.to_string(),
        maintenance,
        nodes,
    }
}
