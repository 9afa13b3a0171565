//! `kiln spec …`

#[derive(Debug, clap::Subcommand)]
pub enum SpecCmd {}

pub fn run(cmd: SpecCmd) -> anyhow::Result<()> {
    match cmd {}
}
