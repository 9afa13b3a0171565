//! What to do with a machine, decided per MAC. The services ask only this; the inventory
//! backend answers from the fleet inventory.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, RwLock};

use kiln_spec::inventory::{Inventory, InventoryNode, parse_mac};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// A known node: boot the installer for it.
    Boot { node: String },
    /// An unknown machine that should boot the discovery image.
    Discovery,
    /// Not ours: stay silent.
    Ignore,
}

/// What unknown MACs get.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UnknownMacs {
    #[default]
    Ignore,
    Discovery,
}

impl std::str::FromStr for UnknownMacs {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ignore" => Ok(UnknownMacs::Ignore),
            "discovery" => Ok(UnknownMacs::Discovery),
            other => Err(format!("{other:?} is not one of: ignore, discovery")),
        }
    }
}

pub trait Backend: Send + Sync + std::fmt::Debug {
    fn lookup(&self, mac: &[u8; 6]) -> Decision;
    /// Fixed addresses by MAC for the authoritative DHCP server.
    fn reservations(&self) -> BTreeMap<[u8; 6], Ipv4Addr>;
    /// The inventory node that boots from `mac`: whose spec `/config/MAC` serves and whose
    /// token the per-node endpoints check.
    fn node(&self, mac: &[u8; 6]) -> Option<InventoryNode>;
}

/// Decisions from an inventory that can be replaced while the services run (a controller's
/// Machines change under it).
#[derive(Debug)]
pub struct InventoryBackend {
    inventory: RwLock<Arc<Inventory>>,
    unknown: UnknownMacs,
}

impl InventoryBackend {
    pub fn new(inventory: Inventory, unknown: UnknownMacs) -> InventoryBackend {
        InventoryBackend {
            inventory: RwLock::new(Arc::new(inventory)),
            unknown,
        }
    }

    /// Serves `inventory` from now on.
    pub fn replace(&self, inventory: Inventory) {
        *self.inventory.write().expect("inventory lock") = Arc::new(inventory);
    }

    fn current(&self) -> Arc<Inventory> {
        self.inventory.read().expect("inventory lock").clone()
    }
}

impl Backend for InventoryBackend {
    fn lookup(&self, mac: &[u8; 6]) -> Decision {
        match self.current().node_by_mac(mac) {
            Some(node) => Decision::Boot {
                node: node.name.clone(),
            },
            None => match self.unknown {
                UnknownMacs::Ignore => Decision::Ignore,
                UnknownMacs::Discovery => Decision::Discovery,
            },
        }
    }

    fn reservations(&self) -> BTreeMap<[u8; 6], Ipv4Addr> {
        self.current()
            .spec
            .nodes
            .iter()
            .filter_map(|n| n.boot_address.map(|ip| (n, ip)))
            .flat_map(|(n, ip)| {
                n.boot_macs
                    .iter()
                    .filter_map(|m| parse_mac(m))
                    .map(move |m| (m, ip))
            })
            .collect()
    }

    fn node(&self, mac: &[u8; 6]) -> Option<InventoryNode> {
        self.current().node_by_mac(mac).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decides_from_the_inventory_and_the_unknown_policy() {
        let inv = Inventory::from_yaml(
            r#"
apiVersion: kiln.dev/v1alpha1
kind: Inventory
spec:
  nodes:
    - name: node-01
      bootMACs: ["52:54:00:00:00:01", "52:54:00:00:00:11"]
      bootAddress: 10.0.0.11
    - name: node-02
      bootMACs: ["52:54:00:00:00:02"]
"#,
        )
        .unwrap();
        let known = [0x52, 0x54, 0, 0, 0, 1];
        let unknown = [0x52, 0x54, 0, 0, 0, 9];
        let b = InventoryBackend::new(inv.clone(), UnknownMacs::Ignore);
        assert_eq!(
            b.lookup(&known),
            Decision::Boot {
                node: "node-01".into()
            }
        );
        assert_eq!(b.lookup(&unknown), Decision::Ignore);
        let d = InventoryBackend::new(inv, UnknownMacs::Discovery);
        assert_eq!(d.lookup(&unknown), Decision::Discovery);
        assert_eq!(
            b.reservations(),
            BTreeMap::from([
                (known, Ipv4Addr::new(10, 0, 0, 11)),
                ([0x52, 0x54, 0, 0, 0, 0x11], Ipv4Addr::new(10, 0, 0, 11))
            ])
        );
        assert_eq!(b.node(&known).unwrap().name, "node-01");
        assert!(b.node(&unknown).is_none());
        // A new inventory is what the next decision is made on.
        let mut edited = inv_without_node_01(&b);
        edited.spec.nodes[0]
            .boot_macs
            .push("52:54:00:00:00:09".into());
        b.replace(edited);
        assert_eq!(b.lookup(&known), Decision::Ignore);
        assert_eq!(b.node(&unknown).unwrap().name, "node-02");
        assert!(b.reservations().is_empty());
    }

    fn inv_without_node_01(b: &InventoryBackend) -> Inventory {
        let mut inv = (*b.current()).clone();
        inv.spec.nodes.retain(|n| n.name != "node-01");
        inv
    }
}
