//! Progress display and step timings, and the external tools the build runs.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

/// How long one pipeline step took, and what it did (e.g. "cache hit").
#[derive(Debug, Clone, Serialize)]
pub struct StepTiming {
    pub step: String,
    pub seconds: f64,
    pub note: String,
}

/// Draws a spinner or bar per step (only on a terminal: indicatif hides them otherwise) and
/// logs one line per finished step, so logs and tests see the same facts as the user.
#[derive(Debug, Default)]
pub struct Reporter {
    pub timings: Vec<StepTiming>,
}

impl Reporter {
    pub fn spinner(&self, step: &str) -> ProgressBar {
        let pb = ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {prefix:>10} [{elapsed}] {wide_msg}")
                .expect("static template"),
        );
        pb.set_prefix(step.to_string());
        pb.enable_steady_tick(Duration::from_millis(120));
        pb
    }

    pub fn bar(&self, step: &str, len: u64) -> ProgressBar {
        let pb = ProgressBar::new(len).with_style(
            ProgressStyle::with_template(
                "{spinner} {prefix:>10} [{elapsed}] {bar:30} {pos}/{len} {wide_msg}",
            )
            .expect("static template"),
        );
        pb.set_prefix(step.to_string());
        pb.enable_steady_tick(Duration::from_millis(120));
        pb
    }

    /// Ends a step: clears its bar, records and logs the timing.
    pub fn done(
        &mut self,
        pb: &ProgressBar,
        step: &str,
        started: Instant,
        note: impl Into<String>,
    ) {
        pb.finish_and_clear();
        let note = note.into();
        let seconds = started.elapsed().as_secs_f64();
        tracing::info!("step {step}: {note} ({seconds:.1} s)");
        self.timings.push(StepTiming {
            step: step.to_string(),
            seconds,
            note,
        });
    }
}

pub use kiln_exec::Tool;

pub const MMDEBSTRAP: Tool = Tool::new("mmdebstrap", "mmdebstrap");
pub const MKSQUASHFS: Tool = Tool::new("mksquashfs", "squashfs-tools");
pub const GRUB_MKRESCUE: Tool = Tool::new("grub-mkrescue", "grub-common");
pub const XORRISO: Tool = Tool::new("xorriso", "xorriso");
pub const TAR: Tool = Tool::new("tar", "tar");
pub const DEPMOD: Tool = Tool::new("depmod", "kmod");
pub const LDD: Tool = Tool::new("ldd", "libc-bin");
pub const STRIP: Tool = Tool::new("strip", "binutils");
pub const ZSTD: Tool = Tool::new("zstd", "zstd");
pub const SYSTEMCTL: Tool = Tool::new("systemctl", "systemd");
