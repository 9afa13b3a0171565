//! `kiln node …`: day-2 commands for one node. Local host state (status, plan, apply) is the
//! agent's; cluster-side maintenance (cordon, maintenance mode) is the cluster layer's.

#[derive(Debug, clap::Subcommand)]
pub enum NodeCmd {
    #[command(flatten)]
    Local(super::agent::NodeLocalCmd),
    #[command(flatten)]
    Cluster(super::cluster::NodeClusterCmd),
}

pub fn run(cmd: NodeCmd) -> anyhow::Result<()> {
    match cmd {
        NodeCmd::Local(c) => super::agent::run_node(c),
        NodeCmd::Cluster(c) => super::cluster::run_node(c),
    }
}
