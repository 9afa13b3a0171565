//! Bringing up a node of the appliance's own Kubernetes cluster from its node config
//! (`spec.kubernetes`): what kubeadm does, in kiln, for the binaries kiln ships.
//!
//! - [`plan`] (pure): the files (component configs, containerd, CNI) and the services, in
//!   start order, for the node's role; golden-tested.
//! - [`pki`](crate::pki): the CA and certificates, made on the first control plane.
//! - [`join`]: a worker finds the cluster's CA by its pinned hash and checks its bootstrap
//!   token before anything starts.
//! - [`bringup`]: writes it all, starts the services through a [`bringup::Supervisor`],
//!   imports the airgap images before the kubelet, and waits for each step.
//! - [`routes`]: the node announces its pod network; every node routes the others'.
//! - [`dns`]: the cluster DNS the first control plane runs (golden-tested).

pub mod bringup;
pub mod dns;
pub mod etcd;
mod images;
pub mod join;
pub mod routes;
pub mod systemd;

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use kiln_spec::kubernetes::{BIN_DIR, IMAGES_DIR, KubeRole, KubernetesNode};
use kiln_spec::layout::STATE_MOUNT;

/// Where things live on a node, relative to its root.
pub mod paths {
    pub const PKI: &str = "etc/kubernetes/pki";
    pub const ADMIN_KUBECONFIG: &str = "etc/kubernetes/admin.conf";
    pub const CONTROLLER_MANAGER_KUBECONFIG: &str = "etc/kubernetes/controller-manager.conf";
    pub const SCHEDULER_KUBECONFIG: &str = "etc/kubernetes/scheduler.conf";
    /// The kubelet's own credentials: written by kiln on the first control plane, by the
    /// kubelet itself after its bootstrap on a worker.
    pub const KUBELET_KUBECONFIG: &str = "etc/kubernetes/kubelet.conf";
    pub const BOOTSTRAP_KUBECONFIG: &str = "etc/kubernetes/bootstrap-kubelet.conf";
    pub const KUBELET_CONFIG: &str = "etc/kubernetes/kubelet-config.yaml";
    pub const KUBE_PROXY_CONFIG: &str = "etc/kubernetes/kube-proxy-config.yaml";
    pub const CONTAINERD_CONFIG: &str = "etc/containerd/kiln.toml";
    pub const CONTAINERD_SOCKET: &str = "run/containerd/containerd.sock";
    /// One `<registry>/hosts.toml` per registry with mirrors; kiln owns the directory.
    pub const CONTAINERD_HOSTS: &str = "etc/containerd/certs.d";
    pub const CNI_CONFIG: &str = "etc/cni/net.d/10-kiln.conflist";
    pub const ETCD_DATA: &str = "var/lib/etcd";
    pub const KUBELET_ROOT: &str = "var/lib/kubelet";
    pub const LOGS: &str = "var/log/kiln";
}

pub use kiln_spec::kubernetes::PAUSE_IMAGE;
pub const API_SERVER_PORT: u16 = 6443;
pub const ETCD_CLIENT_PORT: u16 = 2379;
pub const ETCD_PEER_PORT: u16 = 2380;
/// The group a bootstrap token authenticates as, besides `system:bootstrappers`.
pub const BOOTSTRAP_GROUP: &str = "system:bootstrappers:kiln:default-node-token";

/// The binaries and host facts a node runs with. [`Host::appliance`] is the installed
/// appliance; tests run several nodes on one machine, each with its own root.
#[derive(Debug, Clone)]
pub struct Host {
    /// Every node path is below this (`/` on the appliance).
    pub root: PathBuf,
    pub node_name: String,
    /// The directory holding the multi-call `kube` binary's component links.
    pub kube_bin: PathBuf,
    pub etcd: PathBuf,
    pub containerd: PathBuf,
    pub ctr: PathBuf,
    pub cni_bin: PathBuf,
    /// The airgap bundle: OCI archives imported before the kubelet starts.
    pub images: PathBuf,
    /// containerd's root: its overlay snapshots need a real file system below them, which
    /// the appliance's overlay root is not.
    pub containerd_root: PathBuf,
    /// The kubelet's `cgroupRoot` (its pods' parent cgroup); `/` on the appliance. Nodes
    /// sharing one machine need their own.
    pub cgroup_root: String,
    /// containerd's `restrict_oom_score_adj`: for a host whose root may not lower OOM scores
    /// (no CAP_SYS_RESOURCE, as in some containers).
    pub restrict_oom_score_adj: bool,
    /// The node's disk is a machine's shared with much else (a test host): its kubelet
    /// evicts pods only when less than 1Gi is left, not at the default 10% and 15% of a disk
    /// the node does not own.
    pub shared_disk: bool,
}

impl Host {
    /// The installed appliance: binaries where the image puts them.
    pub fn appliance(node_name: &str) -> Host {
        Host {
            root: PathBuf::from("/"),
            node_name: node_name.to_string(),
            kube_bin: PathBuf::from(BIN_DIR),
            etcd: Path::new(BIN_DIR).join("etcd"),
            containerd: PathBuf::from("/usr/bin/containerd"),
            ctr: PathBuf::from("/usr/bin/ctr"),
            cni_bin: PathBuf::from("/usr/lib/cni"),
            images: PathBuf::from(IMAGES_DIR),
            containerd_root: Path::new(STATE_MOUNT).join("containerd"),
            cgroup_root: "/".into(),
            restrict_oom_score_adj: false,
            shared_disk: false,
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn at(&self, rel: &str) -> String {
        self.path(rel).display().to_string()
    }

    fn bin(&self, component: &str) -> String {
        self.kube_bin.join(component).display().to_string()
    }
}

/// A file to write, relative to the node's root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFile {
    pub path: String,
    pub content: String,
    pub mode: u32,
}

/// A long-running daemon: a systemd unit on the appliance, a supervised process elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub argv: Vec<String>,
}

/// What bringing up a node writes and starts, in start order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePlan {
    pub files: Vec<NodeFile>,
    /// The control plane (first control plane only), then containerd, kubelet, kube-proxy.
    pub control_plane: Vec<Service>,
    pub containerd: Service,
    pub kubelet: Service,
    pub kube_proxy: Service,
}

/// Where containerd reads the hosts of `registry`.
pub fn registry_hosts_file(registry: &str) -> String {
    format!("{}/{registry}/hosts.toml", paths::CONTAINERD_HOSTS)
}

/// containerd's `hosts.toml` for `registry`: pulls try each mirror in order, then the
/// registry itself. Names and URLs are validated (no quotes or spaces).
fn registry_hosts(registry: &str, mirrors: &[String]) -> String {
    let mut t = format!("# Pulls from {registry} try these mirrors in order, then {registry}.\n");
    for m in mirrors {
        t.push_str(&format!(
            "\n[host.\"{m}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ));
    }
    t
}

/// The `n`th address of a network (`.1` is the API service, `.10` cluster DNS).
pub fn nth_address(net: &IpNet, n: u32) -> Option<IpAddr> {
    match net {
        IpNet::V4(v4) => {
            let base = u32::from(v4.network());
            let ip = base.checked_add(n)?;
            v4.contains(&std::net::Ipv4Addr::from(ip))
                .then_some(IpAddr::V4(ip.into()))
        }
        IpNet::V6(v6) => {
            let base = u128::from(v6.network());
            let ip = base.checked_add(u128::from(n))?;
            v6.contains(&std::net::Ipv6Addr::from(ip))
                .then_some(IpAddr::V6(ip.into()))
        }
    }
}

/// The API server's URL as this node reaches it.
pub fn api_server_url(node: &KubernetesNode) -> String {
    node.api_server
        .clone()
        .unwrap_or_else(|| format!("https://{}:{API_SERVER_PORT}", bracket(&node.node_ip)))
}

/// This node's own API server: what a control plane's components and kubelet use.
pub fn local_api_server(node: &KubernetesNode) -> String {
    format!("https://{}:{API_SERVER_PORT}", bracket(&node.node_ip))
}

/// The etcd peer URL of a control plane at `ip`.
pub fn etcd_peer_url(ip: &str) -> String {
    format!("https://{}:{ETCD_PEER_PORT}", bracket(ip))
}

fn bracket(ip: &str) -> String {
    if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_string()
    }
}

/// The names and addresses the API server's certificate carries.
pub fn api_server_sans(node: &KubernetesNode) -> Vec<String> {
    let mut sans = vec![
        node.node_ip.clone(),
        "127.0.0.1".into(),
        "localhost".into(),
        "kubernetes".into(),
        "kubernetes.default".into(),
        "kubernetes.default.svc".into(),
        format!("kubernetes.default.svc.{}", node.cluster_domain),
    ];
    if let Some(ip) = service_net(node).and_then(|n| nth_address(&n, 1)) {
        sans.push(ip.to_string());
    }
    sans
}

fn service_net(node: &KubernetesNode) -> Option<IpNet> {
    node.service_cidr.parse().ok()
}

/// The cluster DNS Service's address, which every kubelet gives its pods: the 10th of the
/// service network, as kubeadm's.
fn cluster_dns(services: &IpNet) -> Option<IpAddr> {
    nth_address(services, 10)
}

/// The files and services of `node` on `host`. The node config is validated; addresses in
/// it parse.
pub fn plan(node: &KubernetesNode, host: &Host) -> NodePlan {
    let dns = service_net(node)
        .and_then(|n| cluster_dns(&n))
        .map(|ip| ip.to_string())
        .unwrap_or_default();
    let labels: Vec<String> = node
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let kubelet_config = format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: {ca}
authorization:
  mode: Webhook
address: {ip}
readOnlyPort: 0
clusterDomain: {domain}
clusterDNS:
- {dns}
containerRuntimeEndpoint: unix://{sock}
cgroupDriver: cgroupfs
cgroupRoot: {cgroup_root}
failCgroupV1: false
maxPods: {max_pods}
podCIDR: {pod_cidr}
rotateCertificates: true
registerWithTaints: [{taints}]
staticPodPath: ""
{reserved}{eviction}"#,
        ca = host.at(&format!("{}/ca.crt", paths::PKI)),
        ip = node.node_ip,
        domain = node.cluster_domain,
        sock = host.at(paths::CONTAINERD_SOCKET),
        cgroup_root = host.cgroup_root,
        max_pods = node.max_pods,
        pod_cidr = node.pod_cidr,
        taints = node
            .taints
            .iter()
            .map(|t| taint_json(t))
            .collect::<Vec<_>>()
            .join(", "),
        reserved = [
            ("systemReserved", &node.system_reserved),
            ("kubeReserved", &node.kube_reserved),
        ]
        .iter()
        .filter(|(_, r)| !r.is_empty())
        .map(|(field, r)| {
            let lines: String = r.iter().map(|(k, v)| format!("  {k}: \"{v}\"\n")).collect();
            format!("{field}:\n{lines}")
        })
        .collect::<String>(),
        // Every signal: those left out of an evictionHard are not enforced.
        eviction = if host.shared_disk {
            "evictionHard:\n  memory.available: 100Mi\n  nodefs.available: 1Gi\n  \
             imagefs.available: 1Gi\n  nodefs.inodesFree: 5%\n"
        } else {
            ""
        },
    );
    let kube_proxy_config = format!(
        r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: {kubeconfig}
mode: iptables
clusterCIDR: {cluster_cidr}
hostnameOverride: {name}
bindAddress: {ip}
metricsBindAddress: 127.0.0.1:10249
# Conntrack limits are the host's (the agent's sysctls), not kube-proxy's to change.
conntrack:
  maxPerCore: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
"#,
        kubeconfig = host.at(paths::KUBELET_KUBECONFIG),
        cluster_cidr = node.cluster_cidr,
        name = host.node_name,
        ip = node.node_ip,
    );
    let containerd_config = format!(
        r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]

[grpc]
  address = "{sock}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  restrict_oom_score_adj = {restrict}

[plugins."io.containerd.grpc.v1.cri".containerd]
  default_runtime_name = "runc"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "{cni_bin}"
  conf_dir = "{cni_conf}"

[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "{hosts}"
"#,
        root = host.containerd_root.display(),
        state = host.at("run/containerd"),
        sock = host.at(paths::CONTAINERD_SOCKET),
        opt = host.at("opt/containerd"),
        pause = PAUSE_IMAGE,
        restrict = host.restrict_oom_score_adj,
        cni_bin = host.cni_bin.display(),
        cni_conf = host.at("etc/cni/net.d"),
        hosts = host.at(paths::CONTAINERD_HOSTS),
    );
    let cni = serde_json::to_string_pretty(&serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "kiln",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "kiln0",
                "isGateway": true,
                "ipMasq": true,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": node.pod_cidr}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": host.at("var/lib/cni/networks"),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": true}},
        ],
    }))
    .expect("JSON of plain values");

    let mut files: Vec<NodeFile> = [
        (paths::KUBELET_CONFIG, kubelet_config),
        (paths::KUBE_PROXY_CONFIG, kube_proxy_config),
        (paths::CONTAINERD_CONFIG, containerd_config),
        (paths::CNI_CONFIG, cni + "\n"),
    ]
    .into_iter()
    .map(|(path, content)| NodeFile {
        path: path.into(),
        content,
        mode: 0o644,
    })
    .chain(
        node.registry_mirrors
            .iter()
            .map(|(registry, mirrors)| NodeFile {
                path: registry_hosts_file(registry),
                content: registry_hosts(registry, mirrors),
                mode: 0o644,
            }),
    )
    .collect();
    files.sort_by(|a, b| a.path.cmp(&b.path));

    let pki = |f: &str| host.at(&format!("{}/{f}", paths::PKI));
    // Controller-manager and scheduler: one kubeconfig for the API and for checking their
    // own callers, serving on loopback only; one of each leads among the control planes.
    // Leases 4x the upstream default: a leader on a loaded or emulated node that misses the
    // 10 s renew deadline exits, and while it does no CSR is signed and no worker joins.
    let local_component = |component: &str, kubeconfig: &str| {
        let kubeconfig = host.at(kubeconfig);
        vec![
            host.bin(component),
            format!("--kubeconfig={kubeconfig}"),
            format!("--authentication-kubeconfig={kubeconfig}"),
            format!("--authorization-kubeconfig={kubeconfig}"),
            "--bind-address=127.0.0.1".into(),
            "--leader-elect=true".into(),
            "--leader-elect-lease-duration=60s".into(),
            "--leader-elect-renew-deadline=40s".into(),
            "--leader-elect-retry-period=5s".into(),
        ]
    };
    let ip = bracket(&node.node_ip);
    let mut etcd_argv = vec![
        host.etcd.display().to_string(),
        format!("--name={}", host.node_name),
        format!("--data-dir={}", host.at(paths::ETCD_DATA)),
        // Clients (this node's API server, joining control planes) and peers with
        // certificates of the etcd CA only.
        format!(
            "--listen-client-urls=https://127.0.0.1:{ETCD_CLIENT_PORT},https://{ip}:{ETCD_CLIENT_PORT}"
        ),
        format!("--advertise-client-urls=https://{ip}:{ETCD_CLIENT_PORT}"),
        format!("--listen-peer-urls={}", etcd_peer_url(&node.node_ip)),
        format!(
            "--initial-advertise-peer-urls={}",
            etcd_peer_url(&node.node_ip)
        ),
        "--listen-metrics-urls=http://127.0.0.1:2381".into(),
        format!("--cert-file={}", pki("etcd/server.crt")),
        format!("--key-file={}", pki("etcd/server.key")),
        "--client-cert-auth=true".into(),
        format!("--trusted-ca-file={}", pki("etcd/ca.crt")),
        format!("--peer-cert-file={}", pki("etcd/peer.crt")),
        format!("--peer-key-file={}", pki("etcd/peer.key")),
        "--peer-client-cert-auth=true".into(),
        format!("--peer-trusted-ca-file={}", pki("etcd/ca.crt")),
    ];
    match node.role {
        KubeRole::Init => etcd_argv.push(format!(
            "--initial-cluster={}={}",
            host.node_name,
            etcd_peer_url(&node.node_ip)
        )),
        // The bring-up adds --initial-cluster once the cluster has taken this member in.
        KubeRole::ControlPlane => etcd_argv.push("--initial-cluster-state=existing".into()),
        KubeRole::Worker => {}
    }
    let control_plane = match node.role {
        KubeRole::Worker => Vec::new(),
        KubeRole::Init | KubeRole::ControlPlane => vec![
            Service {
                name: "etcd".into(),
                argv: etcd_argv,
            },
            Service {
                name: "kube-apiserver".into(),
                argv: vec![
                    host.bin("kube-apiserver"),
                    format!("--etcd-servers=https://127.0.0.1:{ETCD_CLIENT_PORT}"),
                    format!("--etcd-cafile={}", pki("etcd/ca.crt")),
                    format!("--etcd-certfile={}", pki("apiserver-etcd-client.crt")),
                    format!("--etcd-keyfile={}", pki("apiserver-etcd-client.key")),
                    format!("--advertise-address={}", node.node_ip),
                    format!("--secure-port={API_SERVER_PORT}"),
                    format!("--tls-cert-file={}", pki("apiserver.crt")),
                    format!("--tls-private-key-file={}", pki("apiserver.key")),
                    format!("--client-ca-file={}", pki("ca.crt")),
                    format!(
                        "--kubelet-client-certificate={}",
                        pki("apiserver-kubelet-client.crt")
                    ),
                    format!(
                        "--kubelet-client-key={}",
                        pki("apiserver-kubelet-client.key")
                    ),
                    "--kubelet-preferred-address-types=InternalIP,Hostname".into(),
                    format!(
                        "--service-account-issuer=https://kubernetes.default.svc.{}",
                        node.cluster_domain
                    ),
                    format!("--service-account-key-file={}", pki("sa.pub")),
                    format!("--service-account-signing-key-file={}", pki("sa.key")),
                    format!("--service-cluster-ip-range={}", node.service_cidr),
                    "--authorization-mode=Node,RBAC".into(),
                    "--enable-admission-plugins=NodeRestriction".into(),
                    "--enable-bootstrap-token-auth=true".into(),
                    "--allow-privileged=true".into(),
                    format!("--cert-dir={}", host.at("var/lib/kube-apiserver")),
                ],
            },
            Service {
                name: "kube-controller-manager".into(),
                argv: [
                    local_component(
                        "kube-controller-manager",
                        paths::CONTROLLER_MANAGER_KUBECONFIG,
                    ),
                    vec![
                        format!("--cluster-signing-cert-file={}", pki("ca.crt")),
                        format!("--cluster-signing-key-file={}", pki("ca.key")),
                        format!("--root-ca-file={}", pki("ca.crt")),
                        format!("--service-account-private-key-file={}", pki("sa.key")),
                        "--use-service-account-credentials=true".into(),
                        format!("--cluster-cidr={}", node.cluster_cidr),
                        format!("--service-cluster-ip-range={}", node.service_cidr),
                        // Pod networks per node come from the node configs (the CNI config
                        // carries each node's slice); bootstrap tokens need their two
                        // controllers, off by default.
                        "--controllers=*,bootstrapsigner,tokencleaner,-nodeipam".into(),
                    ],
                ]
                .concat(),
            },
            Service {
                name: "kube-scheduler".into(),
                argv: local_component("kube-scheduler", paths::SCHEDULER_KUBECONFIG),
            },
        ],
    };
    let containerd = Service {
        name: "containerd".into(),
        argv: vec![
            host.containerd.display().to_string(),
            format!("--config={}", host.at(paths::CONTAINERD_CONFIG)),
        ],
    };
    let mut kubelet_argv = vec![
        host.bin("kubelet"),
        format!("--config={}", host.at(paths::KUBELET_CONFIG)),
        format!("--kubeconfig={}", host.at(paths::KUBELET_KUBECONFIG)),
        format!("--root-dir={}", host.at(paths::KUBELET_ROOT)),
        format!(
            "--cert-dir={}",
            host.at(&format!("{}/pki", paths::KUBELET_ROOT))
        ),
        format!("--hostname-override={}", host.node_name),
        format!("--node-ip={}", node.node_ip),
    ];
    if node.role == KubeRole::Worker {
        kubelet_argv.push(format!(
            "--bootstrap-kubeconfig={}",
            host.at(paths::BOOTSTRAP_KUBECONFIG)
        ));
    }
    if !labels.is_empty() {
        kubelet_argv.push(format!("--node-labels={}", labels.join(",")));
    }
    NodePlan {
        files,
        control_plane,
        containerd,
        kubelet: Service {
            name: "kubelet".into(),
            argv: kubelet_argv,
        },
        kube_proxy: Service {
            name: "kube-proxy".into(),
            argv: vec![
                host.bin("kube-proxy"),
                format!("--config={}", host.at(paths::KUBE_PROXY_CONFIG)),
            ],
        },
    }
}

/// `key=value:Effect` as the kubelet config's JSON taint.
fn taint_json(t: &str) -> String {
    let (kv, effect) = t.rsplit_once(':').unwrap_or((t, "NoSchedule"));
    let (key, value) = kv.split_once('=').unwrap_or((kv, ""));
    serde_json::json!({"key": key, "value": value, "effect": effect}).to_string()
}

/// The plan as text, for the golden test and `--dry-run`.
pub fn describe(plan: &NodePlan) -> String {
    let mut out = String::new();
    for f in &plan.files {
        out.push_str(&format!("--- {} ({:o})\n{}", f.path, f.mode, f.content));
    }
    for s in plan
        .control_plane
        .iter()
        .chain([&plan.containerd, &plan.kubelet, &plan.kube_proxy])
    {
        out.push_str(&format!(
            "--- service {}\n{}\n",
            s.name,
            s.argv.join(" \\\n  ")
        ));
    }
    out
}

/// Creates `rel` under `root` with its parents.
pub(crate) fn write_file(root: &Path, rel: &str, content: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = root.join(rel);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = path.with_extension("kiln-tmp");
    std::fs::write(&tmp, content)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, &path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_addresses() {
        let n = KubernetesNode {
            role: KubeRole::Init,
            node_ip: "10.99.0.1".into(),
            api_server: None,
            join: None,
            ca: None,
            etcd_ca: None,
            service_account_key: None,
            cluster_cidr: "10.42.0.0/16".into(),
            service_cidr: "10.43.0.0/16".into(),
            cluster_domain: "cluster.local".into(),
            pod_cidr: "10.42.0.0/24".into(),
            max_pods: 110,
            labels: Default::default(),
            taints: vec![],
            system_reserved: Default::default(),
            kube_reserved: Default::default(),
            registry_mirrors: Default::default(),
        };
        assert!(api_server_sans(&n).contains(&"10.43.0.1".to_string()));
        assert_eq!(api_server_url(&n), "https://10.99.0.1:6443");
        let small: IpNet = "10.0.0.0/30".parse().unwrap();
        assert_eq!(nth_address(&small, 10), None);
    }
}
