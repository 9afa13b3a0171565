//! `kiln`: one multi-call binary for building, installing, provisioning and converging
//! hyperconverged appliance nodes. This file only parses the command line and dispatches.

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

mod cli;

#[derive(Debug, Parser)]
#[command(name = "kiln", version, about = "Build, install, provision and converge appliance nodes")]
struct Cli {
    /// More log output (-v debug, -vv trace); KILN_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Validate, show and describe appliance specs
    #[command(subcommand)]
    Spec(cli::spec::SpecCmd),
    /// Day-2 operations on one node: status, plan, apply, maintenance
    #[command(subcommand)]
    Node(cli::node::NodeCmd),
    /// Print a shell completion script
    Completions(cli::docs::CompletionsArgs),
    /// Write man pages for every command
    #[command(hide = true)]
    Man(cli::docs::ManArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli::init_logging(cli.verbose);
    let result = match cli.cmd {
        Cmd::Spec(c) => cli::spec::run(c),
        Cmd::Node(c) => cli::node::run(c),
        Cmd::Completions(a) => cli::docs::completions(a, Cli::command()),
        Cmd::Man(a) => cli::docs::man(a, Cli::command()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiln: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
