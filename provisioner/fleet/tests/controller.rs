//! The provisioner as a Kubernetes controller, against a real kube-apiserver + etcd: replicas
//! share a rollout through a Lease, its state lives in the Machines' status, and a replica
//! that dies mid-rollout is replaced without any machine being powered or installed twice.
//!
//! The machines are `SimulatedMachines`, an in-process simulator standing in for BMCs, netboot
//! and installers (not for the API server): it answers the controller's BMC actions, boots the
//! powered machines into a simulated install that phones home through the rollout's own
//! enrolment (tokens checked as the netboot HTTP server checks them), and counts every
//! power-on and install per machine.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kiln_cluster::testing::TestCluster;
use kiln_fleet::controller::{self, ClientLimits, ReplicaConfig, ReplicaEnd};
use kiln_fleet::crd::{self, Machine, MachineSpec, RolloutResource, RolloutSpec};
use kiln_fleet::rollout::{Actuator, Rollout, RolloutOptions, Shared, Target};
use kiln_fleet::stage::{BmcAction, BmcOutcome, Limits, Stage};
use kiln_fleet::store::Store;
use kiln_netboot::enrol::Enrolment;
use kiln_netboot::server::CancellationToken;
use kiln_spec::Inventory;
use kiln_spec::enrol::{Phase, Report};
use kiln_spec::inventory::NodeRole;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};

const IMAGE: &str = "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a";

#[derive(Debug, Default, Clone, Copy)]
struct SimMachine {
    on: bool,
    power_ons: u32,
    installs: u32,
}

/// The in-process stand-in for the machines (see the module comment).
#[derive(Debug)]
struct SimulatedMachines {
    machines: Mutex<HashMap<String, SimMachine>>,
    /// The replica whose netboot services the machines reach now.
    leader: RwLock<Option<Arc<Shared>>>,
    runtime: tokio::runtime::Handle,
    /// One BMC exchange, one boot step.
    step: Duration,
}

impl SimulatedMachines {
    fn new(names: &[String], runtime: tokio::runtime::Handle, step: Duration) -> Arc<Self> {
        Arc::new(SimulatedMachines {
            machines: Mutex::new(
                names
                    .iter()
                    .map(|n| (n.clone(), SimMachine::default()))
                    .collect(),
            ),
            leader: RwLock::default(),
            runtime,
            step,
        })
    }

    fn counts(&self) -> HashMap<String, SimMachine> {
        self.machines.lock().unwrap().clone()
    }

    /// Powers the machine on; it then netboots and installs.
    fn power_on(self: &Arc<Self>, node: &str) {
        {
            let mut m = self.machines.lock().unwrap();
            let m = m.get_mut(node).expect("simulated machine");
            m.on = true;
            m.power_ons += 1;
        }
        let sim = self.clone();
        let node = node.to_string();
        self.runtime.spawn(async move { sim.install(&node).await });
    }

    /// Asks whoever leads now, as a request to its netboot service: the answer is waited for
    /// as long as that replica still leads (the API server may be slow), and given up when
    /// it is killed — a killed replica's store waits forever on its dead runtime — so the
    /// machine asks the next leader.
    async fn ask<T: Send + 'static>(
        &self,
        question: impl FnOnce(&Shared) -> Option<T> + Send + 'static,
    ) -> Option<T> {
        let leader = self.leader.read().unwrap().clone()?;
        let asked = leader.clone();
        let mut answer = tokio::task::spawn_blocking(move || question(&asked));
        loop {
            tokio::select! {
                answered = &mut answer => return answered.ok()?,
                () = tokio::time::sleep(self.step) => {
                    let now = self.leader.read().unwrap().clone();
                    if !now.is_some_and(|l| Arc::ptr_eq(&l, &leader)) {
                        return None;
                    }
                }
            }
        }
    }

    /// Fetches a boot script (and its token) from whoever leads, then reports each phase to
    /// whoever leads when it is sent, as a real installer reaches the netboot service.
    async fn install(self: Arc<Self>, node: &str) {
        tokio::time::sleep(self.step).await;
        let token = loop {
            let name = node.to_string();
            if let Some(t) = self.ask(move |l| l.install_token(&name)).await {
                break t;
            }
            tokio::time::sleep(self.step).await;
        };
        self.machines
            .lock()
            .unwrap()
            .get_mut(node)
            .unwrap()
            .installs += 1;
        for phase in [
            Phase::InstallerStarted,
            Phase::Installing,
            Phase::Installed,
            Phase::AgentReady,
        ] {
            tokio::time::sleep(self.step).await;
            let mut report = Report::new(phase, None);
            report.image_sha256 = Some(IMAGE.into());
            if phase == Phase::AgentReady {
                report.slot = Some("A".into());
            }
            loop {
                let (name, token, report) = (node.to_string(), token.clone(), report.clone());
                let sent = self.ask(move |l| {
                    l.verify(&name, Some(&token)).ok()?;
                    l.report(&name, &[0x52, 0x54, 0, 0, 0, 1], &report);
                    Some(())
                });
                if sent.await.is_some() {
                    break;
                }
                tokio::time::sleep(self.step).await;
            }
        }
    }
}

/// A replica's BMC driver for the simulated machines; its answers go to the replica that
/// asked, and die with it.
struct SimulatedBmcs {
    sim: Arc<SimulatedMachines>,
    shared: Arc<Shared>,
    runtime: tokio::runtime::Handle,
}

impl Actuator for SimulatedBmcs {
    fn start(&self, node: &str, action: BmcAction) {
        let sim = self.sim.clone();
        let shared = self.shared.clone();
        let node = node.to_string();
        self.runtime.spawn(async move {
            tokio::time::sleep(sim.step).await;
            let on = sim.machines.lock().unwrap()[&node].on;
            match action {
                BmcAction::NetbootOnce => sim.power_on(&node),
                BmcAction::NetbootIfOff if !on => sim.power_on(&node),
                BmcAction::NetbootIfOff | BmcAction::BootFromDisk => {}
            }
            shared.bmc_result(&node, action, BmcOutcome::Done { note: None });
        });
    }
}

fn names(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("node-{i:05}")).collect()
}

/// The CRDs, a Machine for each of `nodes` and a Rollout of them in a fresh namespace.
async fn fleet(client: &Client, namespace: &str, nodes: &[String], parallelism: u32) {
    let machines = nodes
        .iter()
        .enumerate()
        .map(|(i, name)| Machine {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.into()),
                ..ObjectMeta::default()
            },
            spec: MachineSpec {
                role: NodeRole::Worker,
                boot_macs: vec![format!("52:54:01:00:{:02x}:{:02x}", i / 256, i % 256)],
                boot_address: None,
                bmc: None,
                overrides: None,
            },
            status: None,
        })
        .collect();
    let import = crd::Import {
        machines,
        secrets: Vec::new(),
    };
    crd::import(client, &import, namespace, std::path::Path::new("."))
        .await
        .expect("importing the machines");
    let apply = PatchParams::apply("kiln-test").force();
    let rollout = RolloutResource::new(
        "rack",
        RolloutSpec {
            selector: None,
            artifacts: "/srv/kiln/build".into(),
            image_sha256: IMAGE.into(),
            parallelism,
            max_unavailable: None,
        },
    );
    Api::<RolloutResource>::namespaced(client.clone(), namespace)
        .patch("rack", &apply, &Patch::Apply(&rollout))
        .await
        .expect("creating the Rollout");
}

fn config(namespace: &str, identity: &str, lease: Duration) -> ReplicaConfig {
    ReplicaConfig {
        namespace: namespace.into(),
        rollout: "rack".into(),
        identity: identity.into(),
        lease,
        client: ClientLimits::default(),
        resync: Duration::from_millis(200),
        limits: Limits::default(),
        trace_file: std::env::temp_dir().join("kiln-controller-test-trace.jsonl"),
    }
}

/// A replica on a runtime of its own (so it can die alone), its machines answered by `sim`.
struct Replica {
    runtime: Option<tokio::runtime::Runtime>,
    end: std::sync::mpsc::Receiver<Result<ReplicaEnd, String>>,
    shared: Arc<Mutex<Option<Arc<Shared>>>>,
    /// The Machines as netboot would serve them now.
    served: Arc<Mutex<Option<tokio::sync::watch::Receiver<Inventory>>>>,
    sim: Arc<SimulatedMachines>,
}

impl Replica {
    fn start(cluster: &TestCluster, config: ReplicaConfig, sim: Arc<SimulatedMachines>) -> Replica {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (tx, end) = std::sync::mpsc::channel();
        let shared = Arc::new(Mutex::new(None));
        let kubeconfig_client = runtime.block_on(cluster.client());
        let seen = shared.clone();
        let served = Arc::new(Mutex::new(None));
        let netboot = served.clone();
        let kept = sim.clone();
        runtime.spawn(async move {
            let handle = tokio::runtime::Handle::current();
            let result = controller::run_replica(
                kubeconfig_client,
                config,
                move |s: Arc<Shared>, _: &[Target]| {
                    *seen.lock().unwrap() = Some(s.clone());
                    *sim.leader.write().unwrap() = Some(s.clone());
                    Arc::new(SimulatedBmcs {
                        sim,
                        shared: s,
                        runtime: handle,
                    })
                },
                // The simulated machines reach the leader without netboot services; what
                // those would serve is kept to look at.
                move |_, inventories| {
                    *netboot.lock().unwrap() = Some(inventories);
                    async { Ok(()) }
                },
                CancellationToken::new(),
            )
            .await;
            let _ = tx.send(result.map_err(|e| e.to_string()));
        });
        Replica {
            runtime: Some(runtime),
            end,
            shared,
            served,
            sim: kept,
        }
    }

    fn leads(&self) -> bool {
        self.shared.lock().unwrap().is_some()
    }

    /// Dies as a killed process does: no lease released, nothing more sent, its netboot
    /// gone.
    fn kill(&mut self) {
        let mine = self.shared.lock().unwrap().clone();
        let mut leader = self.sim.leader.write().unwrap();
        if leader
            .as_ref()
            .zip(mine)
            .is_some_and(|(l, m)| Arc::ptr_eq(l, &m))
        {
            *leader = None;
        }
        drop(leader);
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }

    fn wait(&self, limit: Duration) -> ReplicaEnd {
        match self.end.recv_timeout(limit) {
            Ok(end) => end.unwrap_or_else(|e| panic!("the replica failed: {e}")),
            Err(_) => {
                // What it still waits on, as it sees it.
                let unfinished: Vec<(String, Stage)> = self
                    .shared
                    .lock()
                    .unwrap()
                    .as_ref()
                    .and_then(|s| s.snapshot().ok())
                    .map(|snapshot| snapshot.nodes)
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|(_, p)| !p.stage.is_done())
                    .map(|(node, p)| (node, p.stage))
                    .collect();
                panic!("the replica did not finish in {limit:?}; not done yet: {unfinished:?}")
            }
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

fn machine_stages(
    rt: &tokio::runtime::Runtime,
    client: &Client,
    ns: &str,
) -> BTreeMap<String, Stage> {
    let machines: Api<Machine> = Api::namespaced(client.clone(), ns);
    rt.block_on(machines.list(&ListParams::default()))
        .unwrap()
        .items
        .into_iter()
        .map(|m| {
            let stage = m
                .status
                .as_ref()
                .map_or(Stage::Pending, |s| s.progress.stage);
            (m.name_any(), stage)
        })
        .collect()
}

#[test]
fn a_second_replica_takes_over_a_rollout_whose_leader_died_without_powering_anything_twice() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("kiln=debug,warn")
        .with_test_writer()
        .try_init();
    let cluster = TestCluster::shared();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt.block_on(cluster.client());
    let ns = "kiln-takeover";
    let nodes = names(40);
    rt.block_on(fleet(&client, ns, &nodes, 8));
    let sim = SimulatedMachines::new(&nodes, rt.handle().clone(), Duration::from_millis(150));
    let lease = Duration::from_secs(6);
    let mut first = Replica::start(cluster, config(ns, "replica-a", lease), sim.clone());
    // A hang guard only: a host busy with other tests makes the API server slow.
    let deadline = Instant::now() + Duration::from_secs(300);
    while !first.leads() {
        assert!(Instant::now() < deadline, "replica-a never led");
        std::thread::sleep(Duration::from_millis(50));
    }
    let second = Replica::start(cluster, config(ns, "replica-b", lease), sim.clone());
    // Mid-rollout: some machines ready, most not.
    loop {
        let stages = machine_stages(&rt, &client, ns);
        let ready = stages.values().filter(|s| **s == Stage::Ready).count();
        if ready >= 5 {
            break;
        }
        if let Ok(end) = first.end.try_recv() {
            panic!("replica-a ended early: {end:?}");
        }
        assert!(Instant::now() < deadline, "no progress: {stages:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!second.leads(), "two replicas led at once");
    let killed = Instant::now();
    first.kill();
    let end = second.wait(Duration::from_secs(300));
    let took_over = second.shared.lock().unwrap().is_some();
    assert!(took_over, "replica-b never led");
    let ReplicaEnd::Finished(results) = end else {
        panic!("replica-b ended with {end:?}");
    };
    eprintln!(
        "replica-b finished the rollout {:.1} s after replica-a died",
        killed.elapsed().as_secs_f64()
    );
    assert_eq!(results.len(), nodes.len());
    for (node, p) in &results {
        assert_eq!(p.stage, Stage::Ready, "{node}: {p:?}");
    }
    for (node, m) in sim.counts() {
        assert_eq!(
            (m.power_ons, m.installs),
            (1, 1),
            "{node} was powered on {} and installed {} times",
            m.power_ons,
            m.installs
        );
    }
    // What an operator sees: every Machine ready in the cluster, and its story in Events.
    let stages = machine_stages(&rt, &client, ns);
    assert!(stages.values().all(|s| *s == Stage::Ready), "{stages:?}");
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    let story: Vec<String> = rt
        .block_on(events.list(&ListParams::default()))
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("node-00040"))
        .filter_map(|e| e.reason)
        .collect();
    // Every stage of the way to ready has its Event.
    for reason in Stage::ALL
        .into_iter()
        .filter(|s| s.is_active() || *s == Stage::Ready)
        .map(controller::event_reason)
    {
        assert!(story.contains(&reason), "no {reason} event: {story:?}");
    }
    let rollout = rt
        .block_on(Api::<RolloutResource>::namespaced(client.clone(), ns).get("rack"))
        .unwrap();
    let status = rollout.status.expect("the Rollout's status");
    assert_eq!((status.total, status.ready, status.failed), (40, 40, 0));
}

#[test]
fn replicas_share_the_fleets_credentials_through_a_secret() {
    use kiln_fleet::cluster::{FleetSecrets, SECRETS_DIR};
    use kiln_fleet::credentials::{self, CredentialsError, Sharing};
    use std::os::unix::fs::PermissionsExt;
    let cluster = TestCluster::shared();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt.block_on(cluster.client());
    let ns = "kiln-credentials";
    rt.block_on(fleet(&client, ns, &names(1), 1));
    let files = |dir: &std::path::Path| -> BTreeMap<String, Vec<u8>> {
        std::fs::read_dir(dir.join(SECRETS_DIR))
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let mode = e.metadata().unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{}", e.path().display());
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect()
    };
    let (first, second, stranger) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let share = |dir: &std::path::Path| rt.block_on(credentials::share(&client, ns, dir));
    // The first replica to lead makes them and puts them in the cluster.
    assert_eq!(share(first.path()).unwrap(), Sharing::ToCluster);
    let made = files(first.path());
    assert!(made.contains_key("kubernetes-ca.key") && made.contains_key("bootstrap-token"));
    // Another replica, with an empty state directory, gets the same ones.
    assert_eq!(share(second.path()).unwrap(), Sharing::FromCluster);
    assert_eq!(files(second.path()), made);
    assert_eq!(share(first.path()).unwrap(), Sharing::FromCluster);
    // A replica holding another fleet's credentials is refused, its own left as they were.
    FleetSecrets::load_or_create(stranger.path()).unwrap();
    let own = files(stranger.path());
    match share(stranger.path()) {
        Err(e @ CredentialsError::Differ { .. }) => {
            let message = e.to_string();
            assert!(
                message.contains(credentials::CREDENTIALS_SECRET),
                "{message}"
            );
        }
        other => panic!("another fleet's credentials were taken: {other:?}"),
    }
    assert_eq!(files(stranger.path()), own);
}

/// The netboot MACs of each Machine the leader would serve now.
fn served_macs(replica: &Replica) -> BTreeMap<String, Vec<String>> {
    let served = replica.served.lock().unwrap();
    let inventory = served.as_ref().expect("serving").borrow();
    inventory
        .spec
        .nodes
        .iter()
        .map(|n| (n.name.clone(), n.boot_macs.clone()))
        .collect()
}

#[test]
fn machines_deleted_or_edited_mid_rollout_are_followed() {
    let cluster = TestCluster::shared();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt.block_on(cluster.client());
    let ns = "kiln-follow";
    let nodes = names(8);
    rt.block_on(fleet(&client, ns, &nodes, 2));
    let sim = SimulatedMachines::new(&nodes, rt.handle().clone(), Duration::from_millis(300));
    let replica = Replica::start(
        cluster,
        config(ns, "replica-a", Duration::from_secs(4)),
        sim.clone(),
    );
    let machines: Api<Machine> = Api::namespaced(client.clone(), ns);
    let deadline = Instant::now() + Duration::from_secs(120);
    // node-00001 installing, node-00008 still waiting its turn.
    loop {
        let stages = machine_stages(&rt, &client, ns);
        if stages.get("node-00001").is_some_and(|s| s.is_active()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node-00001 never started: {stages:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let held = rt.block_on(machines.get("node-00008")).unwrap();
    assert!(
        held.finalizers()
            .iter()
            .any(|f| f == kiln_fleet::follow::FINALIZER),
        "a driven Machine without the rollout's finalizer: {:?}",
        held.finalizers()
    );
    for gone in ["node-00001", "node-00008"] {
        rt.block_on(machines.delete(gone, &Default::default()))
            .unwrap();
    }
    let new_mac = "52:54:01:ff:00:07";
    rt.block_on(machines.patch(
        "node-00007",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"bootMACs": [new_mac]}})),
    ))
    .unwrap();
    // Netboot follows: the deleted ones are no longer served, the edited MAC is.
    loop {
        let served = served_macs(&replica);
        if !served.contains_key("node-00001")
            && !served.contains_key("node-00008")
            && served.get("node-00007") == Some(&vec![new_mac.to_string()])
        {
            break;
        }
        assert!(Instant::now() < deadline, "netboot still serves {served:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let ReplicaEnd::Finished(results) = replica.wait(Duration::from_secs(120)) else {
        panic!("the rollout did not finish");
    };
    let results: BTreeMap<String, _> = results.into_iter().collect();
    for gone in ["node-00001", "node-00008"] {
        let p = &results[gone];
        assert_eq!(p.stage, Stage::Failed, "{gone}: {p:?}");
        let reason = &p.failure.as_ref().unwrap().reason;
        assert!(reason.contains("deleted"), "{gone}: {reason}");
        // Let go of: the delete went through.
        assert!(
            rt.block_on(machines.get_opt(gone)).unwrap().is_none(),
            "{gone} is still there"
        );
    }
    assert_eq!(
        sim.counts()["node-00008"].power_ons,
        0,
        "a deleted Machine was powered on"
    );
    for node in nodes
        .iter()
        .filter(|n| !["node-00001", "node-00008"].contains(&n.as_str()))
    {
        assert_eq!(
            results[node].stage,
            Stage::Ready,
            "{node}: {:?}",
            results[node]
        );
        let m = rt.block_on(machines.get(node)).unwrap();
        assert!(
            m.finalizers().is_empty(),
            "{node} still held after the rollout: {:?}",
            m.finalizers()
        );
    }
}

#[test]
fn a_rollout_of_many_simulated_machines_through_the_api_server_reports_its_cost() {
    // A thousand machines keep the suite's share of CI small; the README's measurement names
    // its own scale (5,000) through the variable.
    let count: usize = std::env::var("KILN_CONTROLLER_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let cluster = TestCluster::shared();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt.block_on(cluster.client());
    let ns = "kiln-scale";
    let nodes = names(count);
    rt.block_on(fleet(&client, ns, &nodes, 1000));
    let sim = SimulatedMachines::new(&nodes, rt.handle().clone(), Duration::from_millis(20));
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let replica = Replica::start(
        cluster,
        config(ns, "replica-a", Duration::from_secs(15)),
        sim.clone(),
    );
    let end = replica.wait(Duration::from_secs(1800));
    let wall = started.elapsed();
    let ReplicaEnd::Finished(results) = end else {
        panic!("ended with {end:?}");
    };
    assert!(results.iter().all(|(_, p)| p.stage == Stage::Ready));
    assert!(
        sim.counts()
            .values()
            .all(|m| m.power_ons == 1 && m.installs == 1)
    );
    let shared = replica.shared.lock().unwrap().clone().unwrap();
    report(
        "kube store",
        count,
        wall,
        &shared,
        cpu_seconds() - cpu_before,
    );
    let stages = machine_stages(&rt, &client, ns);
    assert_eq!(stages.len(), count);
    assert!(stages.values().all(|s| *s == Stage::Ready));

    // The same simulated machines on the embedded store, for comparison.
    let dir = tempfile::tempdir().unwrap();
    let sim = SimulatedMachines::new(&nodes, rt.handle().clone(), Duration::from_millis(20));
    let targets: Vec<Target> = nodes
        .iter()
        .map(|n| Target {
            name: n.clone(),
            role: NodeRole::Worker,
            macs: Vec::new(),
            bmc: None,
        })
        .collect();
    let opts = RolloutOptions {
        limits: Limits {
            parallel: 1000,
            netboot_parallel: 1000,
            ..Limits::default()
        },
        image_sha256: IMAGE.into(),
        events: None,
        trace_file: dir.path().join("trace.jsonl"),
        reinstall: false,
        metrics: Arc::default(),
    };
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let store = Box::new(Store::open(dir.path()).unwrap());
    let handle = rt.handle().clone();
    let embedded = Rollout::new(&targets, &opts, store, None, |s| {
        *sim.leader.write().unwrap() = Some(s.clone());
        Arc::new(SimulatedBmcs {
            sim: sim.clone(),
            shared: s,
            runtime: handle,
        })
    })
    .unwrap();
    let shared = embedded.shared.clone();
    let results = embedded.run(Duration::from_millis(200));
    assert!(results.iter().all(|(_, p)| p.stage == Stage::Ready));
    assert!(
        sim.counts()
            .values()
            .all(|m| m.power_ons == 1 && m.installs == 1)
    );
    report(
        "embedded store",
        count,
        started.elapsed(),
        &shared,
        cpu_seconds() - cpu_before,
    );
}

/// The figures of one rollout, on stderr (the closing note quotes them).
fn report(store: &str, count: usize, wall: Duration, shared: &Shared, cpu: f64) {
    let q = shared
        .metrics
        .lag_quantiles(&[0.5, 0.95, 0.99])
        .expect("lag samples");
    eprintln!(
        "{store}: {count} machines ready in {:.1} s; {:.1} API requests per machine; \
         event-to-commit p50 {:?} p95 {:?} p99 {:?}; test process CPU {cpu:.1} s, \
         peak RSS so far {} MiB",
        wall.as_secs_f64(),
        shared.metrics.api_requests() as f64 / count as f64,
        q[0],
        q[1],
        q[2],
        peak_rss_mib(),
    );
}

/// User + system CPU of this process (from /proc; USER_HZ is 100 on Linux).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are the 14th and 15th fields; the 3rd is the first after the name.
    (ticks(11) + ticks(12)) / 100.0
}

fn peak_rss_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024)
}
