//! What an unattended install does when it is done: reboot (into the installed system),
//! power off, or stay in the live system.

use kiln_spec::appliance::AfterInstall;

/// Flushes every file system and reboots or powers off; returns only for `Stay` or when the
/// kernel refused.
///
/// Under systemd the shutdown is systemd's: services stop in order and the journal still
/// carries the installer's last lines to the console and the log (a bare reboot(2) loses
/// what journald has not forwarded yet). Without systemd, or if it declines, the kernel
/// reboots directly.
pub fn after_install(after: AfterInstall) -> nix::Result<()> {
    use nix::sys::reboot::{RebootMode, reboot};
    nix::unistd::sync();
    let (mode, verb) = match after {
        AfterInstall::Stay => return Ok(()),
        AfterInstall::Reboot => (RebootMode::RB_AUTOBOOT, "reboot"),
        AfterInstall::Poweroff => (RebootMode::RB_POWER_OFF, "poweroff"),
    };
    if crate::live::systemd_running() && crate::live::systemctl(&[verb]).is_ok() {
        // systemd stops this process as part of the shutdown.
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
    reboot(mode).map(drop)
}
