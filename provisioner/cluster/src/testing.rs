//! Test support (feature `testing`): a real etcd + kube-apiserver on loopback, the fixture
//! CRDs, builders for test workloads, and the stand-in controllers that play kubelet and
//! virt-controller (no kubelet or KubeVirt runs next to the test API server).
//!
//! The binaries come from `scripts/kube-fixtures.sh` (versions in
//! `scripts/kube-fixtures/versions.env`), cached under `$KILN_CACHE/bin/<version>/`.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Client;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams,
};
use serde_json::{Value, json};

use crate::Error;
use crate::ceph::CephAdmin;
use crate::maintenance::Vmim;
use crate::pki::{self, Ca, Credential, Leaf, Usage};

/// The pinned fixture versions, from the one file `scripts/kube-fixtures.sh` builds them from.
const VERSIONS: &str = include_str!("../../../scripts/kube-fixtures/versions.env");

/// The admin user kiln runs as in tests; stand-in controllers use another one, so API request
/// counts can tell them apart.
pub const ADMIN_USER: &str = "kiln-admin";
pub const STANDIN_USER: &str = "kiln-standin-controllers";

/// Paths of the pinned Kubernetes binaries.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// The directory of the multi-call `kube` binary and its component links.
    pub kube_dir: PathBuf,
    pub kube_apiserver: PathBuf,
    pub kubectl: PathBuf,
    pub etcd: PathBuf,
}

impl Binaries {
    /// Finds the binaries, or says how to build them.
    pub fn locate() -> Result<Binaries, String> {
        let version = |key: &str| {
            VERSIONS
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{key}=")))
                .map(str::trim)
                .ok_or_else(|| format!("{key} missing from scripts/kube-fixtures/versions.env"))
        };
        let cache = kiln_spec::paths::cache_dir();
        let kube = cache.join("bin").join(version("KUBERNETES_VERSION")?);
        let bins = Binaries {
            kube_dir: kube.clone(),
            kube_apiserver: kube.join("kube-apiserver"),
            kubectl: kube.join("kubectl"),
            etcd: cache
                .join("bin")
                .join(version("ETCD_VERSION")?)
                .join("etcd"),
        };
        for b in [&bins.kube_apiserver, &bins.kubectl, &bins.etcd] {
            if !b.exists() {
                return Err(format!(
                    "{} is missing: run scripts/kube-fixtures.sh (builds etcd and the Kubernetes components from their Go modules; needs Go in /usr/local/go)",
                    b.display()
                ));
            }
        }
        Ok(bins)
    }
}

#[derive(Debug, Clone, Default)]
pub struct HarnessOptions {
    /// Write an audit log (one JSON line per request) to count API requests.
    pub audit: bool,
}

/// A running etcd + kube-apiserver; both stop when this drops (or when the test process
/// dies: each runs under a watchdog shell that follows the parent).
#[derive(Debug)]
pub struct TestCluster {
    dir: tempfile::TempDir,
    bins: Binaries,
    etcd: Option<Child>,
    apiserver: Option<Child>,
    apiserver_args: Vec<String>,
    pub port: u16,
    pub kubeconfig: PathBuf,
    pub standin_kubeconfig: PathBuf,
    pub audit_log: Option<PathBuf>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding an ephemeral port")
}

/// Runs `bin args` under `sh` that kills it when the test process exits or on SIGTERM, then
/// removes `cleanup` (the shared cluster is a static: nothing drops it). SIGKILL: test servers
/// need no graceful shutdown, and an API server whose etcd is gone would take long.
fn spawn_guarded(bin: &Path, args: &[String], log: &Path, cleanup: Option<&Path>) -> Child {
    const WATCHDOG: &str = r#"parent=$1; cleanup=$2; shift 2
"$@" & child=$!
finish() { kill -9 $child 2>/dev/null; wait $child; [ -n "$cleanup" ] && rm -rf "$cleanup"; exit 0; }
trap finish TERM
while kill -0 "$parent" 2>/dev/null && kill -0 "$child" 2>/dev/null; do sleep 0.5; done
finish"#;
    let log_file = std::fs::File::create(log).expect("creating a log file");
    Command::new("sh")
        .arg("-c")
        .arg(WATCHDOG)
        .arg("kiln-test-watchdog")
        .arg(std::process::id().to_string())
        .arg(cleanup.map(Path::as_os_str).unwrap_or_default())
        .arg(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("log file"))
        .stderr(log_file)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()))
}

fn stop(child: &mut Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(25)..].join("\n")
}

impl TestCluster {
    /// The cluster shared by every test of this test binary.
    pub fn shared() -> &'static TestCluster {
        static SHARED: OnceLock<TestCluster> = OnceLock::new();
        SHARED.get_or_init(|| TestCluster::start(HarnessOptions::default()))
    }

    /// Starts a cluster of its own (for tests that restart the API server).
    pub fn start(opts: HarnessOptions) -> TestCluster {
        let bins = Binaries::locate().unwrap_or_else(|e| panic!("{e}"));
        let dir = tempfile::Builder::new()
            .prefix("kiln-kube-")
            .tempdir()
            .expect("creating a temp dir");
        let d = dir.path();
        let write = |name: &str, content: &str| {
            let p = d.join(name);
            std::fs::write(&p, content).expect("writing harness files");
            p
        };

        // A CA, a serving certificate for 127.0.0.1 and client certificates for two users.
        let ca = Ca::generate("kiln-test-ca").expect("CA");
        let server = ca
            .issue(&Leaf {
                common_name: "kube-apiserver",
                organizations: &[],
                sans: vec!["127.0.0.1".into(), "localhost".into()],
                usage: Usage::Server,
            })
            .expect("serving certificate");
        let ca_crt = write("ca.crt", &ca.pair.cert_pem);
        let server_crt = write("apiserver.crt", &server.cert_pem);
        let server_key = write("apiserver.key", &server.key_pem);
        let (sa_private, sa_public) = pki::key_pair().expect("service account key");
        let sa_key = write("sa.key", &sa_private);
        let sa_pub = write("sa.pub", &sa_public);

        let port = free_port();
        let kubeconfig_for = |user: &str, file: &str| {
            let client = ca
                .issue(&Leaf {
                    common_name: user,
                    organizations: &["system:masters"],
                    sans: vec![],
                    usage: Usage::Client,
                })
                .expect("client certificate");
            write(
                file,
                &pki::kubeconfig(
                    &format!("https://127.0.0.1:{port}"),
                    &ca.pair.cert_pem,
                    user,
                    Credential::Certificate(&client),
                ),
            )
        };
        let kubeconfig = kubeconfig_for(ADMIN_USER, "kubeconfig");
        let standin_kubeconfig = kubeconfig_for(STANDIN_USER, "standin.kubeconfig");

        let (client_port, peer_port) = (free_port(), free_port());
        let etcd_args: Vec<String> = vec![
            "--name=kiln-test".into(),
            format!("--data-dir={}", d.join("etcd").display()),
            format!("--listen-client-urls=http://127.0.0.1:{client_port}"),
            format!("--advertise-client-urls=http://127.0.0.1:{client_port}"),
            format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"),
            format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"),
            format!("--initial-cluster=kiln-test=http://127.0.0.1:{peer_port}"),
            // Test data: durability across power loss does not matter, speed does.
            "--unsafe-no-fsync".into(),
        ];
        let etcd = spawn_guarded(&bins.etcd, &etcd_args, &d.join("etcd.log"), Some(d));

        let mut apiserver_args: Vec<String> = vec![
            format!("--etcd-servers=http://127.0.0.1:{client_port}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            // A loopback address cannot back the `kubernetes` Service endpoints.
            "--endpoint-reconciler-type=none".into(),
            format!("--secure-port={port}"),
            format!("--cert-dir={}", d.join("certs").display()),
            format!("--tls-cert-file={}", server_crt.display()),
            format!("--tls-private-key-file={}", server_key.display()),
            format!("--client-ca-file={}", ca_crt.display()),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", sa_pub.display()),
            format!("--service-account-signing-key-file={}", sa_key.display()),
            "--service-cluster-ip-range=10.0.0.0/24".into(),
            "--authorization-mode=RBAC".into(),
            "--allow-privileged=true".into(),
            // No controller-manager creates default ServiceAccounts here.
            "--disable-admission-plugins=ServiceAccount".into(),
        ];
        let audit_log = opts.audit.then(|| {
            let policy = write("audit-policy.yaml", "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n- level: Metadata\n");
            let log = d.join("audit.log");
            apiserver_args.push(format!("--audit-policy-file={}", policy.display()));
            apiserver_args.push(format!("--audit-log-path={}", log.display()));
            log
        });
        let mut cluster = TestCluster {
            bins,
            etcd: Some(etcd),
            apiserver: None,
            apiserver_args,
            port,
            kubeconfig,
            standin_kubeconfig,
            audit_log,
            dir,
        };
        cluster.start_apiserver();
        cluster
    }

    pub fn binaries(&self) -> &Binaries {
        &self.bins
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn start_apiserver(&mut self) {
        let log = self.dir.path().join("kube-apiserver.log");
        self.apiserver = Some(spawn_guarded(
            &self.bins.kube_apiserver,
            &self.apiserver_args,
            &log,
            None,
        ));
        let kubeconfig = self.kubeconfig.clone();
        // Own thread and runtime: callers may already be inside a tokio runtime.
        let ready = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let deadline = Instant::now() + Duration::from_secs(120);
                let mut last = String::new();
                while Instant::now() < deadline {
                    match crate::kube_client::from_kubeconfig(&kubeconfig).await {
                        Ok(client) => match client.request_text(http_get("/readyz")).await {
                            Ok(body) if body.trim() == "ok" => return Ok(()),
                            Ok(body) => last = body,
                            Err(e) => last = e.to_string(),
                        },
                        Err(e) => last = e.to_string(),
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(format!("not ready after 120 s ({last})"))
            })
        });
        let apiserver = self.apiserver.as_mut().expect("just started");
        while !ready.is_finished() {
            if let Ok(Some(status)) = apiserver.try_wait() {
                panic!(
                    "kube-apiserver exited ({status}); log:\n{}\netcd log:\n{}",
                    tail(&log),
                    tail(&self.dir.path().join("etcd.log"))
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Err(why) = ready.join().expect("readiness thread") {
            panic!(
                "kube-apiserver {why}; log:\n{}\netcd log:\n{}",
                tail(&log),
                tail(&self.dir.path().join("etcd.log"))
            );
        }
    }

    /// Stops and starts the API server (etcd keeps the data), waiting until it is ready.
    pub fn restart_apiserver(&mut self) {
        if let Some(mut a) = self.apiserver.take() {
            stop(&mut a);
        }
        self.start_apiserver();
    }

    /// Stops the API server only (a test then calls [`TestCluster::restart_apiserver`]).
    pub fn stop_apiserver(&mut self) {
        if let Some(mut a) = self.apiserver.take() {
            stop(&mut a);
        }
    }

    pub async fn client(&self) -> Client {
        crate::kube_client::from_kubeconfig(&self.kubeconfig)
            .await
            .expect("admin client")
    }

    pub async fn standin_client(&self) -> Client {
        crate::kube_client::from_kubeconfig(&self.standin_kubeconfig)
            .await
            .expect("stand-in client")
    }

    /// Completed requests in the audit log made by `user`.
    pub fn audited_requests(&self, user: &str) -> usize {
        let Some(log) = &self.audit_log else { return 0 };
        let needle = format!("\"username\":\"{user}\"");
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"stage\":\"ResponseComplete\"") && l.contains(&needle))
            .count()
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for child in [self.apiserver.as_mut(), self.etcd.as_mut()]
            .into_iter()
            .flatten()
        {
            stop(child);
        }
    }
}

fn http_get(path: &str) -> http::Request<Vec<u8>> {
    http::Request::get(path).body(Vec::new()).expect("request")
}

/// `tests/fixtures/kube` of the repository.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/kube")
}

/// Applies every CRD in `files` and waits until they are Established.
pub async fn install_crds(client: &Client, files: &[PathBuf]) -> Result<(), Error> {
    let api: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &ApiResource::from_gvk(&GroupVersionKind::gvk(
            "apiextensions.k8s.io",
            "v1",
            "CustomResourceDefinition",
        )),
    );
    let mut names = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f).map_err(|source| Error::Io {
            path: f.clone(),
            source,
        })?;
        let docs: Vec<Value> = serde_saphyr::from_multiple(&text).map_err(|e| Error::Manifest {
            source_path: f.display().to_string(),
            reason: e.to_string(),
        })?;
        for doc in docs
            .into_iter()
            .filter(|d| d["kind"] == "CustomResourceDefinition")
        {
            let name = doc["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            api.patch(
                &name,
                &PatchParams::apply(crate::FIELD_MANAGER).force(),
                &Patch::Apply(&doc),
            )
            .await
            .map_err(Error::kube(format!("applying CRD {name}")))?;
            names.push(name);
        }
    }
    crate::bootstrap::wait_established(client, names, Duration::from_secs(60)).await
}

/// The KubeVirt workload CRDs of `tests/fixtures/kube`.
pub async fn install_kubevirt_fixture_crds(client: &Client) -> Result<(), Error> {
    let dir = fixtures_dir();
    install_crds(
        client,
        &[
            dir.join("virtualmachineinstances.kubevirt.io.yaml"),
            dir.join("virtualmachineinstancemigrations.kubevirt.io.yaml"),
        ],
    )
    .await
}

/// Builders for the objects maintenance tests put on a node.
pub mod workload {
    use super::*;
    pub use crate::maintenance::{vmi_resource, vmim_resource};

    pub fn node(name: &str) -> Node {
        serde_json::from_value(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}}})).expect("node")
    }

    /// A plain pod bound to `node`, optionally owned by a controller `(kind, name)`.
    pub fn pod(
        ns: &str,
        name: &str,
        node: &str,
        labels: &[(&str, &str)],
        owner: Option<(&str, &str)>,
    ) -> Pod {
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        let mut pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"nodeName": node, "containers": [{"name": "main", "image": "registry.k8s.io/pause:3.10"}]},
        });
        if let Some((kind, owner_name)) = owner {
            let api_version = match kind {
                "VirtualMachineInstance" => "kubevirt.io/v1",
                _ => "apps/v1",
            };
            pod["metadata"]["ownerReferences"] = json!([{"apiVersion": api_version, "kind": kind, "name": owner_name, "uid": format!("{owner_name}-uid"), "controller": true}]);
        }
        serde_json::from_value(pod).expect("pod")
    }

    /// A VMI running on `node` (status as virt-controller would set it), with its
    /// virt-launcher pod.
    pub fn vmi(
        ns: &str,
        name: &str,
        node: &str,
        eviction_strategy: Option<&str>,
        volumes: Value,
    ) -> (DynamicObject, Pod) {
        let mut spec = json!({"domain": {"devices": {}, "resources": {"requests": {"memory": "64Mi"}}}, "volumes": volumes});
        if let Some(s) = eviction_strategy {
            spec["evictionStrategy"] = json!(s);
        }
        let vmi = serde_json::from_value(json!({
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
            "metadata": {"name": name, "namespace": ns},
            "spec": spec,
            "status": {"nodeName": node, "phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
        }))
        .expect("vmi");
        let launcher = pod(
            ns,
            &format!("virt-launcher-{name}"),
            node,
            &[
                ("kubevirt.io", "virt-launcher"),
                ("vm.kubevirt.io/name", name),
            ],
            Some(("VirtualMachineInstance", name)),
        );
        (vmi, launcher)
    }

    /// Creates `pod` and reports it Running and Ready, as its kubelet would (eviction only
    /// consults PodDisruptionBudgets for running pods).
    pub async fn run_pod(client: &Client, pod: &Pod) -> Result<(), kube::Error> {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
        api.create(&PostParams::default(), pod).await?;
        let status = json!({"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}});
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
            .await?;
        Ok(())
    }

    /// Creates a namespace, ignoring one that exists.
    pub async fn namespace(client: &Client, name: &str) {
        let ns: k8s_openapi::api::core::v1::Namespace =
            serde_json::from_value(json!({"metadata": {"name": name}})).expect("namespace");
        match Api::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => panic!("creating namespace {name}: {e}"),
        }
    }
}

/// A background task that ends when its handle drops.
#[derive(Debug)]
pub struct StandIn(tokio::task::JoinHandle<()>);

impl Drop for StandIn {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Stands in for the kubelet: finishes the deletion of every terminating pod in `namespace`,
/// as a kubelet does once the containers stopped.
pub fn standin_kubelet(client: Client, namespace: &str) -> StandIn {
    let namespace = namespace.to_string();
    StandIn(tokio::spawn(async move {
        let api: Api<Pod> = Api::namespaced(client.clone(), &namespace);
        loop {
            if let Ok(pods) = api.list(&ListParams::default()).await {
                for p in pods
                    .items
                    .iter()
                    .filter(|p| p.metadata.deletion_timestamp.is_some())
                {
                    let ns = p.metadata.namespace.clone().unwrap_or_default();
                    let name = p.metadata.name.clone().unwrap_or_default();
                    let _ = Api::<Pod>::namespaced(client.clone(), &ns)
                        .delete(&name, &DeleteParams::default().grace_period(0))
                        .await;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }))
}

/// Stands in for virt-controller in `namespace`: runs each pending
/// VirtualMachineInstanceMigration — moves the VMI to `target_node`, removes its source
/// virt-launcher pod, marks the migration Succeeded — or fails it when the VMI says it is not
/// live-migratable.
pub fn standin_virt_controller(client: Client, namespace: &str, target_node: &str) -> StandIn {
    standin_virt_controller_with(client, namespace, target_node, None)
}

/// Moves a VMI's guest from one node to another: `(vmi, source node, target node)`. What
/// KubeVirt's virt-handlers do with libvirt; a test hands in a real QEMU migration.
pub type Migrator = Arc<dyn Fn(&str, &str, &str) -> Result<(), String> + Send + Sync>;

/// [`standin_virt_controller`] that has `migrate` move each guest for real before it records
/// the move; a migration that fails fails the VirtualMachineInstanceMigration.
pub fn standin_virt_controller_with(
    client: Client,
    namespace: &str,
    target_node: &str,
    migrate: Option<Migrator>,
) -> StandIn {
    let (namespace, target_node) = (namespace.to_string(), target_node.to_string());
    StandIn(tokio::spawn(async move {
        let vmims: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), &namespace, &workload::vmim_resource());
        loop {
            if let Ok(list) = vmims.list(&ListParams::default()).await {
                for m in list.items {
                    let _ = run_migration(&client, m, &target_node, migrate.clone()).await;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }))
}

/// Moves the guest of VMI `name` when it can live-migrate: its source node, or `None` when
/// the migration fails (no such VMI, not live-migratable, the migrator failed).
async fn move_guest(
    vmis: &Api<DynamicObject>,
    name: &str,
    target: &str,
    migrate: Option<Migrator>,
) -> Result<Option<String>, kube::Error> {
    let Some(vmi) = vmis.get_opt(name).await? else {
        return Ok(None);
    };
    let vmi = serde_json::to_value(&vmi).unwrap_or_default();
    let not_migratable = vmi["status"]["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["type"] == "LiveMigratable" && c["status"] == "False")
    });
    if not_migratable {
        return Ok(None);
    }
    let source = vmi["status"]["nodeName"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if let Some(migrate) = migrate {
        let (vmi, from, to) = (name.to_string(), source.clone(), target.to_string());
        let moved = tokio::task::spawn_blocking(move || migrate(&vmi, &from, &to))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        if let Err(reason) = moved {
            tracing::warn!("migrating {name}: {reason}");
            return Ok(None);
        }
    }
    Ok(Some(source))
}

async fn run_migration(
    client: &Client,
    m: DynamicObject,
    target: &str,
    migrate: Option<Migrator>,
) -> Result<(), kube::Error> {
    let Ok(parsed) = serde_json::from_value::<Vmim>(serde_json::to_value(&m).unwrap_or_default())
    else {
        return Ok(());
    };
    if matches!(
        parsed.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) {
        return Ok(());
    }
    let ns = m.metadata.namespace.clone().unwrap_or_default();
    let name = m.metadata.name.clone().unwrap_or_default();
    let vmis: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &ns, &workload::vmi_resource());
    let vmims: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &ns, &workload::vmim_resource());
    let set_phase = |phase: &'static str| json!({"status": {"phase": phase}});
    let Some(source) = move_guest(&vmis, &parsed.spec.vmi_name, target, migrate).await? else {
        vmims
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(set_phase("Failed")),
            )
            .await?;
        return Ok(());
    };
    vmis.patch(
        &parsed.spec.vmi_name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"nodeName": target}})),
    )
    .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    for p in pods
        .list(&ListParams::default().fields(&format!("spec.nodeName={source}")))
        .await?
        .items
    {
        let owned = p
            .metadata
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.kind == "VirtualMachineInstance" && o.name == parsed.spec.vmi_name);
        if owned {
            pods.delete(
                p.metadata.name.as_deref().unwrap_or_default(),
                &DeleteParams::default().grace_period(0),
            )
            .await?;
        }
    }
    vmims
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(set_phase("Succeeded")),
        )
        .await?;
    Ok(())
}

/// A [`CephAdmin`] that records the commands it was asked to run, for tests (no Ceph cluster
/// runs next to the test API server).
#[derive(Debug, Default)]
pub struct RecordingCephAdmin {
    calls: Mutex<Vec<String>>,
}

impl RecordingCephAdmin {
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().expect("lock").clone()
    }

    fn record(&self, verb: &str, osds: &[u32]) {
        if !osds.is_empty() {
            let ids: Vec<String> = osds.iter().map(|id| format!("osd.{id}")).collect();
            self.calls
                .lock()
                .expect("lock")
                .push(format!("ceph osd {verb} {}", ids.join(" ")));
        }
    }
}

#[async_trait::async_trait]
impl CephAdmin for RecordingCephAdmin {
    async fn add_noout(&self, osds: &[u32]) -> Result<(), Error> {
        self.record("add-noout", osds);
        Ok(())
    }

    async fn rm_noout(&self, osds: &[u32]) -> Result<(), Error> {
        self.record("rm-noout", osds);
        Ok(())
    }

    /// Always allows: the unit-test double has no placement groups to weigh.
    async fn stop_refusal(&self, _osds: &[u32]) -> Result<Option<String>, Error> {
        Ok(None)
    }

    /// None: the OSDs these tests know come from Rook's pod labels.
    async fn host_osds(&self, _node: &str) -> Result<Vec<u32>, Error> {
        Ok(Vec::new())
    }
}
