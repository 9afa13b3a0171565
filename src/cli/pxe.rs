//! `kiln pxe serve|trace`: the netboot services and the boot timeline of one machine.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use kiln_netboot::config::ServeConfig;
use kiln_netboot::enrol::MemoryEnrolment;
use kiln_netboot::trace::{TRACE_FILE, read_events, timeline};
use kiln_spec::inventory::{format_mac, parse_mac};

use crate::cli::output::OutputArgs;

#[derive(Debug, clap::Subcommand)]
pub enum PxeCmd {
    /// Serve DHCP (proxy or authoritative), TFTP and HTTP iPXE to netbooting machines
    Serve(Box<ServeArgs>),
    /// Print one machine's boot timeline, with failed steps and why
    Trace(TraceArgs),
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// YAML file with these settings, keys named like the long options; options given on
    /// the command line override it
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    opts: ServeConfig,
}

#[derive(Debug, clap::Args)]
pub struct TraceArgs {
    /// MAC address of the machine (aa:bb:cc:dd:ee:ff)
    mac: String,
    /// State directory of the server
    #[arg(long, value_name = "DIR", default_value = "/var/lib/kiln/pxe")]
    state: PathBuf,
    #[command(flatten)]
    output: OutputArgs,
}

pub fn run(cmd: PxeCmd) -> anyhow::Result<()> {
    match cmd {
        PxeCmd::Serve(args) => serve(*args),
        PxeCmd::Trace(args) => trace(args),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let opts = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let file = ServeConfig::from_yaml(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            args.opts.merged_over(file)
        }
        None => args.opts,
    };
    let resolved = opts
        .resolve()
        .map_err(|errors| anyhow::anyhow!("invalid settings:\n  {}", errors.join("\n  ")))?;
    let enrolment = Arc::new(MemoryEnrolment::new(&resolved.inventory));
    let trace = kiln_netboot::server::open_trace(&resolved.settings.state_dir)?;
    let rt = crate::cli::runtime()?;
    rt.block_on(async move {
        let shutdown = kiln_netboot::server::CancellationToken::new();
        let signal = shutdown.clone();
        tokio::spawn(async move {
            super::wait_for_signal().await;
            tracing::info!("shutting down");
            signal.cancel();
        });
        kiln_netboot::server::serve(
            resolved.settings,
            tokio::sync::watch::channel(resolved.inventory).1,
            resolved.appliance,
            enrolment,
            trace,
            shutdown,
        )
        .await
        .context("serving netboot")
    })
}

fn trace(args: TraceArgs) -> anyhow::Result<()> {
    let mac = parse_mac(&args.mac)
        .with_context(|| format!("{:?} is not a MAC address like aa:bb:cc:dd:ee:ff", args.mac))?;
    let mac = format_mac(&mac);
    let events = read_events(&args.state.join(TRACE_FILE), &mac)?;
    args.output.emit(&events, |e| timeline(&mac, e))
}
