//! `kiln fleet crds|import`: the fleet as Kubernetes resources — the Machine and Rollout
//! definitions, and an inventory imported as Machines with their BMC passwords in Secrets.

use std::path::PathBuf;

use anyhow::Context;
use kiln_fleet::crd;
use kiln_spec::Inventory;

use super::output::OutputArgs;

#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// Fleet inventory (kind: Inventory)
    #[arg(long, value_name = "FILE")]
    inventory: PathBuf,
    /// The cluster to keep the fleet in
    #[arg(long, value_name = "FILE", env = "KUBECONFIG")]
    kubeconfig: PathBuf,
    /// Namespace of the Machines and their Secrets
    #[arg(long, value_name = "NAME", default_value = "kiln-system")]
    namespace: String,
    /// Print the Machines (YAML) instead of applying anything; no password is read
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    output: OutputArgs,
}

/// The custom resource definitions, as YAML documents for `kubectl apply -f -`.
pub fn crds_cmd() -> anyhow::Result<()> {
    for crd in crd::definitions() {
        print!("---\n{}", serde_saphyr::to_string(&crd)?);
    }
    Ok(())
}

pub fn import_cmd(a: ImportArgs) -> anyhow::Result<()> {
    let inventory = Inventory::load(&a.inventory)
        .with_context(|| format!("loading the inventory {}", a.inventory.display()))?;
    let plan = crd::machines_from(&inventory, &a.namespace);
    if a.dry_run {
        for m in &plan.machines {
            print!("---\n{}", serde_saphyr::to_string(m)?);
        }
        return Ok(());
    }
    let base = a.inventory.parent().map(PathBuf::from).unwrap_or_default();
    let imported = super::runtime()?.block_on(async {
        let client = kiln_cluster::kube_client::from_kubeconfig(&a.kubeconfig).await?;
        anyhow::Ok(crd::import(&client, &plan, &a.namespace, &base).await?)
    })?;
    a.output.emit(&imported, |i| {
        format!(
            "applied {} Machine(s) and {} BMC Secret(s) in namespace {}\n",
            i.machines.len(),
            i.secrets.len(),
            i.namespace
        )
    })
}
