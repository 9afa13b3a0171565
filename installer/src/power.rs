//! What an unattended install does when it is done: reboot (into the installed system),
//! power off, or stay in the live system.

use kiln_spec::appliance::AfterInstall;

/// Flushes every file system and reboots or powers off; returns only for `Stay` or when the
/// kernel refused.
pub fn after_install(after: AfterInstall) -> nix::Result<()> {
    use nix::sys::reboot::{RebootMode, reboot};
    nix::unistd::sync();
    let mode = match after {
        AfterInstall::Stay => return Ok(()),
        AfterInstall::Reboot => RebootMode::RB_AUTOBOOT,
        AfterInstall::Poweroff => RebootMode::RB_POWER_OFF,
    };
    reboot(mode).map(drop)
}
