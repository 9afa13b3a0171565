//! kiln-exec: running the external tools kiln drives (mkfs, mtools, GRUB, mmdebstrap, ip, …).
//! One runner for the image build, the installer and the lab: output streamed line by line
//! (progress bars that redraw with `\r` arrive as lines too), and errors that say what kiln was
//! doing, which tool failed with its last lines of output, or which Debian package is missing.

use std::borrow::BorrowMut;
use std::collections::VecDeque;
use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::mpsc;

/// How many lines of output a failure carries.
const TAIL_LINES: usize = 25;

/// A tool kiln runs and the Debian package that provides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tool {
    pub name: &'static str,
    pub package: &'static str,
}

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error(
        "{tool} is not installed (Debian package {package}; scripts/install-deps.sh installs it)"
    )]
    Missing { tool: String, package: String },
    #[error("{what}: starting {tool}: {source}")]
    Start {
        what: String,
        tool: String,
        source: std::io::Error,
    },
    #[error("{what}: {command} failed ({status})\n{log}")]
    Failed {
        what: String,
        command: String,
        status: String,
        /// The last lines of its output, stdout and stderr interleaved.
        log: String,
    },
}

impl Tool {
    pub const fn new(name: &'static str, package: &'static str) -> Tool {
        Tool { name, package }
    }

    pub fn command(&self) -> Command {
        Command::new(self.name)
    }

    /// Runs `cmd` (built from [`Tool::command`]), handing each output line to `on_line`;
    /// returns the collected stdout. `what` says what kiln was doing, for the error.
    pub fn run(
        &self,
        mut cmd: impl BorrowMut<Command>,
        what: &str,
        on_line: impl FnMut(&str),
    ) -> Result<String, ToolError> {
        run_lines(cmd.borrow_mut(), what, self.package, on_line)
    }

    /// Runs `cmd` quietly and returns its stdout.
    pub fn output(&self, cmd: impl BorrowMut<Command>, what: &str) -> Result<String, ToolError> {
        self.run(cmd, what, |_| {})
    }
}

/// Runs any command quietly and returns its stdout; a missing program is reported without a
/// package name.
pub fn output(mut cmd: impl BorrowMut<Command>, what: &str) -> Result<String, ToolError> {
    run_lines(cmd.borrow_mut(), what, "unknown", |_| {})
}

/// The command line as a person would type it.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

fn run_lines(
    cmd: &mut Command,
    what: &str,
    package: &str,
    mut on_line: impl FnMut(&str),
) -> Result<String, ToolError> {
    let command = describe(cmd);
    let tool = cmd.get_program().to_string_lossy().into_owned();
    tracing::debug!(%command, "running");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            ToolError::Missing {
                tool: tool.clone(),
                package: package.to_string(),
            }
        } else {
            ToolError::Start {
                what: what.to_string(),
                tool: tool.clone(),
                source,
            }
        }
    })?;
    let (tx, rx) = mpsc::channel::<(bool, String)>();
    let out = child.stdout.take().expect("piped");
    let err = child.stderr.take().expect("piped");
    let tx2 = tx.clone();
    let t_out = std::thread::spawn(move || forward_lines(out, true, tx));
    let t_err = std::thread::spawn(move || forward_lines(err, false, tx2));
    let mut tail = VecDeque::new();
    for (_, line) in rx {
        on_line(&line);
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }
    // Callers parse stdout (JSON, status codes), so it comes back byte for byte.
    let stdout = String::from_utf8_lossy(&t_out.join().unwrap_or_default()).into_owned();
    let _ = t_err.join();
    let status = child.wait().map_err(|source| ToolError::Start {
        what: what.to_string(),
        tool: tool.clone(),
        source,
    })?;
    if status.success() {
        Ok(stdout)
    } else {
        Err(ToolError::Failed {
            what: what.to_string(),
            command,
            status: status.to_string(),
            log: Vec::from(tail).join("\n"),
        })
    }
}

/// Sends every line read from `r` and returns all of it (kept only for stdout).
fn forward_lines(mut r: impl Read, is_stdout: bool, tx: mpsc::Sender<(bool, String)>) -> Vec<u8> {
    let mut all = Vec::new();
    let mut pending = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = r.read(&mut chunk).unwrap_or(0);
        if n == 0 {
            send_line(&pending, is_stdout, &tx);
            return all;
        }
        if is_stdout {
            all.extend_from_slice(&chunk[..n]);
        }
        for &b in &chunk[..n] {
            if b == b'\n' || b == b'\r' {
                send_line(&pending, is_stdout, &tx);
                pending.clear();
            } else {
                pending.push(b);
            }
        }
    }
}

fn send_line(bytes: &[u8], is_stdout: bool, tx: &mpsc::Sender<(bool, String)>) {
    let line = String::from_utf8_lossy(bytes).trim_end().to_string();
    if !line.is_empty() {
        // The receiver lives until both readers finish.
        let _ = tx.send((is_stdout, line));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stdout_is_returned_and_every_line_seen() {
        let mut seen = Vec::new();
        let out = Tool::new("sh", "dash")
            .run(
                Command::new("sh")
                    .args(["-c", "echo one; printf 'two\\rthree\\n200'; echo err >&2"]),
                "testing",
                |l| seen.push(l.to_string()),
            )
            .unwrap();
        assert_eq!(out, "one\ntwo\rthree\n200");
        seen.sort();
        assert_eq!(seen, ["200", "err", "one", "three", "two"]);
    }

    #[test]
    fn failures_carry_what_the_command_and_its_last_lines() {
        let err = output(
            Command::new("sh").args(["-c", "for i in $(seq 40); do echo line$i; done; exit 3"]),
            "counting",
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("counting: sh -c "), "{text}");
        assert!(text.contains("failed (exit status: 3)"), "{text}");
        assert!(
            text.contains("line40") && !text.contains("line15\n"),
            "{text}"
        );
    }

    #[test]
    fn a_missing_tool_names_its_package() {
        let err = Tool::new("kiln-no-such-tool", "kiln-tools")
            .output(Command::new("kiln-no-such-tool"), "probing")
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "kiln-no-such-tool is not installed (Debian package kiln-tools; scripts/install-deps.sh installs it)"
        );
    }
}
