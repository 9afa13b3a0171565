//! One module per noun of the command line; each exposes its clap types and `run`.

pub mod agent;
pub mod bmc;
pub mod build;
pub mod cluster;
pub mod docs;
pub mod fleet;
pub mod fleet_controller;
pub mod fleet_resources;
pub mod fleet_upgrade;
pub mod install;
pub mod key;
pub mod lab;
pub mod node;
pub mod output;
pub mod pxe;
pub mod spec;

/// Logs go to stderr so that `--output json` on stdout stays machine-readable.
pub fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    // kube's client logs every failed request at ERROR, without saying what it was for; kiln
    // reports the failures that matter with their context (and polls an API server that is
    // still starting on purpose).
    let default = match verbose {
        0 => "info,kube_client::client::builder=off",
        1 => "debug,kube_client::client::builder=off",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_env("KILN_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    // Colour only on a terminal: under systemd, stderr goes to journald and the console.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// A tokio runtime for the commands that need one; most of kiln's CLI is synchronous.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Parses command-line durations like `500ms`, `90s`, `15m` or `1h 30m`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration like 500ms, 90s or 15m: {e}"))
}

/// Resolves on SIGINT or SIGTERM (never, if the handlers cannot be installed).
pub async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}
