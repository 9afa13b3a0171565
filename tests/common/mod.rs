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
