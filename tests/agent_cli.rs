//! `kiln agent run` as a process on a temporary root, driven through its unix socket by
//! `kiln node status|plan|apply` and the API client: drift repair by the running agent,
//! crash recovery, sd_notify, and starting without a config; and its network API, reached by
//! `kiln cluster kubeconfig` with the fleet's credentials.

mod common;

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kiln_agent::status::{NodeStatus, PlanReport};

const KILN: &str = env!("CARGO_BIN_EXE_kiln");
const TIMEOUT: Duration = Duration::from_secs(60);

fn host_tree(slot: &str) -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    let etc = t.path().join("etc");
    fs::create_dir_all(&etc).unwrap();
    fs::write(etc.join("passwd"), "root:x:0:0:root:/root:/bin/bash\n").unwrap();
    fs::write(etc.join("group"), "root:x:0:\n").unwrap();
    fs::create_dir_all(t.path().join("proc")).unwrap();
    fs::write(
        t.path().join("proc/cmdline"),
        format!("root=/dev/sda2 kiln.slot={slot} quiet\n"),
    )
    .unwrap();
    fs::create_dir_all(t.path().join("var/lib/kiln")).unwrap();
    t
}

fn write_config(root: &Path, spec_yaml: &str) {
    fs::write(
        root.join("var/lib/kiln/node.yaml"),
        format!("apiVersion: kiln.dev/v1alpha1\nkind: NodeConfig\nspec:\n{spec_yaml}"),
    )
    .unwrap();
}

/// A running `kiln agent run`; killed on drop.
struct Agent {
    child: Child,
    lines: mpsc::Receiver<String>,
    socket: PathBuf,
}

impl Agent {
    fn start(root: &Path, env: &[(&str, String)]) -> Agent {
        let socket = root.join("agent.sock");
        let mut cmd = Command::new(KILN);
        cmd.args(["agent", "run", "--resync-secs", "3600", "--root"])
            .arg(root)
            .arg("--socket")
            .arg(&socket)
            .env("KILN_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("starting kiln agent run");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Agent {
            child,
            lines,
            socket,
        }
    }

    /// The agent's first stdout line, which must be its ready line.
    fn ready_line(&self) -> String {
        self.lines
            .recv_timeout(TIMEOUT)
            .expect("the agent printed its ready line")
    }

    fn node(&self, args: &[&str]) -> Output {
        Command::new(KILN)
            .arg("node")
            .args(args)
            .arg("--socket")
            .arg(&self.socket)
            .output()
            .unwrap()
    }

    fn status(&self) -> NodeStatus {
        let out = self.node(&["status", "--output", "json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn plan(&self) -> PlanReport {
        let out = self.node(&["plan", "-o", "json"]);
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cond(s: &NodeStatus, kind: &str) -> bool {
    s.condition(kind)
        .unwrap_or_else(|| panic!("no {kind} in {s:#?}"))
        .status
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn status_plan_and_apply_through_the_socket() {
    let t = host_tree("B");
    let root = t.path();
    write_config(
        root,
        "  hostname: cli-node\n  files: [{path: /etc/motd, content: \"one\\n\"}]\n  sysctls: {vm.swappiness: \"10\"}\n",
    );
    let agent = Agent::start(root, &[]);
    assert_eq!(agent.ready_line(), "kiln-agent ready node=cli-node slot=B");

    let s = agent.status();
    assert!(cond(&s, "Ready"), "{s:#?}");
    assert_eq!(s.slot, "B");
    assert_eq!(fs::read_to_string(root.join("etc/motd")).unwrap(), "one\n");
    assert_eq!(
        fs::read_to_string(root.join("proc/sys/vm/swappiness")).unwrap(),
        "10\n"
    );
    let text = agent.node(&["status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("file:/etc/motd") && text.contains("Converged"),
        "{text}"
    );
    assert!(agent.plan().actions.is_empty());

    // A config change shows in plan and lands with apply.
    write_config(
        root,
        "  hostname: cli-node\n  files: [{path: /etc/motd, content: \"two\\n\"}, {path: /etc/kiln-new, content: \"x\"}]\n",
    );
    let plan: Vec<String> = agent
        .plan()
        .actions
        .into_iter()
        .map(|a| a.description)
        .collect();
    assert_eq!(
        plan,
        [
            "create file /etc/kiln-new",
            "rewrite file /etc/motd",
            "remove file /etc/sysctl.d/90-kiln.conf",
            "remove directory /etc/sysctl.d",
        ]
    );
    let out = agent.node(&["apply", "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: NodeStatus = serde_json::from_slice(&out.stdout).unwrap();
    assert!(cond(&s, "Ready"));
    assert_eq!(fs::read_to_string(root.join("etc/motd")).unwrap(), "two\n");
    assert_eq!(fs::read_to_string(root.join("etc/kiln-new")).unwrap(), "x");

    // A bad config: exit status, field paths, and the last good state stays.
    write_config(
        root,
        "  hostname: No_Good\n  files: [{path: /etc/motd, content: \"three\\n\", owner: \"a:b:c\"}]\n",
    );
    let out = agent.node(&["apply", "--output", "json"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("rejected"));
    let s: NodeStatus = serde_json::from_slice(&out.stdout).unwrap();
    let paths: Vec<&str> = s.config.errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["spec.hostname", "spec.files[0].owner"]);
    assert_eq!(fs::read_to_string(root.join("etc/motd")).unwrap(), "two\n");
    let plan = agent.node(&["plan"]);
    assert!(!plan.status.success());
    assert!(String::from_utf8_lossy(&plan.stdout).contains("spec.hostname"));

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (code, metrics) = rt
        .block_on(kiln_agent::Client::new(&agent.socket).call("GET", "/metrics"))
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics);
    assert_eq!(code, 200);
    assert!(
        metrics.contains("kiln_agent_reconciles_total{controller=\"host\",result=\"ok\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("kiln_agent_actions_total"), "{metrics}");
    assert!(
        metrics.contains("kiln_agent_condition{type=\"ConfigValid\"} 0"),
        "{metrics}"
    );
}

#[test]
fn the_running_agent_repairs_a_hand_edit_at_once() {
    let t = host_tree("A");
    let root = t.path();
    write_config(
        root,
        "  files: [{path: /etc/app/app.conf, content: \"managed\\n\", mode: \"0644\"}]\n",
    );
    // Resync is an hour away: only the file watcher can bring the content back.
    let agent = Agent::start(root, &[]);
    agent.ready_line();
    let conf = root.join("etc/app/app.conf");
    assert_eq!(fs::read_to_string(&conf).unwrap(), "managed\n");
    fs::write(root.join("etc/app/notes.txt"), "mine\n").unwrap();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut events = rt
        .block_on(kiln_agent::Client::new(&agent.socket).events())
        .unwrap();

    fs::write(&conf, "edited by hand\n").unwrap();
    wait_for("the edit to be repaired", || {
        fs::read_to_string(&conf).is_ok_and(|c| c == "managed\n")
    });
    fs::remove_file(&conf).unwrap();
    wait_for("the deleted file to come back", || {
        fs::read_to_string(&conf).is_ok_and(|c| c == "managed\n")
    });
    let drift = rt.block_on(async {
        tokio::time::timeout(TIMEOUT, async {
            while let Some(ev) = events.recv().await {
                if ev.kind == "drift" {
                    return Some(ev);
                }
            }
            None
        })
        .await
    });
    let drift = drift
        .expect("a drift event in time")
        .expect("the event stream stayed open");
    assert_eq!(drift.resource.as_deref(), Some("file:/etc/app/app.conf"));
    assert_eq!(
        fs::read_to_string(root.join("etc/app/notes.txt")).unwrap(),
        "mine\n"
    );
    // The status is published right after the repair it reports.
    wait_for("both repairs in the status", || {
        agent.status().drift_repairs >= 2
    });
    assert!(cond(&agent.status(), "Ready"));
}

#[test]
fn a_crash_between_actions_converges_on_restart() {
    let t = host_tree("A");
    let root = t.path();
    let files: Vec<String> = (0..20)
        .map(|i| format!("{{path: /srv/crash/d{}/f{i}, content: \"{i}\\n\"}}", i % 4))
        .collect();
    write_config(root, &format!("  files: [{}]\n", files.join(", ")));
    // Files in a directory that exists are renamed into place one by one; d2 and d3 are new,
    // so each is built whole under a temporary name and appears at once.
    for d in ["d0", "d1"] {
        fs::create_dir_all(root.join("srv/crash").join(d)).unwrap();
    }
    let in_dir = |d: usize| {
        (0..20)
            .filter(|i| i % 4 == d && root.join(format!("srv/crash/d{d}/f{i}")).exists())
            .count()
    };

    let mut crashing = Agent::start(
        root,
        &[("KILN_AGENT_FAILPOINT", "apply-abort-after:7".into())],
    );
    let status = crashing.child.wait().unwrap();
    assert!(!status.success(), "the failpoint aborted the agent");
    let journal = root.join("var/lib/kiln/agent/journal.json");
    assert!(journal.exists(), "the interrupted apply left its journal");
    let written = (0..20)
        .filter(|i| root.join(format!("srv/crash/d{}/f{i}", i % 4)).exists())
        .count();
    assert!(
        written > 0 && written < 20,
        "crashed mid-apply ({written} of 20 written)"
    );
    for d in [2, 3] {
        assert!(
            [0, 5].contains(&in_dir(d)),
            "new directory d{d} is whole or absent, not {} of 5",
            in_dir(d)
        );
    }

    let agent = Agent::start(root, &[]);
    agent.ready_line();
    let s = agent.status();
    assert!(cond(&s, "Ready"), "{s:#?}");
    assert!(
        s.recovered
            .as_deref()
            .is_some_and(|r| r.contains("interrupted")),
        "{s:#?}"
    );
    assert!(!journal.exists());
    for i in 0..20 {
        let f = root.join(format!("srv/crash/d{}/f{i}", i % 4));
        assert_eq!(fs::read_to_string(&f).unwrap(), format!("{i}\n"));
    }
    let leftovers: Vec<_> = fs::read_dir(root.join("srv/crash"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().contains("kiln-tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // Nothing was lost from the record: dropping the files removes every one, and the
    // directories kiln made for them; the ones made by hand stay.
    write_config(root, "  files: []\n");
    let out = agent.node(&["apply"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let left: Vec<_> = fs::read_dir(root.join("srv/crash"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(left, ["d0", "d1"], "everything kiln created is gone");
    assert_eq!(in_dir(0) + in_dir(1), 0);
}

#[test]
fn tells_systemd_it_is_ready_and_feeds_the_watchdog() {
    let t = host_tree("A");
    let root = t.path();
    write_config(root, "  files: [{path: /etc/motd, content: \"x\"}]\n");
    let notify = root.join("notify.sock");
    let sock = UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(TIMEOUT)).unwrap();
    let agent = Agent::start(
        root,
        &[
            ("NOTIFY_SOCKET", notify.display().to_string()),
            ("WATCHDOG_USEC", "400000".into()),
        ],
    );
    let mut buf = [0u8; 256];
    let mut seen = Vec::new();
    while !(seen.iter().any(|m| m == "READY=1") && seen.iter().any(|m| m == "WATCHDOG=1")) {
        let n = sock.recv(&mut buf).expect("a notification in time");
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert_eq!(agent.ready_line(), "kiln-agent ready node=localhost slot=A");
}

#[test]
fn starts_without_a_config_and_reports_why_it_is_not_ready() {
    let t = host_tree("B");
    fs::create_dir_all(t.path().join("etc")).unwrap();
    fs::write(t.path().join("etc/hostname"), "fresh\n").unwrap();
    let agent = Agent::start(t.path(), &[]);
    assert_eq!(agent.ready_line(), "kiln-agent ready node=fresh slot=B");
    let s = agent.status();
    assert!(!cond(&s, "Ready"));
    let failed = s.condition("Failed").unwrap();
    assert!(failed.status);
    assert_eq!(failed.reason, "NoValidConfig");
    assert!(failed.message.contains("node.yaml"), "{failed:?}");
}

/// The network API a fleet gives its nodes (`kiln fleet node-config`): an administrator with
/// the fleet's state directory fetches the kubeconfig the node holds; a client of another
/// fleet, a client without a certificate, and a client that expects another node are refused.
#[test]
fn the_network_api_serves_the_fleets_admins_only() {
    let t = host_tree("A");
    let root = t.path();
    let dir = tempfile::tempdir().unwrap();
    let inventory = dir.path().join("fleet.yaml");
    fs::write(
        &inventory,
        "apiVersion: kiln.dev/v1alpha1\nkind: Inventory\nspec:\n  nodes:\n    \
         - name: n1\n      bootAddress: 127.0.0.1\n    - name: n2\n      bootAddress: 127.0.0.2\n",
    )
    .unwrap();
    let spec = dir.path().join("spec.yaml");
    let out = Command::new(KILN)
        .args(["spec", "default"])
        .output()
        .unwrap();
    assert!(out.status.success());
    fs::write(&spec, &out.stdout).unwrap();
    let state = dir.path().join("fleet");
    let out = Command::new(KILN)
        .args(["fleet", "node-config", "n1", "--inventory"])
        .arg(&inventory)
        .arg("--spec")
        .arg(&spec)
        .arg("--state-dir")
        .arg(&state)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fleet = kiln_spec::NodeConfig::from_yaml(&String::from_utf8(out.stdout).unwrap()).unwrap();
    // Only the network API from it (this root is not a whole node), on a free port.
    let port = common::free_port();
    let mut api = fleet
        .spec
        .remote_api
        .expect("the fleet gives each node its API");
    api.listen = format!("127.0.0.1:{port}");
    let config = kiln_spec::NodeConfig {
        spec: kiln_spec::NodeSpec {
            remote_api: Some(api),
            ..Default::default()
        },
        ..fleet
    };
    fs::write(root.join("var/lib/kiln/node.yaml"), config.to_yaml()).unwrap();
    let kubeconfig = "apiVersion: v1\nkind: Config\n# the node's admin kubeconfig\n";
    fs::create_dir_all(root.join("etc/kubernetes")).unwrap();
    fs::write(root.join("etc/kubernetes/admin.conf"), kubeconfig).unwrap();

    let agent = Agent::start(root, &[]);
    agent.ready_line();
    let address = format!("127.0.0.1:{port}");
    common::wait_until("the network API listening", TIMEOUT, || {
        std::net::TcpStream::connect(&address).is_ok()
    });
    let fetch = |node: &str, state: &Path, out: &Path| {
        Command::new(KILN)
            .args(["cluster", "kubeconfig", "--node", node, "--inventory"])
            .arg(&inventory)
            .arg("--state-dir")
            .arg(state)
            .args(["--address", &address, "--out"])
            .arg(out)
            .output()
            .unwrap()
    };
    let fetched = dir.path().join("admin.conf");
    let out = fetch("n1", &state, &fetched);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fs::read_to_string(&fetched).unwrap(), kubeconfig);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(&fetched).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // The node's status over the same API, as `kiln node status` shows it on the node.
    let out = Command::new(KILN)
        .args(["node", "status", "--node", "n1", "--inventory"])
        .arg(&inventory)
        .arg("--state-dir")
        .arg(&state)
        .args(["--address", &address, "--output", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let remote: NodeStatus = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(remote.slot, agent.status().slot);
    assert!(remote.config.valid, "{remote:#?}");

    // An upgrade over the same API reaches the agent, which refuses: this root is no
    // installed node (the install tier upgrades real ones).
    let out = Command::new(KILN)
        .args([
            "node",
            "upgrade",
            "--image",
            "/srv/v2",
            "--dry-run",
            "--node",
            "n1",
        ])
        .arg("--inventory")
        .arg(&inventory)
        .arg("--state-dir")
        .arg(&state)
        .args(["--address", &address])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("409") && err.contains("only an installed node can be upgraded"),
        "{err}"
    );

    // Another fleet's admin: the node does not know its CA (nor it the node's).
    let stranger = dir.path().join("other-fleet");
    kiln_fleet::cluster::FleetSecrets::load_or_create(&stranger).unwrap();
    let refused = dir.path().join("refused.conf");
    let out = fetch("n1", &stranger, &refused);
    assert!(!out.status.success());
    assert!(!refused.exists());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("agent at 127.0.0.1"), "{err}");
    // This fleet's admin, expecting n2 where n1 answers: n1's certificate does not name n2.
    let out = fetch("n2", &state, &refused);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("certificate"), "{err}");
    // No client certificate at all (curl trusting the node's CA).
    let ca = dir.path().join("admin-ca.crt");
    fs::copy(state.join("secrets/admin-ca.crt"), &ca).unwrap();
    let out = Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(&ca)
        .args(["--resolve", &format!("n1:{port}:127.0.0.1")])
        .arg(format!("https://n1:{port}/v1/kubeconfig"))
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("kind: Config"));
}

/// `kiln fleet upgrade` checks the build's signature against the operator's key before it
/// reads the inventory or asks any node: a build on a directory path, or signed by another
/// key, stops there with the reason, and no fleet state is made.
#[test]
fn a_fleet_upgrade_refuses_a_build_the_operator_did_not_sign() {
    let dir = tempfile::tempdir().unwrap();
    let key = |name: &str| {
        let out = Command::new(KILN)
            .args(["key", "generate", "--out"])
            .arg(dir.path().join(name))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir.path().join(name).join("kiln")
    };
    let (builder, operator) = (key("builder"), key("operator"));
    let bundle = dir.path().join("www/v2");
    fs::create_dir_all(&bundle).unwrap();
    fs::write(bundle.join("manifest.json"), "{\"artifacts\": []}\n").unwrap();
    let sign = Command::new("openssl")
        .args(["pkeyutl", "-sign", "-rawin", "-inkey"])
        .arg(builder.with_extension("key"))
        .arg("-in")
        .arg(bundle.join("manifest.json"))
        .arg("-out")
        .arg(bundle.join("manifest.json.sig"))
        .output()
        .unwrap();
    assert!(
        sign.status.success(),
        "{}",
        String::from_utf8_lossy(&sign.stderr)
    );
    let port = common::free_port();
    let mut http = Command::new("python3")
        .args([
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            &port.to_string(),
        ])
        .arg("--directory")
        .arg(dir.path().join("www"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    common::wait_until("the HTTP server", TIMEOUT, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let state = dir.path().join("fleet");
    let upgrade = |image: &str| {
        Command::new(KILN)
            .args(["fleet", "upgrade", "--inventory", "/nonexistent/fleet.yaml"])
            .args(["--image", image, "--trusted-key"])
            .arg(operator.with_extension("pub"))
            .arg("--state-dir")
            .arg(&state)
            .output()
            .unwrap()
    };
    let out = upgrade(&format!("http://127.0.0.1:{port}/v2"));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("checking the build's signature")
            && err.contains("manifest.json is not signed by any of the trusted keys"),
        "{err}"
    );
    let out = upgrade(bundle.to_str().unwrap());
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("give the build's base URL"), "{err}");
    assert!(!state.exists(), "fleet state was made");
    let _ = http.kill();
    let _ = http.wait();
}
