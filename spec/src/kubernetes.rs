//! A node's part in the appliance's Kubernetes cluster (NodeConfig `spec.kubernetes`): its
//! role, addresses and networks, and the join credentials a worker needs. The credentials
//! travel only in the per-node config, never in the image.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::errors::ValidationErrors;

/// Where an image with the `kubernetes` feature carries kiln's multi-call `kube` binary (with
/// a link per component) and etcd, and the airgap bundle of OCI archives the node imports
/// into containerd before its kubelet starts: the contract between the build and the node.
pub const BIN_DIR: &str = "/usr/lib/kiln/kubernetes";
pub const IMAGES_DIR: &str = "/usr/share/kiln/images";
/// The pause image every pod sandbox runs (containerd's `sandbox_image`), built by kiln.
pub const PAUSE_IMAGE: &str = "kiln.local/pause:1";
/// The cluster DNS (kiln's CoreDNS build), run by the first control plane as a Deployment.
pub const COREDNS_IMAGE: &str = "kiln.local/coredns:1";
/// kiln's workload for checking a cluster: a web server (busybox httpd) answering
/// [`CHECK_PAGE`] on port 8080, with busybox's tools (wget, nslookup) to look around from a
/// pod. In the bundle of images whose packages include busybox-static.
pub const CHECK_IMAGE: &str = "kiln.local/hello:1";
pub const CHECK_PAGE: &str = "hello from kiln's airgap bundle\n";

/// Which part the node plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum KubeRole {
    /// The first control plane: creates the cluster's CA, etcd and the API server, and the
    /// bootstrap token workers join with. It also runs a kubelet and takes workloads.
    Init,
    /// A further control plane: joins the cluster's etcd as a member and runs its own API
    /// server, controller-manager and scheduler (leader-elected) and a kubelet. It joins like
    /// a worker (token, CA pinned by its hash) and needs what every control plane shares: the
    /// cluster CA, the etcd CA and the service-account key (`ca`, `etcdCa`,
    /// `serviceAccountKey`).
    ControlPlane,
    /// Joins an existing cluster with a bootstrap token, the CA pinned by its hash.
    Worker,
}

impl KubeRole {
    /// Whether the node runs etcd and the control plane components.
    pub fn is_control_plane(self) -> bool {
        matches!(self, KubeRole::Init | KubeRole::ControlPlane)
    }

    /// Whether the node joins an existing cluster (with a token and the CA's hash).
    pub fn joins(self) -> bool {
        matches!(self, KubeRole::ControlPlane | KubeRole::Worker)
    }
}

/// A private key as PEM text; never printed.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct SecretPem(pub String);

impl std::fmt::Debug for SecretPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("(secret)")
    }
}

/// A bootstrap token (`abcdef.0123456789abcdef`) and the SHA-256 of the cluster CA's public
/// key (`sha256:<hex>`), as kubeadm writes them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JoinCredentials {
    pub token: String,
    /// Required to join: the joining node trusts only an API server whose CA has this hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert_hash: Option<String>,
}

/// The cluster's CA as PEM text, made outside the node (by the fleet) so that joining nodes
/// know its hash before the first control plane is up.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterCa {
    pub cert: String,
    pub key: String,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa")
            .field("cert", &self.cert)
            .field("key", &"(secret)")
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubernetesNode {
    pub role: KubeRole,
    /// The address this node's components advertise and listen on.
    pub node_ip: String,
    /// `https://ADDRESS:6443`, the first control plane. Workers need it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_server: Option<String>,
    /// On `init`: the token the cluster accepts from joining nodes. On `worker`: the token
    /// and CA hash to join with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join: Option<JoinCredentials>,
    /// The cluster CA. On `init`, optional: without it the first control plane makes its
    /// own, and joining nodes learn its hash from `kiln node status`. Required on
    /// `control-plane`; never on a worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<ClusterCa>,
    /// The CA of the control planes' etcd (peers and the API servers). Like `ca`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd_ca: Option<ClusterCa>,
    /// The key that signs service-account tokens, PEM, shared by every API server. Like `ca`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_key: Option<SecretPem>,
    /// The whole pod network; every node's `podCidr` lies inside it.
    #[serde(default = "default_cluster_cidr")]
    pub cluster_cidr: String,
    #[serde(default = "default_service_cidr")]
    pub service_cidr: String,
    #[serde(default = "default_cluster_domain")]
    pub cluster_domain: String,
    /// This node's slice of `clusterCidr` for its pods.
    pub pod_cidr: String,
    #[serde(default = "default_max_pods")]
    pub max_pods: u32,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// `key=value:Effect` or `key:Effect`, as kubelet's `--register-with-taints`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub taints: Vec<String>,
    /// What the kubelet keeps from pods for the host's own daemons (Ceph, the agent, sshd):
    /// `{cpu: 500m, memory: 1Gi}`; `cpu`, `memory`, `ephemeral-storage` and `pid`, in
    /// Kubernetes quantities. The node's allocatable is its capacity less this, less
    /// `kubeReserved`, less the kubelet's eviction threshold.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub system_reserved: BTreeMap<String, String>,
    /// The same for the Kubernetes daemons (kubelet, containerd, the control plane).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub kube_reserved: BTreeMap<String, String>,
    /// For sites with a registry of their own: the mirrors (`http://` or `https://` URLs,
    /// tried in order) pulls from a registry go to, e.g.
    /// `images.example.org: [https://mirror.site.example:5000]`. The registry itself comes last.
    /// kiln's own images never need a pull: they are imported from the image's bundle.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub registry_mirrors: BTreeMap<String, Vec<String>>,
}

pub fn default_cluster_cidr() -> String {
    "10.42.0.0/16".into()
}

pub fn default_service_cidr() -> String {
    "10.43.0.0/16".into()
}

pub fn default_cluster_domain() -> String {
    "cluster.local".into()
}

pub fn default_max_pods() -> u32 {
    110
}

/// `abcdef.0123456789abcdef`: the token id (public, names its Secret) and the secret part.
pub fn is_bootstrap_token(t: &str) -> bool {
    let ok = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
    };
    matches!(t.split_once('.'), Some((id, secret)) if ok(id, 6) && ok(secret, 16))
}

/// The resources `systemReserved` and `kubeReserved` may name.
const RESERVABLE: [&str; 4] = ["cpu", "memory", "ephemeral-storage", "pid"];

/// A Kubernetes quantity as people write reservations: a decimal number with an optional
/// SI (`m`, `k`, `M`, `G`, `T`, `P`, `E`) or binary (`Ki` … `Ei`) suffix.
fn is_quantity(q: &str) -> bool {
    const SUFFIXES: [&str; 13] = [
        "Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "m", "k", "M", "G", "T", "P", "E",
    ];
    let number = SUFFIXES.iter().find_map(|s| q.strip_suffix(s)).unwrap_or(q);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, "0"));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    digits(whole) && digits(fraction)
}

/// `host` or `host:port`, the host a DNS name or IPv4 address in lower case (as image
/// references name registries).
fn is_registry_host(r: &str) -> bool {
    let (host, port) = match r.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (r, None),
    };
    port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0))
        && !host.is_empty()
        && host.split('.').all(crate::inventory::is_dns_label)
}

fn is_mirror_url(u: &str) -> bool {
    let rest = u
        .strip_prefix("https://")
        .or_else(|| u.strip_prefix("http://"));
    rest.is_some_and(|r| {
        let host = r.split('/').next().unwrap_or_default();
        !r.contains(char::is_whitespace) && !r.contains('"') && is_registry_host(host)
    })
}

fn is_ca_hash(h: &str) -> bool {
    h.strip_prefix("sha256:")
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Two networks overlap when either contains the other's first address.
pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Checks the cluster-wide networks: parseable, and pods and services apart.
pub fn check_cluster_networks(
    at: &str,
    cluster_cidr: &str,
    service_cidr: &str,
    errs: &mut ValidationErrors,
) -> Option<(IpNet, IpNet)> {
    let parse = |field: &str, v: &str, errs: &mut ValidationErrors| match v.parse::<IpNet>() {
        Ok(n) => Some(n),
        Err(_) => {
            errs.push(
                format!("{at}.{field}"),
                format!("{v:?} is not a network like 10.42.0.0/16"),
            );
            None
        }
    };
    let pods = parse("clusterCidr", cluster_cidr, errs);
    let services = parse("serviceCidr", service_cidr, errs);
    let (pods, services) = (pods?, services?);
    if overlaps(&pods, &services) {
        errs.push(
            format!("{at}.serviceCidr"),
            format!("{services} overlaps the pod network clusterCidr {pods}"),
        );
    }
    Some((pods, services))
}

impl KubernetesNode {
    /// Validates the section; `node_networks` are the node's own static addresses (with
    /// their field paths), which must not fall into the pod or service networks.
    pub fn validate_into(
        &self,
        at: &str,
        node_networks: &[(String, IpNet)],
        errs: &mut ValidationErrors,
    ) {
        let nets = check_cluster_networks(at, &self.cluster_cidr, &self.service_cidr, errs);
        if self.cluster_domain.is_empty()
            || !self
                .cluster_domain
                .split('.')
                .all(crate::inventory::is_dns_label)
        {
            errs.push(
                format!("{at}.clusterDomain"),
                format!("{:?} is not a domain name", self.cluster_domain),
            );
        }
        match self.pod_cidr.parse::<IpNet>() {
            Err(_) => errs.push(
                format!("{at}.podCidr"),
                format!("{:?} is not a network like 10.42.1.0/24", self.pod_cidr),
            ),
            Ok(slice) => {
                if let Some((pods, _)) = nets
                    && !pods.contains(&slice)
                {
                    errs.push(
                        format!("{at}.podCidr"),
                        format!("{slice} is not inside clusterCidr {pods}"),
                    );
                }
            }
        }
        match self.node_ip.parse::<IpAddr>() {
            Err(_) => errs.push(
                format!("{at}.nodeIp"),
                format!("{:?} is not an IP address", self.node_ip),
            ),
            Ok(ip) => {
                let own = [(format!("{at}.nodeIp"), IpNet::from(ip))];
                for (path, net) in own.iter().chain(node_networks) {
                    for (name, cluster_net) in nets
                        .iter()
                        .flat_map(|(p, s)| [("clusterCidr", p), ("serviceCidr", s)])
                    {
                        if overlaps(net, cluster_net) {
                            errs.push(
                                path.clone(),
                                format!("{net} overlaps the cluster's {name} {cluster_net}"),
                            );
                        }
                    }
                }
            }
        }
        if let Some(url) = &self.api_server
            && !url.starts_with("https://")
        {
            errs.push(
                format!("{at}.apiServer"),
                format!("{url:?} is not an https:// URL"),
            );
        }
        if let Some(j) = &self.join {
            if !is_bootstrap_token(&j.token) {
                errs.push(
                    format!("{at}.join.token"),
                    "not a bootstrap token: 6 and 16 lower-case letters or digits joined by '.'",
                );
            }
            if let Some(h) = &j.ca_cert_hash
                && !is_ca_hash(h)
            {
                errs.push(
                    format!("{at}.join.caCertHash"),
                    "not a CA hash: sha256: and 64 hexadecimal digits",
                );
            }
        }
        for (field, ca) in [("ca", &self.ca), ("etcdCa", &self.etcd_ca)] {
            if let Some(ca) = ca {
                crate::check::check_pem_pair(&format!("{at}.{field}"), &ca.cert, &ca.key, errs);
            }
        }
        if let Some(key) = &self.service_account_key
            && !(key.0.trim_start().starts_with("-----BEGIN ")
                && key.0.contains("PRIVATE KEY-----"))
        {
            errs.push(format!("{at}.serviceAccountKey"), "not a PEM private key");
        }
        let shared = [
            ("ca", self.ca.is_some()),
            ("etcdCa", self.etcd_ca.is_some()),
            ("serviceAccountKey", self.service_account_key.is_some()),
        ];
        for (field, given) in shared {
            match self.role {
                KubeRole::Worker if given => errs.push(
                    format!("{at}.{field}"),
                    "only control planes hold the cluster's keys; a worker pins the CA by join.caCertHash",
                ),
                KubeRole::ControlPlane if !given => errs.push(
                    format!("{at}.{field}"),
                    "a joining control plane needs what every control plane shares: ca, etcdCa and serviceAccountKey",
                ),
                _ => {}
            }
        }
        if self.role.joins() {
            if self.api_server.is_none() {
                errs.push(
                    format!("{at}.apiServer"),
                    "a joining node needs the API server of the first control plane",
                );
            }
            match &self.join {
                None => errs.push(
                    format!("{at}.join"),
                    "a joining node needs join credentials (token and caCertHash) from the first control plane",
                ),
                Some(j) if j.ca_cert_hash.is_none() => errs.push(
                    format!("{at}.join.caCertHash"),
                    "a joining node trusts the cluster only by its CA hash; it is missing",
                ),
                Some(_) => {}
            }
        }
        for (field, reserved) in [
            ("systemReserved", &self.system_reserved),
            ("kubeReserved", &self.kube_reserved),
        ] {
            for (resource, quantity) in reserved {
                let p = format!("{at}.{field}.{resource}");
                if !RESERVABLE.contains(&resource.as_str()) {
                    errs.push(
                        p,
                        format!(
                            "not a resource the kubelet reserves ({})",
                            RESERVABLE.join(", ")
                        ),
                    );
                } else if !is_quantity(quantity) {
                    errs.push(
                        p,
                        format!("{quantity:?} is not a quantity like 500m, 2, 512Mi or 1Gi"),
                    );
                }
            }
        }
        for (registry, mirrors) in &self.registry_mirrors {
            let p = format!("{at}.registryMirrors.{registry}");
            if !is_registry_host(registry) {
                errs.push(
                    p.clone(),
                    format!("{registry:?} is not a registry host like images.example.org or registry.example:5000"),
                );
            }
            if mirrors.is_empty() {
                errs.push(p.clone(), "names no mirror");
            }
            for (i, m) in mirrors.iter().enumerate() {
                if !is_mirror_url(m) {
                    errs.push(
                        format!("{p}[{i}]"),
                        format!("{m:?} is not an http:// or https:// URL of a registry"),
                    );
                }
            }
        }
        for (i, t) in self.taints.iter().enumerate() {
            let effect = t.rsplit_once(':').map(|(_, e)| e);
            if !matches!(
                effect,
                Some("NoSchedule" | "PreferNoSchedule" | "NoExecute")
            ) {
                errs.push(
                    format!("{at}.taints[{i}]"),
                    format!("{t:?} is not key[=value]:NoSchedule|PreferNoSchedule|NoExecute"),
                );
            }
        }
    }
}
