//! A running machine: console waits, QMP, power-down, exit, kill on drop.

use super::*;

/// A running machine. Dropping it kills QEMU.
#[derive(Debug)]
pub struct Vm {
    pub(super) name: String,
    pub(super) console: ConsoleLog,
    pub(super) qmp: PathBuf,
    pub(super) qemu_log: PathBuf,
    pub(super) child: Child,
    pub(super) started: Instant,
    pub(super) _temp: Option<tempfile::TempDir>,
}

impl Vm {
    pub fn builder() -> VmBuilder {
        VmBuilder::default()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Time since QEMU was started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn serial_log(&self) -> &Path {
        self.console.path()
    }

    /// Waits for the next console line matching `pattern` and returns it. Fails early when
    /// QEMU exits; every failure carries the last console lines.
    pub fn wait_for_console(
        &mut self,
        pattern: impl Into<ConsolePattern>,
        timeout: Duration,
    ) -> Result<String, QemuError> {
        let pattern = pattern.into();
        let child = &mut self.child;
        let qemu_log = &self.qemu_log;
        let result = self.console.wait_for(&self.name, &pattern, timeout, || {
            child.try_wait().ok().flatten()
        });
        result.map_err(|e| with_qemu_output(e, qemu_log))
    }

    /// The last lines of the console.
    pub fn console_tail(&self, lines: usize) -> String {
        self.console.tail(lines)
    }

    /// Waits for QEMU to exit (a guest poweroff, or a reboot under `-no-reboot`).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, QemuError> {
        let start = Instant::now();
        loop {
            if let Some(status) = self
                .child
                .try_wait()
                .map_err(io_err(format!("waiting for VM {}", self.name)))?
            {
                return Ok(status);
            }
            if start.elapsed() >= timeout {
                return Err(QemuError::ExitTimeout {
                    vm: self.name.clone(),
                    waited: timeout,
                    tail: self.console.tail(TAIL_LINES),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// Sends one QMP command (after the capabilities handshake) and returns its `return` value.
    pub fn qmp(&self, command: &str) -> Result<serde_json::Value, QemuError> {
        self.qmp_with(command, serde_json::Value::Null)
    }

    /// [`Vm::qmp`] with arguments (`null` for none).
    pub fn qmp_with(
        &self,
        command: &str,
        arguments: serde_json::Value,
    ) -> Result<serde_json::Value, QemuError> {
        let fail = |reason: String| QemuError::Qmp {
            vm: self.name.clone(),
            command: command.to_string(),
            reason,
        };
        let stream = UnixStream::connect(&self.qmp)
            .map_err(|e| fail(format!("connecting {}: {e}", self.qmp.display())))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| fail(e.to_string()))?;
        let mut writer = stream.try_clone().map_err(|e| fail(e.to_string()))?;
        let mut reader = BufReader::new(stream);
        // Greeting, then each command's reply; asynchronous events in between are skipped.
        let read_reply =
            |reader: &mut BufReader<UnixStream>| -> Result<serde_json::Value, QemuError> {
                loop {
                    let mut line = String::new();
                    if reader
                        .read_line(&mut line)
                        .map_err(|e| fail(e.to_string()))?
                        == 0
                    {
                        return Err(fail("connection closed".into()));
                    }
                    let v: serde_json::Value = serde_json::from_str(&line)
                        .map_err(|e| fail(format!("bad reply {line:?}: {e}")))?;
                    if let Some(r) = v.get("return") {
                        return Ok(r.clone());
                    }
                    if let Some(e) = v.get("error") {
                        return Err(fail(e.to_string()));
                    }
                    if v.get("QMP").is_some() {
                        return Ok(v);
                    }
                }
            };
        read_reply(&mut reader)?;
        for cmd in ["qmp_capabilities", command] {
            let mut request = serde_json::json!({ "execute": cmd });
            if cmd == command && !arguments.is_null() {
                request["arguments"] = arguments.clone();
            }
            writeln!(writer, "{request}").map_err(|e| fail(e.to_string()))?;
            let reply = read_reply(&mut reader)?;
            if cmd == command {
                return Ok(reply);
            }
        }
        unreachable!("the loop returns on the last command")
    }

    /// ACPI power button (the guest shuts down if it handles it).
    pub fn powerdown(&self) -> Result<(), QemuError> {
        self.qmp("system_powerdown").map(|_| ())
    }

    /// Asks QEMU to quit immediately and reaps it.
    pub fn quit(mut self) -> Result<ExitStatus, QemuError> {
        // The connection may drop as QEMU exits; the exit is what counts.
        let _ = self.qmp("quit");
        self.wait_exit(Duration::from_secs(10))
    }

    /// Kills QEMU (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// QEMU's own complaints (bad arguments, missing firmware) explain an early exit best.
fn with_qemu_output(e: QemuError, qemu_log: &Path) -> QemuError {
    match e {
        QemuError::ExitedBeforeMatch {
            vm,
            pattern,
            status,
            tail,
        } => {
            let out = fs::read_to_string(qemu_log).unwrap_or_default();
            let tail = if out.trim().is_empty() {
                tail
            } else {
                format!("{tail}\nQEMU said:\n{}", out.trim())
            };
            QemuError::ExitedBeforeMatch {
                vm,
                pattern,
                status,
                tail,
            }
        }
        other => other,
    }
}
