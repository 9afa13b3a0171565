//! The fleet inventory (`kind: Inventory`, usually `fleet.yaml`): which machines exist, how
//! they boot and how their BMCs are reached. The netboot services, the BMC CLI and the fleet
//! controller all read this one format.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::errors::{SpecError, ValidationErrors};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Inventory {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: Metadata,
    pub spec: InventorySpec,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Metadata {
    #[serde(default)]
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InventorySpec {
    /// How `kiln fleet rollout` serves netboot to these nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netboot: Option<InventoryNetboot>,
    pub nodes: Vec<InventoryNode>,
}

/// The provisioner's netboot services for a rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InventoryNetboot {
    /// Interface on the nodes' boot network (its first IPv4 address is the server address).
    pub interface: String,
    #[serde(default)]
    pub mode: NetbootMode,
    /// First address of the pool (`dhcp` mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_start: Option<std::net::Ipv4Addr>,
    /// Last address of the pool (`dhcp` mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_end: Option<std::net::Ipv4Addr>,
    /// HTTP port for scripts, images, node configs and phone-home [default: 8080].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_port: Option<u16>,
}

/// Who hands out addresses on the boot network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum NetbootMode {
    /// Boot information only; another DHCP server hands out addresses.
    #[default]
    Proxy,
    /// Addresses from a pool, and boot information.
    Dhcp,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InventoryNode {
    /// Host name of the node; unique in the inventory.
    pub name: String,
    #[serde(default)]
    pub role: NodeRole,
    /// MAC addresses the node may netboot from, `aa:bb:cc:dd:ee:ff`, lower or upper case.
    #[serde(default, rename = "bootMACs")]
    pub boot_macs: Vec<String>,
    /// IPv4 address the netboot DHCP server reserves for this node's boot MACs when it hands
    /// out addresses itself (authoritative mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_address: Option<std::net::Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bmc: Option<BmcEndpoint>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Per-node overrides of the appliance spec (static addresses, disk rules, …), merged over
    /// the appliance spec when the node's config is rendered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overrides: Option<crate::appliance::ApplianceOverrides>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum NodeRole {
    ControlPlane,
    #[default]
    Worker,
    Storage,
}

impl NodeRole {
    /// The name the inventory spells it with.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeRole::ControlPlane => "control-plane",
            NodeRole::Worker => "worker",
            NodeRole::Storage => "storage",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BmcProtocol {
    Ipmi,
    Redfish,
}

impl BmcProtocol {
    pub fn default_port(self) -> u16 {
        match self {
            BmcProtocol::Ipmi => 623,
            BmcProtocol::Redfish => 443,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BmcEndpoint {
    pub protocol: BmcProtocol,
    /// Host name or IP address of the BMC.
    pub address: String,
    /// Defaults to 623 for IPMI and 443 for Redfish.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub username: String,
    /// Where the password is; never the secret itself.
    pub password_ref: SecretRef,
    /// Redfish only: PEM file with the CA that signed the BMC's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<PathBuf>,
    /// Redfish only: accept any certificate. Must be asked for explicitly.
    #[serde(default)]
    pub insecure: bool,
    /// Redfish only: allow an `http://` address, credentials unencrypted. Must be asked for
    /// explicitly.
    #[serde(default)]
    pub allow_plain_http: bool,
}

impl BmcEndpoint {
    pub fn port(&self) -> u16 {
        self.port.unwrap_or_else(|| self.protocol.default_port())
    }
}

/// A reference to a secret kept outside the document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum SecretRef {
    /// A file holding the secret (trailing newline ignored).
    File(PathBuf),
    /// An environment variable holding the secret.
    Env(String),
}

impl SecretRef {
    /// Reads the secret. Relative files resolve against `base` (the inventory's directory).
    pub fn resolve(&self, base: &Path) -> Result<String, std::io::Error> {
        match self {
            SecretRef::File(p) => {
                let text = std::fs::read_to_string(base.join(p))?;
                Ok(text.trim_end_matches(['\r', '\n']).to_string())
            }
            SecretRef::Env(var) => std::env::var(var).map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("environment variable {var} is not set"),
                )
            }),
        }
    }
}

/// Parses a MAC address written with `:` or `-` separators into its six bytes.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = text.split([':', '-']).collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(&parts) {
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    Some(mac)
}

/// Formats six bytes as the canonical lower-case `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl Inventory {
    /// Parses and validates an inventory document.
    pub fn from_yaml(text: &str) -> Result<Inventory, SpecError> {
        let value = crate::check::yaml_value("inventory", text)?;
        // Shape errors (unknown fields, wrong types) and value errors together, all at once.
        crate::check::parse_document("inventory", value, Inventory::validate)
    }

    pub fn load(path: &Path) -> Result<Inventory, SpecError> {
        Inventory::from_yaml(&crate::check::read(path)?)
    }

    /// Every problem in the document, each with its field path.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errs = ValidationErrors::default();
        crate::check::check_header(&self.api_version, &self.kind, "Inventory", &mut errs);
        let mut names = BTreeMap::new();
        let mut macs = BTreeMap::new();
        let mut boot_addresses = BTreeMap::new();
        if let Some(n) = &self.spec.netboot {
            if n.interface.is_empty() {
                errs.push("spec.netboot.interface", "must not be empty");
            }
            match (n.mode, n.pool_start, n.pool_end) {
                (NetbootMode::Dhcp, Some(a), Some(b)) if a > b => errs.push(
                    "spec.netboot.poolEnd",
                    format!("{b} comes before poolStart {a}"),
                ),
                (NetbootMode::Dhcp, Some(_), Some(_)) => {}
                (NetbootMode::Dhcp, _, _) => {
                    errs.push("spec.netboot", "mode dhcp needs poolStart and poolEnd")
                }
                (NetbootMode::Proxy, None, None) => {}
                (NetbootMode::Proxy, _, _) => errs.push(
                    "spec.netboot",
                    "poolStart and poolEnd apply to mode dhcp only",
                ),
            }
            if n.http_port == Some(0) {
                errs.push("spec.netboot.httpPort", "must be between 1 and 65535");
            }
        }
        for (i, node) in self.spec.nodes.iter().enumerate() {
            let at = format!("spec.nodes[{i}]");
            if !is_dns_label(&node.name) {
                errs.push(
                    format!("{at}.name"),
                    format!("{:?} is not a valid host name (lower-case letters, digits and '-', at most 63)", node.name),
                );
            }
            if let Some(first) = names.insert(node.name.clone(), i) {
                errs.push(
                    format!("{at}.name"),
                    format!("{:?} is already used by spec.nodes[{first}]", node.name),
                );
            }
            for (j, mac) in node.boot_macs.iter().enumerate() {
                match parse_mac(mac) {
                    None => errs.push(
                        format!("{at}.bootMACs[{j}]"),
                        format!("{mac:?} is not a MAC address like aa:bb:cc:dd:ee:ff"),
                    ),
                    Some(bytes) => {
                        if let Some(owner) = macs.insert(bytes, node.name.clone()) {
                            errs.push(
                                format!("{at}.bootMACs[{j}]"),
                                format!("{mac} is already a boot MAC of node {owner}"),
                            );
                        }
                    }
                }
            }
            if let Some(addr) = node.boot_address
                && let Some(owner) = boot_addresses.insert(addr, node.name.clone())
            {
                errs.push(
                    format!("{at}.bootAddress"),
                    format!("{addr} is already the boot address of node {owner}"),
                );
            }
            if let Some(o) = &node.overrides {
                o.validate_into(&format!("{at}.overrides"), &mut errs);
            }
            if let Some(bmc) = &node.bmc {
                if bmc.address.trim().is_empty() {
                    errs.push(format!("{at}.bmc.address"), "must not be empty");
                }
                if bmc.port == Some(0) {
                    errs.push(format!("{at}.bmc.port"), "must be between 1 and 65535");
                }
                if bmc.username.is_empty() {
                    errs.push(format!("{at}.bmc.username"), "must not be empty");
                }
                if bmc.protocol == BmcProtocol::Ipmi
                    && (bmc.insecure || bmc.allow_plain_http || bmc.ca_cert.is_some())
                {
                    errs.push(
                        format!("{at}.bmc"),
                        "insecure, allowPlainHttp and caCert apply to Redfish only",
                    );
                }
            }
        }
        errs.into_result()
    }

    /// The node that netboots from `mac`, if any.
    pub fn node_by_mac(&self, mac: &[u8; 6]) -> Option<&InventoryNode> {
        self.spec.nodes.iter().find(|n| {
            n.boot_macs
                .iter()
                .any(|m| parse_mac(m).as_ref() == Some(mac))
        })
    }

    pub fn node(&self, name: &str) -> Option<&InventoryNode> {
        self.spec.nodes.iter().find(|n| n.name == name)
    }
}

/// RFC 1123 label: what a Kubernetes node name and a host name both accept.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: kiln.dev/v1alpha1
kind: Inventory
metadata: {name: rack1}
spec:
  nodes:
    - name: node-01
      role: control-plane
      bootMACs: ["52:54:00:00:00:01"]
      bmc:
        protocol: ipmi
        address: 127.0.0.1
        port: 9001
        username: admin
        passwordRef: {file: bmc-password}
    - name: node-02
      bootMACs: ["52-54-00-00-00-02"]
"#;

    #[test]
    fn parses_a_good_inventory_and_finds_nodes_by_mac() {
        let inv = Inventory::from_yaml(GOOD).unwrap();
        assert_eq!(inv.spec.nodes.len(), 2);
        assert_eq!(inv.spec.nodes[0].role, NodeRole::ControlPlane);
        assert_eq!(inv.spec.nodes[1].role, NodeRole::Worker);
        let n = inv.node_by_mac(&[0x52, 0x54, 0, 0, 0, 2]).unwrap();
        assert_eq!(n.name, "node-02");
        assert_eq!(inv.spec.nodes[0].bmc.as_ref().unwrap().port(), 9001);
    }

    #[test]
    fn reports_every_error_with_its_path() {
        let bad = GOOD
            .replace("node-02", "Node_02")
            .replace("52-54-00-00-00-02", "52:54:00:00:00:01")
            .replace("port: 9001", "port: 0")
            .replace("kind: Inventory", "kind: Fleet");
        let err = Inventory::from_yaml(&bad).unwrap_err();
        let SpecError::Invalid { errors, .. } = err else {
            panic!("expected validation errors, got {err}")
        };
        let paths: Vec<&str> = errors.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "kind",
                "spec.nodes[0].bmc.port",
                "spec.nodes[1].name",
                "spec.nodes[1].bootMACs[0]"
            ]
        );
    }

    #[test]
    fn boot_addresses_parse_and_must_be_unique() {
        let with = GOOD
            .replace(
                "role: control-plane",
                "role: control-plane\n      bootAddress: 10.0.0.11",
            )
            .replace(
                "- name: node-02",
                "- name: node-02\n      bootAddress: 10.0.0.12",
            );
        let inv = Inventory::from_yaml(&with).unwrap();
        assert_eq!(inv.spec.nodes[0].boot_address, Some([10, 0, 0, 11].into()));
        let clash = with.replace("10.0.0.12", "10.0.0.11");
        let SpecError::Invalid { errors, .. } = Inventory::from_yaml(&clash).unwrap_err() else {
            panic!("expected validation errors")
        };
        assert_eq!(errors.0[0].path, "spec.nodes[1].bootAddress");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let bad = GOOD.replace("role: control-plane", "rolle: control-plane");
        let Err(SpecError::Invalid { errors, .. }) = Inventory::from_yaml(&bad) else {
            panic!("an unknown field was accepted")
        };
        assert_eq!(errors.0[0].path, "spec.nodes[0].rolle");
    }

    #[test]
    fn overrides_are_typed_and_checked_with_their_paths() {
        let with = GOOD.replace(
            "    - name: node-02\n",
            "    - name: node-02\n      overrides:\n        hostname: \"{name}\"\n        \
             network:\n          interfaces:\n            - {name: eno1, addresses: [10.0.0.9]}\n        \
             install:\n          disk: {serial: S1, minSize: 1TB}\n          wipe: please\n",
        );
        let Err(SpecError::Invalid { errors, .. }) = Inventory::from_yaml(&with) else {
            panic!("bad overrides were accepted")
        };
        let paths: Vec<&str> = errors.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "spec.nodes[1].overrides.install.wipe",
                "spec.nodes[1].overrides.network.interfaces[0].addresses[0]"
            ]
        );
        let fixed = with.replace("wipe: please", "wipe: always");
        let Err(SpecError::Invalid { errors, .. }) = Inventory::from_yaml(&fixed) else {
            panic!("a bad address was accepted")
        };
        let paths: Vec<&str> = errors.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            ["spec.nodes[1].overrides.network.interfaces[0].addresses[0]"]
        );
        let good = fixed.replace("10.0.0.9]", "10.0.0.9/24]");
        let inv = Inventory::from_yaml(&good).unwrap();
        let o = inv.spec.nodes[1].overrides.as_ref().unwrap();
        let spec = crate::Appliance::default_spec().with_overrides(o);
        assert_eq!(spec.spec.install.disk.serial.as_deref(), Some("S1"));
        assert_eq!(spec.spec.install.wipe, crate::appliance::WipePolicy::Always);
        assert_eq!(spec.hostname_for(Some("node-02"), None).unwrap(), "node-02");
    }

    #[test]
    fn secret_refs_read_files_and_environment() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pw"), "s3cret\n").unwrap();
        let f = SecretRef::File("pw".into());
        assert_eq!(f.resolve(dir.path()).unwrap(), "s3cret");
        let e = SecretRef::Env("KILN_TEST_SURELY_UNSET_VAR".into());
        assert!(e.resolve(dir.path()).is_err());
    }
}
