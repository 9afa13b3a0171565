//! `kiln cluster …` and the cluster-side part of `kiln node …`.

#[derive(Debug, clap::Subcommand)]
pub enum NodeClusterCmd {}

pub fn run_node(cmd: NodeClusterCmd) -> anyhow::Result<()> {
    match cmd {}
}
