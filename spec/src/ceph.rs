//! A node's part in the appliance's own Ceph cluster (`spec.ceph` of a node config): native
//! daemons the agent sets up from Debian's packages, as pveceph does, not containers.
//!
//! The node is the cluster's first monitor: it runs a monitor and a manager, generates the
//! cluster's id and keys itself (kept on the node, never in the image), turns the node's
//! data disks of usage `ceph-osd` into OSDs and creates the pools. With one host, replicas go
//! to different OSDs of that host.

use std::net::IpAddr;

use ipnet::IpNet;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ValidationErrors;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CephNode {
    /// The cluster's id (a UUID); generated on the node and kept when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fsid: Option<String>,
    /// The address this node's monitor listens on; in `publicNetwork`.
    pub monitor_address: String,
    /// The network Ceph's clients and daemons talk on (CIDR).
    pub public_network: String,
    /// Pools to create; an RBD pool `rbd` of 3 replicas when none are given.
    #[serde(default = "default_pools")]
    pub pools: Vec<CephPool>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CephPool {
    pub name: String,
    /// Copies of each object. 1 keeps no redundancy: a lost disk loses the pool's data.
    #[serde(default = "default_size")]
    pub size: u8,
    /// Placement groups; a power of two.
    #[serde(default = "default_pg_num")]
    pub pg_num: u32,
    /// `rbd` (block images for VMs), `cephfs` or `rgw`.
    #[serde(default = "default_application")]
    pub application: String,
}

fn default_pools() -> Vec<CephPool> {
    vec![CephPool {
        name: "rbd".into(),
        size: default_size(),
        pg_num: default_pg_num(),
        application: default_application(),
    }]
}

fn default_size() -> u8 {
    3
}

fn default_pg_num() -> u32 {
    32
}

fn default_application() -> String {
    "rbd".into()
}

/// Ceph's own limit on replicas.
const MAX_SIZE: u8 = 10;

impl CephNode {
    /// The monitor's address, once validated.
    pub fn monitor_ip(&self) -> Option<IpAddr> {
        self.monitor_address.parse().ok()
    }

    /// What the node's Ceph part warns about: pools without redundancy.
    pub fn warnings(&self) -> Vec<String> {
        self.pools
            .iter()
            .filter(|p| p.size == 1)
            .map(|p| {
                format!(
                    "pool {} keeps one copy of its data (size 1): a lost disk loses it, and no OSD can stop without making it unavailable",
                    p.name
                )
            })
            .collect()
    }

    pub fn validate_into(&self, at: &str, osd_disks: usize, errs: &mut ValidationErrors) {
        if let Some(f) = &self.fsid
            && uuid::Uuid::parse_str(f).is_err()
        {
            errs.push(format!("{at}.fsid"), format!("{f:?} is not a UUID"));
        }
        let network = match self.public_network.parse::<IpNet>() {
            Ok(n) => Some(n),
            Err(_) => {
                errs.push(
                    format!("{at}.publicNetwork"),
                    format!("{:?} is not a CIDR network", self.public_network),
                );
                None
            }
        };
        match (self.monitor_ip(), network) {
            (None, _) => errs.push(
                format!("{at}.monitorAddress"),
                format!("{:?} is not an IP address", self.monitor_address),
            ),
            (Some(ip), Some(net)) if !net.contains(&ip) => errs.push(
                format!("{at}.monitorAddress"),
                format!("{ip} is outside publicNetwork {net}"),
            ),
            _ => {}
        }
        if self.pools.is_empty() {
            errs.push(format!("{at}.pools"), "at least one pool is needed");
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, p) in self.pools.iter().enumerate() {
            let pat = format!("{at}.pools[{i}]");
            let name_ok = !p.name.is_empty()
                && p.name.len() <= 64
                && !p.name.starts_with('.')
                && p.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !name_ok {
                errs.push(
                    format!("{pat}.name"),
                    "must be 1 to 64 letters, digits, '-', '_' or '.', not starting with '.'",
                );
            } else if !names.insert(&p.name) {
                errs.push(format!("{pat}.name"), "listed twice");
            }
            if p.size == 0 || p.size > MAX_SIZE {
                errs.push(format!("{pat}.size"), format!("must be 1 to {MAX_SIZE}"));
            } else if usize::from(p.size) > osd_disks {
                errs.push(
                    format!("{pat}.size"),
                    format!(
                        "{} copies need as many OSDs, and the node has {osd_disks} data disks of usage ceph-osd",
                        p.size
                    ),
                );
            }
            if !p.pg_num.is_power_of_two() || p.pg_num > 32768 {
                errs.push(format!("{pat}.pgNum"), "must be a power of two up to 32768");
            }
            if !matches!(p.application.as_str(), "rbd" | "cephfs" | "rgw") {
                errs.push(
                    format!("{pat}.application"),
                    format!("{:?} is not one of rbd, cephfs, rgw", p.application),
                );
            }
        }
    }
}
