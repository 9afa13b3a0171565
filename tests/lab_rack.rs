//! `kiln lab rack`: a two-machine rack comes up powered off with a valid inventory, one machine
//! is powered on over IPMI from inside the rack and really runs its firmware, and `down`
//! leaves no namespace and no process behind.

mod common;

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{require, wait_until};
use kiln_lab::rack::RackState;
use kiln_spec::inventory::{BmcProtocol, NetbootMode};
use kiln_spec::{Inventory, NodeRole};

fn kiln<S: AsRef<OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running kiln")
}

/// Runs kiln, asserts success and returns stdout.
fn kiln_ok<S: AsRef<OsStr>>(args: &[S]) -> String {
    let out = kiln(args);
    let shown: Vec<_> = args.iter().map(|a| a.as_ref().to_string_lossy()).collect();
    assert!(
        out.status.success(),
        "kiln {shown:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Takes the rack down even when an assertion fails halfway.
struct RackDir {
    dir: PathBuf,
    _temp: tempfile::TempDir,
}

impl Drop for RackDir {
    fn drop(&mut self) {
        let _ = kiln(&[
            OsStr::new("lab"),
            "rack".as_ref(),
            "down".as_ref(),
            "--dir".as_ref(),
            self.dir.as_os_str(),
        ]);
    }
}

/// Whether `pid` runs; a zombie (this container's init may not reap) does not.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z")
    })
}

/// Running processes whose command line mentions `marker`.
fn processes_mentioning(marker: &Path) -> Vec<String> {
    let marker = marker.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if pid != std::process::id() && alive(pid) && cmdline.contains(&marker) {
            found.push(format!("{pid}: {cmdline}"));
        }
    }
    found
}

fn namespaces() -> String {
    kiln_lab::netns::run(Command::new("ip").args(["netns", "list"])).unwrap()
}

fn console(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).replace('\r', "")
}

#[test]
fn a_two_node_rack_powers_a_machine_on_over_ipmi_and_goes_down_cleanly() {
    require("ipmi_sim", "openipmi");
    require("ipmitool", "ipmitool");
    require("qemu-system-x86_64", "qemu-system-x86");
    let started = Instant::now();
    let temp = tempfile::tempdir().unwrap();
    let rack = RackDir {
        dir: temp.path().join("rack"),
        _temp: temp,
    };
    let dir = rack.dir.to_str().unwrap().to_string();

    let out = kiln_ok(&[
        "lab",
        "rack",
        "up",
        "--nodes",
        "2",
        "--firmware",
        "mixed",
        "--disks",
        "1GiB",
        "--memory",
        "256",
        "--dir",
        &dir,
    ]);
    assert!(out.contains("node-01") && out.contains("node-02"), "{out}");
    let up = started.elapsed();

    // The inventory an operator hands to the provisioner.
    let inventory = Inventory::load(&rack.dir.join("fleet.yaml")).unwrap();
    let netboot = inventory.spec.netboot.as_ref().expect("a netboot section");
    assert_eq!(netboot.interface, "kilnbr0");
    assert_eq!(netboot.mode, NetbootMode::Dhcp);
    assert_eq!(netboot.pool_start, Some([10, 77, 0, 100].into()));
    assert_eq!(netboot.pool_end, Some([10, 77, 0, 199].into()));
    let nodes = &inventory.spec.nodes;
    assert_eq!(nodes.len(), 2);
    assert_eq!(
        (nodes[0].name.as_str(), nodes[0].role),
        ("node-01", NodeRole::ControlPlane)
    );
    assert_eq!(
        (nodes[1].name.as_str(), nodes[1].role),
        ("node-02", NodeRole::Worker)
    );
    assert_eq!(nodes[0].boot_macs, ["52:54:00:6b:00:01"]);
    let bmc = nodes[0].bmc.as_ref().unwrap();
    assert_eq!(bmc.protocol, BmcProtocol::Ipmi);
    assert_eq!(
        (bmc.address.as_str(), bmc.username.as_str()),
        ("127.0.0.1", "admin")
    );
    let password = bmc.password_ref.resolve(&rack.dir).unwrap();
    let secret = rack.dir.join("secrets/node-01.bmc");
    assert_eq!(
        std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let port = bmc.port().to_string();

    let state = RackState::load(&rack.dir).unwrap();
    assert!(
        namespaces()
            .lines()
            .any(|l| l.split_whitespace().next() == Some(&state.netns)),
        "{}",
        namespaces()
    );
    let firmware: Vec<String> = state.nodes.iter().map(|n| n.firmware.to_string()).collect();
    assert_eq!(firmware, ["bios", "uefi"]);
    let node = &state.nodes[0];
    assert_eq!(node.bmc_port, bmc.port());
    assert!(
        node.records().power_ons().is_empty(),
        "powered off at first"
    );
    assert!(node.records().vm_pid().is_none());

    // ipmitool inside the rack's namespace, where the BMCs listen.
    let ipmitool = |args: &[&str]| {
        let mut argv = vec![
            "lab",
            "rack",
            "exec",
            "--dir",
            &dir,
            "--",
            "ipmitool",
            "-I",
            "lanplus",
            "-C",
            "3",
            "-H",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "admin",
            "-P",
            &password,
        ];
        argv.extend(args);
        kiln_ok(&argv)
    };
    assert!(ipmitool(&["chassis", "power", "status"]).contains("is off"));
    ipmitool(&["chassis", "bootdev", "pxe"]);
    ipmitool(&["chassis", "power", "on"]);
    wait_until("node-01's QEMU", Duration::from_secs(20), || {
        node.records().vm_pid().is_some()
    });
    assert_eq!(node.records().power_ons(), ["power-on boot=pxe"]);
    let at_power_on = std::fs::metadata(&node.console_log).map_or(0, |m| m.len());
    let wait_console = |what: &str, check: &dyn Fn(&str) -> bool| {
        let start = Instant::now();
        while !check(&console(&node.console_log)) {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "timed out waiting for {what}\nconsole:\n{}\nqemu:\n{}\nchassis calls: {:?}",
                console(&node.console_log),
                node.records().qemu_log(),
                node.records().chassis_calls()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // SeaBIOS hands over to the NIC's iPXE ROM, which finds its link on the rack's bridge up
    // and asks for an address (nobody answers: no provisioner runs).
    wait_console(
        "SeaBIOS and iPXE configuring net0 on node-01's console",
        &|s| {
            s.contains("SeaBIOS")
                && s.contains("net0: 52:54:00:6b:00:01")
                && s.contains("Link:up")
                && s.contains("Configuring (net0 52:54:00:6b:00:01)")
        },
    );
    let grown = std::fs::metadata(&node.console_log).unwrap().len();
    assert!(grown > at_power_on, "{grown} > {at_power_on}");
    assert!(ipmitool(&["chassis", "power", "status"]).contains("is on"));
    assert!(state.nodes[1].records().power_ons().is_empty());
    let qemu = node.records().vm_pid().unwrap();

    // A command's failure in the rack is the exec's exit status.
    let out = kiln(&[
        "lab", "rack", "exec", "--dir", &dir, "--", "sh", "-c", "exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3));

    let out = kiln_ok(&["lab", "rack", "down", "--dir", &dir]);
    assert!(
        out.contains(&format!("deleted namespace {}", state.netns)),
        "{out}"
    );
    assert!(
        !namespaces()
            .lines()
            .any(|l| l.split_whitespace().next() == Some(&state.netns)),
        "{}",
        namespaces()
    );
    let pids = state
        .nodes
        .iter()
        .map(|n| n.bmc_pid)
        .chain([qemu, state.advertiser_pid]);
    for pid in pids {
        assert!(!alive(pid), "pid {pid} still runs after down");
    }
    let left = processes_mentioning(&rack.dir);
    assert!(left.is_empty(), "still running after down: {left:#?}");
    assert!(
        rack.dir.join("node-01/disk0.raw").exists(),
        "disks are kept"
    );

    let out = kiln_ok(&["lab", "rack", "down", "--dir", &dir]);
    assert!(out.contains("already down"), "{out}");
    kiln_ok(&["lab", "rack", "down", "--dir", &dir, "--purge"]);
    assert!(!rack.dir.exists(), "purge removes the rack directory");
    eprintln!(
        "rack up in {:.1}s, whole test {:.1}s",
        up.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}
