//! Golden tests of the fleet's pure steps: a page of the fleet view's table and a node's
//! boot-chain timeline (from a store's snapshot made by the stage machine, and a trace); the
//! custom resource definitions and an inventory as Machines.
//! Regenerate the files under tests/golden with `KILN_BLESS=1 cargo test -p kiln-fleet --test golden`.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use kiln_fleet::crd::{definitions, machines_from};
use kiln_fleet::stage::{
    BmcAction, BmcOutcome, Limits, Load, NodeProgress, Observation, Stage, StepInput, step,
};
use kiln_fleet::store::{MachineInfo, RolloutInfo, Snapshot, StoredReport};
use kiln_fleet::web::view::{FleetQuery, fleet_page, node_detail};
use kiln_netboot::trace::{Event, EventKind};
use kiln_spec::enrol::{Phase, Report};
use kiln_spec::inventory::NodeRole;

const IMAGE: &str = "5d41402abc4b2a76b9719d911017c592aa5d41402abc4b2a76b9719d911017c5";
const MAC: &str = "52:54:00:00:00:02";

fn golden(name: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("KILN_BLESS").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (KILN_BLESS=1 writes it)", path.display()));
    assert!(
        expected == actual,
        "{} differs (KILN_BLESS=1 to accept):\n{actual}",
        path.display()
    );
}

/// Builds a snapshot the way the rollout does, with the clock given.
#[derive(Default)]
struct Rack {
    snapshot: Snapshot,
}

impl Rack {
    /// `story`: what happened when; `None` is the clock moving alone.
    fn node(&mut self, name: &str, role: NodeRole, story: &[(u64, Option<Observation>)]) {
        let limits = Limits::default();
        let mut p = NodeProgress::new(1_000);
        for (at, obs) in story {
            let mut obs = obs.clone();
            if let Some(Observation::Report(r)) = &mut obs {
                r.at_ms = *at;
                self.snapshot.reports.push((name.to_string(), r.clone()));
            }
            let obs = obs.as_slice();
            let input = StepInput {
                now_ms: *at,
                limits: &limits,
                load: Load::default(),
                bmc_busy: false,
                netboot_hint: None,
            };
            step(&mut p, obs, input);
        }
        let info = self.snapshot.rollout.get_or_insert_with(|| RolloutInfo {
            image_sha256: IMAGE.into(),
            started_ms: 1_000,
            nodes: Vec::new(),
            machines: Default::default(),
        });
        info.nodes.push(name.into());
        let macs = vec![format!("52:54:00:00:00:0{}", info.nodes.len())];
        info.machines
            .insert(name.into(), MachineInfo { role, macs });
        self.snapshot.nodes.push((name.into(), p));
    }
}

fn bmc(action: BmcAction) -> Option<Observation> {
    Some(Observation::Bmc {
        action,
        outcome: BmcOutcome::Done { note: None },
    })
}

fn report(phase: Phase, message: Option<&str>) -> Option<Observation> {
    let mut r = Report::new(phase, message.map(String::from));
    if matches!(phase, Phase::Installed | Phase::AgentReady) {
        r.image_sha256 = Some(IMAGE.into());
    }
    if phase == Phase::AgentReady {
        r.slot = Some("A".into());
    }
    Some(Observation::Report(StoredReport {
        at_ms: 0,
        report: r,
    }))
}

fn rack() -> Snapshot {
    let mut rack = Rack::default();
    rack.node(
        "node-01",
        NodeRole::ControlPlane,
        &[
            (2_000, None),
            (4_000, bmc(BmcAction::NetbootOnce)),
            (20_000, report(Phase::InstallerStarted, None)),
            (21_000, report(Phase::Planned, Some("/dev/vda"))),
            (60_000, report(Phase::Installed, None)),
            (90_000, report(Phase::AgentReady, None)),
            (91_000, bmc(BmcAction::BootFromDisk)),
        ],
    );
    rack.node(
        "node-02",
        NodeRole::Worker,
        &[
            (2_000, None),
            (4_500, bmc(BmcAction::NetbootOnce)),
            (22_000, report(Phase::InstallerStarted, None)),
            (
                23_000,
                report(
                    Phase::Failed,
                    Some("refusing to erase /dev/vda: it holds ext4"),
                ),
            ),
        ],
    );
    rack.node("node-03", NodeRole::Storage, &[(2_000, None)]);
    rack.node("node-04", NodeRole::Worker, &[]);
    rack.snapshot
}

fn trace() -> Vec<Event> {
    let client = Ipv4Addr::new(10, 0, 0, 52).into();
    let http = |at_ms, path: &str, status, bytes, duration_ms| Event {
        at_ms,
        mac: MAC.into(),
        kind: EventKind::Http {
            client,
            method: "GET".into(),
            path: format!("/boot/{MAC}/{path}"),
            status,
            bytes,
            duration_ms,
            error: None,
        },
    };
    vec![
        Event {
            at_ms: 6_000,
            mac: MAC.into(),
            kind: EventKind::DhcpReceived {
                message: "discover".into(),
                port: 67,
                arch: Some(0),
                ipxe: false,
            },
        },
        Event {
            at_ms: 6_010,
            mac: MAC.into(),
            kind: EventKind::DhcpSent {
                message: "offer".into(),
                address: Some(Ipv4Addr::new(10, 0, 0, 52)),
                boot_file: Some("undionly.kpxe".into()),
            },
        },
        Event {
            at_ms: 7_000,
            mac: MAC.into(),
            kind: EventKind::Tftp {
                client,
                file: "undionly.kpxe".into(),
                bytes: 70_000,
                blksize: 1_432,
                windowsize: 1,
                duration_ms: 90,
                error: None,
            },
        },
        http(9_000, "boot.ipxe", 200, 900, 3),
        http(9_100, "vmlinuz", 200, 8_000_000, 400),
        http(9_600, "initrd.img", 200, 30_000_000, 1_200),
        http(11_000, "rootfs.squashfs", 404, 0, 1),
        http(12_000, "rootfs.squashfs", 200, 250_000_000, 6_000),
        Event {
            at_ms: 22_000,
            mac: MAC.into(),
            kind: EventKind::PhoneHome {
                phase: Phase::InstallerStarted,
                message: None,
                slot: None,
                image_sha256: None,
            },
        },
    ]
}

#[test]
fn a_page_of_the_fleet_table() {
    let snapshot = rack();
    let page = fleet_page(
        &snapshot,
        &FleetQuery {
            per: 3,
            ..FleetQuery::default()
        },
        100_000,
    );
    golden(
        "fleet-page.json",
        &serde_json::to_string_pretty(&page).unwrap(),
    );
    let second = fleet_page(
        &snapshot,
        &FleetQuery {
            page: 2,
            per: 3,
            ..FleetQuery::default()
        },
        100_000,
    );
    assert_eq!(second.pages, 2);
    let names: Vec<&str> = second
        .nodes
        .iter()
        .map(|n| n.status.name.as_str())
        .collect();
    assert_eq!(names, ["node-04"]);
    // A page past the end shows the last one.
    let past = fleet_page(
        &snapshot,
        &FleetQuery {
            page: 9,
            per: 3,
            ..FleetQuery::default()
        },
        100_000,
    );
    assert_eq!(past.page, 2);
    let failed = fleet_page(
        &snapshot,
        &FleetQuery {
            stage: Some(Stage::Failed),
            ..FleetQuery::default()
        },
        100_000,
    );
    assert_eq!(failed.matching, 1);
    assert_eq!(failed.fleet_size, 4);
    assert_eq!(failed.nodes[0].status.name, "node-02");
    let by_name = fleet_page(
        &snapshot,
        &FleetQuery {
            q: Some("E-03".into()),
            ..FleetQuery::default()
        },
        100_000,
    );
    assert_eq!(by_name.nodes.len(), 1);
    assert_eq!(by_name.nodes[0].status.name, "node-03");
}

#[test]
fn a_nodes_boot_chain_in_order() {
    let snapshot = rack();
    let detail = node_detail(&snapshot, "node-02", &trace(), 100_000).unwrap();
    golden(
        "node-detail.json",
        &serde_json::to_string_pretty(&detail).unwrap(),
    );
    assert!(node_detail(&snapshot, "node-99", &[], 100_000).is_none());
}

#[test]
fn the_custom_resource_definitions() {
    let docs: Vec<String> = definitions()
        .iter()
        .map(|d| serde_json::to_string_pretty(d).unwrap())
        .collect();
    golden("crds.json", &docs.join("\n"));
}

#[test]
fn an_inventory_as_machines() {
    let inventory = kiln_spec::Inventory::from_yaml(
        r#"apiVersion: kiln.dev/v1alpha1
kind: Inventory
metadata: {name: rack1}
spec:
  nodes:
    - name: node-01
      role: control-plane
      bootMACs: ["52:54:00:00:00:01"]
      bootAddress: 10.0.0.21
      labels: {rack: r1}
      bmc:
        protocol: ipmi
        address: 10.0.0.11
        username: admin
        passwordRef: {file: node-01.bmc}
    - name: node-02
      bootMACs: ["52:54:00:00:00:02"]
"#,
    )
    .unwrap();
    let import = machines_from(&inventory, "rack1");
    golden(
        "machines.json",
        &serde_json::to_string_pretty(&import.machines).unwrap(),
    );
    assert_eq!(import.secrets.len(), 1);
    assert_eq!(import.secrets[0].name, "node-01-bmc");
}
