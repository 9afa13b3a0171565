//! Where one boot's time went, read back from its serial console. The kernel stamps its own
//! lines (`[   4.19] …`, seconds since it started), which splits everything after the kernel
//! starts; the wall clock at which the harness saw the marker gives the part before it.

use std::sync::OnceLock;
use std::time::Duration;

use regex::Regex;
use serde::Serialize;

use super::console::clean_console_line;

/// One boot, power-on → a marker line, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BootSplit {
    /// Power-on → kernel start: firmware, boot menu, loading the kernel and the initramfs.
    pub firmware_loader: f64,
    /// Kernel start → stage-1 (`/init`) runs, unpacking the initramfs included.
    pub kernel: f64,
    /// Stage-1: modules, finding and mounting the root image, until the root image's systemd
    /// first speaks.
    pub stage1: f64,
    /// systemd → the marker.
    pub userspace: f64,
}

impl BootSplit {
    /// Splits a boot whose `marker` line the harness saw `seen_at` after power-on. None when the
    /// console lacks a step (a boot that never reached stage-1, or a marker the kernel did not
    /// stamp).
    pub fn from_console(console: &str, marker: &str, seen_at: Duration) -> Option<BootSplit> {
        // Keyed on the kernel's and systemd's own lines: stage-1's unstamped ones may come out
        // interleaved with kernel messages on a shared serial line.
        let mut init = None;
        let mut systemd = None;
        for raw in console.lines() {
            let line = clean_console_line(raw);
            if init.is_none() {
                init = stamp_before(&line, "Run /init as init process");
                continue;
            }
            if systemd.is_none() {
                systemd = stamp_before(&line, "systemd[1]: ");
            }
            if let (Some(init), Some(root_init)) = (init, systemd)
                && let Some(at) = stamp_before(&line, marker)
            {
                return Some(BootSplit {
                    firmware_loader: (seen_at.as_secs_f64() - at).max(0.0),
                    kernel: init,
                    stage1: root_init - init,
                    userspace: at - root_init,
                });
            }
        }
        None
    }
}

/// The kernel's stamp on a console line (`[   4.194890]`), seconds captured. A process's
/// `[pid]` and systemd's `[  OK  ]` are not stamps.
const STAMP: &str = r"\[\s*([0-9]+\.[0-9]+)\]";

/// A console line the kernel stamped ahead of `marker`, as [`BootSplit::from_console`] reads
/// it: for waiting until that copy of a line has come out.
pub fn stamped_marker(marker: &str) -> Regex {
    Regex::new(&format!("{STAMP}.*{}", regex::escape(marker)))
        .expect("an escaped marker makes a valid regex")
}

/// The kernel's timestamp of the line that carries `keyword`, in seconds: the last stamp
/// before it. Other writers share the serial line and may put their text ahead of the stamp
/// (systemd's `[  OK  ] Started …` comes out at the moment the journal's copy of the agent's
/// ready line does); a stamp after the keyword belongs to a kernel message behind it.
fn stamp_before(line: &str, keyword: &str) -> Option<f64> {
    static STAMPS: OnceLock<Regex> = OnceLock::new();
    let head = &line[..line.find(keyword)?];
    let stamps = STAMPS.get_or_init(|| Regex::new(STAMP).expect("static regex"));
    stamps.captures_iter(head).last()?[1].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines as an installed node's console shows them (trimmed), escapes included.
    const CONSOLE: &str = "\
\x1b[0m\x1b[30m\x1b[47mWelcome to GRUB!
[    0.000000] Linux version 6.1.0-50-amd64
[    4.194890] Run /init as init process
kiln-stage1: started
[    4.447278] SCSI subsystem initialized
kiln-stage1: loaded 49 kernel modules
kiln-stage1: switching root
[    6.237695] Not activating Mandatory Access Control as /sbin/tomoyo-init does not exist.
[    6.784288] systemd[1]: Failed to find module 'autofs4'
[    7.091265] systemd[1]: systemd 252.39-1~deb12u2 running in system mode
[\x1b[0;32m  OK  \x1b[0m] Started \x1b[0;1;39mkiln-agent.service\x1b[0m - kiln node agent.
kiln-agent ready node=kiln-5254004b494c slot=A
[   19.010142] kiln[192]: kiln-agent ready node=kiln-5254004b494c slot=A
";

    #[test]
    fn splits_a_boot_at_the_kernel_stamps() {
        let split =
            BootSplit::from_console(CONSOLE, "kiln-agent ready", Duration::from_secs_f64(30.5))
                .unwrap();
        let close = |a: f64, b: f64| (a - b).abs() < 1e-6;
        assert!(close(split.firmware_loader, 30.5 - 19.010142), "{split:?}");
        assert!(close(split.kernel, 4.194890), "{split:?}");
        assert!(close(split.stage1, 6.784288 - 4.194890), "{split:?}");
        assert!(close(split.userspace, 19.010142 - 6.784288), "{split:?}");
    }

    #[test]
    fn a_boot_missing_a_step_has_no_split() {
        let no_systemd: String = CONSOLE
            .lines()
            .filter(|l| !l.contains("systemd[1]"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(
            BootSplit::from_console(&no_systemd, "kiln-agent ready", Duration::ZERO),
            None
        );
        assert_eq!(
            BootSplit::from_console(CONSOLE, "never printed", Duration::ZERO),
            None
        );
    }

    #[test]
    fn a_marker_line_with_other_text_ahead_of_its_stamp_still_splits() {
        // systemd wrote the start of its status line as the kernel printed the journal's copy.
        let console = CONSOLE.replace(
            "[   19.010142] kiln[192]",
            "[\x1b[0;32m  OK  [   19.010142] kiln[192]",
        );
        assert_eq!(
            BootSplit::from_console(&console, "kiln-agent ready", Duration::from_secs_f64(30.5)),
            BootSplit::from_console(CONSOLE, "kiln-agent ready", Duration::from_secs_f64(30.5)),
        );
        let line = "[  OK  [   19.010142] kiln[192]: kiln-agent ready node=n slot=A";
        assert!(stamped_marker("kiln-agent ready").is_match(line));
    }

    #[test]
    fn a_line_takes_the_last_kernel_stamp_before_its_keyword() {
        let ready = "kiln-agent ready";
        assert_eq!(
            stamp_before("[   19.010142] kiln[192]: kiln-agent ready", ready),
            Some(19.010142)
        );
        assert_eq!(
            stamp_before("[  OK  [   18.117284] kiln[191]: kiln-agent ready", ready),
            Some(18.117284)
        );
        // A process's [pid] and systemd's [  OK  ] are not stamps.
        assert_eq!(stamp_before("kiln[191]: kiln-agent ready", ready), None);
        assert_eq!(
            stamp_before("[  OK  ] Started kiln-agent ready", ready),
            None
        );
        // A kernel message that came out behind the line.
        assert_eq!(
            stamp_before("kiln-agent ready slot=A[   41.203] random", ready),
            None
        );
        assert!(!stamped_marker(ready).is_match("kiln-agent ready slot=A[   41.203] random"));
        assert_eq!(stamp_before("[   19.010142] other", ready), None);
    }
}
