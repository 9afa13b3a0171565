//! Host tier of the appliance's own Kubernetes: kiln's bring-up code (certificates, configs,
//! airgap image import, services) starts a real cluster on this machine — etcd, the API
//! server, controller-manager, scheduler, containerd, kubelet and kube-proxy from kiln's
//! multi-call build — with each node in its own network and mount namespace. One cluster
//! serves every assertion: the node agent's controllers bring the first control plane up from
//! its node config and report it Ready, a Deployment of kiln's test image from the airgap
//! bundle answers over its Service and a pod finds it by name through the cluster DNS, a
//! worker with a wrong token or a wrong CA pin is refused before it starts anything, a worker
//! with the right ones joins and runs a pod of an image it pulls from a site's registry (a
//! real one) through its mirror, a kubelet that stops is reported by the agent and started
//! again, and a second control plane joins etcd and serves the same cluster.
//!
//! The services run as supervised processes (no systemd here); the host's cgroups are v1, so
//! each node's kubelet gets its own cgroup root, its root lacks CAP_SYS_RESOURCE, so
//! containerd may not lower OOM scores (`restrict_oom_score_adj`), and its disk is shared with
//! everything else on the machine (`shared_disk`).

mod common;

use common::TestAgent;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kiln_agent::kubernetes::{KubernetesController, KubernetesState};
use kiln_cluster::node::bringup::{BringupError, Processes, Supervisor, bring_up};
use kiln_cluster::node::join::JoinError;
use kiln_cluster::node::{Host, paths};
use kiln_image::kubernetes::{
    KubeBinaries, check_image, coredns_image, ensure_binaries, pause_image,
};
use kiln_image::oci::write_archive;
use kiln_lab::netns::Netns;
use kiln_spec::kubernetes::{
    CHECK_IMAGE, CHECK_PAGE, ClusterCa, JoinCredentials, KubeRole, KubernetesNode, SecretPem,
};
use kiln_spec::{NodeConfig, NodeSpec, ValidationErrors};

/// A registry no DNS knows: the worker can pull from it only through its mirror, a real
/// registry (Debian's docker-registry) on node A's address.
const SITE_IMAGE: &str = "registry.kiln.test/kiln/hello:1";
const MIRROR: &str = "10.231.0.1:5000";

/// One node's namespaces: a network namespace, a process holding a mount namespace the
/// node's daemons share (their mounts vanish with it), and a cgroup of its own.
struct NodeNs {
    netns: Netns,
    holder: Child,
    cgroup: String,
}

impl NodeNs {
    fn create(prefix: &str) -> NodeNs {
        let netns = Netns::create(prefix).unwrap();
        // The kubelet and containerd keep pod logs and pod network namespaces at fixed host
        // paths; each node gets its own, gone with its mount namespace.
        let private = ["/run/netns", "/var/log/pods", "/var/log/containers"];
        for d in private {
            std::fs::create_dir_all(d).unwrap();
        }
        let mounts: String = private
            .iter()
            .map(|d| format!("mount -t tmpfs kiln-node {d} && "))
            .collect();
        let holder = common::mount_namespace(&netns, &mounts);
        let cgroup = format!("kiln-test-{}", netns.name());
        for controller in cgroup_controllers() {
            let dir = controller.join(&cgroup);
            std::fs::create_dir_all(&dir).unwrap();
            for f in ["cpuset.cpus", "cpuset.mems"] {
                if let Ok(v) = std::fs::read_to_string(controller.join(f)) {
                    std::fs::write(dir.join(f), v).unwrap();
                }
            }
        }
        NodeNs {
            netns,
            holder,
            cgroup,
        }
    }

    /// Runs every service in the node's mount namespace (the network one comes from the
    /// thread that starts it).
    fn supervisor(&self, log_dir: PathBuf) -> Processes {
        Processes::new(log_dir, self.prefix())
    }

    fn prefix(&self) -> Vec<String> {
        ["nsenter", "-t", &self.holder.id().to_string(), "-m", "--"]
            .map(String::from)
            .to_vec()
    }

    fn run<T: Send>(&self, f: impl std::future::Future<Output = T> + Send) -> T {
        self.netns
            .enter(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(f)
            })
            .unwrap()
    }
}

impl Drop for NodeNs {
    fn drop(&mut self) {
        // containerd's shims (in the node's network namespace) and the containers (in the
        // node's cgroup, each in a network namespace of its own) outlive containerd by design.
        let kill = |pids: &str| {
            for pid in pids.split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        };
        if let Ok(pids) =
            kiln_lab::netns::run(Command::new("ip").args(["netns", "pids", self.netns.name()]))
        {
            kill(&pids);
        }
        let _ = self.holder.kill();
        let _ = self.holder.wait();
        for _ in 0..50 {
            let procs = cgroup_procs(&self.cgroup);
            if procs.is_empty() {
                break;
            }
            kill(&procs);
            std::thread::sleep(Duration::from_millis(100));
        }
        for controller in cgroup_controllers() {
            remove_cgroup(&controller.join(&self.cgroup));
        }
    }
}

fn cgroup_controllers() -> Vec<PathBuf> {
    std::fs::read_dir("/sys/fs/cgroup")
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("cgroup.procs").exists() && !p.is_symlink())
        .collect()
}

/// Every process in the cgroup tree `name`, in any hierarchy.
fn cgroup_procs(name: &str) -> String {
    let mut out = String::new();
    for controller in cgroup_controllers() {
        for entry in walk_dirs(&controller.join(name)) {
            out.push_str(&std::fs::read_to_string(entry.join("cgroup.procs")).unwrap_or_default());
        }
    }
    out
}

fn walk_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.path().is_dir() {
                out.extend(walk_dirs(&e.path()));
            }
        }
    }
    out
}

fn remove_cgroup(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.path().is_dir() {
                remove_cgroup(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// kiln's airgap bundle for the test: the pause image (catatonit), the cluster DNS (kiln's
/// CoreDNS build) and a web server (busybox httpd) with one page.
fn bundle(dir: &Path, bins: &KubeBinaries) {
    std::fs::create_dir_all(dir).unwrap();
    let read = |p: &str| std::fs::read(p).unwrap_or_else(|e| panic!("{p}: {e}"));
    write_archive(
        &pause_image(read("/usr/bin/catatonit")),
        &dir.join("pause.tar"),
    )
    .unwrap();
    write_archive(
        &coredns_image(read(bins.coredns.to_str().unwrap())),
        &dir.join("coredns.tar"),
    )
    .unwrap();
    write_archive(&check_image(read("/bin/busybox")), &dir.join("hello.tar")).unwrap();
}

fn host(dir: &Path, name: &str, ns: &NodeNs, bins: &KubeBinaries, images: &Path) -> Host {
    Host {
        root: dir.join(name),
        node_name: name.into(),
        kube_bin: bins.kube.parent().unwrap().to_path_buf(),
        etcd: bins.etcd.clone(),
        containerd: "/usr/bin/containerd".into(),
        ctr: "/usr/bin/ctr".into(),
        cni_bin: "/usr/lib/cni".into(),
        images: images.to_path_buf(),
        containerd_root: dir.join(name).join("var/lib/containerd"),
        cgroup_root: format!("/{}", ns.cgroup),
        restrict_oom_score_adj: true,
        shared_disk: true,
    }
}

fn node(role: KubeRole, ip: &str, pod_cidr: &str, join: Option<JoinCredentials>) -> KubernetesNode {
    let n = KubernetesNode {
        role,
        node_ip: ip.into(),
        api_server: (role == KubeRole::Worker).then(|| "https://10.231.0.1:6443".into()),
        join,
        ca: None,
        etcd_ca: None,
        service_account_key: None,
        cluster_cidr: "10.42.0.0/16".into(),
        service_cidr: "10.43.0.0/16".into(),
        cluster_domain: "cluster.local".into(),
        pod_cidr: pod_cidr.into(),
        max_pods: 110,
        labels: BTreeMap::from([("kiln.dev/test".into(), "yes".into())]),
        taints: vec![],
        system_reserved: BTreeMap::new(),
        kube_reserved: BTreeMap::new(),
        registry_mirrors: BTreeMap::new(),
    };
    let mut errs = ValidationErrors::default();
    n.validate_into("spec.kubernetes", &[], &mut errs);
    assert!(errs.0.is_empty(), "{errs:?}");
    n
}

/// `kubectl` as the admin, from inside node A's network namespace.
fn kubectl(
    a: &NodeNs,
    bins: &KubeBinaries,
    kubeconfig: &Path,
    args: &[&str],
    stdin: Option<&str>,
) -> String {
    a.netns
        .enter(|| {
            let mut child = Command::new(bins.kube.with_file_name("kubectl"))
                .arg(format!("--kubeconfig={}", kubeconfig.display()))
                .args(args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            if let Some(text) = stdin {
                use std::io::Write as _;
                child
                    .stdin
                    .take()
                    .unwrap()
                    .write_all(text.as_bytes())
                    .unwrap();
            }
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "kubectl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
        .unwrap()
}

fn wait_ready(a: &NodeNs, bins: &KubeBinaries, admin: &Path, object: &str) {
    kubectl(
        a,
        bins,
        admin,
        &["wait", "--for=condition=Ready", object, "--timeout=180s"],
        None,
    );
}

/// The node agent with its Kubernetes controller, in the node's network namespace.
fn start_agent(ns: &NodeNs, config: PathBuf, host: Host) -> TestAgent<KubernetesState> {
    let prefix = ns.prefix();
    TestAgent::start(config, Some(ns.netns.name()), move |trigger| {
        Box::new(
            KubernetesController::new(
                Box::new(move |_| host.clone()),
                Box::new(move |h| Box::new(Processes::new(h.path(paths::LOGS), prefix.clone()))),
                trigger,
            )
            .unwrap(),
        )
    })
}

/// Waits until the agent reports a state `done` accepts; a failed bring-up fails the test.
fn wait_for(
    agent: &TestAgent<KubernetesState>,
    t0: std::time::Instant,
    done: impl Fn(&KubernetesState) -> bool,
) -> Vec<KubernetesState> {
    agent.wait_for(
        t0,
        |k| {
            format!(
                "KubernetesReady={} {} {}",
                k.ready,
                k.reason,
                k.message.lines().next().unwrap_or_default()
            )
        },
        |k| {
            assert_ne!(k.reason, "BringupFailed", "{}", k.message);
            done(k)
        },
    )
}

/// A site's registry on node A's address, holding kiln's test image (pushed from node A's
/// containerd by `ctr`); killed with node A's network namespace.
fn site_mirror(a: &NodeNs, host_a: &Host, dir: &Path) -> Child {
    let config = dir.join("registry.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {MIRROR}\n",
            dir.join("registry").display()
        ),
    )
    .unwrap();
    common::require("docker-registry", "docker-registry");
    let registry = a
        .netns
        .enter(|| {
            Command::new("docker-registry")
                .arg("serve")
                .arg(&config)
                .stdout(Stdio::null())
                .spawn()
                .unwrap()
        })
        .unwrap();
    let pushed = format!("{MIRROR}/kiln/hello:1");
    let ctr = |args: &[&str]| {
        a.netns
            .enter(|| {
                Command::new(&host_a.ctr)
                    .arg("--address")
                    .arg(host_a.path(paths::CONTAINERD_SOCKET))
                    .args(["-n", "k8s.io"])
                    .args(args)
                    .output()
                    .unwrap()
            })
            .unwrap()
    };
    let out = ctr(&["images", "tag", "--force", CHECK_IMAGE, &pushed]);
    assert!(out.status.success(), "ctr tag: {out:?}");
    // The registry may still be starting.
    for attempt in 1.. {
        let out = ctr(&["images", "push", "--plain-http", &pushed]);
        if out.status.success() {
            break;
        }
        assert!(attempt < 30, "ctr push {pushed}: {out:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
    registry
}

/// `curl` of `url` from the node's network namespace, retrying for a while.
fn curl_from(ns: &NodeNs, url: &str) -> std::process::Output {
    ns.netns
        .enter(|| {
            Command::new("curl")
                .args([
                    "-fsS",
                    "--max-time",
                    "10",
                    "--retry",
                    "20",
                    "--retry-all-errors",
                    "--retry-delay",
                    "1",
                ])
                .arg(url)
                .output()
                .unwrap()
        })
        .unwrap()
}

fn token() -> String {
    let hex = format!("{:032x}", rand_u128());
    format!("{}.{}", &hex[..6], &hex[6..22])
}

fn rand_u128() -> u128 {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .unwrap();
    u128::from_le_bytes(b)
}

const HELLO: &str = r#"apiVersion: apps/v1
kind: Deployment
metadata: {name: hello, namespace: default}
spec:
  replicas: 1
  selector: {matchLabels: {app: hello}}
  template:
    metadata: {labels: {app: hello}}
    spec:
      nodeSelector: {kubernetes.io/hostname: kiln-a}
      containers:
      - name: hello
        image: kiln.local/hello:1
        imagePullPolicy: Never
        ports: [{containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: hello, namespace: default}
spec:
  selector: {app: hello}
  ports: [{port: 80, targetPort: 8080}]
"#;

#[test]
fn a_kiln_node_runs_a_cluster_and_a_worker_joins_with_its_token() {
    for (tool, package) in [
        ("containerd", "containerd"),
        ("runc", "runc"),
        ("catatonit", "catatonit"),
        ("iptables", "iptables"),
        ("conntrack", "conntrack"),
        ("unshare", "util-linux"),
    ] {
        common::require(tool, package);
    }
    assert!(
        Path::new("/usr/lib/cni/bridge").exists(),
        "/usr/lib/cni/bridge is missing: install the Debian package containernetworking-plugins"
    );
    // The same build `kiln build` puts into an image (a check when cached).
    let bins = ensure_binaries(&kiln_spec::paths::cache_dir()).unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::Builder::new()
        .prefix("kiln-k8s-")
        .tempdir()
        .unwrap();
    let images = dir.path().join("images");
    bundle(&images, &bins);

    let a = NodeNs::create("k8sa");
    let b = NodeNs::create("k8sb");
    a.netns.add_veth("kiln0a", &b.netns, "kiln0b").unwrap();
    a.netns.add_address("kiln0a", "10.231.0.1/24").unwrap();
    b.netns.add_address("kiln0b", "10.231.0.2/24").unwrap();
    for (ns, dev) in [(&a, "kiln0a"), (&b, "kiln0b")] {
        ns.netns
            .ip(&["route", "add", "default", "dev", dev])
            .unwrap();
    }

    // The first control plane. The steps print with their time since the start.
    let t0 = std::time::Instant::now();
    let join_token = token();
    let init = KubernetesNode {
        system_reserved: BTreeMap::from([("memory".into(), "256Mi".into())]),
        kube_reserved: BTreeMap::from([("memory".into(), "128Mi".into())]),
        ..node(
            KubeRole::Init,
            "10.231.0.1",
            "10.42.0.0/24",
            Some(JoinCredentials {
                token: join_token.clone(),
                ca_cert_hash: None,
            }),
        )
    };
    let host_a = host(dir.path(), "kiln-a", &a, &bins, &images);
    let config_a = dir.path().join("kiln-a.node.yaml");
    let node_config = NodeConfig {
        api_version: kiln_spec::API_VERSION.into(),
        kind: NodeConfig::KIND.into(),
        metadata: Default::default(),
        spec: NodeSpec {
            kubernetes: Some(init.clone()),
            ..NodeSpec::default()
        },
    };
    // JSON is YAML: the agent reads it as any node config.
    std::fs::write(&config_a, serde_json::to_string(&node_config).unwrap()).unwrap();
    let agent_a = start_agent(&a, config_a, host_a.clone());
    let seen = wait_for(&agent_a, t0, |k| k.ready);
    assert_eq!(
        seen.first().map(|k| k.reason.as_str()),
        Some("BringingUp"),
        "the agent reports the bring-up while it runs: {seen:?}"
    );
    let admin = host_a.path(paths::ADMIN_KUBECONFIG);
    let ca_pem = std::fs::read_to_string(host_a.path(&format!("{}/ca.crt", paths::PKI))).unwrap();
    let ca_cert_hash = kiln_cluster::pki::ca_cert_hash(&ca_pem).unwrap();
    // What a worker needs to join, as `kiln node status` shows it.
    let report = &seen.last().unwrap().report;
    assert_eq!(report.ca_cert_hash.as_deref(), Some(ca_cert_hash.as_str()));
    assert_eq!(report.role, KubeRole::Init);
    wait_ready(&a, &bins, &admin, "node/kiln-a");
    eprintln!("[{:5.1}s] node kiln-a Ready", t0.elapsed().as_secs_f64());
    // Pods get the node's memory less what the config reserves for the host and for
    // Kubernetes, less the kubelet's default eviction threshold (100Mi).
    let memory = kubectl(
        &a,
        &bins,
        &admin,
        &[
            "get",
            "node",
            "kiln-a",
            "-o",
            "jsonpath={.status.capacity.memory} {.status.allocatable.memory}",
        ],
        None,
    );
    let kib: Vec<u64> = memory
        .split_whitespace()
        .map(|q| q.strip_suffix("Ki").and_then(|n| n.parse().ok()))
        .collect::<Option<_>>()
        .unwrap_or_else(|| panic!("capacity and allocatable memory: {memory:?}"));
    assert_eq!(kib[0] - kib[1], (256 + 128 + 100) * 1024, "{memory}");

    // kiln's test image from the airgap bundle, served through its Service by kube-proxy.
    kubectl(&a, &bins, &admin, &["apply", "-f", "-"], Some(HELLO));
    kubectl(
        &a,
        &bins,
        &admin,
        &["rollout", "status", "deployment/hello", "--timeout=180s"],
        None,
    );
    let cluster_ip = kubectl(
        &a,
        &bins,
        &admin,
        &[
            "get",
            "service",
            "hello",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ],
        None,
    );
    let body = curl_from(&a, &format!("http://{cluster_ip}/"));
    assert_eq!(
        String::from_utf8_lossy(&body.stdout),
        CHECK_PAGE,
        "the Service at {cluster_ip} did not answer with the page: {}",
        String::from_utf8_lossy(&body.stderr)
    );

    // The cluster DNS from the bundle: a pod finds the Service by its name.
    kubectl(
        &a,
        &bins,
        &admin,
        &[
            "-n",
            "kube-system",
            "rollout",
            "status",
            "deployment/coredns",
            "--timeout=180s",
        ],
        None,
    );
    // A running pod of it: a pod the kubelet evicted stays behind as Failed.
    let pod = kubectl(
        &a,
        &bins,
        &admin,
        &[
            "get",
            "pods",
            "-l",
            "app=hello",
            "--field-selector=status.phase=Running",
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ],
        None,
    );
    let looked_up = kubectl(
        &a,
        &bins,
        &admin,
        &[
            "exec",
            &pod,
            "--",
            "/bin/busybox",
            "sh",
            "-c",
            // kube-proxy routes the DNS Service a moment after its pod is ready.
            "i=0; while [ $i -lt 30 ]; do \
             /bin/busybox nslookup hello.default.svc.cluster.local && exit 0; \
             i=$((i+1)); /bin/busybox sleep 1; done; exit 1",
        ],
        None,
    );
    assert!(
        looked_up
            .lines()
            .any(|l| l.starts_with("Address:") && l.trim_end().ends_with(&cluster_ip)),
        "the cluster DNS did not give hello's address {cluster_ip}:\n{looked_up}"
    );

    // Joining with a wrong token or a wrong CA pin stops before anything is written or runs.
    let host_b = host(dir.path(), "kiln-b", &b, &bins, &images);
    let worker = |token: &str, hash: &str| KubernetesNode {
        registry_mirrors: BTreeMap::from([(
            SITE_IMAGE.split('/').next().unwrap().to_string(),
            vec![format!("http://{MIRROR}")],
        )]),
        ..node(
            KubeRole::Worker,
            "10.231.0.2",
            "10.42.1.0/24",
            Some(JoinCredentials {
                token: token.into(),
                ca_cert_hash: Some(hash.into()),
            }),
        )
    };
    let mut sup_b = b.supervisor(host_b.path("var/log/kiln"));
    let wrong_token = token();
    let err = b
        .run(bring_up(
            &worker(&wrong_token, &ca_cert_hash),
            &host_b,
            &mut sup_b,
            &|_| {},
        ))
        .expect_err("a wrong token must be refused");
    assert!(
        matches!(
            err,
            BringupError::Join(JoinError::TokenRefused { status: 401, .. })
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("refused the bootstrap token"),
        "{err}"
    );
    let other_hash = format!("sha256:{}", "0".repeat(64));
    let err = b
        .run(bring_up(
            &worker(&join_token, &other_hash),
            &host_b,
            &mut sup_b,
            &|_| {},
        ))
        .expect_err("a wrong CA pin must be refused");
    assert!(
        matches!(err, BringupError::Join(JoinError::CaMismatch { .. })),
        "{err}"
    );
    assert!(
        !host_b.root.exists(),
        "a refused join wrote {}",
        host_b.root.display()
    );

    let mut registry = site_mirror(&a, &host_a, dir.path());

    // The worker joins with the token and the pin, and runs a pod of an image it pulls from
    // the site's registry through its mirror.
    b.run(bring_up(
        &worker(&join_token, &ca_cert_hash),
        &host_b,
        &mut sup_b,
        &|step| eprintln!("[{:5.1}s] kiln-b: {step}", t0.elapsed().as_secs_f64()),
    ))
    .unwrap_or_else(|e| panic!("joining the worker: {e}"));
    wait_ready(&a, &bins, &admin, "node/kiln-b");
    eprintln!("[{:5.1}s] node kiln-b Ready", t0.elapsed().as_secs_f64());
    // Bringing a running node up again (a retry, an agent restart) imports nothing again:
    // containerd holds the bundle's images already.
    let steps = std::sync::Mutex::new(Vec::new());
    b.run(bring_up(
        &worker(&join_token, &ca_cert_hash),
        &host_b,
        &mut sup_b,
        &|step| steps.lock().unwrap().push(step.to_string()),
    ))
    .unwrap_or_else(|e| panic!("bringing the running worker up again: {e}"));
    let steps = steps.into_inner().unwrap();
    assert!(
        steps.iter().any(|s| s == "starting the kubelet")
            && !steps.iter().any(|s| s.starts_with("importing")),
        "a second bring-up's steps: {steps:?}"
    );
    let csrs = kubectl(
        &a,
        &bins,
        &admin,
        &[
            "get",
            "csr",
            "-o",
            "jsonpath={range .items[*]}{.spec.username} {.status.conditions[0].type}{\"\\n\"}{end}",
        ],
        None,
    );
    assert!(
        csrs.lines()
            .any(|l| l.starts_with("system:bootstrap:") && l.ends_with(" Approved")),
        "the worker's certificate request was not approved automatically: {csrs}"
    );
    kubectl(
        &a,
        &bins,
        &admin,
        &[
            "run",
            "on-worker",
            "--image",
            SITE_IMAGE,
            "--image-pull-policy=Always",
            "--overrides",
            r#"{"spec":{"nodeName":"kiln-b"}}"#,
        ],
        None,
    );
    wait_ready(&a, &bins, &admin, "pod/on-worker");
    let pod_ip = kubectl(
        &a,
        &bins,
        &admin,
        &["get", "pod", "on-worker", "-o", "jsonpath={.status.podIP}"],
        None,
    );
    assert!(
        pod_ip.starts_with("10.42.1."),
        "the worker's pod has {pod_ip}, outside its podCidr"
    );
    let image_id = kubectl(
        &a,
        &bins,
        &admin,
        &[
            "get",
            "pod",
            "on-worker",
            "-o",
            "jsonpath={.status.containerStatuses[0].imageID}",
        ],
        None,
    );
    assert!(
        image_id.starts_with("registry.kiln.test/kiln/hello@sha256:"),
        "the worker's image was not pulled from the registry: {image_id}"
    );
    // Node A reaches the worker's pod directly: kiln-a's agent routes the pod network kiln-b
    // announced on its Node through kiln-b's address.
    let body = curl_from(&a, &format!("http://{pod_ip}:8080/"));
    assert_eq!(
        String::from_utf8_lossy(&body.stdout),
        CHECK_PAGE,
        "the worker's pod at {pod_ip} did not answer node A: {}\nnode A's routes: {}",
        String::from_utf8_lossy(&body.stderr),
        a.netns.ip(&["route"]).unwrap_or_default()
    );
    let _ = registry.kill();
    let _ = registry.wait();

    // A kubelet that stops is reported, with its log, and started again by the agent.
    let kubelet_config = host_a.path(paths::KUBELET_CONFIG).display().to_string();
    let killed = Command::new("pkill")
        .args(["-KILL", "-f", &kubelet_config])
        .status()
        .unwrap();
    assert!(killed.success(), "no kubelet of kiln-a to stop");
    wait_for(&agent_a, t0, |k| {
        k.reason == "ServiceStopped" && k.message.starts_with("kubelet exited")
    });
    wait_for(&agent_a, t0, |k| k.ready);
    wait_ready(&a, &bins, &admin, "node/kiln-a");
    // So are an API server and a kube-proxy that stop together: the bring-up's wait for the
    // API server holds only the API server to account, not kube-proxy, which a later step
    // starts again.
    for pattern in [
        format!("kube-apiserver .*{}", host_a.path(paths::PKI).display()),
        format!(
            "kube-proxy --config={}",
            host_a.path(paths::KUBE_PROXY_CONFIG).display()
        ),
    ] {
        let killed = Command::new("pkill")
            .args(["-KILL", "-f", "--", &pattern])
            .status()
            .unwrap();
        assert!(killed.success(), "nothing of kiln-a matched {pattern}");
    }
    wait_for(&agent_a, t0, |k| k.reason == "ServiceStopped");
    wait_for(&agent_a, t0, |k| k.ready);
    wait_ready(&a, &bins, &admin, "node/kiln-a");

    // A second control plane joins: its own etcd member, API server, controller-manager and
    // scheduler, with the keys every control plane shares, copied from kiln-a as an operator
    // without a fleet would (the fleet hands them out itself). Its own link to kiln-a.
    let c = NodeNs::create("k8sc");
    a.netns.add_veth("kiln1a", &c.netns, "kiln1c").unwrap();
    a.netns.add_address("kiln1a", "10.232.0.1/24").unwrap();
    c.netns.add_address("kiln1c", "10.232.0.3/24").unwrap();
    c.netns
        .ip(&["route", "add", "default", "dev", "kiln1c"])
        .unwrap();
    // kiln-a reaches kiln-c from its node address: etcd checks a peer's certificate against
    // the address it connects from.
    a.netns
        .ip(&[
            "route",
            "replace",
            "10.232.0.0/24",
            "dev",
            "kiln1a",
            "src",
            "10.231.0.1",
        ])
        .unwrap();
    let pki_a =
        |f: &str| std::fs::read_to_string(host_a.path(&format!("{}/{f}", paths::PKI))).unwrap();
    let keys = |stem: &str| ClusterCa {
        cert: pki_a(&format!("{stem}.crt")),
        key: pki_a(&format!("{stem}.key")),
    };
    let second = KubernetesNode {
        role: KubeRole::ControlPlane,
        ca: Some(keys("ca")),
        etcd_ca: Some(keys("etcd/ca")),
        service_account_key: Some(SecretPem(pki_a("sa.key"))),
        ..node(
            KubeRole::Worker,
            "10.232.0.3",
            "10.42.2.0/24",
            Some(JoinCredentials {
                token: join_token.clone(),
                ca_cert_hash: Some(ca_cert_hash.clone()),
            }),
        )
    };
    let mut errs = ValidationErrors::default();
    second.validate_into("spec.kubernetes", &[], &mut errs);
    assert!(errs.0.is_empty(), "{errs:?}");
    let host_c = host(dir.path(), "kiln-c", &c, &bins, &images);
    let mut sup_c = c.supervisor(host_c.path("var/log/kiln"));
    let joined = c.run(bring_up(&second, &host_c, &mut sup_c, &|step| {
        eprintln!("[{:5.1}s] kiln-c: {step}", t0.elapsed().as_secs_f64())
    }));
    if let Err(e) = joined {
        panic!(
            "joining the second control plane: {e}\nthe end of its etcd's log:\n{}",
            sup_c.log_tail("etcd")
        );
    }
    // Its own API server serves the cluster's one state: every node, itself Ready.
    let admin_c = host_c.path(paths::ADMIN_KUBECONFIG);
    wait_ready(&c, &bins, &admin_c, "node/kiln-c");
    eprintln!("[{:5.1}s] node kiln-c Ready", t0.elapsed().as_secs_f64());
    assert!(
        std::fs::read_to_string(&admin_c)
            .unwrap()
            .contains("server: https://10.232.0.3:6443"),
        "kiln-c's admin kubeconfig is not for its own API server"
    );
    let names = kubectl(
        &c,
        &bins,
        &admin_c,
        &["get", "nodes", "-o", "jsonpath={.items[*].metadata.name}"],
        None,
    );
    assert_eq!(names, "kiln-a kiln-b kiln-c");
    // etcd has both members, started and named.
    let pki_c = |f: &str| host_c.path(&format!("{}/{f}", paths::PKI));
    let listed = c
        .netns
        .enter(|| {
            Command::new("curl")
                .args(["-fsS", "--max-time", "10", "-X", "POST", "-d", "{}"])
                .arg("--cacert")
                .arg(pki_c("etcd/ca.crt"))
                .arg("--cert")
                .arg(pki_c("apiserver-etcd-client.crt"))
                .arg("--key")
                .arg(pki_c("apiserver-etcd-client.key"))
                .arg("https://127.0.0.1:2379/v3/cluster/member/list")
                .output()
                .unwrap()
        })
        .unwrap();
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let mut members: Vec<&str> = listed["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap_or_default())
        .collect();
    members.sort();
    assert_eq!(members, ["kiln-a", "kiln-c"], "{listed:#}");

    drop(sup_c);
    drop(sup_b);
    drop(agent_a);
}
