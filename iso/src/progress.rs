//! Progress display and step timings, and running external tools with their output streamed.

use std::collections::VecDeque;
use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::error::{BuildError, Result};

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

/// A tool kiln runs and the Debian package that provides it.
#[derive(Debug, Clone, Copy)]
pub struct Tool {
    pub name: &'static str,
    pub package: &'static str,
}

pub const MMDEBSTRAP: Tool = Tool {
    name: "mmdebstrap",
    package: "mmdebstrap",
};
pub const MKSQUASHFS: Tool = Tool {
    name: "mksquashfs",
    package: "squashfs-tools",
};
pub const GRUB_MKRESCUE: Tool = Tool {
    name: "grub-mkrescue",
    package: "grub-common",
};
pub const XORRISO: Tool = Tool {
    name: "xorriso",
    package: "xorriso",
};
pub const TAR: Tool = Tool {
    name: "tar",
    package: "tar",
};
pub const DEPMOD: Tool = Tool {
    name: "depmod",
    package: "kmod",
};
pub const LDD: Tool = Tool {
    name: "ldd",
    package: "libc-bin",
};
pub const STRIP: Tool = Tool {
    name: "strip",
    package: "binutils",
};
pub const ZSTD: Tool = Tool {
    name: "zstd",
    package: "zstd",
};
pub const SYSTEMCTL: Tool = Tool {
    name: "systemctl",
    package: "systemd",
};

impl Tool {
    pub fn command(&self) -> Command {
        Command::new(self.name)
    }

    /// Runs `cmd`, handing each output line (split at `\n` and `\r`, so progress bars that
    /// redraw in place arrive as lines too) to `on_line`; on failure the error carries the
    /// last lines of output. Returns the collected stdout.
    pub fn run(
        &self,
        mut cmd: Command,
        what: &str,
        mut on_line: impl FnMut(&str),
    ) -> Result<String> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| self.spawn_error(what, e))?;
        let (tx, rx) = mpsc::channel::<(bool, String)>();
        let out = child.stdout.take().expect("piped");
        let err = child.stderr.take().expect("piped");
        let tx2 = tx.clone();
        let t_out = std::thread::spawn(move || forward_lines(out, true, tx));
        let t_err = std::thread::spawn(move || forward_lines(err, false, tx2));
        let mut tail = VecDeque::new();
        let mut stdout = String::new();
        for (is_stdout, line) in rx {
            if is_stdout {
                stdout.push_str(&line);
                stdout.push('\n');
            }
            on_line(&line);
            if tail.len() == 25 {
                tail.pop_front();
            }
            tail.push_back(line);
        }
        let _ = t_out.join();
        let _ = t_err.join();
        let status = child
            .wait()
            .map_err(BuildError::io(format!("waiting for {}", self.name)))?;
        if status.success() {
            Ok(stdout)
        } else {
            Err(BuildError::ToolFailed {
                what: what.to_string(),
                tool: self.name,
                status: status.to_string(),
                log: Vec::from(tail).join("\n"),
            })
        }
    }

    /// Runs `cmd` quietly and returns its stdout.
    pub fn output(&self, cmd: Command, what: &str) -> Result<String> {
        self.run(cmd, what, |_| {})
    }

    fn spawn_error(&self, what: &str, e: std::io::Error) -> BuildError {
        if e.kind() == std::io::ErrorKind::NotFound {
            BuildError::MissingTool {
                tool: self.name,
                package: self.package,
            }
        } else {
            BuildError::Io {
                what: format!("{what}: starting {}", self.name),
                source: e,
            }
        }
    }
}

fn forward_lines(mut r: impl Read, is_stdout: bool, tx: mpsc::Sender<(bool, String)>) {
    let mut pending = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = match r.read(&mut chunk) {
            Ok(0) | Err(_) => 0,
            Ok(n) => n,
        };
        if n == 0 {
            send_line(&pending, is_stdout, &tx);
            return;
        }
        for &b in &chunk[..n] {
            if b == b'\n' || b == b'\r' {
                if !send_line(&pending, is_stdout, &tx) {
                    return;
                }
                pending.clear();
            } else {
                pending.push(b);
            }
        }
    }
}

fn send_line(bytes: &[u8], is_stdout: bool, tx: &mpsc::Sender<(bool, String)>) -> bool {
    let line = String::from_utf8_lossy(bytes).trim_end().to_string();
    line.is_empty() || tx.send((is_stdout, line)).is_ok()
}
