//! The Kubernetes and Ceph clusters a rollout makes of its nodes: each inventory node's part
//! (`spec.cluster.node`, `spec.cluster.cephNode`) follows from its inventory role and address,
//! with credentials the fleet makes once and keeps in its state directory. The fleet makes the
//! CA and Ceph's fsid and keys itself, so every joining node knows them before the first
//! control plane or monitor is even installed: all nodes install and join in one rollout,
//! none waits for another to report.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use kiln_cluster::pki::{Ca, CertPair, Leaf, Usage};
use kiln_spec::appliance::Feature;
use kiln_spec::ceph::{CephKeys, CephNode, CephRole};
use kiln_spec::errors::ValidationErrors;
use kiln_spec::kubernetes::{ClusterCa, JoinCredentials, KubeRole, KubernetesNode, SecretPem};
use kiln_spec::remote::RemoteApi;
use kiln_spec::{Appliance, Inventory, InventoryNode, NodeRole};

/// Where in the state directory the credentials live (for root alone).
pub const SECRETS_DIR: &str = "secrets";

/// Each node's slice of the pod network: 254 pods, more than a kubelet's 110 by default.
const POD_PREFIX: u8 = 24;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("{what} {}: {source}", .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {reason}", .path.display())]
    Pki { path: PathBuf, reason: String },
    #[error("no fleet credentials in {}: `kiln fleet rollout` and `kiln fleet node-config` make them there (pass the fleet's --state-dir)", .dir.display())]
    Missing { dir: PathBuf },
}

/// What the fleet's nodes and administrators share: the Kubernetes CA (with the hash joining
/// nodes pin) and the bootstrap token nodes join with; and the admin CA, which issues each
/// node's agent API certificate and the administrators' client certificates.
#[derive(Debug, Clone)]
pub struct FleetSecrets {
    pub kubernetes_ca: ClusterCa,
    pub ca_cert_hash: String,
    pub token: String,
    /// What every control plane shares besides the CA: etcd's CA and the key that signs
    /// service-account tokens.
    pub etcd_ca: ClusterCa,
    pub service_account_key: SecretPem,
    /// The Ceph cluster's fsid and keys; absent from a state directory made before them
    /// until a rollout makes them.
    pub ceph: Option<CephSecrets>,
    admin_ca: CertPair,
    admin_ca_path: PathBuf,
}

/// What every node of the fleet's Ceph cluster shares (`secrets/ceph.json`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CephSecrets {
    pub fsid: String,
    pub keys: CephKeys,
}

impl FleetSecrets {
    /// The secrets kept in `state_dir`, each made on first use. A later rollout of the same
    /// fleet reuses them, so nodes installed again join the cluster their peers run.
    pub fn load_or_create(state_dir: &Path) -> Result<FleetSecrets, ClusterError> {
        create_dir_private(&state_dir.join(SECRETS_DIR))?;
        FleetSecrets::read(state_dir, true)
    }

    /// The secrets kept in `state_dir`, for tools that must not make new ones.
    pub fn load(state_dir: &Path) -> Result<FleetSecrets, ClusterError> {
        let dir = state_dir.join(SECRETS_DIR);
        if !dir.join("admin-ca.key").exists() {
            return Err(ClusterError::Missing { dir });
        }
        FleetSecrets::read(state_dir, false)
    }

    fn read(state_dir: &Path, create: bool) -> Result<FleetSecrets, ClusterError> {
        let dir = state_dir.join(SECRETS_DIR);
        let kube = load_or_create_ca(&dir, "kubernetes-ca", "kiln-kubernetes-ca", create)?;
        let etcd = load_or_create_ca(&dir, "etcd-ca", "kiln-etcd-ca", create)?;
        let sa_path = dir.join("service-account.key");
        if create && !sa_path.exists() {
            let (private, _) = kiln_cluster::pki::key_pair().map_err(|e| ClusterError::Pki {
                path: sa_path.clone(),
                reason: e.to_string(),
            })?;
            write_private(&sa_path, &private)?;
        }
        let service_account_key = SecretPem(std::fs::read_to_string(&sa_path).map_err(
            |source| ClusterError::Io {
                what: "reading",
                path: sa_path.clone(),
                source,
            },
        )?);
        let admin_ca = load_or_create_ca(&dir, "admin-ca", "kiln-admin-ca", create)?;
        let token_path = dir.join("bootstrap-token");
        if create && !token_path.exists() {
            write_private(&token_path, &(new_bootstrap_token() + "\n"))?;
        }
        let token = std::fs::read_to_string(&token_path)
            .map_err(|source| ClusterError::Io {
                what: "reading",
                path: token_path.clone(),
                source,
            })?
            .trim()
            .to_string();
        let ca_cert_hash =
            kiln_cluster::pki::ca_cert_hash(&kube.cert_pem).map_err(|e| ClusterError::Pki {
                path: dir.join("kubernetes-ca.crt"),
                reason: e.to_string(),
            })?;
        let ceph_path = dir.join("ceph.json");
        if create && !ceph_path.exists() {
            let fresh = CephSecrets {
                fsid: uuid::Uuid::new_v4().to_string(),
                keys: kiln_cluster::ceph::conf::new_keys(),
            };
            let json = serde_json::to_string_pretty(&fresh).expect("plain data serialises");
            write_private(&ceph_path, json)?;
        }
        let ceph = match std::fs::read(&ceph_path) {
            Ok(bytes) => Some(
                serde_json::from_slice(&bytes).map_err(|e| ClusterError::Pki {
                    path: ceph_path.clone(),
                    reason: e.to_string(),
                })?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(ClusterError::Io {
                    what: "reading",
                    path: ceph_path,
                    source,
                });
            }
        };
        Ok(FleetSecrets {
            kubernetes_ca: ClusterCa {
                cert: kube.cert_pem,
                key: kube.key_pem,
            },
            ca_cert_hash,
            token,
            etcd_ca: ClusterCa {
                cert: etcd.cert_pem,
                key: etcd.key_pem,
            },
            service_account_key,
            ceph,
            admin_ca,
            admin_ca_path: dir.join("admin-ca.crt"),
        })
    }

    fn admin_issue(&self, leaf: &Leaf<'_>) -> Result<CertPair, ClusterError> {
        let pki = |e: kiln_cluster::pki::PkiError| ClusterError::Pki {
            path: self.admin_ca_path.clone(),
            reason: e.to_string(),
        };
        Ca::load(self.admin_ca.clone())
            .map_err(pki)?
            .issue(leaf)
            .map_err(pki)
    }

    /// The agent API of node `name`: a server certificate for its name and `address`, and
    /// the admin CA its clients must come with.
    pub fn remote_api(
        &self,
        name: &str,
        address: Option<IpAddr>,
    ) -> Result<RemoteApi, ClusterError> {
        let mut sans = vec![name.to_string()];
        sans.extend(address.map(|a| a.to_string()));
        let pair = self.admin_issue(&Leaf {
            common_name: name,
            organizations: &[],
            sans,
            usage: Usage::Server,
        })?;
        Ok(RemoteApi {
            listen: format!("0.0.0.0:{}", kiln_spec::remote::DEFAULT_PORT),
            client_ca: self.admin_ca.cert_pem.clone(),
            cert: pair.cert_pem,
            key: pair.key_pem,
        })
    }

    /// A client certificate for an administrator's tool, and the CA that vouches for the
    /// nodes.
    pub fn admin_identity(&self) -> Result<(CertPair, String), ClusterError> {
        let pair = self.admin_issue(&Leaf {
            common_name: "kiln-admin",
            organizations: &[],
            sans: vec![],
            usage: Usage::Client,
        })?;
        Ok((pair, self.admin_ca.cert_pem.clone()))
    }
}

/// The CA `<stem>.crt`/`<stem>.key` in `dir`, made when the key is missing (written last: its
/// presence says the pair is complete).
fn load_or_create_ca(
    dir: &Path,
    stem: &str,
    common_name: &str,
    create: bool,
) -> Result<CertPair, ClusterError> {
    let (cert, key) = (
        dir.join(format!("{stem}.crt")),
        dir.join(format!("{stem}.key")),
    );
    if create && !key.exists() {
        let ca = Ca::generate(common_name).map_err(|e| ClusterError::Pki {
            path: cert.clone(),
            reason: e.to_string(),
        })?;
        write_private(&cert, &ca.pair.cert_pem)?;
        write_private(&key, &ca.pair.key_pem)?;
    }
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|source| ClusterError::Io {
            what: "reading",
            path: path.to_path_buf(),
            source,
        })
    };
    Ok(CertPair {
        cert_pem: read(&cert)?,
        key_pem: read(&key)?,
    })
}

/// A kubeadm-style bootstrap token: 6 and 16 random lower-case letters or digits.
fn new_bootstrap_token() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let part = |n: usize| -> String {
        (0..n)
            .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
            .collect()
    };
    format!("{}.{}", part(6), part(16))
}

/// Creates `dir` (and its parents), readable by its owner only.
pub fn create_dir_private(dir: &Path) -> Result<(), ClusterError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| ClusterError::Io {
            what: "creating",
            path: dir.to_path_buf(),
            source,
        })
}

/// Written to a temporary file (mode 0600 from the start) and renamed into place: whole or
/// not at all, and never readable by others.
pub fn write_private(path: &Path, content: impl AsRef<[u8]>) -> Result<(), ClusterError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let io = |source| ClusterError::Io {
        what: "writing",
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(content.as_ref()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// The address a node's cluster components use: the first static address its overrides
/// give, else the address the netboot DHCP server reserves for it.
pub fn node_address(node: &InventoryNode) -> Option<IpAddr> {
    let static_address = node
        .overrides
        .as_ref()
        .and_then(|o| o.network.as_ref())
        .and_then(|n| {
            n.interfaces
                .iter()
                .flat_map(|i| &i.addresses)
                .chain(n.bonds.iter().flat_map(|b| &b.addresses))
                .chain(n.vlans.iter().flat_map(|v| &v.addresses))
                .chain(n.bridges.iter().flat_map(|b| &b.addresses))
                .find_map(|a| a.parse::<IpNet>().ok())
        })
        .map(|net| net.addr());
    static_address.or(node.boot_address.map(IpAddr::V4))
}

/// Where a node sits in the cluster, decided from the inventory alone (no credentials).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seat {
    /// Derived by the fleet.
    Derived {
        role: KubeRole,
        address: IpAddr,
        pod_cidr: IpNet,
        api_server: String,
    },
    /// The node's overrides give its `clusterNode`; it is used as written.
    Written(Box<KubernetesNode>),
}

impl Seat {
    pub fn role(&self) -> KubeRole {
        match self {
            Seat::Derived { role, .. } => *role,
            Seat::Written(k) => k.role,
        }
    }

    /// One line for `kiln fleet plan`.
    pub fn describe(&self) -> String {
        let role = |r: KubeRole| match r {
            KubeRole::Init => "first control plane",
            KubeRole::ControlPlane => "control plane (joins etcd)",
            KubeRole::Worker => "worker",
        };
        match self {
            Seat::Derived {
                role: r,
                address,
                pod_cidr,
                ..
            } => format!("{} at {address}, pods {pod_cidr}", role(*r)),
            Seat::Written(k) => format!(
                "{} at {}, pods {} (as written)",
                role(k.role),
                k.node_ip,
                k.pod_cidr
            ),
        }
    }
}

/// Each inventory node's seat in the cluster, by name, when the appliance has the
/// `kubernetes` feature (else none): the first `control-plane` node makes the cluster, further
/// `control-plane` nodes join its etcd and run control planes of their own, every `worker`
/// and `storage` node joins it, and each gets the next /24 of the pod network in
/// inventory order (append new nodes at the end to keep the others' slices). A node whose
/// overrides give `clusterNode` keeps it as written. Every problem is reported, with its
/// inventory path.
pub fn seats(
    appliance: &Appliance,
    inventory: &Inventory,
) -> Result<BTreeMap<String, Seat>, ValidationErrors> {
    let mut errs = ValidationErrors::default();
    let mut out = BTreeMap::new();
    if !appliance.has_feature(Feature::Kubernetes) {
        return Ok(out);
    }
    let cluster = &appliance.spec.cluster;
    let Ok(pods) = cluster.cluster_cidr.parse::<IpNet>() else {
        errs.push(
            "spec.cluster.clusterCidr",
            format!("{:?} is not a network", cluster.cluster_cidr),
        );
        return Err(errs);
    };
    let mut slices = match pods.subnets(POD_PREFIX) {
        Ok(s) => s,
        Err(_) => {
            errs.push(
                "spec.cluster.clusterCidr",
                format!("{pods} is smaller than one node's /{POD_PREFIX}"),
            );
            return Err(errs);
        }
    };
    let nodes = &inventory.spec.nodes;
    let Some((init_index, init)) = nodes
        .iter()
        .enumerate()
        .find(|(_, n)| n.role == NodeRole::ControlPlane)
    else {
        errs.push(
            "spec.nodes",
            "the appliance has the kubernetes feature, so one node needs role control-plane",
        );
        return Err(errs);
    };
    let no_address = format!("a cluster node needs {FIXED_ADDRESS}");
    let init_address = node_address(init);
    if init_address.is_none() {
        errs.push(format!("spec.nodes[{init_index}]"), &no_address);
    }
    for (i, node) in nodes.iter().enumerate() {
        if let Some(written) = node.overrides.as_ref().and_then(|o| o.cluster_node.clone()) {
            out.insert(node.name.clone(), Seat::Written(Box::new(written)));
            continue;
        }
        let Some(address) = node_address(node) else {
            if i != init_index {
                errs.push(format!("spec.nodes[{i}]"), &no_address);
            }
            continue;
        };
        let Some(pod_cidr) = slices.next() else {
            errs.push(
                format!("spec.nodes[{i}]"),
                format!("the pod network {pods} has no /{POD_PREFIX} left for this node"),
            );
            continue;
        };
        let Some(init_address) = init_address else {
            continue;
        };
        out.insert(
            node.name.clone(),
            Seat::Derived {
                role: if i == init_index {
                    KubeRole::Init
                } else if node.role == NodeRole::ControlPlane {
                    KubeRole::ControlPlane
                } else {
                    KubeRole::Worker
                },
                address,
                pod_cidr,
                api_server: format!("https://{}", host_port(init_address, 6443)),
            },
        );
    }
    errs.into_result().map(|()| out)
}

/// What the seats leave to be said: etcd with two members has no quorum when either stops.
pub fn seat_warnings(seats: &BTreeMap<String, Seat>) -> Vec<String> {
    let control_planes = seats
        .values()
        .filter(|s| s.role().is_control_plane())
        .count();
    if control_planes == 2 {
        vec![
            "two control planes: etcd with two members stops when either of them stops; run one or three"
                .into(),
        ]
    } else {
        Vec::new()
    }
}

/// Each inventory node's part in the cluster ([`seats`]), with the fleet's credentials: the
/// control plane gets the CA, every node the token and the CA's hash.
pub fn members(
    appliance: &Appliance,
    inventory: &Inventory,
    secrets: &FleetSecrets,
) -> Result<BTreeMap<String, KubernetesNode>, ValidationErrors> {
    let cluster = &appliance.spec.cluster;
    let labels: BTreeMap<&str, &BTreeMap<String, String>> = inventory
        .spec
        .nodes
        .iter()
        .map(|n| (n.name.as_str(), &n.labels))
        .collect();
    Ok(seats(appliance, inventory)?
        .into_iter()
        .map(|(name, seat)| {
            let member = match seat {
                Seat::Written(k) => *k,
                Seat::Derived {
                    role,
                    address,
                    pod_cidr,
                    api_server,
                } => KubernetesNode {
                    role,
                    node_ip: address.to_string(),
                    api_server: Some(api_server),
                    join: Some(JoinCredentials {
                        token: secrets.token.clone(),
                        ca_cert_hash: Some(secrets.ca_cert_hash.clone()),
                    }),
                    ca: role
                        .is_control_plane()
                        .then(|| secrets.kubernetes_ca.clone()),
                    etcd_ca: role.is_control_plane().then(|| secrets.etcd_ca.clone()),
                    service_account_key: role
                        .is_control_plane()
                        .then(|| secrets.service_account_key.clone()),
                    cluster_cidr: cluster.cluster_cidr.clone(),
                    service_cidr: cluster.service_cidr.clone(),
                    cluster_domain: cluster.cluster_domain.clone(),
                    pod_cidr: pod_cidr.to_string(),
                    max_pods: kiln_spec::kubernetes::default_max_pods(),
                    labels: labels
                        .get(name.as_str())
                        .map(|l| (*l).clone())
                        .unwrap_or_default(),
                    taints: Vec::new(),
                    system_reserved: BTreeMap::new(),
                    kube_reserved: BTreeMap::new(),
                    registry_mirrors: BTreeMap::new(),
                },
            };
            (name, member)
        })
        .collect())
}

/// How a node gets an address other nodes can rely on.
const FIXED_ADDRESS: &str = "a fixed address: a static address in overrides.network, or \
                             bootAddress when the netboot DHCP server hands out addresses";

/// Monitors beyond three add no safety for a rack, only elections.
const MAX_MONITORS: usize = 3;

/// Where a node sits in the Ceph cluster, decided from the inventory alone (no keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CephSeat {
    /// Derived by the fleet; `address` is the monitor's, for monitors.
    Derived {
        role: CephRole,
        address: Option<IpAddr>,
    },
    /// The node's overrides give its `cephNode`; it is used as written.
    Written(Box<CephNode>),
}

impl CephSeat {
    pub fn role(&self) -> CephRole {
        match self {
            CephSeat::Derived { role, .. } => *role,
            CephSeat::Written(c) => c.role,
        }
    }

    /// The address of the node's monitor, when it runs one (derived or as written).
    pub fn monitor_address(&self) -> Option<IpAddr> {
        match self {
            CephSeat::Derived { address, .. } => *address,
            CephSeat::Written(c) => c.monitor_ip().filter(|_| c.role.runs_monitor()),
        }
    }

    /// A few words for `kiln fleet plan`.
    pub fn describe(&self) -> String {
        let written = match self {
            CephSeat::Derived { .. } => "",
            CephSeat::Written(_) => " (as written)",
        };
        let address = self.monitor_address();
        let role = match self.role() {
            CephRole::FirstMonitor => "ceph first monitor",
            CephRole::Monitor => "ceph monitor",
            CephRole::Osd => "ceph OSDs",
        };
        match address {
            Some(a) => format!("{role} at {a}{written}"),
            None => format!("{role}{written}"),
        }
    }
}

/// Each inventory node's seat in the Ceph cluster, by name, when the appliance names one
/// (`spec.cluster.ceph`; else none): the first `control-plane` node makes the cluster, the
/// next two `control-plane` nodes join as monitors, and every other node adds its data disks
/// as OSDs. A node whose overrides give `cephNode` keeps it as written. Every problem is
/// reported, with its inventory or spec path.
pub fn ceph_seats(
    appliance: &Appliance,
    inventory: &Inventory,
) -> Result<BTreeMap<String, CephSeat>, ValidationErrors> {
    let mut errs = ValidationErrors::default();
    let Some(cluster) = &appliance.spec.cluster.ceph else {
        return Ok(BTreeMap::new());
    };
    let nodes = &inventory.spec.nodes;
    for (i, p) in cluster.pools.iter().enumerate() {
        let at = format!("spec.cluster.ceph.pools[{i}].size");
        if p.size == 1 && nodes.len() > 1 {
            errs.push(
                at,
                format!(
                    "one copy is allowed only in a cluster of one node, and the inventory has {}",
                    nodes.len()
                ),
            );
        } else if usize::from(p.size) > nodes.len() && nodes.len() > 1 {
            errs.push(
                at,
                format!(
                    "{} copies go to as many hosts, and the inventory has {}",
                    p.size,
                    nodes.len()
                ),
            );
        }
    }
    let monitors: Vec<&str> = nodes
        .iter()
        .filter(|n| n.role == NodeRole::ControlPlane)
        .take(MAX_MONITORS)
        .map(|n| n.name.as_str())
        .collect();
    if monitors.is_empty() {
        errs.push(
            "spec.nodes",
            "the appliance names a Ceph cluster (spec.cluster.ceph), so one node needs role control-plane to be its first monitor",
        );
    }
    let network = cluster.public_network.parse::<IpNet>().ok();
    let mut out = BTreeMap::new();
    for (i, node) in nodes.iter().enumerate() {
        if let Some(written) = node.overrides.as_ref().and_then(|o| o.ceph_node.clone()) {
            out.insert(node.name.clone(), CephSeat::Written(Box::new(written)));
            continue;
        }
        let role = match monitors.iter().position(|m| *m == node.name) {
            Some(0) => CephRole::FirstMonitor,
            Some(_) => CephRole::Monitor,
            None => CephRole::Osd,
        };
        let address = match node_address(node) {
            None if role.runs_monitor() => {
                errs.push(
                    format!("spec.nodes[{i}]"),
                    format!("a Ceph monitor needs {FIXED_ADDRESS}"),
                );
                continue;
            }
            Some(ip) if role.runs_monitor() && network.is_some_and(|n| !n.contains(&ip)) => {
                errs.push(
                    format!("spec.nodes[{i}]"),
                    format!(
                        "its address {ip} is outside spec.cluster.ceph.publicNetwork {}",
                        cluster.public_network
                    ),
                );
                continue;
            }
            ip => ip.filter(|_| role.runs_monitor()),
        };
        out.insert(node.name.clone(), CephSeat::Derived { role, address });
    }
    errs.into_result().map(|()| out)
}

/// What the Ceph seats leave to be said: monitors with two members stop when either stops.
pub fn ceph_seat_warnings(seats: &BTreeMap<String, CephSeat>) -> Vec<String> {
    let monitors = seats.values().filter(|s| s.role().runs_monitor()).count();
    if monitors == 2 {
        vec![
            "two Ceph monitors: their quorum stops when either of them stops; run one or three control-plane nodes"
                .into(),
        ]
    } else {
        Vec::new()
    }
}

/// Each inventory node's part in the Ceph cluster ([`ceph_seats`]), with the fleet's fsid
/// and keys. A fleet of one node makes a cluster of that node alone, whose keys stay on it.
pub fn ceph_members(
    appliance: &Appliance,
    inventory: &Inventory,
    secrets: &FleetSecrets,
) -> Result<BTreeMap<String, CephNode>, ValidationErrors> {
    let seats = ceph_seats(appliance, inventory)?;
    let Some(cluster) = &appliance.spec.cluster.ceph else {
        return Ok(BTreeMap::new());
    };
    let shared = match &secrets.ceph {
        _ if inventory.spec.nodes.len() == 1 => None,
        Some(c) => Some(c),
        None => {
            let mut errs = ValidationErrors::default();
            errs.push(
                "spec.cluster.ceph",
                "the fleet's state directory has no Ceph keys yet: `kiln fleet rollout` or `kiln fleet node-config` makes them",
            );
            return Err(errs);
        }
    };
    let monitors: Vec<String> = seats
        .values()
        .filter_map(CephSeat::monitor_address)
        .map(|a| a.to_string())
        .collect();
    Ok(seats
        .into_iter()
        .map(|(name, seat)| {
            let member = match seat {
                CephSeat::Written(c) => *c,
                CephSeat::Derived { role, address } => CephNode {
                    role,
                    fsid: shared.map(|c| c.fsid.clone()),
                    monitor_address: address.map(|a| a.to_string()),
                    public_network: cluster.public_network.clone(),
                    monitors: if shared.is_some() {
                        monitors.clone()
                    } else {
                        Vec::new()
                    },
                    keys: shared.map(|c| CephKeys {
                        monitor: c.keys.monitor.clone().filter(|_| role.runs_monitor()),
                        ..c.keys.clone()
                    }),
                    pools: cluster.pools.clone(),
                },
            };
            (name, member)
        })
        .collect())
}

fn host_port(ip: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}

/// Every inventory node's agent API, with a certificate for its name and address.
pub fn remote_apis(
    inventory: &Inventory,
    secrets: &FleetSecrets,
) -> Result<BTreeMap<String, RemoteApi>, ClusterError> {
    inventory
        .spec
        .nodes
        .iter()
        .map(|n| {
            Ok((
                n.name.clone(),
                secrets.remote_api(&n.name, node_address(n))?,
            ))
        })
        .collect()
}

/// The inventory with each node's part in the cluster and its agent API written into its
/// overrides (where absent), where the netboot services' per-node spec, and so the
/// installer's node config, picks them up.
pub fn with_members(
    inventory: &Inventory,
    members: &BTreeMap<String, KubernetesNode>,
    ceph: &BTreeMap<String, CephNode>,
    apis: &BTreeMap<String, RemoteApi>,
) -> Inventory {
    let mut out = inventory.clone();
    for node in &mut out.spec.nodes {
        let o = node.overrides.get_or_insert_with(Default::default);
        if o.cluster_node.is_none() {
            o.cluster_node = members.get(&node.name).cloned();
        }
        if o.ceph_node.is_none() {
            o.ceph_node = ceph.get(&node.name).cloned();
        }
        if o.remote_api.is_none() {
            o.remote_api = apis.get(&node.name).cloned();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_spec::NodeConfig;

    const INVENTORY: &str = r#"apiVersion: kiln.dev/v1alpha1
kind: Inventory
spec:
  nodes:
    - name: cp-1
      role: control-plane
      overrides:
        network:
          interfaces:
            - name: eno1
              addresses: [192.168.10.11/24]
    - name: w-1
      bootAddress: 192.168.10.21
      labels:
        rack: r1
    - name: s-1
      role: storage
      bootAddress: 192.168.10.31
"#;

    fn appliance(features: &str) -> Appliance {
        Appliance::from_yaml(&format!(
            "apiVersion: kiln.dev/v1alpha1\nkind: Appliance\nmetadata:\n  name: rack\nspec:\n  \
             profile: test\n  features: [{features}]\n  cluster:\n    clusterCidr: 10.60.0.0/16\n"
        ))
        .unwrap()
    }

    fn secrets(dir: &Path) -> FleetSecrets {
        FleetSecrets::load_or_create(dir).unwrap()
    }

    #[test]
    fn roles_addresses_and_pod_slices_follow_the_inventory() {
        let dir = tempfile::tempdir().unwrap();
        let s = secrets(dir.path());
        let inventory = Inventory::from_yaml(INVENTORY).unwrap();
        let m = members(&appliance("kubernetes"), &inventory, &s).unwrap();
        let summary: Vec<_> = m
            .iter()
            .map(|(name, k)| {
                (
                    name.as_str(),
                    k.role,
                    k.node_ip.as_str(),
                    k.pod_cidr.as_str(),
                    k.ca.is_some(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (
                    "cp-1",
                    KubeRole::Init,
                    "192.168.10.11",
                    "10.60.0.0/24",
                    true
                ),
                (
                    "s-1",
                    KubeRole::Worker,
                    "192.168.10.31",
                    "10.60.2.0/24",
                    false
                ),
                (
                    "w-1",
                    KubeRole::Worker,
                    "192.168.10.21",
                    "10.60.1.0/24",
                    false
                ),
            ]
        );
        for k in m.values() {
            assert_eq!(k.api_server.as_deref(), Some("https://192.168.10.11:6443"));
            let join = k.join.as_ref().unwrap();
            assert_eq!(join.token, s.token);
            assert_eq!(join.ca_cert_hash.as_ref(), Some(&s.ca_cert_hash));
            assert_eq!(k.cluster_cidr, "10.60.0.0/16");
        }
        assert_eq!(m["w-1"].labels["rack"], "r1");
        assert!(seat_warnings(&seats(&appliance("kubernetes"), &inventory).unwrap()).is_empty());
        // Further control-plane nodes join etcd, with every key the control planes share.
        let two = Inventory::from_yaml(&INVENTORY.replace("role: storage", "role: control-plane"))
            .unwrap();
        let joined = members(&appliance("kubernetes"), &two, &s).unwrap();
        let cp = &joined["s-1"];
        assert_eq!(cp.role, KubeRole::ControlPlane);
        assert_eq!(cp.ca.as_ref(), Some(&s.kubernetes_ca));
        assert_eq!(cp.etcd_ca.as_ref(), Some(&s.etcd_ca));
        assert_eq!(
            cp.service_account_key.as_ref(),
            Some(&s.service_account_key)
        );
        assert!(joined["w-1"].etcd_ca.is_none() && joined["w-1"].service_account_key.is_none());
        let warned = seat_warnings(&seats(&appliance("kubernetes"), &two).unwrap());
        assert!(warned[0].starts_with("two control planes"), "{warned:?}");
        let seats = seats(&appliance("kubernetes"), &inventory).unwrap();
        assert_eq!(
            seats["cp-1"].describe(),
            "first control plane at 192.168.10.11, pods 10.60.0.0/24"
        );
        assert_eq!(
            seats["w-1"].describe(),
            "worker at 192.168.10.21, pods 10.60.1.0/24"
        );
    }

    /// What a node installs with: the per-node spec the netboot services serve, rendered into
    /// its node config, valid and carrying its part.
    #[test]
    fn each_node_config_carries_its_part_and_validates() {
        let dir = tempfile::tempdir().unwrap();
        let appliance = ceph_appliance();
        let inventory = Inventory::from_yaml(INVENTORY).unwrap();
        let m = members(&appliance, &inventory, &secrets(dir.path())).unwrap();
        let s = secrets(dir.path());
        let ceph = ceph_members(&appliance, &inventory, &s).unwrap();
        let apis = remote_apis(&inventory, &s).unwrap();
        let inventory = with_members(&inventory, &m, &ceph, &apis);
        for node in &inventory.spec.nodes {
            let spec = appliance.for_node(node, None).unwrap();
            let text = kiln_spec::nodeconfig::node_config_for(&spec, None, &node.name).to_yaml();
            let config = NodeConfig::from_yaml(&text).unwrap();
            assert_eq!(config.spec.kubernetes.as_ref(), Some(&m[&node.name]));
            assert_eq!(config.spec.ceph.as_ref(), Some(&ceph[&node.name]));
            assert_eq!(config.spec.remote_api.as_ref(), Some(&apis[&node.name]));
        }
        let described: Vec<String> =
            ceph_seats(&appliance, &Inventory::from_yaml(INVENTORY).unwrap())
                .unwrap()
                .values()
                .map(CephSeat::describe)
                .collect();
        assert_eq!(
            described,
            [
                "ceph first monitor at 192.168.10.11",
                "ceph OSDs",
                "ceph OSDs"
            ]
        );
        let fleet = s.ceph.unwrap();
        let parts: Vec<_> = ceph
            .iter()
            .map(|(name, c)| {
                assert_eq!(c.fsid.as_ref(), Some(&fleet.fsid));
                assert_eq!(c.monitors, ["192.168.10.11"]);
                let keys = c.keys.as_ref().unwrap();
                assert_eq!(keys.admin, fleet.keys.admin);
                (
                    name.as_str(),
                    c.role,
                    c.monitor_address.as_deref(),
                    keys.monitor.is_some(),
                )
            })
            .collect();
        assert_eq!(
            parts,
            [
                ("cp-1", CephRole::FirstMonitor, Some("192.168.10.11"), true),
                ("s-1", CephRole::Osd, None, false),
                ("w-1", CephRole::Osd, None, false),
            ]
        );
    }

    fn ceph_appliance() -> Appliance {
        let mut a = appliance("kubernetes, ceph");
        a.spec.cluster.ceph = Some(kiln_spec::ceph::CephCluster {
            public_network: "192.168.10.0/24".into(),
            pools: serde_json::from_str(r#"[{"name": "rbd", "size": 3}]"#).unwrap(),
        });
        a
    }

    #[test]
    fn a_monitor_written_in_the_overrides_is_among_every_nodes_monitors() {
        let dir = tempfile::tempdir().unwrap();
        let s = secrets(dir.path());
        let fleet = s.ceph.clone().unwrap();
        let mut inventory = Inventory::from_yaml(INVENTORY).unwrap();
        inventory.spec.nodes[1]
            .overrides
            .get_or_insert_with(Default::default)
            .ceph_node = Some(CephNode {
            role: CephRole::Monitor,
            fsid: Some(fleet.fsid.clone()),
            monitor_address: Some("192.168.10.21".into()),
            public_network: "192.168.10.0/24".into(),
            monitors: vec!["192.168.10.11".into()],
            keys: Some(fleet.keys.clone()),
            pools: Vec::new(),
        });
        let ceph = ceph_members(&ceph_appliance(), &inventory, &s).unwrap();
        assert_eq!(ceph["s-1"].monitors, ["192.168.10.11", "192.168.10.21"]);
        assert_eq!(
            ceph_seats(&ceph_appliance(), &inventory).unwrap()["w-1"].describe(),
            "ceph monitor at 192.168.10.21 (as written)"
        );
    }

    #[test]
    fn a_ceph_cluster_the_nodes_cannot_hold_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let s = secrets(dir.path());
        let mut a = ceph_appliance();
        let two = Inventory::from_yaml(&INVENTORY.replace(
            "    - name: s-1\n      role: storage\n      bootAddress: 192.168.10.31\n",
            "",
        ))
        .unwrap();
        a.spec.cluster.ceph.as_mut().unwrap().pools[0].size = 3;
        let errs = ceph_members(&a, &two, &s).unwrap_err().to_string();
        assert!(
            errs.contains("spec.cluster.ceph.pools[0].size: 3 copies go to as many hosts, and the inventory has 2"),
            "{errs}"
        );
        a.spec.cluster.ceph.as_mut().unwrap().pools[0].size = 1;
        let errs = ceph_members(&a, &two, &s).unwrap_err().to_string();
        assert!(
            errs.contains("one copy is allowed only in a cluster of one node"),
            "{errs}"
        );
        let mut pair = a.clone();
        pair.spec.cluster.ceph.as_mut().unwrap().pools[0].size = 2;
        assert!(ceph_seat_warnings(&ceph_seats(&pair, &two).unwrap()).is_empty());
        let two_monitors = Inventory::from_yaml(&INVENTORY.replace(
            "    - name: w-1\n",
            "    - name: w-1\n      role: control-plane\n",
        ))
        .unwrap();
        let warned = ceph_seat_warnings(&ceph_seats(&pair, &two_monitors).unwrap());
        assert!(warned[0].starts_with("two Ceph monitors"), "{warned:?}");
        // One node makes a cluster of its own, with keys that never leave it.
        let one =
            Inventory::from_yaml(&INVENTORY[..INVENTORY.find("    - name: w-1").unwrap()]).unwrap();
        let alone = &ceph_members(&a, &one, &s).unwrap()["cp-1"];
        assert_eq!(alone.role, CephRole::FirstMonitor);
        assert!(alone.keys.is_none() && alone.fsid.is_none() && alone.single_node());
    }

    #[test]
    fn credentials_are_made_once_and_kept_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let first = secrets(dir.path());
        let again = secrets(dir.path());
        assert_eq!(first.kubernetes_ca, again.kubernetes_ca);
        assert_eq!(first.admin_ca, again.admin_ca);
        assert_ne!(first.admin_ca.cert_pem, first.kubernetes_ca.cert);
        assert_eq!(first.token, again.token);
        assert!(kiln_spec::kubernetes::is_bootstrap_token(&first.token));
        assert_eq!(
            first.ca_cert_hash,
            kiln_cluster::pki::ca_cert_hash(&first.kubernetes_ca.cert).unwrap()
        );
        let mode = |p: &str| {
            std::fs::metadata(dir.path().join(SECRETS_DIR).join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode(""), 0o700);
        for f in [
            "kubernetes-ca.key",
            "kubernetes-ca.crt",
            "etcd-ca.key",
            "service-account.key",
            "admin-ca.key",
            "admin-ca.crt",
            "bootstrap-token",
            "ceph.json",
        ] {
            assert_eq!(mode(f), 0o600, "{f}");
        }
    }

    #[test]
    fn an_inventory_that_cannot_make_a_cluster_says_every_reason() {
        let dir = tempfile::tempdir().unwrap();
        let s = secrets(dir.path());
        let inventory = Inventory::from_yaml(
            &INVENTORY
                .replace("      role: storage\n", "      role: control-plane\n")
                .replace("      bootAddress: 192.168.10.21\n", ""),
        )
        .unwrap();
        let errs = members(&appliance("kubernetes"), &inventory, &s).unwrap_err();
        let paths: Vec<&str> = errs.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["spec.nodes[1]"], "{errs}");

        let workers_only = Inventory::from_yaml(&INVENTORY.replace("role: control-plane", ""));
        let errs = members(&appliance("kubernetes"), &workers_only.unwrap(), &s).unwrap_err();
        assert_eq!(errs.0[0].path, "spec.nodes", "{errs}");
    }

    #[test]
    fn no_cluster_without_the_feature_and_written_parts_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let s = secrets(dir.path());
        let inventory = Inventory::from_yaml(INVENTORY).unwrap();
        assert!(members(&appliance(""), &inventory, &s).unwrap().is_empty());

        let mut inventory = inventory;
        let written = KubernetesNode {
            pod_cidr: "10.60.9.0/24".into(),
            ..members(&appliance("kubernetes"), &inventory, &s).unwrap()["w-1"].clone()
        };
        inventory.spec.nodes[1]
            .overrides
            .get_or_insert_with(Default::default)
            .cluster_node = Some(written.clone());
        let m = members(&appliance("kubernetes"), &inventory, &s).unwrap();
        assert_eq!(m["w-1"], written);
        // The written node takes no slice: the next node gets the second one.
        assert_eq!(m["s-1"].pod_cidr, "10.60.1.0/24");
    }
}
