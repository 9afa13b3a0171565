//! `kiln agent …` and the node-local part of `kiln node …`.

#[derive(Debug, clap::Subcommand)]
pub enum NodeLocalCmd {}

pub fn run_node(cmd: NodeLocalCmd) -> anyhow::Result<()> {
    match cmd {}
}
