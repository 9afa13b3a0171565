//! The live system around an unattended install. Stage-1 boots only
//! [`INSTALL_TARGET`](crate::stage1::INSTALL_TARGET); the installer brings up the rest of the
//! live system (network, name resolution, logins) when the install reaches the network or
//! stays in the live system afterwards. A failed install brings it up through the unit's
//! `OnFailure=`, so someone can log in and look. Without systemd (a manual `kiln install`
//! elsewhere) there is nothing to start.

use std::path::Path;
use std::process::Command;

/// Starts the live system's `multi-user.target` without waiting for it.
pub fn start_full_system() -> Result<(), String> {
    if !systemd_running() {
        return Ok(());
    }
    systemctl(&["start", "--no-block", "multi-user.target"])
}

/// Starts the live system and waits until `network-online.target` is reached (the image's
/// wait-online decides what online means, and bounds the wait). A network that never came
/// up shows as the first fetch's error.
pub fn wait_for_network() -> Result<(), String> {
    if !systemd_running() {
        return Ok(());
    }
    start_full_system()?;
    systemctl(&["start", "network-online.target"])
}

/// `true` when systemd runs this system.
pub fn systemd_running() -> bool {
    Path::new("/run/systemd/system").exists()
}

/// Runs `systemctl ARGS`.
pub fn systemctl(args: &[&str]) -> Result<(), String> {
    let status = Command::new("systemctl")
        .args(args)
        .status()
        .map_err(|e| format!("running systemctl: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("systemctl {}: {status}", args.join(" ")))
    }
}
