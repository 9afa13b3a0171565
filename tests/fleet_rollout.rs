//! End to end through every real part: a virtual rack (QEMU machines on SeaBIOS and OVMF, each
//! behind an OpenIPMI `ipmi_sim` BMC, on a bridge in a network namespace) is rolled out by
//! `kiln fleet rollout` from powered off to installed and ready: IPMI power and one-time PXE,
//! kiln's DHCP/TFTP/HTTP netboot, the unattended installer fetching its own config and image,
//! phone-home, and the installed node's agent reporting ready, then serving its network API
//! to the fleet's admins with the certificate the rollout gave it.
//!
//! One rack serves every scenario (the VM boots are the cost): three good nodes, with the
//! rollout killed while one installs and run again; then three faulty ones in a second
//! rollout: a wrong BMC password, a disk that holds a filesystem, a node whose NIC is not the
//! one the inventory names. That rollout serves its fleet view: the boot chain of a node as
//! the view shows it, metrics that pass promtool, and the node with the wrong password
//! retried from the view with its token once the password is put right.

mod common;
mod lab_support;

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use kiln_fleet::controller;
use kiln_fleet::stage::Stage;
use kiln_lab::rack::{self, RackNode, RackSpec};
use kiln_spec::layout;
use lab_support::upgrade::bundles;
use lab_support::{KILN, disk_fingerprint, generate_key, test_iso, test_signing_key, text};
use serde_json::Value;

/// Generous bounds against hangs only: six machines share two cores under software emulation.
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(40 * 60);
const GOOD: &str = "node-01,node-02,node-03";
const FAULTY: &str = "node-04,node-05,node-06";
/// The faulty rollout's fleet view, on the rack namespace's loopback.
const VIEW: &str = "127.0.0.1:9180";
const VIEW_TOKEN: &str = "a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5";

fn rack_cmd(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(KILN);
    c.args(["lab", "rack", "exec", "--dir"])
        .arg(dir)
        .arg("--")
        .arg(KILN)
        .args(args);
    c
}

/// A rollout of `nodes` from the signed `artifacts`, checked with `key`.
fn rollout_args<'a>(
    dir: &'a str,
    artifacts: &'a str,
    key: &'a str,
    nodes: &'a str,
) -> Vec<&'a str> {
    vec![
        "fleet",
        "rollout",
        "--inventory",
        dir,
        "--artifacts",
        artifacts,
        "--trusted-key",
        key,
        "--nodes",
        nodes,
        "--parallel",
        "3",
    ]
}

fn wait_output(mut child: Child, timeout: Duration) -> Output {
    let started = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if started.elapsed() > timeout {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let out = child.wait_with_output().unwrap();
            panic!("no end within {timeout:?}:\n{}", text(&out));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn events(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn status(dir: &Path, state: &Path) -> Value {
    let out = rack_cmd(dir, &["fleet", "status", "--output", "json", "--state-dir"])
        .arg(state)
        .output()
        .unwrap();
    assert!(out.status.success(), "fleet status: {}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The last lines of each node's serial console: where a node that never reported stopped.
fn console_tails(nodes: &[RackNode]) -> String {
    nodes
        .iter()
        .map(|n| {
            // Firmware screens are not all UTF-8.
            let console =
                String::from_utf8_lossy(&std::fs::read(&n.console_log).unwrap_or_default())
                    .into_owned();
            let lines: Vec<&str> = console.lines().collect();
            let tail = lines[lines.len().saturating_sub(40)..].join("\n");
            format!("--- {} console (last 40 lines):\n{tail}\n", n.name)
        })
        .collect()
}

fn node<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == name)
        .unwrap_or_else(|| panic!("{name} missing from {status:#}"))
}

#[test]
fn a_rack_rolls_out_from_powered_off_to_ready_and_faults_fail_alone() {
    let iso = test_iso();
    let artifacts = iso.parent().unwrap().to_path_buf();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("rack");
    let mut spec = RackSpec::new(
        &dir,
        6,
        vec![
            OsString::from(KILN),
            "lab".into(),
            "rack".into(),
            "advertise".into(),
        ],
    );
    spec.disks = vec![4 << 30];
    let rack = rack::up(&spec).expect("bringing up the rack");
    let nodes = rack.nodes().to_vec();
    let inventory = rack.inventory_path();
    let state = dir.join("state");
    let events_file = dir.join("events.jsonl");

    // Faults: node-04's only disk holds a filesystem; node-05's inventory MAC is not its NIC's;
    // node-06's BMC password is wrong.
    let fs_disk = &nodes[3].disks[0];
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "precious"])
        .arg(fs_disk)
        .output()
        .unwrap();
    assert!(mkfs.status.success(), "{}", text(&mkfs));
    let yaml = std::fs::read_to_string(&inventory).unwrap();
    assert!(yaml.contains(&nodes[4].mac), "{yaml}");
    std::fs::write(&inventory, yaml.replace(&nodes[4].mac, "52:54:00:6b:00:55")).unwrap();
    let node_06_password = std::fs::read_to_string(&nodes[5].password_file).unwrap();
    std::fs::write(&nodes[5].password_file, "not-the-password\n").unwrap();
    let fingerprints: Vec<String> = nodes
        .iter()
        .map(|n| disk_fingerprint(&n.disks[0]))
        .collect();

    // A build not signed by the key the operator trusts is refused before any BMC is asked.
    let trusted = test_signing_key();
    let other = generate_key(&tmp.path().join("other"));
    let plan = |key: &Path| {
        rack_cmd(&dir, &["fleet", "plan", "--output", "json", "--inventory"])
            .arg(&inventory)
            .arg("--artifacts")
            .arg(&artifacts)
            .arg("--trusted-key")
            .arg(key)
            .arg("--state-dir")
            .arg(&state)
            .output()
            .unwrap()
    };
    let out = plan(&other);
    assert!(
        !out.status.success()
            && text(&out).contains("manifest.json: the signature does not verify"),
        "fleet plan with another key: {}",
        text(&out)
    );

    // The plan checks the build's signature, probes every BMC and touches nothing.
    let out = plan(&trusted);
    assert!(out.status.success(), "fleet plan: {}", text(&out));
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    for (i, p) in plan.as_array().unwrap().iter().enumerate() {
        assert_eq!(p["name"], nodes[i].name);
        assert_eq!(p["action"], "install", "{p:#}");
        let probe = &p["probe"];
        if i == 5 {
            assert_eq!(probe["authenticated"], false, "{p:#}");
        } else {
            assert_eq!(probe["authenticated"], true, "{p:#}");
            assert_eq!(probe["power"], "off", "{p:#}");
        }
    }
    for (n, before) in nodes.iter().zip(&fingerprints) {
        assert!(
            n.records().power_ons().is_empty(),
            "{} was powered on",
            n.name
        );
        assert_eq!(
            &disk_fingerprint(&n.disks[0]),
            before,
            "{}'s disk changed",
            n.name
        );
    }

    // The good nodes: killed while the first of them installs, then run again to the end.
    let inv = inventory.to_str().unwrap();
    let art = artifacts.to_str().unwrap();
    let key = trusted.to_str().unwrap();
    let mut first = rack_cmd(&dir, &rollout_args(inv, art, key, GOOD));
    first
        .arg("--state-dir")
        .arg(&state)
        .arg("--events")
        .arg(&events_file)
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = first.spawn().unwrap();
    let started = Instant::now();
    while !events(&events_file)
        .iter()
        .any(|e| e["stage"] == "installing")
    {
        assert!(
            started.elapsed() < ROLLOUT_TIMEOUT,
            "no node started installing"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let killed = child.wait_with_output().unwrap();
    eprintln!("first rollout, killed:\n{}", text(&killed));

    let mut again = rack_cmd(&dir, &rollout_args(inv, art, key, GOOD));
    again
        .arg("--state-dir")
        .arg(&state)
        .arg("--events")
        .arg(&events_file)
        .arg("-vv")
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let resumed = wait_output(again.spawn().unwrap(), ROLLOUT_TIMEOUT);
    let log = text(&resumed);
    eprintln!("resumed rollout:\n{log}");
    assert!(
        resumed.status.success(),
        "the resumed rollout failed:\n{log}\n{}",
        console_tails(&nodes[..3])
    );

    let st = status(&dir, &state);
    for n in &nodes[..3] {
        let s = node(&st, &n.name);
        assert_eq!(s["stage"], "ready", "{s:#}");
        assert_eq!(s["slot"], "A", "{s:#}");
        let seen: Vec<&str> = s["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["stage"].as_str().unwrap())
            .collect();
        for stage in [
            "pending",
            "powering-on",
            "netbooting",
            "installing",
            "rebooting",
            "ready",
        ] {
            assert!(seen.contains(&stage), "{} never was {stage}: {s:#}", n.name);
        }
        assert!(
            s["stages"]
                .as_array()
                .unwrap()
                .iter()
                .all(|t| t["seconds"].is_f64())
        );
        // Installed once: one install on its console, one installer start in the store.
        // Firmware screens are not all UTF-8.
        let console = String::from_utf8_lossy(&std::fs::read(&n.console_log).unwrap()).into_owned();
        assert_eq!(
            console.matches("kiln-install: done").count(),
            1,
            "{} installed other than once",
            n.name
        );
        assert!(s["installs"].as_u64().unwrap() <= 1, "{s:#}");
        assert!(
            console.contains(&format!("kiln-agent ready node={} slot=A", n.name)),
            "{}'s agent never said ready with its inventory name",
            n.name
        );
        let table = kiln_installer::hardware::read_gpt(&n.disks[0], 512).expect("a GPT");
        let names: Vec<String> = table
            .partitions
            .iter()
            .map(|p| p.name.clone().unwrap_or_default())
            .collect();
        assert_eq!(names, layout::KILN_NAMES, "{}", n.name);
        // ipmi_sim names IPMI's "force boot from the default hard drive" `default`.
        let calls = n.records().chassis_calls();
        assert!(
            calls.iter().any(|c| c == "set boot default"),
            "{}'s boot device was not set back to disk: {calls:?}",
            n.name
        );
        // Secrets stay out of logs and the store.
        let password = std::fs::read_to_string(&n.password_file).unwrap();
        assert!(
            !log.contains(password.trim()),
            "a BMC password is in the log"
        );
        if let Some(token) = console
            .split_whitespace()
            .find_map(|w| w.strip_prefix("kiln.token="))
        {
            assert!(!log.contains(token), "an enrolment token is in the log");
            let store = std::fs::read(state.join("fleet.redb")).unwrap();
            assert!(
                !store.windows(token.len()).any(|w| w == token.as_bytes()),
                "an enrolment token is in the store"
            );
        }
    }

    // Each installed node's agent serves its API on its address with the certificate the
    // rollout gave it, to the fleet's admins: its status, read from the provisioner's side.
    for n in &nodes[..3] {
        let remote = agent_status(&dir, &inventory, &state, &n.name);
        assert_eq!(remote["slot"], "A", "{remote:#}");
        assert_eq!(remote["hostname"], n.name.as_str(), "{remote:#}");
    }

    rolling_upgrade(&dir, &inventory, &artifacts, &state, &trusted);

    // The faulty nodes fail, each in its own stage, and nothing else happens to them; the one
    // with the wrong BMC password is retried from the fleet view once it is put right.
    let token_file = dir.join("view.token");
    std::fs::write(&token_file, VIEW_TOKEN).unwrap();
    let mut faulty = rack_cmd(&dir, &rollout_args(inv, art, key, FAULTY));
    faulty
        .arg("--state-dir")
        .arg(&state)
        .args(["--netboot-timeout", "4m", "--listen", VIEW, "--token-file"])
        .arg(&token_file)
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = faulty.spawn().unwrap();
    // node-05 keeps the rollout (and its view) up for its 4-minute netboot deadline.
    retry_from_the_view(&dir, &mut child, &nodes[5], &node_06_password);
    // Bytes are counted once a boot file has gone out: the last of these to appear.
    let metrics = wait_for_metrics(&dir, &mut child, "kiln_netboot_bytes_total{");
    common::promtool_check_metrics(&metrics);
    for line in [
        "kiln_fleet_nodes{stage=\"powering-on\"}",
        "kiln_fleet_bmc_operation_errors_total{action=\"netboot-once\",kind=\"auth\"} 1",
        "kiln_fleet_bmc_operation_duration_seconds_count{action=\"netboot-once\"}",
        "kiln_netboot_events_total{",
    ] {
        assert!(metrics.contains(line), "no {line} in:\n{metrics}");
    }
    let out = wait_output(child, ROLLOUT_TIMEOUT);
    assert!(
        !out.status.success(),
        "a rollout with faults succeeded:\n{}",
        text(&out)
    );
    let st = status(&dir, &state);
    let failure = |name: &str| -> String {
        let s = node(&st, name);
        assert_eq!(s["stage"], "failed", "{s:#}");
        s["error"].as_str().unwrap().to_string()
    };
    node_04_in_the_view(&state);
    let e = failure("node-04");
    assert!(
        e.starts_with("installing:") && e.contains("refusing to erase"),
        "{e}"
    );
    assert_eq!(
        disk_fingerprint(fs_disk),
        fingerprints[3],
        "the refused disk changed"
    );
    let e = failure("node-05");
    assert!(e.starts_with("netbooting: timed out"), "{e}");
    // node-06 failed on its password, was retried from the view, and installed.
    let s = node(&st, "node-06");
    assert_eq!(s["stage"], "ready", "{s:#}");
    assert!(
        s["stages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["note"].as_str().is_some_and(|n| n
                .starts_with("retry asked by the fleet view after powering-on failed: BMC auth"))),
        "{s:#}"
    );
    // The good nodes were left as they were.
    for n in &nodes[..3] {
        assert_eq!(node(&st, &n.name)["stage"], "ready");
    }

    rollout_through_the_cluster(&dir, &rack, &inventory, &artifacts, &state, &trusted);
    drop(rack);
}

/// node-05, failed above on the wrong MAC in the inventory, is put right and rolled out
/// through Kubernetes resources: the inventory imported as Machines into a real API server, a
/// Rollout of node-05, and `kiln fleet controller` in the rack's namespace (reaching the API
/// server through a relay on its loopback) leading it, powering the machine over IPMI and
/// serving its netboot, to ready — the story in the Machine's status and Events.
fn rollout_through_the_cluster(
    dir: &Path,
    rack: &rack::Rack,
    inventory: &Path,
    artifacts: &Path,
    state: &Path,
    key: &Path,
) {
    let node = &rack.nodes()[4];
    let cluster = kiln_cluster::testing::TestCluster::shared();
    let yaml = std::fs::read_to_string(inventory).unwrap();
    std::fs::write(inventory, yaml.replace("52:54:00:6b:00:55", &node.mac)).unwrap();
    let ns = "kiln-lab";
    let out = Command::new(KILN)
        .args(["fleet", "import", "--namespace", ns, "--inventory"])
        .arg(inventory)
        .arg("--kubeconfig")
        .arg(&cluster.kubeconfig)
        .output()
        .unwrap();
    assert!(out.status.success(), "fleet import: {}", text(&out));
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(artifacts.join("manifest.json")).unwrap()).unwrap();
    let image = manifest["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["path"] == kiln_spec::bootargs::PXE_ROOTFS)
        .unwrap()["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    let rollout = dir.join("rollout.yaml");
    std::fs::write(
        &rollout,
        format!(
            "apiVersion: kiln.dev/v1alpha1\nkind: Rollout\nmetadata: {{name: lab, namespace: {ns}}}\n\
             spec: {{selector: {}, artifacts: {}, imageSha256: {image}, parallelism: 1}}\n",
            node.name,
            artifacts.display()
        ),
    )
    .unwrap();
    kubectl(cluster, &["apply", "-f", rollout.to_str().unwrap()]);

    let kubeconfig = std::fs::read_to_string(&cluster.kubeconfig).unwrap();
    let port: u16 = kubeconfig
        .split("https://127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|p| p.parse().ok())
        .expect("the API server's port in the kubeconfig");
    let _relay = lab_support::relay_into_netns(&rack.state().netns, port);
    let netboot = kiln_spec::Inventory::load(inventory)
        .unwrap()
        .spec
        .netboot
        .unwrap();
    let mut controller = rack_cmd(dir, &["fleet", "controller", "--kubeconfig"]);
    controller
        .arg(&cluster.kubeconfig)
        .args([
            "--namespace",
            ns,
            "--rollout",
            "lab",
            "--identity",
            "lab-replica",
        ])
        .arg("--artifacts")
        .arg(artifacts)
        .arg("--trusted-key")
        .arg(key)
        .arg("--state-dir")
        .arg(state)
        .args(["--interface", &netboot.interface, "--mode", "dhcp"])
        .args(["--pool-start", &netboot.pool_start.unwrap().to_string()])
        .args(["--pool-end", &netboot.pool_end.unwrap().to_string()])
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = wait_output(controller.spawn().unwrap(), ROLLOUT_TIMEOUT);
    let log = text(&out);
    eprintln!("fleet controller:\n{log}");
    assert!(
        out.status.success(),
        "the controller's rollout failed:\n{log}\n{}",
        console_tails(std::slice::from_ref(node))
    );

    // The fleet's credentials are the cluster's now: the ones this state directory held.
    let shared = kiln_fleet::credentials::CREDENTIALS_SECRET;
    assert!(
        log.contains(&format!("this replica's, put in Secret {ns}/{shared}")),
        "{log}"
    );
    let secret: Value = serde_json::from_str(&kubectl(
        cluster,
        &["get", "secret", shared, "-n", ns, "-o", "json"],
    ))
    .unwrap();
    let ca = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        secret["data"]["kubernetes-ca.crt"].as_str().unwrap(),
    )
    .unwrap();
    assert_eq!(
        ca,
        std::fs::read(state.join("secrets/kubernetes-ca.crt")).unwrap()
    );

    let machine: Value = serde_json::from_str(&kubectl(
        cluster,
        &["get", "machine", &node.name, "-n", ns, "-o", "json"],
    ))
    .unwrap();
    let status = &machine["status"];
    assert_eq!(status["stage"], "ready", "{status:#}");
    assert_eq!(status["slot"], "A", "{status:#}");
    assert_eq!(status["imageSha256"], image.as_str(), "{status:#}");
    assert!(
        status["reports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["report"]["phase"] == "agent-ready"),
        "{status:#}"
    );
    // What the installer found on the machine: its disk and the NIC it booted from.
    let hardware = &status["hardware"];
    assert!(hardware["cpus"].as_u64().unwrap_or(0) >= 1, "{status:#}");
    assert!(
        hardware["memoryBytes"].as_u64().unwrap_or(0) > 0,
        "{status:#}"
    );
    assert!(
        hardware["disks"]
            .as_array()
            .is_some_and(|d| d.iter().any(|d| d["sizeBytes"].as_u64() > Some(0))),
        "{status:#}"
    );
    assert!(
        hardware["nics"]
            .as_array()
            .is_some_and(|n| n.iter().any(|n| n["mac"] == node.mac.as_str())),
        "{status:#}"
    );
    let events = kubectl(
        cluster,
        &[
            "get",
            "events.events.k8s.io",
            "-n",
            ns,
            "--field-selector",
            &format!("regarding.name={}", node.name),
            "-o",
            "json",
        ],
    );
    let events: Value = serde_json::from_str(&events).unwrap();
    let reasons: Vec<&str> = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["reason"].as_str())
        .collect();
    // The Machine's story: every stage of the way to ready has its Event.
    for reason in Stage::ALL
        .into_iter()
        .filter(|s| s.is_active() || *s == Stage::Ready)
        .map(controller::event_reason)
    {
        assert!(
            reasons.contains(&reason.as_str()),
            "no {reason} Event: {reasons:?}"
        );
    }
    let lease = kubectl(
        cluster,
        &[
            "get",
            "lease",
            "kiln-rollout-lab",
            "-n",
            ns,
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ],
    );
    // Released when the rollout ended, or still naming the replica that led it.
    assert!(lease.is_empty() || lease == "lab-replica", "{lease}");
    let console = String::from_utf8_lossy(&std::fs::read(&node.console_log).unwrap()).into_owned();
    assert!(
        console.contains(&format!("kiln-agent ready node={} slot=A", node.name)),
        "{} never said ready",
        node.name
    );
}

fn kubectl(cluster: &kiln_cluster::testing::TestCluster, args: &[&str]) -> String {
    let out = Command::new(&cluster.binaries().kubectl)
        .arg("--kubeconfig")
        .arg(&cluster.kubeconfig)
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "kubectl {args:?}: {}", text(&out));
    String::from_utf8(out.stdout).unwrap()
}

/// A request to the running rollout's fleet view from inside the rack's namespace: the status
/// code and the body.
fn view(dir: &Path, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let mut c = Command::new(KILN);
    c.args(["lab", "rack", "exec", "--dir"]).arg(dir).args([
        "--",
        "curl",
        "-sS",
        "--max-time",
        "30",
        "-w",
        "\n%{http_code}",
        "-X",
        method,
    ]);
    if let Some(t) = token {
        c.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    let out = c.arg(format!("http://{VIEW}{path}")).output().unwrap();
    let body = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = body.rsplit_once('\n').unwrap_or(("", &body));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// A node's page in the running rollout's view, once `ready` holds for it.
fn wait_for_view(
    dir: &Path,
    rollout: &mut Child,
    name: &str,
    ready: impl Fn(&Value) -> bool,
) -> Value {
    let started = Instant::now();
    loop {
        let (code, body) = view(dir, "GET", &format!("/api/nodes/{name}"), None);
        if code == 200 {
            let v: Value = serde_json::from_str(&body).unwrap();
            if ready(&v) {
                return v;
            }
        }
        if let Some(said) = ended(rollout) {
            panic!(
                "the rollout ended before {name} got there in its view ({code} {body}):\n{said}"
            );
        }
        assert!(
            started.elapsed() < ROLLOUT_TIMEOUT,
            "{name} never got there in the view: {code} {body}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// What the rollout printed, once it has ended.
fn ended(rollout: &mut Child) -> Option<String> {
    use std::io::Read as _;
    let status = rollout.try_wait().unwrap()?;
    let mut said = format!("{status}\n");
    for pipe in [
        rollout
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read>),
        rollout
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read>),
    ]
    .into_iter()
    .flatten()
    {
        let mut pipe = pipe;
        let _ = pipe.read_to_string(&mut said);
    }
    Some(said)
}

/// The running rollout's metrics, once they show `wanted`.
fn wait_for_metrics(dir: &Path, rollout: &mut Child, wanted: &str) -> String {
    let started = Instant::now();
    loop {
        let (code, metrics) = view(dir, "GET", "/metrics", None);
        if code == 200 && metrics.contains(wanted) {
            return metrics;
        }
        if let Some(said) = ended(rollout) {
            panic!("the rollout ended before its metrics showed {wanted}:\n{said}");
        }
        assert!(
            started.elapsed() < ROLLOUT_TIMEOUT,
            "the view's metrics never showed {wanted}: {code} {metrics}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// node-04's boot chain in `kiln fleet serve` over the state the rollout left: every link
/// with its bytes and time, and the installer's refusal.
fn node_04_in_the_view(state: &Path) {
    let body = common::FleetView::start(state).get("/api/nodes/node-04");
    let node: Value = serde_json::from_str(&body).unwrap();
    let steps = node["timeline"].as_array().unwrap();
    let parts: Vec<&str> = steps.iter().map(|s| s["part"].as_str().unwrap()).collect();
    for part in [
        "dhcp",
        "tftp",
        "ipxe",
        "kernel",
        "initrd",
        "rootfs",
        "installer",
    ] {
        assert!(parts.contains(&part), "no {part} step in {node:#}");
    }
    assert!(
        steps.iter().any(|s| s["part"] == "rootfs"
            && s["bytes"].as_u64().unwrap() > 1 << 20
            && s["durationMs"].is_u64()),
        "{node:#}"
    );
    assert!(
        steps.iter().any(|s| s["failure"]
            .as_str()
            .is_some_and(|f| f.contains("refusing to erase"))),
        "{node:#}"
    );
}

/// `node` fails on its BMC password; actions without the view's token are refused; with the
/// password put right, a retry with the token powers it on again.
fn retry_from_the_view(dir: &Path, rollout: &mut Child, node: &RackNode, right_password: &str) {
    let failed = wait_for_view(dir, rollout, &node.name, |n| n["stage"] == "failed");
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .starts_with("powering-on: BMC auth"),
        "{failed:#}"
    );
    assert!(node.records().power_ons().is_empty());
    let retry = format!("/api/nodes/{}/retry", node.name);
    let (code, body) = view(dir, "POST", &retry, None);
    assert_eq!(code, 401, "a retry without the token: {body}");
    let (code, body) = view(dir, "POST", &retry, Some("not-the-token-at-all"));
    assert_eq!(code, 401, "a retry with another token: {body}");
    assert_eq!(
        wait_for_view(dir, rollout, &node.name, |_| true)["stage"],
        "failed",
        "a refused retry changed the node"
    );
    std::fs::write(&node.password_file, right_password).unwrap();
    let (code, body) = view(dir, "POST", &retry, Some(VIEW_TOKEN));
    assert_eq!(code, 202, "a retry with the token: {body}");
    wait_for_view(dir, rollout, &node.name, |n| n["stage"] != "failed");
}

/// A node's status, as its agent reports it over its network API to the fleet's admins.
fn agent_status(dir: &Path, inventory: &Path, state: &Path, name: &str) -> Value {
    let out = rack_cmd(dir, &["node", "status", "--output", "json", "--node", name])
        .arg("--inventory")
        .arg(inventory)
        .arg("--state-dir")
        .arg(state)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kiln node status --node {name}: {}",
        text(&out)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `kiln fleet upgrade` with `args` in the rack, run to its end.
fn fleet_upgrade(dir: &Path, inventory: &Path, state: &Path, key: &Path, args: &[&str]) -> Output {
    let mut c = rack_cmd(dir, &["fleet", "upgrade", "--inventory"]);
    c.arg(inventory)
        .arg("--state-dir")
        .arg(state)
        .arg("--trusted-key")
        .arg(key)
        .args(args)
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    wait_output(c.spawn().unwrap(), ROLLOUT_TIMEOUT)
}

/// The ready nodes upgrade through their agents from the provisioner's side of the rack: a
/// build whose initrd cannot boot stops the rolling upgrade at its first node, which comes
/// back on slot A by itself while the next node is never touched; then a good build goes to
/// two nodes at once, and the third keeps its version.
fn rolling_upgrade(dir: &Path, inventory: &Path, artifacts: &Path, state: &Path, key: &Path) {
    let b = bundles();
    let host = rack::PROVISIONER_CIDR.split('/').next().unwrap();
    let mut http = Command::new(KILN);
    http.args(["lab", "rack", "exec", "--dir"])
        .arg(dir)
        .args(["--", "python3", "-m", "http.server", "8088", "--bind", host])
        .arg("--directory")
        .arg(&b.tree)
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut http = http.spawn().unwrap();
    // The nodes take their addresses from kiln's DHCP (`mode: dhcp`), which the rollout served
    // while it ran; a site keeps `kiln pxe serve` running for them, with the rollout's leases.
    let mut dhcp = rack_cmd(
        dir,
        &[
            "pxe",
            "serve",
            "--mode",
            "dhcp",
            "--interface",
            rack::BRIDGE,
        ],
    )
    .args([
        "--pool-start",
        rack::POOL_START,
        "--pool-end",
        rack::POOL_END,
    ])
    .arg("--inventory")
    .arg(inventory)
    .arg("--artifacts")
    .arg(artifacts)
    .arg("--state")
    .arg(state.join("pxe"))
    .process_group(0)
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let base = format!("http://{host}:8088");
    let bad = format!("{base}/bad");
    let v2 = format!("{base}/v2");
    let upgrade = |args: &[&str]| fleet_upgrade(dir, inventory, state, key, args);
    let boot_of = |node: &str| agent_status(dir, inventory, state, node)["boot"].clone();
    let started = Instant::now();

    // The dry run asks each node's agent to check the build and plan the write.
    let out = upgrade(&[
        "--image",
        &bad,
        "--nodes",
        "node-01,node-02",
        "--dry-run",
        "--output",
        "json",
    ]);
    assert!(out.status.success(), "dry run: {}", text(&out));
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = plan["nodes"].as_array().unwrap();
    assert_eq!(rows[0]["node"], "node-01", "{plan:#}");
    assert_eq!(rows[1]["wave"], 2, "{plan:#}");
    for r in rows {
        assert_eq!(
            r["verdict"], "would write slot B (generation 2) and reboot",
            "{plan:#}"
        );
    }
    for n in ["node-01", "node-02"] {
        let boot = boot_of(n);
        assert!(boot["staged"].is_null(), "the dry run staged {n}: {boot:#}");
    }

    // The bad build: node-01 tries it, falls back, and the upgrade stops there.
    let out = upgrade(&[
        "--image",
        &bad,
        "--nodes",
        "node-01,node-02",
        "--boot-timeout",
        "25m",
    ]);
    let bad_done = started.elapsed();
    let said = text(&out);
    assert!(!out.status.success(), "a bad build went through:\n{said}");
    assert!(
        said.contains(
            "node node-01 failed: slot B (generation 2) failed and the node is back on slot A"
        ) && said.contains("used up its 3 boot tries")
            && said.contains("1 node(s) not upgraded"),
        "{said}"
    );
    let st = status(dir, state);
    let up = &st["upgrade"];
    assert_eq!(up["nodes"][0]["stage"], "failed", "{up:#}");
    assert_eq!(up["nodes"][1]["stage"], "pending", "{up:#}");
    let back = boot_of("node-01");
    assert_eq!(back["booted"]["slot"], "A", "{back:#}");
    assert_eq!(back["booted"]["state"], "good", "{back:#}");
    let untouched = boot_of("node-02");
    assert_eq!(untouched["booted"]["generation"], 1, "{untouched:#}");
    assert!(untouched["staged"].is_null(), "{untouched:#}");

    // The good build, two nodes at a time.
    let out = upgrade(&[
        "--image",
        &v2,
        "--nodes",
        "node-01,node-02",
        "--max-unavailable",
        "2",
    ]);
    assert!(out.status.success(), "good upgrade: {}", text(&out));
    let good_done = started.elapsed();
    for (n, generation) in [("node-01", 3), ("node-02", 2)] {
        let boot = boot_of(n);
        assert_eq!(boot["booted"]["slot"], "B", "{n}: {boot:#}");
        assert_eq!(boot["booted"]["generation"], generation, "{n}: {boot:#}");
        assert_eq!(boot["booted"]["state"], "good", "{n}: {boot:#}");
        assert_eq!(
            boot["booted"]["image"]["rootfsSha256"],
            b.v2_rootfs.as_str(),
            "{n}: {boot:#}"
        );
        assert_eq!(boot["rollback"]["slot"], "A", "{n}: {boot:#}");
    }
    let kept = boot_of("node-03");
    assert_eq!(kept["booted"]["slot"], "A", "{kept:#}");
    assert_ne!(
        kept["booted"]["image"]["rootfsSha256"],
        b.v2_rootfs.as_str(),
        "{kept:#}"
    );
    let st = status(dir, state);
    for n in st["upgrade"]["nodes"].as_array().unwrap() {
        assert_eq!(n["stage"], "done", "{st:#}");
    }
    eprintln!(
        "fleet upgrade: dry run and the bad build stopped at node-01 after {:.0} s; \
         two nodes upgraded at once in {:.0} s",
        bad_done.as_secs_f64(),
        (good_done - bad_done).as_secs_f64()
    );
    for server in [&mut http, &mut dhcp] {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(server.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = server.wait();
    }
}
