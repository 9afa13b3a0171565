//! `kiln`: one binary for building, installing, provisioning and converging hyperconverged
//! appliance nodes (its stage-1, `kiln-init`, is built beside it). This file only parses the
//! command line and dispatches.

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

mod cli;

#[derive(Debug, Parser)]
#[command(
    name = "kiln",
    version,
    about = "Build, install, provision and converge appliance nodes"
)]
struct Cli {
    /// More log output (-v debug, -vv trace); KILN_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Build the OS image, hybrid ISO and PXE bundle from an appliance spec
    Build(cli::build::BuildArgs),
    /// Keys that sign builds, and checking a signed build
    #[command(subcommand)]
    Key(cli::key::KeyCmd),
    /// Validate, show and describe appliance specs
    #[command(subcommand)]
    Spec(cli::spec::SpecCmd),
    /// Day-2 operations on one node: status, plan, apply, maintenance
    #[command(subcommand)]
    Node(cli::node::NodeCmd),
    /// The node agent that keeps this host converged
    #[command(subcommand)]
    Agent(cli::agent::AgentCmd),
    /// Out-of-band control over IPMI or Redfish: power, boot device, inventory, event log
    #[command(subcommand)]
    Bmc(cli::bmc::BmcCmd),
    /// Roll an inventory out: BMC power, netboot and unattended install of every node
    #[command(subcommand)]
    Fleet(cli::fleet::FleetCmd),
    /// Netboot services (DHCP, TFTP, HTTP iPXE) and boot traces
    #[command(subcommand)]
    Pxe(cli::pxe::PxeCmd),
    /// Install the appliance onto this machine's disk (run in the live system)
    Install(cli::install::InstallArgs),
    /// The local virtual rack: QEMU machines for trying and testing installs
    #[command(subcommand)]
    Lab(cli::lab::LabCmd),
    /// The Kubernetes layer: addon bootstrap from pinned manifests, cluster status
    #[command(subcommand)]
    Cluster(cli::cluster::ClusterCmd),
    /// Print a shell completion script
    Completions(cli::docs::CompletionsArgs),
    /// Write man pages for every command
    #[command(hide = true)]
    Man(cli::docs::ManArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli::init_logging(cli.verbose);
    // One TLS provider for the whole process (rustls + ring), installed before any client:
    // the agent's threads and the commands' runtimes all build clients.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let result = match cli.cmd {
        Cmd::Build(a) => cli::build::run(a),
        Cmd::Spec(c) => cli::spec::run(c),
        Cmd::Key(c) => cli::key::run(c),
        Cmd::Node(c) => cli::node::run(c),
        Cmd::Agent(c) => cli::agent::run(c),
        Cmd::Bmc(c) => cli::bmc::run(c),
        Cmd::Fleet(c) => cli::fleet::run(c),
        Cmd::Pxe(c) => cli::pxe::run(c),
        Cmd::Install(a) => cli::install::run(a),
        Cmd::Lab(c) => cli::lab::run(c),
        Cmd::Cluster(c) => cli::cluster::run(c),
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
