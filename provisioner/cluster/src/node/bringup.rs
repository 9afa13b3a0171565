//! Brings a node up: credentials, files, services in order, airgap images before the
//! kubelet, a wait on each step that fails early with the failing service's log.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kiln_spec::kubernetes::{ClusterCa, KubeRole, KubernetesNode, SecretPem};
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::discovery::ApiResource;
use serde_json::{Value, json};

use super::{
    BOOTSTRAP_GROUP, Host, NodePlan, Service, api_server_sans, api_server_url, local_api_server,
    paths, plan, write_file,
};
use crate::pki::{self, Ca, CertPair, Credential, Leaf, PkiError, Usage};

#[derive(Debug, thiserror::Error)]
pub enum BringupError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Join(#[from] super::join::JoinError),
    #[error("starting {service}: {reason}")]
    Start { service: String, reason: String },
    #[error("{service} exited ({status}); the end of its log:\n{log}")]
    Exited {
        service: String,
        status: String,
        log: String,
    },
    #[error("{what} not done after {}s; the end of {service}'s log:\n{log}", .after.as_secs())]
    Timeout {
        what: String,
        after: Duration,
        service: String,
        log: String,
    },
    #[error("importing {archive}: {reason}")]
    Import { archive: String, reason: String },
    #[error(transparent)]
    Cluster(#[from] crate::Error),
    #[error("{0}")]
    Announce(String),
    #[error("no interface has the node address {address} after {}s (spec.kubernetes.nodeIp and the node's network config must agree)", .after.as_secs())]
    NoAddress { address: String, after: Duration },
    #[error("this node already runs a cluster with another key ({}); the config's is not used. To make a new cluster, remove the node's Kubernetes state first", .path.display())]
    OtherCa { path: PathBuf },
    #[error("a joining control plane needs the cluster's {what} in its config")]
    MissingSecret { what: String },
    #[error(
        "the config's ca is not the CA of the cluster at {server} (its pin names another): refusing to join with it"
    )]
    NotTheClustersCa { server: String },
    #[error("asking the etcd member at {endpoint} to add this node: {reason}")]
    EtcdMember { endpoint: String, reason: String },
    #[error(
        "etcd already has a started member at {peer} but this node has no etcd data: remove that member (etcdctl member remove) before this node joins again"
    )]
    StaleEtcdMember { peer: String },
}

pub(super) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BringupError {
    let what = what.into();
    move |source| BringupError::Io { what, source }
}

/// Runs the node's long-running services.
pub trait Supervisor: Send {
    fn start(&mut self, service: &Service) -> Result<(), BringupError>;
    /// An error naming the first service that has stopped, with its log; of `only` that
    /// one, when given (a step waiting on one service need not fail for another).
    fn check(&mut self, only: Option<&str>) -> Result<(), BringupError>;
    /// The end of a service's log.
    fn log_tail(&self, service: &str) -> String;
}

/// Services as child processes, each logging to `<log dir>/<name>.log`: for hosts without
/// systemd. `prefix` runs each under a wrapper (the tests' `nsenter` into a node's
/// namespaces). The processes stop when this drops.
#[derive(Debug)]
pub struct Processes {
    log_dir: PathBuf,
    prefix: Vec<String>,
    children: Vec<Running>,
}

#[derive(Debug)]
struct Running {
    name: String,
    argv: Vec<String>,
    child: Child,
}

impl Running {
    fn stop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Processes {
    pub fn new(log_dir: PathBuf, prefix: Vec<String>) -> Processes {
        Processes {
            log_dir,
            prefix,
            children: Vec::new(),
        }
    }

    fn log_path(&self, service: &str) -> PathBuf {
        self.log_dir.join(format!("{service}.log"))
    }
}

impl Supervisor for Processes {
    /// Starts the service; one already running with the same command line is left alone,
    /// one with another (or one that stopped) is replaced.
    fn start(&mut self, service: &Service) -> Result<(), BringupError> {
        if let Some(i) = self.children.iter().position(|r| r.name == service.name) {
            let r = &mut self.children[i];
            if r.argv == service.argv && matches!(r.child.try_wait(), Ok(None)) {
                return Ok(());
            }
            r.stop();
            self.children.remove(i);
        }
        std::fs::create_dir_all(&self.log_dir)
            .map_err(io(format!("creating {}", self.log_dir.display())))?;
        let log_path = self.log_path(&service.name);
        let log = std::fs::File::create(&log_path)
            .map_err(io(format!("creating {}", log_path.display())))?;
        let err_log = log.try_clone().map_err(io("duplicating a log file"))?;
        let argv: Vec<&String> = self.prefix.iter().chain(&service.argv).collect();
        let child = Command::new(argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err_log)
            .spawn()
            .map_err(|e| BringupError::Start {
                service: service.name.to_string(),
                reason: format!("{}: {e}", argv[0]),
            })?;
        self.children.push(Running {
            name: service.name.to_string(),
            argv: service.argv.clone(),
            child,
        });
        Ok(())
    }

    fn check(&mut self, only: Option<&str>) -> Result<(), BringupError> {
        for r in &mut self.children {
            if only.is_some_and(|name| name != r.name) {
                continue;
            }
            if let Ok(Some(status)) = r.child.try_wait() {
                return Err(BringupError::Exited {
                    service: r.name.clone(),
                    status: status.to_string(),
                    log: tail(&self.log_dir.join(format!("{}.log", r.name))),
                });
            }
        }
        Ok(())
    }

    fn log_tail(&self, service: &str) -> String {
        tail(&self.log_path(service))
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        // Last started first: kube-proxy and the kubelet before containerd and the API server.
        for r in self.children.iter_mut().rev() {
            r.stop();
        }
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// What a finished bring-up tells its caller.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// `sha256:…` of the cluster CA: what workers pin.
    pub ca_cert_hash: String,
    /// The admin kubeconfig (first control plane only).
    pub admin_kubeconfig: Option<PathBuf>,
}

/// How long one step may take before the bring-up gives up on it. Generous: a node under
/// software emulation is slow, and each wait ends as soon as its condition holds.
const STEP_TIMEOUT: Duration = Duration::from_secs(300);

/// Brings `node` up on `host`. `progress` hears each step as it starts.
pub async fn bring_up(
    node: &KubernetesNode,
    host: &Host,
    supervisor: &mut dyn Supervisor,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<Outcome, BringupError> {
    let root = &host.root;
    let server = api_server_url(node);
    // The components bind to and advertise the node address: wait for the network config
    // (applied by the agent alongside) to put it on an interface.
    if !has_local_address(&node.node_ip) {
        progress(&format!("waiting for the node address {}", node.node_ip));
        let start = Instant::now();
        while !has_local_address(&node.node_ip) {
            if start.elapsed() > STEP_TIMEOUT {
                return Err(BringupError::NoAddress {
                    address: node.node_ip.clone(),
                    after: STEP_TIMEOUT,
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    // A joining node trusts the cluster only through the CA its pin names, and proves its
    // token, before it writes anything.
    let discovered = match (&node.join, node.role.joins()) {
        (Some(join), true) => {
            let hash = join
                .ca_cert_hash
                .as_deref()
                .expect("validated: a joining node has a CA hash");
            progress("discovering the cluster CA and checking the bootstrap token");
            Some(super::join::discover(&server, hash, &join.token).await?)
        }
        _ => None,
    };
    let (ca_pem, etcd_ca) = match node.role {
        KubeRole::Worker => {
            let ca_pem = discovered.expect("validated: a worker has join credentials");
            let token = &node.join.as_ref().expect("validated").token;
            write(root, &format!("{}/ca.crt", paths::PKI), &ca_pem, 0o644)?;
            let bootstrap = pki::kubeconfig(
                &server,
                &ca_pem,
                "kubelet-bootstrap",
                Credential::Token(token),
            );
            write(root, paths::BOOTSTRAP_KUBECONFIG, &bootstrap, 0o600)?;
            (ca_pem, None)
        }
        KubeRole::Init | KubeRole::ControlPlane => {
            if let (Some(found), Some(given)) = (&discovered, &node.ca)
                && found.trim() != given.cert.trim()
            {
                return Err(BringupError::NotTheClustersCa { server });
            }
            progress("creating the control plane's certificates");
            let (ca, etcd_ca) = control_plane_credentials(node, host)?;
            (ca.pair.cert_pem, Some(etcd_ca))
        }
    };
    let plan: NodePlan = plan(node, host);
    forget_registries(root, &plan)?;
    for f in &plan.files {
        write(root, &f.path, &f.content, f.mode)?;
    }

    let admin = host.path(paths::ADMIN_KUBECONFIG);
    if let Some(etcd_ca) = etcd_ca {
        let mut etcd = plan.control_plane[0].clone();
        if node.role == KubeRole::ControlPlane {
            progress("joining the cluster's etcd");
            let cluster = super::etcd::join(node, host, &etcd_ca).await?;
            etcd.argv.push(format!("--initial-cluster={cluster}"));
        }
        for s in [&etcd, &plan.control_plane[1]] {
            progress(&format!("starting {}", s.name));
            supervisor.start(s)?;
        }
        progress("waiting for the API server");
        let client = wait_for(
            supervisor,
            "kube-apiserver",
            "the API server becoming ready",
            || {
                let admin = admin.clone();
                async move {
                    let client = crate::kube_client::from_kubeconfig(&admin).await.ok()?;
                    let req = http::Request::get("/readyz").body(Vec::new()).ok()?;
                    let body = client.request_text(req).await.ok()?;
                    (body.trim() == "ok").then_some(client)
                }
            },
        )
        .await?;
        if node.role == KubeRole::Init {
            progress("applying the bootstrap token, its RBAC and cluster-info");
            apply_objects(&client, bootstrap_objects(node, &server, &ca_pem)).await?;
            progress("applying the cluster DNS");
            // systemd-resolved's list of the real upstreams first: /etc/resolv.conf may name
            // only its stub on loopback.
            let upstream = ["run/systemd/resolve/resolv.conf", "etc/resolv.conf"]
                .iter()
                .map(|f| std::fs::read_to_string(host.path(f)).unwrap_or_default())
                .map(|text| super::dns::upstream_nameservers(&text))
                .find(|found| !found.is_empty())
                .unwrap_or_default();
            apply_objects(&client, super::dns::dns_objects(node, &upstream)).await?;
        }
        for s in &plan.control_plane[2..] {
            progress(&format!("starting {}", s.name));
            supervisor.start(s)?;
        }
    }

    progress("starting containerd");
    supervisor.start(&plan.containerd)?;
    let socket = host.path(paths::CONTAINERD_SOCKET);
    let ctr = |args: &[&str]| {
        Command::new(&host.ctr)
            .arg("--address")
            .arg(&socket)
            .arg("--namespace=k8s.io")
            .args(args)
            .output()
    };
    wait_for(supervisor, "containerd", "containerd answering", || {
        let ok = ctr(&["version"]).is_ok_and(|o| o.status.success());
        async move { ok.then_some(()) }
    })
    .await?;
    super::images::import_bundle(&host.images, &ctr, progress)?;

    progress("starting the kubelet");
    supervisor.start(&plan.kubelet)?;
    let kubelet_conf = host.path(paths::KUBELET_KUBECONFIG);
    wait_for(
        supervisor,
        "kubelet",
        "the kubelet getting its credentials",
        || {
            let ok = kubelet_conf.exists();
            async move { ok.then_some(()) }
        },
    )
    .await?;
    progress("waiting for the node to register");
    let node_path = format!("/api/v1/nodes/{}", host.node_name);
    wait_for(supervisor, "kubelet", "the node registering", || {
        let (conf, path) = (kubelet_conf.clone(), node_path.clone());
        async move {
            // The Node authorizer lets a kubelet read its own Node.
            let client = crate::kube_client::from_kubeconfig(&conf).await.ok()?;
            let req = http::Request::get(path).body(Vec::new()).ok()?;
            client.request_text(req).await.ok().map(|_| ())
        }
    })
    .await?;
    // Only now: a kube-proxy that starts before its Node exists exits as soon as the Node
    // appears ("NodeIPs changed"), which failed a joining worker's bring-up whenever its
    // registration was slow.
    progress("starting kube-proxy");
    supervisor.start(&plan.kube_proxy)?;
    progress("announcing the node's pod network");
    super::routes::announce(host, &node.pod_cidr)
        .await
        .map_err(BringupError::Announce)?;
    Ok(Outcome {
        ca_cert_hash: pki::ca_cert_hash(&ca_pem)?,
        admin_kubeconfig: node.role.is_control_plane().then_some(admin),
    })
}

fn write(root: &Path, rel: &str, content: &str, mode: u32) -> Result<(), BringupError> {
    write_file(root, rel, content.as_bytes(), mode)
        .map_err(io(format!("writing {}", root.join(rel).display())))
}

/// Removes the hosts of registries the node config no longer names: containerd reads them at
/// each pull, so a mirror dropped from the config must not stay in use.
fn forget_registries(root: &Path, plan: &NodePlan) -> Result<(), BringupError> {
    let dir = root.join(paths::CONTAINERD_HOSTS);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(format!("reading {}", dir.display()))(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io(format!("reading {}", dir.display())))?;
        let registry = entry.file_name().to_string_lossy().into_owned();
        let hosts = crate::node::registry_hosts_file(&registry);
        if !plan.files.iter().any(|f| f.path == hosts) {
            std::fs::remove_dir_all(entry.path())
                .map_err(io(format!("removing {}", entry.path().display())))?;
        }
    }
    Ok(())
}

/// Whether an interface of this network namespace has `address`.
fn has_local_address(address: &str) -> bool {
    let Ok(wanted) = address.parse::<std::net::IpAddr>() else {
        return false;
    };
    nix::ifaddrs::getifaddrs().is_ok_and(|mut addrs| {
        addrs.any(|a| {
            let ip = a.address.and_then(|s| {
                s.as_sockaddr_in()
                    .map(|v4| std::net::IpAddr::V4(v4.ip()))
                    .or_else(|| s.as_sockaddr_in6().map(|v6| std::net::IpAddr::V6(v6.ip())))
            });
            ip == Some(wanted)
        })
    })
}

/// Polls `probe` until it yields, failing when `service` exits or the step times out.
async fn wait_for<T, F, Fut>(
    supervisor: &mut dyn Supervisor,
    service: &str,
    what: &str,
    mut probe: F,
) -> Result<T, BringupError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = probe().await {
            return Ok(v);
        }
        // Only the awaited service: one that stopped since an earlier bring-up is started
        // again by a later step of this one, and must not fail this wait.
        supervisor.check(Some(service))?;
        if start.elapsed() > STEP_TIMEOUT {
            return Err(BringupError::Timeout {
                what: what.to_string(),
                after: STEP_TIMEOUT,
                service: service.to_string(),
                log: supervisor.log_tail(service),
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A CA kept as `<stem>.crt`/`<stem>.key` below the node's PKI directory: the one on disk
/// (a node never swaps it for another: every certificate and joined node trusts it), else the
/// one given, else a new one where the node may make it (the first control plane).
fn keep_ca(
    root: &Path,
    stem: &str,
    given: Option<&ClusterCa>,
    make: Option<&str>,
) -> Result<Ca, BringupError> {
    let file = |ext: &str| format!("{}/{stem}.{ext}", paths::PKI);
    let read = |rel: &str| {
        std::fs::read_to_string(root.join(rel))
            .map_err(io(format!("reading {}", root.join(rel).display())))
    };
    if root.join(file("key")).exists() {
        let ca = Ca::load(CertPair {
            cert_pem: read(&file("crt"))?,
            key_pem: read(&file("key"))?,
        })?;
        if let Some(given) = given
            && given.cert.trim() != ca.pair.cert_pem.trim()
        {
            return Err(BringupError::OtherCa {
                path: root.join(file("crt")),
            });
        }
        return Ok(ca);
    }
    let ca = match (given, make) {
        (Some(given), _) => Ca::load(CertPair {
            cert_pem: given.cert.clone(),
            key_pem: given.key.clone(),
        })?,
        (None, Some(common_name)) => Ca::generate(common_name)?,
        (None, None) => {
            return Err(BringupError::MissingSecret {
                what: stem.to_string(),
            });
        }
    };
    write(root, &file("crt"), &ca.pair.cert_pem, 0o644)?;
    write(root, &file("key"), &ca.pair.key_pem, 0o600)?;
    Ok(ca)
}

/// The service-account signing key every API server shares: kept, else the one given, else
/// a new one on the first control plane.
fn keep_service_account_key(
    root: &Path,
    given: Option<&SecretPem>,
    may_make: bool,
) -> Result<(), BringupError> {
    let key = format!("{}/sa.key", paths::PKI);
    if root.join(&key).exists() {
        let on_disk = std::fs::read_to_string(root.join(&key))
            .map_err(io(format!("reading {}", root.join(&key).display())))?;
        if let Some(given) = given
            && given.0.trim() != on_disk.trim()
        {
            return Err(BringupError::OtherCa {
                path: root.join(&key),
            });
        }
        return Ok(());
    }
    let (private, public) = match given {
        Some(k) => (k.0.clone(), pki::public_key_pem(&k.0)?),
        None if may_make => pki::key_pair()?,
        None => {
            return Err(BringupError::MissingSecret {
                what: "serviceAccountKey".into(),
            });
        }
    };
    write(root, &format!("{}/sa.pub", paths::PKI), &public, 0o644)?;
    write(root, &key, &private, 0o600)
}

/// The CAs and the service-account key (kept across restarts, given or made), and every
/// certificate and kubeconfig a control plane needs; existing ones are kept, so a restart
/// changes nothing. Returns the cluster CA and the etcd CA.
fn control_plane_credentials(node: &KubernetesNode, host: &Host) -> Result<(Ca, Ca), BringupError> {
    let root = &host.root;
    let first = node.role == KubeRole::Init;
    let pki_file = |f: &str| format!("{}/{f}", paths::PKI);
    let exists = |rel: &str| root.join(rel).exists();
    let ca = keep_ca(
        root,
        "ca",
        node.ca.as_ref(),
        first.then_some("kiln-kubernetes-ca"),
    )?;
    let etcd_ca = keep_ca(
        root,
        "etcd/ca",
        node.etcd_ca.as_ref(),
        first.then_some("kiln-etcd-ca"),
    )?;
    keep_service_account_key(root, node.service_account_key.as_ref(), first)?;
    let pair = |issuer: &Ca, name: &str, leaf: Leaf<'_>| -> Result<(), BringupError> {
        if exists(&pki_file(&format!("{name}.key"))) {
            return Ok(());
        }
        let p = issuer.issue(&leaf)?;
        write(root, &pki_file(&format!("{name}.crt")), &p.cert_pem, 0o644)?;
        write(root, &pki_file(&format!("{name}.key")), &p.key_pem, 0o600)
    };
    pair(
        &ca,
        "apiserver",
        Leaf {
            common_name: "kube-apiserver",
            organizations: &[],
            sans: api_server_sans(node),
            usage: Usage::Server,
        },
    )?;
    pair(
        &ca,
        "apiserver-kubelet-client",
        Leaf {
            common_name: "kube-apiserver-kubelet-client",
            organizations: &["system:masters"],
            sans: vec![],
            usage: Usage::Client,
        },
    )?;
    let etcd_sans = vec![
        host.node_name.clone(),
        node.node_ip.clone(),
        "127.0.0.1".into(),
        "localhost".into(),
    ];
    // Both for clients too: etcd's own JSON gateway (a joining control plane's way in)
    // dials its gRPC server with the server certificate.
    for name in ["etcd/server", "etcd/peer"] {
        pair(
            &etcd_ca,
            name,
            Leaf {
                common_name: &host.node_name,
                organizations: &[],
                sans: etcd_sans.clone(),
                usage: Usage::Peer,
            },
        )?;
    }
    pair(
        &etcd_ca,
        "apiserver-etcd-client",
        Leaf {
            common_name: "kube-apiserver-etcd-client",
            organizations: &[],
            sans: vec![],
            usage: Usage::Client,
        },
    )?;
    // This node's components talk to its own API server.
    let server = local_api_server(node);
    let node_user = format!("system:node:{}", host.node_name);
    for (file, user, orgs) in [
        (
            paths::ADMIN_KUBECONFIG,
            "kubernetes-admin",
            &["system:masters"][..],
        ),
        (
            paths::CONTROLLER_MANAGER_KUBECONFIG,
            "system:kube-controller-manager",
            &[],
        ),
        (paths::SCHEDULER_KUBECONFIG, "system:kube-scheduler", &[]),
        (
            paths::KUBELET_KUBECONFIG,
            node_user.as_str(),
            &["system:nodes"],
        ),
    ] {
        if exists(file) {
            continue;
        }
        let p = ca.issue(&Leaf {
            common_name: user,
            organizations: orgs,
            sans: vec![],
            usage: Usage::Client,
        })?;
        let text = pki::kubeconfig(
            &server,
            &ca.pair.cert_pem,
            user,
            Credential::Certificate(&p),
        );
        write(root, file, &text, 0o600)?;
    }
    Ok((ca, etcd_ca))
}

/// What lets nodes join: the bootstrap token's Secret, the bindings that let its holders ask
/// for a node certificate (approved automatically) and let nodes run kube-proxy, and the
/// public cluster-info a joining node finds the CA in.
pub fn bootstrap_objects(node: &KubernetesNode, server: &str, ca_pem: &str) -> Vec<Value> {
    let binding = |name: &str, role: &str, group: &str| {
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": group}],
        })
    };
    let cluster_info = {
        let b64 = |s: &str| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, s);
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: \"\"\n  cluster:\n    server: {server}\n    certificate-authority-data: {}\n",
            b64(ca_pem)
        )
    };
    let mut objects = vec![
        binding(
            "kiln:kubelet-bootstrap",
            "system:node-bootstrapper",
            "system:bootstrappers",
        ),
        binding(
            "kiln:node-autoapprove-bootstrap",
            "system:certificates.k8s.io:certificatesigningrequests:nodeclient",
            "system:bootstrappers",
        ),
        binding(
            "kiln:node-autoapprove-certificate-rotation",
            "system:certificates.k8s.io:certificatesigningrequests:selfnodeclient",
            "system:nodes",
        ),
        // kube-proxy runs with its node's credentials.
        binding("kiln:node-proxier", "system:node-proxier", "system:nodes"),
        json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "cluster-info", "namespace": "kube-public"},
            "data": {"kubeconfig": cluster_info},
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "kiln:cluster-info-reader", "namespace": "kube-public"},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["cluster-info"], "verbs": ["get"]}],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "kiln:cluster-info-reader", "namespace": "kube-public"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "kiln:cluster-info-reader"},
            "subjects": [
                {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "system:anonymous"},
                {"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:bootstrappers"},
            ],
        }),
    ];
    if let Some((id, secret)) = node.join.as_ref().and_then(|j| j.token.split_once('.')) {
        objects.push(json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "bootstrap.kubernetes.io/token",
            "metadata": {"name": format!("bootstrap-token-{id}"), "namespace": "kube-system"},
            "stringData": {
                "description": "kiln: nodes of this cluster join with it",
                "token-id": id,
                "token-secret": secret,
                "usage-bootstrap-authentication": "true",
                "usage-bootstrap-signing": "true",
                "auth-extra-groups": BOOTSTRAP_GROUP,
            },
        }));
    }
    objects
}

/// Applies `objects` (server-side apply, kiln's field manager), in order.
async fn apply_objects(client: &kube::Client, objects: Vec<Value>) -> Result<(), BringupError> {
    for object in objects {
        let (group, version) = match object["apiVersion"]
            .as_str()
            .unwrap_or_default()
            .split_once('/')
        {
            Some((g, v)) => (g.to_string(), v.to_string()),
            None => (String::new(), "v1".to_string()),
        };
        let kind = object["kind"].as_str().unwrap_or_default().to_string();
        let plural = format!("{}s", kind.to_lowercase());
        let ar = ApiResource::from_gvk_with_plural(
            &kube::api::GroupVersionKind::gvk(&group, &version, &kind),
            &plural,
        );
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let api: Api<DynamicObject> = match object["metadata"]["namespace"].as_str() {
            Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
            None => Api::all_with(client.clone(), &ar),
        };
        let context = format!("applying {kind} {name}");
        api.patch(
            &name,
            &PatchParams::apply(crate::FIELD_MANAGER).force(),
            &Patch::Apply(&object),
        )
        .await
        .map_err(crate::Error::kube(context))?;
    }
    Ok(())
}

/// The `Ready` condition of node `name` among `nodes` (as the API server has them):
/// `(ready, message)`. Pure.
pub fn node_ready(nodes: &[Node], name: &str) -> Result<(bool, String), String> {
    let ready = nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(name))
        .ok_or_else(|| format!("node {name} is not registered"))?
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .ok_or_else(|| format!("node {name} reports no Ready condition yet"))?;
    Ok((
        ready.status == "True",
        ready.message.clone().unwrap_or_default(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_control_plane_keeps_its_ca_and_never_swaps_it() {
        let host = |root: &Path| Host {
            root: root.to_path_buf(),
            ..Host::appliance("cp-1")
        };
        let node = |ca: Option<&CertPair>| -> KubernetesNode {
            let mut n: KubernetesNode = serde_json::from_value(
                json!({"role": "init", "nodeIp": "10.0.0.1", "podCidr": "10.42.0.0/24"}),
            )
            .unwrap();
            n.ca = ca.map(|p| kiln_spec::kubernetes::ClusterCa {
                cert: p.cert_pem.clone(),
                key: p.key_pem.clone(),
            });
            n
        };
        let ca_on_disk =
            |root: &Path| std::fs::read_to_string(root.join(paths::PKI).join("ca.crt")).unwrap();

        // Made on the node, then kept across restarts.
        let own = tempfile::tempdir().unwrap();
        let (made, _) = control_plane_credentials(&node(None), &host(own.path())).unwrap();
        assert_eq!(ca_on_disk(own.path()), made.pair.cert_pem);
        let (again, _) = control_plane_credentials(&node(None), &host(own.path())).unwrap();
        assert_eq!(again.pair, made.pair);

        // Given by the fleet: used, and the certificates it issues verify against it.
        let fleet = Ca::generate("fleet-ca").unwrap();
        let given = tempfile::tempdir().unwrap();
        let (used, _) =
            control_plane_credentials(&node(Some(&fleet.pair)), &host(given.path())).unwrap();
        assert_eq!(used.pair, fleet.pair);
        assert_eq!(ca_on_disk(given.path()), fleet.pair.cert_pem);
        assert_eq!(used.cert_hash().unwrap(), fleet.cert_hash().unwrap());

        // A node already running a cluster refuses another CA and changes nothing.
        let err =
            control_plane_credentials(&node(Some(&fleet.pair)), &host(own.path())).unwrap_err();
        assert!(matches!(err, BringupError::OtherCa { .. }), "{err}");
        assert_eq!(ca_on_disk(own.path()), made.pair.cert_pem);
    }

    #[test]
    fn reads_the_ready_condition_of_the_named_node() {
        let node = |name: &str, status: serde_json::Value| -> Node {
            serde_json::from_value(json!({"metadata": {"name": name}, "status": status})).unwrap()
        };
        let nodes = [
            node(
                "a",
                json!({"conditions": [{"type": "Ready", "status": "True", "message": "kubelet is posting ready status"}]}),
            ),
            node("b", json!({})),
        ];
        assert_eq!(
            node_ready(&nodes, "a"),
            Ok((true, "kubelet is posting ready status".into()))
        );
        assert_eq!(
            node_ready(&nodes, "b"),
            Err("node b reports no Ready condition yet".into())
        );
        assert_eq!(
            node_ready(&nodes, "c"),
            Err("node c is not registered".into())
        );
    }

    #[test]
    fn finds_only_addresses_this_host_has() {
        assert!(has_local_address("127.0.0.1"));
        // TEST-NET-2: for documentation, not for hosts.
        assert!(!has_local_address("198.51.100.254"));
        assert!(!has_local_address("not an address"));
    }
}
