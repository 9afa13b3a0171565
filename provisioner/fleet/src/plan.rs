//! `kiln fleet plan`: what a rollout would do to each node, decided from the inventory, the
//! appliance spec and the store of earlier rollouts. Pure: the BMC probe results are filled in
//! by the caller, and nothing here touches a machine.

use kiln_spec::appliance::DiskRules;
use kiln_spec::{Appliance, Inventory, InventoryNode, serde_name};
use serde::Serialize;

use crate::stage::Stage;
use crate::store::Snapshot;
use kiln_spec::enrol::Phase;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "action", content = "why")]
pub enum Action {
    Install,
    /// Installed at this image already.
    Skip(String),
    /// Installed with another image: only with `--reinstall`.
    Reinstall(String),
    /// Cannot be rolled out as described.
    Blocked(String),
}

/// What the BMC said to a read-only probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Probe {
    pub reachable: bool,
    pub authenticated: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub power: Option<String>,
    pub one_time_boot: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodePlan {
    pub name: String,
    pub role: kiln_spec::NodeRole,
    pub boot_macs: Vec<String>,
    /// `ipmi 10.0.0.21:623`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bmc: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe: Option<Probe>,
    /// The install disk rule the node's spec gives, as a sentence.
    pub disk_rule: String,
    /// What the rule picked on the node's real disks when its installer last ran (the
    /// installer's own `planned` or `failed` report), if it ever did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_pick: Option<String>,
    /// Its seat in the Kubernetes cluster, as a sentence (filled in by the caller).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    #[serde(flatten)]
    pub action: Action,
}

/// The disk rule in words.
pub fn describe_rule(rules: &DiskRules) -> String {
    let mut parts = Vec::new();
    let mut glob = |what: &str, v: &Option<String>| {
        if let Some(v) = v {
            parts.push(format!("{what} {v}"));
        }
    };
    glob("model", &rules.model);
    glob("serial", &rules.serial);
    glob("wwn", &rules.wwn);
    glob("by-id", &rules.by_id_path);
    if let Some(s) = rules.min_size {
        parts.push(format!("at least {}", s.human()));
    }
    if let Some(s) = rules.max_size {
        parts.push(format!("at most {}", s.human()));
    }
    if let Some(r) = rules.rotational {
        parts.push(if r { "rotational" } else { "solid-state" }.to_string());
    }
    if !rules.transport.is_empty() {
        let t: Vec<String> = rules.transport.iter().map(serde_name).collect();
        parts.push(format!("on {}", t.join("/")));
    }
    if rules.allow_removable {
        parts.push("removable allowed".into());
    }
    let prefer = serde_name(&rules.prefer);
    if parts.is_empty() {
        format!("any disk, {prefer} first")
    } else {
        format!("{}, {prefer} first", parts.join(", "))
    }
}

/// The plan of each selected node, without probes.
pub fn plan(
    appliance: &Appliance,
    nodes: &[&InventoryNode],
    image_sha256: &str,
    earlier: Option<&Snapshot>,
    reinstall: bool,
) -> Vec<NodePlan> {
    nodes
        .iter()
        .map(|node| {
            let mac = node
                .boot_macs
                .first()
                .and_then(|m| kiln_spec::inventory::parse_mac(m));
            let spec = appliance.for_node(node, mac.as_ref());
            let disk_rule = match &spec {
                Ok(s) => describe_rule(&s.spec.install.disk),
                Err(_) => "-".into(),
            };
            let stored = earlier.and_then(|s| s.node(&node.name));
            let last_pick = earlier.and_then(|s| {
                s.reports_of(&node.name)
                    .filter(|r| matches!(r.report.phase, Phase::Planned | Phase::Failed))
                    .last()
                    .map(|r| match r.report.phase {
                        Phase::Planned => {
                            format!("picked {}", r.report.message.as_deref().unwrap_or("a disk"))
                        }
                        _ => format!(
                            "refused: {}",
                            r.report.message.as_deref().unwrap_or("no reason given")
                        ),
                    })
            });
            let action = if let Err(e) = &spec {
                Action::Blocked(format!("its spec is invalid: {e}"))
            } else if node.boot_macs.is_empty() {
                Action::Blocked("no bootMACs: it cannot netboot".into())
            } else if node.bmc.is_none() {
                Action::Blocked("no bmc: it cannot be powered on".into())
            } else {
                match stored {
                    Some(p) if p.stage == Stage::Ready => {
                        let at = p.image_sha256.clone().unwrap_or_default();
                        if at == image_sha256 && !reinstall {
                            Action::Skip(format!("ready at image {}", short(&at)))
                        } else if reinstall {
                            Action::Install
                        } else {
                            Action::Reinstall(format!(
                                "ready at image {}; --reinstall replaces it with {}",
                                short(&at),
                                short(image_sha256)
                            ))
                        }
                    }
                    _ => Action::Install,
                }
            };
            NodePlan {
                name: node.name.clone(),
                role: node.role,
                boot_macs: node.boot_macs.clone(),
                bmc: node
                    .bmc
                    .as_ref()
                    .map(|b| format!("{} {}:{}", protocol(b.protocol), b.address, b.port())),
                probe: None,
                disk_rule,
                last_pick,
                cluster: None,
                action,
            }
        })
        .collect()
}

fn protocol(p: kiln_spec::BmcProtocol) -> &'static str {
    match p {
        kiln_spec::BmcProtocol::Ipmi => "ipmi",
        kiln_spec::BmcProtocol::Redfish => "redfish",
    }
}

fn short(digest: &str) -> String {
    digest.chars().take(12).collect()
}

/// The plan as a table.
pub fn table(plans: &[NodePlan]) -> String {
    let mut s = String::new();
    for p in plans {
        let action = match &p.action {
            Action::Install => "install".to_string(),
            Action::Skip(w) => format!("skip ({w})"),
            Action::Reinstall(w) => format!("leave alone ({w})"),
            Action::Blocked(w) => format!("blocked: {w}"),
        };
        s.push_str(&format!("{} ({}): {action}\n", p.name, serde_name(&p.role)));
        s.push_str(&format!("  boot MACs: {}\n", p.boot_macs.join(", ")));
        if let Some(b) = &p.bmc {
            s.push_str(&format!("  bmc: {b}"));
            match &p.probe {
                Some(pr) if pr.authenticated => s.push_str(&format!(
                    ", credentials work, power {}, one-time boot {}\n",
                    pr.power.as_deref().unwrap_or("unknown"),
                    if pr.one_time_boot {
                        "supported"
                    } else {
                        "not supported"
                    }
                )),
                Some(pr) => s.push_str(&format!(
                    ", {}\n",
                    pr.error.as_deref().unwrap_or("probe failed")
                )),
                None => s.push('\n'),
            }
        }
        s.push_str(&format!("  install disk: {}\n", p.disk_rule));
        if let Some(pick) = &p.last_pick {
            s.push_str(&format!("  last install: {pick}\n"));
        }
        if let Some(seat) = &p.cluster {
            s.push_str(&format!("  cluster: {seat}\n"));
        }
    }
    s
}

/// The nodes a selector names (all when absent).
pub fn select<'a>(
    inventory: &'a Inventory,
    selector: Option<&str>,
) -> Result<Vec<&'a InventoryNode>, String> {
    match selector {
        None => Ok(inventory.spec.nodes.iter().collect()),
        Some(s) => kiln_bmc::fleet::select(inventory, s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stage::NodeProgress;

    #[test]
    fn the_plan_installs_new_nodes_skips_current_ones_and_blocks_what_cannot_boot() {
        let inventory = Inventory::from_yaml(
            r#"
apiVersion: kiln.dev/v1alpha1
kind: Inventory
spec:
  nodes:
    - name: node-01
      role: control-plane
      bootMACs: ["52:54:00:6b:00:01"]
      bmc: {protocol: ipmi, address: 10.0.0.21, username: admin, passwordRef: {file: pw}}
    - name: node-02
      bootMACs: ["52:54:00:6b:00:02"]
      bmc: {protocol: ipmi, address: 10.0.0.22, username: admin, passwordRef: {file: pw}}
    - name: node-03
      bootMACs: ["52:54:00:6b:00:03"]
      bmc: {protocol: redfish, address: 10.0.0.23, username: admin, passwordRef: {file: pw}}
      overrides:
        install:
          disk: {model: "Samsung*", minSize: 100GiB, prefer: smallest}
    - name: node-04
      bootMACs: []
"#,
        )
        .unwrap();
        let appliance = Appliance::profile(kiln_spec::ProfileName::Test);
        let mut ready = NodeProgress::new(0);
        ready.stage = Stage::Ready;
        ready.image_sha256 = Some("a".repeat(64));
        let mut old = ready.clone();
        old.image_sha256 = Some("b".repeat(64));
        let report = |phase, message: &str| crate::store::StoredReport {
            at_ms: 1,
            report: kiln_spec::enrol::Report::new(phase, Some(message.to_string())),
        };
        let snap = Snapshot {
            nodes: vec![("node-01".into(), ready), ("node-02".into(), old)],
            reports: vec![
                (
                    "node-01".into(),
                    report(Phase::Planned, "/dev/vda (4.0 GiB, serial node-01-disk0)"),
                ),
                ("node-03".into(), report(Phase::Planned, "/dev/sda")),
                (
                    "node-03".into(),
                    report(Phase::Failed, "refusing to erase /dev/sda, it holds: ext4"),
                ),
            ],
            ..Snapshot::default()
        };
        let nodes = select(&inventory, None).unwrap();
        let plans = plan(&appliance, &nodes, &"a".repeat(64), Some(&snap), false);
        let text = table(&plans);
        let expected = "\
node-01 (control-plane): skip (ready at image aaaaaaaaaaaa)
  boot MACs: 52:54:00:6b:00:01
  bmc: ipmi 10.0.0.21:623
  install disk: any disk, smallest first
  last install: picked /dev/vda (4.0 GiB, serial node-01-disk0)
node-02 (worker): leave alone (ready at image bbbbbbbbbbbb; --reinstall replaces it with aaaaaaaaaaaa)
  boot MACs: 52:54:00:6b:00:02
  bmc: ipmi 10.0.0.22:623
  install disk: any disk, smallest first
node-03 (worker): install
  boot MACs: 52:54:00:6b:00:03
  bmc: redfish 10.0.0.23:443
  install disk: model Samsung*, at least 100.0 GiB, smallest first
  last install: refused: refusing to erase /dev/sda, it holds: ext4
node-04 (worker): blocked: no bootMACs: it cannot netboot
  boot MACs: \n  install disk: any disk, smallest first
";
        assert_eq!(text, expected);
        let again = plan(&appliance, &nodes, &"a".repeat(64), Some(&snap), true);
        assert_eq!(again[0].action, Action::Install);
        assert_eq!(again[1].action, Action::Install);
    }
}
