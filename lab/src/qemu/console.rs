//! The serial console log: waiting for a line (text or regex), reading its tail.

use super::*;

/// What a console line must contain: a plain substring or a regular expression.
#[derive(Debug, Clone)]
pub enum ConsolePattern {
    Substring(String),
    Regex(Regex),
}

impl ConsolePattern {
    fn matches(&self, line: &str) -> bool {
        match self {
            ConsolePattern::Substring(s) => line.contains(s.as_str()),
            ConsolePattern::Regex(r) => r.is_match(line),
        }
    }
}

impl fmt::Display for ConsolePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConsolePattern::Substring(s) => write!(f, "{s:?}"),
            ConsolePattern::Regex(r) => write!(f, "/{}/", r.as_str()),
        }
    }
}

impl From<&str> for ConsolePattern {
    fn from(s: &str) -> Self {
        ConsolePattern::Substring(s.to_string())
    }
}

impl From<String> for ConsolePattern {
    fn from(s: String) -> Self {
        ConsolePattern::Substring(s)
    }
}

impl From<Regex> for ConsolePattern {
    fn from(r: Regex) -> Self {
        ConsolePattern::Regex(r)
    }
}

impl From<&Regex> for ConsolePattern {
    fn from(r: &Regex) -> Self {
        ConsolePattern::Regex(r.clone())
    }
}

/// A serial log file read incrementally: each match consumes the log up to the matched line,
/// so consecutive waits see consecutive events.
#[derive(Debug)]
pub struct ConsoleLog {
    path: PathBuf,
    offset: u64,
    partial: String,
    /// Complete lines read but not yet looked at (a read can bring several matches).
    pending: VecDeque<String>,
}

impl ConsoleLog {
    pub fn new(path: impl Into<PathBuf>) -> ConsoleLog {
        ConsoleLog {
            path: path.into(),
            offset: 0,
            partial: String::new(),
            pending: VecDeque::new(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues complete new lines (a trailing partial line is kept back).
    fn read_new_lines(&mut self) -> io::Result<()> {
        let mut f = match fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        f.seek(SeekFrom::Start(self.offset))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        self.offset += buf.len() as u64;
        self.partial.push_str(&String::from_utf8_lossy(&buf));
        while let Some(nl) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=nl).collect();
            self.pending.push_back(clean_console_line(&line));
        }
        Ok(())
    }

    /// The last `n` lines of the whole log, for error messages.
    pub fn tail(&self, n: usize) -> String {
        let Ok(f) = fs::File::open(&self.path) else {
            return format!("(no console log at {})", self.path.display());
        };
        let mut last: VecDeque<String> = VecDeque::with_capacity(n);
        for line in BufReader::new(f).split(b'\n').map_while(Result::ok) {
            if last.len() == n {
                last.pop_front();
            }
            last.push_back(clean_console_line(&String::from_utf8_lossy(&line)));
        }
        last.into_iter().collect::<Vec<_>>().join("\n")
    }

    /// Waits for the next line matching `pattern`, for a machine this process did not start
    /// (e.g. one a BMC simulator's `startcmd` runs with [`VmBuilder::command_line`]); `vm`
    /// names it in errors.
    pub fn wait_for_line(
        &mut self,
        vm: &str,
        pattern: impl Into<ConsolePattern>,
        timeout: Duration,
    ) -> Result<String, QemuError> {
        self.wait_for(vm, &pattern.into(), timeout, || None)
    }

    /// Polls until a line matches, `alive` reports an exit, or `timeout` passes.
    pub(super) fn wait_for(
        &mut self,
        vm: &str,
        pattern: &ConsolePattern,
        timeout: Duration,
        mut alive: impl FnMut() -> Option<ExitStatus>,
    ) -> Result<String, QemuError> {
        let start = Instant::now();
        loop {
            // Check the exit before reading, so the last lines a dying VM wrote are still seen.
            let exited = alive();
            self.read_new_lines()
                .map_err(io_err(format!("reading {}", self.path.display())))?;
            while let Some(line) = self.pending.pop_front() {
                if pattern.matches(&line) {
                    return Ok(line);
                }
            }
            if let Some(status) = exited {
                return Err(QemuError::ExitedBeforeMatch {
                    vm: vm.to_string(),
                    pattern: pattern.to_string(),
                    status,
                    tail: self.tail(TAIL_LINES),
                });
            }
            if start.elapsed() >= timeout {
                return Err(QemuError::ConsoleTimeout {
                    vm: vm.to_string(),
                    pattern: pattern.to_string(),
                    waited: timeout,
                    tail: self.tail(TAIL_LINES),
                });
            }
            std::thread::sleep(POLL);
        }
    }
}

/// Strips carriage returns and terminal escape sequences firmware and kernels print.
pub(super) fn clean_console_line(raw: &str) -> String {
    static ESCAPES: OnceLock<Regex> = OnceLock::new();
    let re =
        ESCAPES.get_or_init(|| Regex::new(r"\x1b\[[0-9;?=]*[A-Za-z]|\x1b[()][A-Z0-9]|\r").unwrap());
    re.replace_all(raw.trim_end_matches('\n'), "").into_owned()
}
