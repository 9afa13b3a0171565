//! A node's part in the appliance's own Ceph cluster (`spec.ceph` of a node config): native
//! daemons the agent sets up from Debian's packages, as pveceph does, not containers.
//!
//! A node plays one of three roles ([`CephRole`]): the first monitor makes the cluster (its
//! monitor and manager, the pools), further monitors join its quorum and run standby
//! managers, and OSD nodes only add their data disks. Every node turns its data disks of usage
//! `ceph-osd` into OSDs.
//!
//! Without `keys` the node makes the cluster's id and keys itself (kept on the node, never in
//! the image): a cluster of this one node, whose replicas go to different OSDs of it. With
//! `keys` (the fleet makes them, with the fsid, and hands them through each node's config)
//! the cluster spans nodes, and replicas go to different hosts.

use std::net::IpAddr;

use ipnet::IpNet;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ValidationErrors;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CephNode {
    #[serde(default)]
    pub role: CephRole,
    /// The cluster's id (a UUID); generated on the node and kept when not given. Required
    /// with `keys`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fsid: Option<String>,
    /// The address this node's monitor listens on, in `publicNetwork`; monitors only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitor_address: Option<String>,
    /// The network Ceph's clients and daemons talk on (CIDR).
    pub public_network: String,
    /// The addresses of the cluster's monitors a node reaches it through (this node's own may
    /// be among them). Required on `monitor` and `osd`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub monitors: Vec<String>,
    /// The cluster's keys, shared by its nodes; required on `monitor` and `osd`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<CephKeys>,
    /// Pools the first monitor creates; an RBD pool `rbd` of 3 replicas when none are given.
    /// Other roles leave pools to it.
    #[serde(default = "default_pools")]
    pub pools: Vec<CephPool>,
}

/// A node's part in its Ceph cluster.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum CephRole {
    /// Makes the cluster: the first monitor and manager, and the pools.
    #[default]
    FirstMonitor,
    /// Joins the monitors' quorum and runs a standby manager.
    Monitor,
    /// Runs OSDs only.
    Osd,
}

impl CephRole {
    pub fn runs_monitor(self) -> bool {
        matches!(self, CephRole::FirstMonitor | CephRole::Monitor)
    }
}

/// A cephx secret as Ceph writes it in a keyring (base64); never printed.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct CephSecret(pub String);

impl std::fmt::Debug for CephSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("(secret)")
    }
}

impl CephSecret {
    /// Whether it reads as a cephx AES key: 12 bytes of header (type 1, creation time, key
    /// length 16) and 16 bytes of key.
    fn is_well_formed(&self) -> bool {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(&self.0)
            .is_ok_and(|b| b.len() == 28 && b[0..2] == [1, 0] && b[10..12] == [16, 0])
    }
}

/// The keys a cluster of several nodes shares, made once by the fleet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CephKeys {
    /// The monitors' shared key (`mon.`); monitors only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitor: Option<CephSecret>,
    /// `client.admin`: what the node's own tools (status, maintenance) use.
    pub admin: CephSecret,
    /// `client.bootstrap-osd`: lets the node register its OSDs.
    pub bootstrap_osd: CephSecret,
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
        self.monitor_address.as_deref()?.parse().ok()
    }

    /// Every monitor the node knows of: its own and `monitors`, each once.
    pub fn all_monitors(&self) -> Vec<IpAddr> {
        let mut all: Vec<IpAddr> = self.monitor_ip().into_iter().collect();
        for ip in self.monitors.iter().filter_map(|m| m.parse().ok()) {
            if !all.contains(&ip) {
                all.push(ip);
            }
        }
        all
    }

    /// A cluster of this node alone: it makes its keys itself, so no other node can join.
    pub fn single_node(&self) -> bool {
        self.keys.is_none() && self.role == CephRole::FirstMonitor
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
        let network = check_network(&format!("{at}.publicNetwork"), &self.public_network, errs);
        match (&self.monitor_address, self.role.runs_monitor()) {
            (None, true) => errs.push(
                format!("{at}.monitorAddress"),
                "a monitor needs the address it listens on",
            ),
            (Some(_), false) => errs.push(
                format!("{at}.monitorAddress"),
                "an osd node runs no monitor; name the cluster's monitors in monitors",
            ),
            (Some(a), true) => check_address(a, network, &format!("{at}.monitorAddress"), errs),
            (None, false) => {}
        }
        for (i, m) in self.monitors.iter().enumerate() {
            check_address(m, network, &format!("{at}.monitors[{i}]"), errs);
        }
        let joins = self.role != CephRole::FirstMonitor;
        if joins && self.monitors.is_empty() {
            errs.push(
                format!("{at}.monitors"),
                "a joining node needs the cluster's monitors",
            );
        }
        match &self.keys {
            None if joins => errs.push(
                format!("{at}.keys"),
                "a joining node needs the cluster's keys (the fleet makes them)",
            ),
            None => {}
            Some(keys) => {
                if self.fsid.is_none() {
                    errs.push(
                        format!("{at}.fsid"),
                        "a cluster of several nodes needs its fsid given with its keys",
                    );
                }
                match (&keys.monitor, self.role.runs_monitor()) {
                    (None, true) => errs.push(
                        format!("{at}.keys.monitor"),
                        "a monitor needs the monitors' key",
                    ),
                    (Some(_), false) => errs.push(
                        format!("{at}.keys.monitor"),
                        "an osd node is not given the monitors' key",
                    ),
                    _ => {}
                }
                for (field, key) in [
                    ("monitor", keys.monitor.as_ref()),
                    ("admin", Some(&keys.admin)),
                    ("bootstrapOsd", Some(&keys.bootstrap_osd)),
                ] {
                    if key.is_some_and(|k| !k.is_well_formed()) {
                        errs.push(
                            format!("{at}.keys.{field}"),
                            "is not a cephx key (base64 of 28 bytes, as ceph-authtool makes)",
                        );
                    }
                }
            }
        }
        let single_node = self.single_node();
        validate_pools(&format!("{at}.pools"), &self.pools, errs, |size| {
            if size == 1 && !single_node {
                Some(
                    "one copy is allowed only in a cluster of one node: in a cluster of several, a node in maintenance would take the pool down"
                        .into(),
                )
            } else if single_node && usize::from(size) > osd_disks {
                Some(format!(
                    "{size} copies need as many OSDs, and the node has {osd_disks} data disks of usage ceph-osd"
                ))
            } else {
                None
            }
        });
    }
}

/// The Ceph cluster a fleet makes of its nodes (appliance `spec.cluster.ceph`): what every
/// node's part shares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CephCluster {
    /// The network Ceph's clients and daemons talk on (CIDR); every node's address is in it.
    pub public_network: String,
    /// Pools the first monitor creates; an RBD pool `rbd` of 3 replicas when none are given.
    #[serde(default = "default_pools")]
    pub pools: Vec<CephPool>,
}

impl CephCluster {
    pub fn validate_into(&self, at: &str, errs: &mut ValidationErrors) {
        check_network(&format!("{at}.publicNetwork"), &self.public_network, errs);
        // How many copies the nodes can hold is the fleet's to check: it knows the nodes.
        validate_pools(&format!("{at}.pools"), &self.pools, errs, |_| None);
    }
}

fn check_network(at: &str, network: &str, errs: &mut ValidationErrors) -> Option<IpNet> {
    let parsed = network.parse::<IpNet>().ok();
    if parsed.is_none() {
        errs.push(at, format!("{network:?} is not a CIDR network"));
    }
    parsed
}

/// The pools' names, sizes, placement groups and applications; `copies` says what is wrong
/// with a size of 1 to 10 copies where the pools are, if anything.
fn validate_pools(
    at: &str,
    pools: &[CephPool],
    errs: &mut ValidationErrors,
    copies: impl Fn(u8) -> Option<String>,
) {
    if pools.is_empty() {
        errs.push(at, "at least one pool is needed");
    }
    let mut names = std::collections::BTreeSet::new();
    for (i, p) in pools.iter().enumerate() {
        let pat = format!("{at}[{i}]");
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
        } else if let Some(reason) = copies(p.size) {
            errs.push(format!("{pat}.size"), reason);
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

/// An IP address, in `network` when that is known.
fn check_address(address: &str, network: Option<IpNet>, at: &str, errs: &mut ValidationErrors) {
    match (address.parse::<IpAddr>(), network) {
        (Err(_), _) => errs.push(at, format!("{address:?} is not an IP address")),
        (Ok(ip), Some(net)) if !net.contains(&ip) => {
            errs.push(at, format!("{ip} is outside publicNetwork {net}"))
        }
        _ => {}
    }
}
