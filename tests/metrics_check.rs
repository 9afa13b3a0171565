//! kiln's Prometheus expositions pass `promtool check metrics`, and the Grafana dashboard
//! (dashboards/kiln-fleet.json) is laid out as Grafana loads it, every query valid PromQL
//! (`promtool check rules` parses each one) reading only metrics kiln really exposes.
//!
//! The fleet's exposition is rendered from nodes the real stage machine drove, with the BMC
//! operations it asked for and a real boot trace's counters; the agent's is read from a
//! running `kiln agent run` through its API. (A real netboot server's own `/metrics` is checked
//! the same way by pxe_interop's HTTP test.)

mod common;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::LazyLock;
use std::time::Duration;

use kiln_fleet::metrics::FleetMetrics;
use kiln_fleet::stage::{
    self, BmcAction, BmcOutcome, Command as StageCommand, Limits, Load, NodeProgress, Observation,
    Stage, StepInput,
};
use kiln_fleet::store::{Snapshot, StoredReport};
use kiln_netboot::trace::{EventKind, Trace};
use kiln_spec::enrol::{Phase, Report};
use kiln_spec::exposition::to_text_format;
use serde_json::{Value, json};

const KILN: &str = env!("CARGO_BIN_EXE_kiln");

/// What the fleet view's `/metrics` gives a scraper that does not ask for OpenMetrics.
static FLEET: LazyLock<String> = LazyLock::new(fleet_exposition);
/// What a running agent's `/metrics` gives the same scraper.
static AGENT: LazyLock<String> = LazyLock::new(agent_exposition);

/// A node driven through the stage machine as the rollout drives it: each BMC action it asks
/// for is answered by `bmc` (and recorded in `metrics`, as the rollout's actuator does), and
/// each of `reports` (its phase, seconds after the last event) arrives once it waits on no BMC.
fn drive(
    metrics: &FleetMetrics,
    bmc: impl Fn(BmcAction) -> (BmcOutcome, Duration),
    reports: &[(Phase, u64)],
) -> NodeProgress {
    let limits = Limits::default();
    let mut node = NodeProgress::new(0);
    let mut now_ms = 0;
    let mut inbox = Vec::new();
    let mut reports = reports.iter();
    loop {
        let input = StepInput {
            now_ms,
            limits: &limits,
            load: Load::default(),
            bmc_busy: false,
            netboot_hint: None,
        };
        for StageCommand::Bmc(action) in stage::step(&mut node, &std::mem::take(&mut inbox), input)
        {
            let (outcome, took) = bmc(action);
            metrics.bmc_operation(action, took, &outcome);
            now_ms += took.as_millis() as u64;
            inbox.push(Observation::Bmc { action, outcome });
        }
        if inbox.is_empty() {
            let Some((phase, after_secs)) = reports.next() else {
                return node;
            };
            let mut report = Report::new(*phase, None);
            if *phase == Phase::AgentReady {
                report.slot = Some("A".into());
            }
            now_ms += after_secs * 1000;
            inbox.push(Observation::Report(StoredReport {
                at_ms: now_ms,
                report,
            }));
        }
    }
}

fn answered(action: BmcAction) -> (BmcOutcome, Duration) {
    let took = match action {
        BmcAction::NetbootOnce | BmcAction::NetbootIfOff => Duration::from_millis(1_200),
        BmcAction::BootFromDisk => Duration::from_millis(300),
    };
    (BmcOutcome::Done { note: None }, took)
}

fn wrong_password(_: BmcAction) -> (BmcOutcome, Duration) {
    let outcome = BmcOutcome::Failed {
        kind: "auth".into(),
        message: "wrong password".into(),
        transient: false,
    };
    (outcome, Duration::from_millis(80))
}

/// A boot trace that saw one node's boot chain, a failed download among it.
fn boot_trace(dir: &Path) -> Trace {
    let trace = Trace::open(dir).unwrap();
    let mac = "52:54:00:00:00:01";
    let client = Ipv4Addr::new(10, 33, 0, 50).into();
    let http = |path: &str, status, bytes, error: Option<&str>| EventKind::Http {
        client,
        method: "GET".into(),
        path: path.into(),
        status,
        bytes,
        duration_ms: 12,
        error: error.map(String::from),
    };
    let events = [
        EventKind::DhcpReceived {
            message: "discover".into(),
            port: 68,
            arch: Some(0),
            ipxe: false,
        },
        EventKind::DhcpSent {
            message: "offer".into(),
            address: Some(Ipv4Addr::new(10, 33, 0, 50)),
            boot_file: Some("undionly.kpxe".into()),
        },
        EventKind::Tftp {
            client,
            file: "undionly.kpxe".into(),
            bytes: 70_000,
            blksize: 1468,
            windowsize: 1,
            duration_ms: 40,
            error: None,
        },
        http("/boot/52-54-00-00-00-01/vmlinuz", 200, 8_000_000, None),
        http("/artifacts/initrd.img", 404, 0, Some("no such artifact")),
        Report::new(Phase::InstallerStarted, None).into(),
    ];
    for e in events {
        trace.record(mac, e);
    }
    trace
}

fn fleet_exposition() -> String {
    let metrics = FleetMetrics::new();
    let install = [
        (Phase::InstallerStarted, 20),
        (Phase::Installed, 300),
        (Phase::AgentReady, 60),
    ];
    let nodes = [
        ("node-01", drive(&metrics, answered, &install)),
        ("node-02", drive(&metrics, answered, &install)),
        ("node-03", drive(&metrics, wrong_password, &[])),
        ("node-04", drive(&metrics, answered, &[])),
        (
            "node-05",
            drive(
                &metrics,
                answered,
                &[(Phase::InstallerStarted, 30), (Phase::Failed, 10)],
            ),
        ),
    ];
    let stages: Vec<Stage> = nodes.iter().map(|(_, n)| n.stage).collect();
    assert_eq!(
        stages,
        [
            Stage::Ready,
            Stage::Ready,
            Stage::Failed,
            Stage::Netbooting,
            Stage::Failed
        ]
    );
    let snapshot = Snapshot {
        nodes: nodes.map(|(name, n)| (name.to_string(), n)).into(),
        ..Snapshot::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let trace = boot_trace(dir.path());
    let text = metrics.render(&snapshot, 3_600_000, Some(&trace));
    assert_eq!(text.matches("# EOF").count(), 1, "{text}");
    to_text_format(&text)
}

/// A running `kiln agent run` on a temporary root; killed on drop.
struct RunningAgent {
    child: Child,
    socket: PathBuf,
    _root: tempfile::TempDir,
}

impl RunningAgent {
    /// An agent on a root that boots slot B (by its command line) with a small config.
    fn start() -> RunningAgent {
        let root = tempfile::tempdir().unwrap();
        let files = [
            ("etc/passwd", "root:x:0:0:root:/root:/bin/bash\n"),
            ("etc/group", "root:x:0:\n"),
            ("proc/cmdline", "root=/dev/sda3 kiln.slot=B quiet\n"),
            (
                "var/lib/kiln/node.yaml",
                "apiVersion: kiln.dev/v1alpha1\nkind: NodeConfig\nspec:\n  hostname: metrics-node\n  \
                 files: [{path: /etc/motd, content: \"hello\\n\"}]\n",
            ),
        ];
        for (path, content) in files {
            let path = root.path().join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, content).unwrap();
        }
        let socket = root.path().join("agent.sock");
        let child = Command::new(KILN)
            .args(["agent", "run", "--resync-secs", "3600", "--root"])
            .arg(root.path())
            .arg("--socket")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting kiln agent run");
        RunningAgent {
            child,
            socket,
            _root: root,
        }
    }

    /// `GET /metrics` as a scraper that does not ask for OpenMetrics (promtool's format).
    fn metrics(&self) -> Option<String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (code, body) = rt
            .block_on(kiln_agent::Client::new(&self.socket).call("GET", "/metrics"))
            .ok()?;
        assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
        Some(String::from_utf8_lossy(&body).into_owned())
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent_exposition() -> String {
    let agent = RunningAgent::start();
    let mut text = String::new();
    common::wait_until(
        "the agent's first reconcile in its metrics",
        Duration::from_secs(60),
        || {
            text = agent.metrics().unwrap_or_default();
            text.contains("kiln_agent_condition{type=\"Ready\"} 1")
        },
    );
    text
}

/// The names of the series in a text exposition (a histogram's with their suffixes).
fn series_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l[..l.find(['{', ' ']).unwrap_or(l.len())].to_string())
        .collect()
}

/// The `kiln_…` names an expression reads.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("kiln_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

fn assert_lines(text: &str, lines: &[&str]) {
    for line in lines {
        assert!(text.lines().any(|l| l == *line), "no {line} in:\n{text}");
    }
}

#[test]
fn the_fleet_exposition_passes_promtool() {
    common::promtool_check_metrics(&FLEET);
    assert_lines(
        &FLEET,
        &[
            "kiln_fleet_nodes{stage=\"ready\"} 2",
            "kiln_fleet_nodes{stage=\"failed\"} 2",
            "kiln_fleet_nodes{stage=\"netbooting\"} 1",
            "kiln_fleet_nodes{stage=\"pending\"} 0",
            "kiln_fleet_stage_duration_seconds_count{stage=\"installing\"} 3",
            "kiln_fleet_installs_total 3",
            "kiln_fleet_bmc_operation_duration_seconds_count{action=\"netboot-once\"} 5",
            "kiln_fleet_bmc_operation_duration_seconds_count{action=\"boot-from-disk\"} 2",
            "kiln_fleet_bmc_operation_errors_total{action=\"netboot-once\",kind=\"auth\"} 1",
            "kiln_netboot_events_total{service=\"http\",event=\"get\",result=\"failed\"} 1",
            "kiln_netboot_bytes_total{service=\"tftp\"} 70000",
        ],
    );
}

#[test]
fn the_agent_exposition_passes_promtool() {
    common::promtool_check_metrics(&AGENT);
    assert_lines(
        &AGENT,
        &[
            "kiln_agent_condition{type=\"ConfigValid\"} 1",
            "kiln_agent_condition{type=\"Failed\"} 0",
            "kiln_agent_boot_slot_info{role=\"booted\",slot=\"B\",state=\"unknown\"} 1",
        ],
    );
    assert!(
        AGENT.contains("kiln_agent_reconciles_total{controller=\"host\",result=\"ok\"}"),
        "{}",
        *AGENT
    );
}

/// Fails unless no two panels of the dashboard share a cell of its 24-column grid.
fn assert_no_overlaps(panels: &[Value]) {
    let cells = |p: &Value| {
        let g = &p["gridPos"];
        let n = |k: &str| g[k].as_u64().unwrap();
        (n("x"), n("y"), n("w"), n("h"))
    };
    for (i, a) in panels.iter().enumerate() {
        let (ax, ay, aw, ah) = cells(a);
        for b in &panels[i + 1..] {
            let (bx, by, bw, bh) = cells(b);
            let apart = ax + aw <= bx || bx + bw <= ax || ay + ah <= by || by + bh <= ay;
            assert!(apart, "panels {} and {} overlap", a["id"], b["id"]);
        }
    }
}

#[test]
fn the_dashboard_loads_and_queries_only_what_kiln_exposes() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards/kiln-fleet.json");
    let d: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(d["uid"], "kiln-fleet");
    assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()));
    let schema = d["schemaVersion"].as_u64().unwrap();
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");
    let vars = d["templating"]["list"].as_array().unwrap();
    assert!(
        vars.iter().any(|v| v["name"] == "datasource"
            && v["type"] == "datasource"
            && v["query"] == "prometheus"),
        "no Prometheus data source variable: {vars:#?}"
    );

    let panels = d["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    let mut kinds = BTreeSet::new();
    let mut rules = Vec::new();
    let mut read = BTreeSet::new();
    for p in panels {
        let id = p["id"].as_u64().expect("a panel id");
        assert!(ids.insert(id), "panel id {id} twice");
        let g = &p["gridPos"];
        let (x, w, h) = (
            g["x"].as_u64().unwrap(),
            g["w"].as_u64().unwrap(),
            g["h"].as_u64().unwrap(),
        );
        assert!(g["y"].is_u64() && h > 0, "panel {id}: {g}");
        assert!(w > 0 && x + w <= 24, "panel {id} is off the grid: {g}");
        assert!(
            p["title"].as_str().is_some_and(|t| !t.is_empty()),
            "panel {id}"
        );
        kinds.insert(p["type"].as_str().unwrap());
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "panel {id}");
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {id} has no query");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "panel {id}");
            let expr = t["expr"].as_str().unwrap();
            read.extend(metric_names(expr));
            // Grafana fills in its interval before Prometheus sees the query.
            let expr = expr.replace("$__rate_interval", "5m");
            let record = format!("kiln:dashboard:panel_{id}_{}", t["refId"].as_str().unwrap());
            rules.push(json!({ "record": record, "expr": expr }));
        }
    }
    assert_no_overlaps(panels);
    for kind in ["timeseries", "stat", "bargauge"] {
        assert!(kinds.contains(kind), "no {kind} panel: {kinds:?}");
    }

    let exposed: BTreeSet<String> = series_names(&FLEET)
        .into_iter()
        .chain(series_names(&AGENT))
        .collect();
    let unknown: Vec<&String> = read.iter().filter(|n| !exposed.contains(*n)).collect();
    assert!(
        unknown.is_empty(),
        "the dashboard reads metrics kiln does not expose: {unknown:?}\nexposed: {exposed:?}"
    );
    for wanted in [
        "kiln_fleet_nodes",
        "kiln_fleet_stage_duration_seconds_bucket",
        "kiln_fleet_installs_total",
        "kiln_fleet_bmc_operation_duration_seconds_bucket",
        "kiln_fleet_bmc_operation_errors_total",
        "kiln_netboot_events_total",
        "kiln_netboot_bytes_total",
        "kiln_agent_reconcile_duration_seconds_bucket",
        "kiln_agent_drift_repairs_total",
        "kiln_agent_condition",
        "kiln_agent_boot_slot_info",
    ] {
        assert!(
            read.contains(wanted),
            "the dashboard does not show {wanted}"
        );
    }

    common::require("promtool", "prometheus");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard-rules.yaml");
    // JSON is YAML: promtool reads it as a rule file.
    let groups = json!({ "groups": [{ "name": "kiln-dashboard", "rules": rules }] });
    std::fs::write(&file, serde_json::to_string_pretty(&groups).unwrap()).unwrap();
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check rules on the dashboard's queries:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
