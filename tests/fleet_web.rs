//! The fleet view in a real browser: headless Chromium, driven over WebDriver, against a real
//! `kiln fleet serve` on loopback reading a state directory written by the rollout's own code
//! (its stage machine, store and netboot trace). Screenshots land in
//! `$CARGO_TARGET_TMPDIR/fleet-web/`.
//!
//! The view of a running rollout, its token-guarded retry and its metrics during a real lab
//! rollout are covered by tests/fleet_rollout.rs.

mod common;

use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::key::Key;
use fantoccini::{Client, ClientBuilder, Locator};
use kiln_fleet::stage::{
    self, BmcAction, BmcOutcome, Limits, Load, NodeProgress, Observation, StepInput,
};
use kiln_fleet::store::{MachineInfo, RolloutInfo, Store, StoredReport};
use kiln_netboot::trace::{EventKind, Trace};
use kiln_spec::enrol::{Phase, Report};
use kiln_spec::inventory::NodeRole;
use serde_json::Value;

use common::{FleetView, free_port, promtool_check_metrics, require, wait_until};

const IMAGE: &str = "5d41402abc4b2a76b9719d911017c592aa5d41402abc4b2a76b9719d911017c5";
/// Generous: a loaded 2-core machine renders slowly, and a hang must still end.
const PAGE_TIMEOUT: Duration = Duration::from_secs(30);

fn now_ms() -> u64 {
    kiln_fleet::rollout::now_ms()
}

fn mac(i: usize) -> String {
    format!("52:54:00:77:{:02x}:{:02x}", i / 256, i % 256)
}

fn done(action: BmcAction) -> Observation {
    Observation::Bmc {
        action,
        outcome: BmcOutcome::Done { note: None },
    }
}

fn report(phase: Phase, message: Option<&str>) -> Report {
    let mut r = Report::new(phase, message.map(String::from));
    if matches!(phase, Phase::Installed | Phase::AgentReady) {
        r.image_sha256 = Some(IMAGE.into());
    }
    if phase == Phase::AgentReady {
        r.slot = Some("A".into());
    }
    r
}

/// Where a simulated node is taken by the real stage machine.
#[derive(Clone, Copy, PartialEq)]
enum Goal {
    Pending,
    Netbooting,
    Installing,
    Ready,
    RefusedDisk,
}

/// A rollout's state, written the way `kiln fleet rollout` writes it: each node's progress
/// comes out of `stage::step`, its reports go to the store, its boot chain to the trace.
struct Rack {
    store: Store,
    trace: std::sync::Arc<Trace>,
    nodes: Vec<(String, NodeProgress)>,
}

impl Rack {
    fn new(dir: &Path, goals: &[Goal]) -> Rack {
        let store = Store::open(dir).unwrap();
        let trace = kiln_netboot::server::open_trace(&dir.join("pxe")).unwrap();
        let names: Vec<String> = (1..=goals.len()).map(|i| format!("node-{i:04}")).collect();
        store
            .set_rollout(&RolloutInfo {
                image_sha256: IMAGE.into(),
                started_ms: now_ms(),
                nodes: names.clone(),
                machines: names
                    .iter()
                    .enumerate()
                    .map(|(i, n)| {
                        let role = if i == 0 {
                            NodeRole::ControlPlane
                        } else {
                            NodeRole::Worker
                        };
                        let macs = vec![mac(i)];
                        (n.clone(), MachineInfo { role, macs })
                    })
                    .collect(),
            })
            .unwrap();
        let mut rack = Rack {
            store,
            trace,
            nodes: Vec::new(),
        };
        for (i, (name, goal)) in names.into_iter().zip(goals).enumerate() {
            let progress = rack.drive(&name, i, *goal);
            rack.nodes.push((name, progress));
        }
        rack.store.put_nodes(&rack.nodes).unwrap();
        rack
    }

    fn step(&self, node: &mut NodeProgress, obs: &[Observation]) {
        let limits = Limits::default();
        stage::step(
            node,
            obs,
            StepInput {
                now_ms: now_ms(),
                limits: &limits,
                load: Load::default(),
                bmc_busy: false,
                netboot_hint: None,
            },
        );
    }

    fn report(&self, name: &str, node: &mut NodeProgress, r: Report) {
        let kept = StoredReport {
            at_ms: now_ms(),
            report: r,
        };
        self.store.add_report(name, &kept).unwrap();
        self.step(node, &[Observation::Report(kept)]);
    }

    /// The boot chain a PXE client walks, as the netboot services record it.
    fn netboot(&self, mac: &str) {
        let client = Ipv4Addr::new(10, 0, 0, 50).into();
        let t = &self.trace;
        t.record(
            mac,
            EventKind::DhcpReceived {
                message: "discover".into(),
                port: 67,
                arch: Some(7),
                ipxe: false,
            },
        );
        t.record(
            mac,
            EventKind::DhcpSent {
                message: "offer".into(),
                address: None,
                boot_file: Some("ipxe.efi".into()),
            },
        );
        t.record(
            mac,
            EventKind::Tftp {
                client,
                file: "ipxe.efi".into(),
                bytes: 1_032_192,
                blksize: 1468,
                windowsize: 1,
                duration_ms: 180,
                error: None,
            },
        );
        for (path, bytes, ms) in [
            ("boot.ipxe", 900, 2),
            ("vmlinuz", 8_388_608, 310),
            ("initrd.img", 31_457_280, 1_020),
            ("rootfs.squashfs", 262_144_000, 6_400),
        ] {
            t.record(
                mac,
                EventKind::Http {
                    client,
                    method: "GET".into(),
                    path: format!("/boot/{mac}/{path}"),
                    status: 200,
                    bytes,
                    duration_ms: ms,
                    error: None,
                },
            );
        }
    }

    fn drive(&self, name: &str, i: usize, goal: Goal) -> NodeProgress {
        let mut p = NodeProgress::new(now_ms());
        if goal == Goal::Pending {
            return p;
        }
        self.step(&mut p, &[]);
        self.step(&mut p, &[done(BmcAction::NetbootOnce)]);
        if goal == Goal::Netbooting {
            return p;
        }
        self.netboot(&mac(i));
        self.report(name, &mut p, report(Phase::InstallerStarted, None));
        self.report(name, &mut p, report(Phase::Planned, Some("/dev/vda")));
        if goal == Goal::RefusedDisk {
            self.report(
                name,
                &mut p,
                report(
                    Phase::Failed,
                    Some(
                        "refusing to erase /dev/vda: it holds an ext4 filesystem labelled precious",
                    ),
                ),
            );
            return p;
        }
        if goal == Goal::Installing {
            return p;
        }
        self.report(name, &mut p, report(Phase::Installed, None));
        self.report(name, &mut p, report(Phase::AgentReady, None));
        self.step(&mut p, &[done(BmcAction::BootFromDisk)]);
        p
    }

    /// `name` finishes writing its disk: a stage change the open page must show by itself.
    fn installed(&mut self, name: &str) {
        let mut p = self
            .nodes
            .iter()
            .find(|(n, _)| n == name)
            .unwrap()
            .1
            .clone();
        self.report(name, &mut p, report(Phase::Installed, None));
        self.store.put_nodes(&[(name.to_string(), p)]).unwrap();
    }
}

/// Chromium under chromedriver, in a process group of their own that is killed with it (a
/// failed assertion included), with its profile in a temporary directory.
struct Browser {
    driver: Child,
    client: Client,
    shots: PathBuf,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.driver.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.driver.wait();
    }
}

impl Browser {
    async fn start() -> Browser {
        require("chromium", "chromium");
        require("chromedriver", "chromium-driver");
        let port = free_port();
        let profile = tempfile::tempdir().unwrap();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            // Chromium's own scratch files go with the profile.
            .env("TMPDIR", profile.path())
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_until("chromedriver to listen", PAGE_TIMEOUT, || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        let caps = serde_json::json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1280,800", "--no-first-run", "--disable-sync",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-default-apps", "--disable-extensions",
                    // Anything but loopback goes to a dead proxy: the test stays on this host.
                    "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=127.0.0.1",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
        });
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps.as_object().unwrap().clone())
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("a Chromium session from chromedriver");
        let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fleet-web");
        std::fs::create_dir_all(&shots).unwrap();
        Browser {
            driver,
            client,
            shots,
            _profile: profile,
        }
    }

    async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.unwrap();
        let path = self.shots.join(name);
        std::fs::write(&path, png).unwrap();
        eprintln!("screenshot: {}", path.display());
    }

    async fn js(&self, script: &str) -> Value {
        self.client.execute(script, vec![]).await.unwrap()
    }

    /// Waits until `script` returns true in the page.
    async fn until(&self, what: &str, script: &str) {
        let start = Instant::now();
        loop {
            if self.js(script).await == Value::Bool(true) {
                return;
            }
            assert!(
                start.elapsed() < PAGE_TIMEOUT,
                "timed out waiting for {what}; the page says:\n{}",
                self.js("return document.body.innerText").await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn click(&self, locator: Locator<'_>) {
        self.client
            .find(locator)
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
    }

    async fn text(&self, css: &str) -> String {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Opens the fleet page and waits for its table to show `rows` nodes.
    async fn fleet_table(&self, server: &FleetView, rows: usize) {
        self.client.goto(&server.url("/")).await.unwrap();
        let script =
            format!("return document.querySelectorAll('#fleet tbody tr').length === {rows}");
        self.until("the fleet table", &script).await;
    }

    async fn rows(&self) -> Vec<(String, String)> {
        let v = self
            .js(
                "return [...document.querySelectorAll('#fleet tbody tr')].map(r => \
                 [r.dataset.node, r.querySelector('td.stage').dataset.stage])",
            )
            .await;
        serde_json::from_value(v).unwrap()
    }

    /// Ends the session cleanly; dropping the browser then stops chromedriver.
    async fn stop(self) {
        let _ = self.client.clone().close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_page_shows_the_rack_live_and_a_node_its_boot_chain() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let mut rack = Rack::new(
        &state,
        &[
            Goal::Ready,
            Goal::Installing,
            Goal::RefusedDisk,
            Goal::Netbooting,
            Goal::Pending,
        ],
    );
    let server = FleetView::start(&state);
    let browser = Browser::start().await;
    let c = &browser.client;

    // The fleet table: every node in its stage, the failed one with its reason.
    c.set_window_size(1280, 800).await.unwrap();
    browser.fleet_table(&server, 5).await;
    assert_eq!(
        browser.rows().await,
        [
            ("node-0001", "ready"),
            ("node-0002", "installing"),
            ("node-0003", "failed"),
            ("node-0004", "netbooting"),
            ("node-0005", "pending"),
        ]
        .map(|(a, b)| (a.to_string(), b.to_string()))
    );
    let failed = browser.text("tr[data-node='node-0003']").await;
    assert!(
        failed.contains("installing: the installer failed: refusing to erase /dev/vda"),
        "{failed}"
    );
    let ready = browser.text("tr[data-node='node-0001']").await;
    assert!(
        ready.contains("control-plane") && ready.contains(&IMAGE[..12]) && ready.contains('A'),
        "{ready}"
    );
    assert_eq!(
        browser
            .js("return document.getElementById('count-failed').dataset.count")
            .await,
        "1"
    );
    browser.screenshot("fleet-1280x800.png").await;

    // A stage change in the store reaches the open page without a reload.
    browser.js("window.kilnMarker = 42; return true").await;
    rack.installed("node-0002");
    browser
        .until(
            "node-0002 to show rebooting",
            "return document.querySelector(\"tr[data-node='node-0002'] td.stage\").dataset.stage === 'rebooting'",
        )
        .await;
    assert_eq!(
        browser.js("return window.kilnMarker").await,
        42,
        "the page reloaded"
    );

    // Keyboard only: tab to the failed node's link and follow it.
    browser.click(Locator::Css("body")).await;
    let mut reached = false;
    for _ in 0..40 {
        c.active_element()
            .await
            .unwrap()
            .send_keys(&Key::Tab.to_string())
            .await
            .unwrap();
        if browser
            .js("return document.activeElement.getAttribute('href') === '/nodes/node-0003'")
            .await
            == true
        {
            reached = true;
            break;
        }
    }
    assert!(reached, "the failed node's link cannot be reached with Tab");
    c.active_element()
        .await
        .unwrap()
        .send_keys(&Key::Enter.to_string())
        .await
        .unwrap();
    browser
        .until("node-0003's page", "return location.pathname === '/nodes/node-0003' && !!document.getElementById('timeline')")
        .await;
    let failure = browser
        .js("return [...document.querySelectorAll('#timeline tr.failed')].map(r => r.innerText).join('\\n')")
        .await;
    assert!(
        failure
            .as_str()
            .unwrap()
            .contains("refusing to erase /dev/vda"),
        "{failure}"
    );
    // An action without credentials is refused.
    let refused = browser
        .js("return fetch('/api/nodes/node-0003/retry', {method: 'POST'}).then(r => r.status)")
        .await;
    assert!(refused == 401 || refused == 403, "{refused}");

    // A ready node's boot chain, every link with its bytes and time.
    c.goto(&server.url("/nodes/node-0001")).await.unwrap();
    browser
        .until(
            "node-0001's timeline",
            "return document.querySelectorAll('#timeline tbody tr').length > 10",
        )
        .await;
    let parts: Vec<String> = serde_json::from_value(
        browser
            .js("return [...document.querySelectorAll('#timeline tbody tr')].map(r => r.dataset.part)")
            .await,
    )
    .unwrap();
    let mut chain: Vec<&str> = parts.iter().map(String::as_str).collect();
    chain.dedup();
    for part in [
        "rollout",
        "dhcp",
        "tftp",
        "ipxe",
        "kernel",
        "initrd",
        "rootfs",
        "installer",
        "agent",
    ] {
        assert!(chain.contains(&part), "no {part} step in {chain:?}");
    }
    let rootfs = browser.text("#timeline tr[data-part='rootfs']").await;
    assert!(
        rootfs.contains("250.0 MiB") && rootfs.contains("6400 ms"),
        "{rootfs}"
    );
    browser.screenshot("node-1280x800.png").await;

    // A phone's width: the table keeps the name, stage and progress; the rest gives way.
    c.set_window_size(390, 844).await.unwrap();
    browser.fleet_table(&server, 5).await;
    let name = c
        .find(Locator::Css("tr[data-node='node-0001'] a"))
        .await
        .unwrap();
    assert!(name.is_displayed().await.unwrap());
    let image = c
        .find(Locator::Css("tr[data-node='node-0001'] td.digest"))
        .await
        .unwrap();
    assert!(!image.is_displayed().await.unwrap());
    browser.screenshot("fleet-phone.png").await;

    // The view's metrics pass promtool and count the rack by stage.
    let metrics = server.get("/metrics");
    promtool_check_metrics(&metrics);
    assert!(
        metrics.contains("kiln_fleet_nodes{stage=\"failed\"} 1"),
        "{metrics}"
    );
    browser.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_nodes_load_in_pages() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let goals: Vec<Goal> = (0..1000)
        .map(|i| match i % 10 {
            0 => Goal::Installing,
            1 => Goal::RefusedDisk,
            2..=5 => Goal::Ready,
            _ => Goal::Pending,
        })
        .collect();
    let _rack = Rack::new(&state, &goals);
    let server = FleetView::start(&state);
    let browser = Browser::start().await;
    let c = &browser.client;
    c.set_window_size(1280, 800).await.unwrap();
    let start = Instant::now();
    c.goto(&server.url("/")).await.unwrap();
    browser
        .until(
            "the first page",
            "return document.querySelectorAll('#fleet tbody tr').length === 100",
        )
        .await;
    eprintln!(
        "fleet page of 1000 nodes: first 100 rows rendered {} ms after navigation",
        start.elapsed().as_millis()
    );
    assert_eq!(
        browser
            .js("return document.getElementById('count-failed').dataset.count")
            .await,
        "100"
    );
    browser.click(Locator::Id("next")).await;
    browser
        .until(
            "the second page",
            "return document.querySelector('#fleet tbody tr').dataset.node === 'node-0101'",
        )
        .await;
    // Filtering by stage goes to the server: only the failed nodes, ten pages fewer.
    browser.click(Locator::Id("count-failed")).await;
    browser
        .until(
            "the failed nodes",
            "return [...document.querySelectorAll('#fleet tbody tr')].every(r => r.classList.contains('failed'))",
        )
        .await;
    let api: Value =
        serde_json::from_str(&server.get("/api/fleet?stage=failed&per=30&page=2")).unwrap();
    assert_eq!(api["matching"], 100, "{api:#}");
    assert_eq!(api["pages"], 4);
    assert_eq!(api["nodes"][0]["name"], "node-0302");
    browser.screenshot("fleet-1000-failed.png").await;
    browser.stop().await;
}
