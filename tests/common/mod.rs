//! Helpers every kind of integration test uses.

#![allow(dead_code)] // each test file uses its own subset

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Fails the test, naming the Debian package, when `tool` is not installed.
pub fn require(tool: &str, package: &str) {
    assert!(
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success()),
        "{tool} is missing: install the Debian package {package} (scripts/install-deps.sh)"
    );
}

/// Polls `check` until it holds; fails the test after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A loopback port nothing listens on now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The node agent's config controller and one more on an engine of their own, on a thread (in
/// network namespace `netns` when given), reading `config` as the node's installed config;
/// each state the second controller reports (`S`) streams to the test. Dropping it stops the
/// engine, and the controller's supervisor stops the node's services.
pub struct TestAgent<S> {
    trigger: kiln_agent::engine::Trigger,
    states: std::sync::mpsc::Receiver<S>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl<S: kiln_agent::engine::Resource + std::fmt::Debug> TestAgent<S> {
    pub fn start(
        config: std::path::PathBuf,
        netns: Option<&str>,
        controller: impl FnOnce(kiln_agent::engine::Trigger) -> Box<dyn kiln_agent::engine::Controller>
        + Send
        + 'static,
    ) -> TestAgent<S> {
        use kiln_agent::controllers::{self, ConfigController, Sources};
        let (state_tx, states) = std::sync::mpsc::channel();
        let (trigger_tx, trigger_rx) = std::sync::mpsc::channel();
        let netns =
            netns.map(|name| std::fs::File::open(format!("/var/run/netns/{name}")).unwrap());
        let thread = std::thread::spawn(move || {
            if let Some(ns) = netns {
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            }
            let mut rt = kiln_agent::engine::Runtime::new();
            let trigger = rt.trigger();
            trigger_tx.send(trigger.clone()).unwrap();
            let sources = Sources {
                installed: config,
                overrides: vec![],
            };
            rt.register(Box::new(ConfigController { sources })).unwrap();
            rt.register(controller(trigger)).unwrap();
            rt.run(
                Duration::from_secs(2),
                Duration::from_millis(250),
                |state| {
                    if let Some(s) = state.get::<S>(controllers::ID) {
                        let _ = state_tx.send(s.clone());
                    }
                },
            );
        });
        TestAgent {
            trigger: trigger_rx.recv().unwrap(),
            states,
            thread: Some(thread),
        }
    }

    /// Waits until the agent reports a state `done` accepts (it sees each one, and may fail
    /// the test on it); prints each new state with `line`. Returns the states reported on the
    /// way, that one last; those reported before the call are skipped.
    pub fn wait_for(
        &self,
        t0: Instant,
        line: impl Fn(&S) -> String,
        done: impl Fn(&S) -> bool,
    ) -> Vec<S> {
        while self.states.try_recv().is_ok() {}
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut seen: Vec<S> = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let s = self
                .states
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("the agent's report did not come: {seen:?}"));
            if seen.last() != Some(&s) {
                eprintln!("[{:5.1}s] agent: {}", t0.elapsed().as_secs_f64(), line(&s));
                seen.push(s.clone());
            }
            if done(&s) {
                return seen;
            }
        }
    }
}

impl<S> Drop for TestAgent<S> {
    fn drop(&mut self) {
        self.trigger.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A process holding a mount namespace of its own, in network namespace `netns`, after
/// running `mounts` (shell commands, each ending in `&& `) in it: a test node's daemons share
/// it through `nsenter -t PID -m`, and its mounts vanish with it.
pub fn mount_namespace(netns: &kiln_lab::netns::Netns, mounts: &str) -> std::process::Child {
    netns
        .enter(|| {
            Command::new("unshare")
                .args(["-m", "--propagation", "slave", "sh", "-c"])
                .arg(format!("{mounts}exec sleep infinity"))
                .spawn()
                .expect("starting the mount namespace holder")
        })
        .unwrap()
}

/// Fails the test with promtool's findings unless `text` is a clean Prometheus exposition
/// (`promtool check metrics` lints names, units, types and help).
pub fn promtool_check_metrics(text: &str) {
    use std::io::Write as _;
    require("promtool", "prometheus");
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let findings = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && findings.trim().is_empty(),
        "promtool check metrics: {findings}\non:\n{text}"
    );
}

/// `kiln fleet serve` over a state directory on a loopback port; stopped when dropped.
pub struct FleetView(std::process::Child, u16);

impl FleetView {
    pub fn start(state: &std::path::Path) -> FleetView {
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["fleet", "serve", "--state-dir"])
            .arg(state)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_until(
            "kiln fleet serve to listen",
            Duration::from_secs(60),
            || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        );
        FleetView(child, port)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.1)
    }

    /// The body of `GET path`; fails the test on an HTTP error.
    pub fn get(&self, path: &str) -> String {
        let out = Command::new("curl")
            .args(["-sS", "--fail-with-body", "--max-time", "30"])
            .arg(self.url(path))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "GET {path}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for FleetView {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
