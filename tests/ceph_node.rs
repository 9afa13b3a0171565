//! Host tier of the native Ceph bootstrap: the node agent's config and Ceph controllers make a
//! node the first monitor of a real Ceph cluster from Debian's packages, in a network
//! namespace on this machine, with the node's Ceph directories private to a mount namespace
//! and its data disks loop devices over sparse files. One cluster serves every assertion:
//!
//! - the agent brings up a monitor, a manager and an OSD on each blank data disk, and the
//!   cluster reaches HEALTH_OK with every placement group active+clean;
//! - a data disk holding a file system is left untouched and reported with its reason;
//! - an RBD image round-trips;
//! - an OSD killed during RBD writes: the writes finish, the agent reports the daemon and
//!   starts it again;
//! - a second bootstrap (the agent restarted) keeps the fsid, the OSDs and the pools;
//! - maintenance against a real API server asks the real Ceph: refused while the node's OSDs
//!   cannot stop; with the operator's consent it live-migrates the node's VM — a real guest
//!   booted from RBD, moved by QEMU from one hypervisor process to another while it writes a
//!   log line each second onto its RBD disk — and sets `noout` on the OSDs; the log has no
//!   gap; exit clears `noout`; Ceph refuses to stop an OSD holding a pool of one copy.
//!
//! A second cluster spans three nodes, as a fleet makes it: with the node configs the fleet
//! derives from an inventory (its fsid and keys, each node's role), the first monitor makes the cluster, a second monitor joins its quorum
//! and runs a standby manager, an OSD-only node adds its disk; each node's OSD lands under its
//! own CRUSH host, and the pool's three copies go to the three hosts.
//!
//! The guest is Debian's cloud kernel (`scripts/guest-kernel.sh` caches it) with a busybox
//! initramfs. KubeVirt does not run here: a stand-in controller plays its part in the API
//! server and hands each migration to real QEMU.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_agent::ceph::{CephController, CephState};
use kiln_cluster::ceph::bootstrap::CephHost;
use kiln_cluster::ceph::{CephAdmin, CephCli};
use kiln_cluster::maintenance::{self, EnterOptions};
use kiln_cluster::node::bringup::Processes;
use kiln_cluster::testing::{
    TestCluster, install_kubevirt_fixture_crds, standin_kubelet, standin_virt_controller_with,
    workload,
};
use kiln_lab::netns::Netns;
use kiln_lab::qemu::{Accel, DirectBoot, Vm, VmBuilder};
use kiln_spec::ceph::CephRole;

mod common;

use common::TestAgent;

const NODE: &str = "kiln-ceph";
/// Ceph's directories, private to the node's mount namespace.
const CEPH_DIRS: [&str; 4] = ["etc/ceph", "var/lib/ceph", "run/ceph", "var/log/ceph"];

/// The node: a network namespace, and a process holding a mount namespace in which the
/// node's root's Ceph directories are mounted over the real ones (commands and daemons find
/// them at their usual paths; the agent writes them below the root).
struct CephNs {
    netns: Arc<Netns>,
    holder: Child,
    root: tempfile::TempDir,
    name: String,
}

impl CephNs {
    fn create() -> CephNs {
        CephNs::beside(Arc::new(Netns::create("kceph").unwrap()), NODE)
    }

    /// Node `name` in network namespace `netns`, which other nodes may share.
    fn beside(netns: Arc<Netns>, name: &str) -> CephNs {
        let root = tempfile::tempdir().unwrap();
        // The node's files on a file system of its own: a monitor warns (MON_DISK_LOW) when
        // its store's file system has under 30 % free, which on a shared build host tells
        // nothing about the node and would keep it from ever being healthy.
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=2g,mode=0700", "kiln-ceph-node"])
            .arg(root.path()));
        let mut mounts = String::new();
        for d in CEPH_DIRS {
            std::fs::create_dir_all(root.path().join(d)).unwrap();
            std::fs::create_dir_all(Path::new("/").join(d)).unwrap();
            mounts.push_str(&format!(
                "mount --bind {} /{d} && ",
                root.path().join(d).display()
            ));
        }
        let holder = common::mount_namespace(&netns, &mounts);
        let ns = CephNs {
            netns,
            holder,
            root,
            name: name.into(),
        };
        // The holder has made its mounts once the node's view shows the root's files.
        std::fs::write(ns.root.path().join("etc/ceph/.kiln-test"), "").unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while ns.sh("test -e /etc/ceph/.kiln-test").is_err() {
            assert!(Instant::now() < deadline, "the node's mounts did not come");
            std::thread::sleep(Duration::from_millis(50));
        }
        ns
    }

    /// `nsenter` into the node's mount and network namespaces.
    fn prefix(&self) -> Vec<String> {
        let pid = self.holder.id().to_string();
        ["nsenter", "-t", &pid, "-m", "-n", "--"]
            .map(String::from)
            .to_vec()
    }

    fn host(&self) -> CephHost {
        CephHost {
            root: self.root.path().to_path_buf(),
            prefix: self.prefix(),
            node_name: self.name.clone(),
            user: Some("ceph".into()),
            shared_disk: true,
        }
    }

    /// A shell command on the node; its output, or its error output.
    fn sh(&self, script: &str) -> Result<String, String> {
        let argv = self.prefix();
        let out = Command::new(&argv[0])
            .args(&argv[1..])
            .args(["sh", "-c", script])
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "`{script}`: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }
}

impl Drop for CephNs {
    fn drop(&mut self) {
        if let Ok(pids) =
            kiln_lab::netns::run(Command::new("ip").args(["netns", "pids", self.netns.name()]))
        {
            for pid in pids.split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        let _ = self.holder.kill();
        let _ = self.holder.wait();
        // Lazily: a daemon killed just now may still hold a file open.
        let _ = Command::new("umount")
            .arg("--lazy")
            .arg(self.root.path())
            .status();
    }
}

/// Loop devices over sparse files; detached when dropped.
struct Disks {
    devices: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Disks {
    /// `blank` disks of 4 GiB and one of 256 MiB holding an ext4 file system.
    fn create(blank: usize) -> Disks {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let mut devices = Vec::new();
        for i in 0..=blank {
            let file = dir.path().join(format!("disk{i}.img"));
            let f = std::fs::File::create(&file).unwrap();
            if i < blank {
                f.set_len(4 << 30).unwrap();
            } else {
                f.set_len(256 << 20).unwrap();
                run(Command::new("mkfs.ext4").arg("-q").arg(&file));
            }
            devices.push(
                run(Command::new("losetup").args(["-f", "--show"]).arg(&file))
                    .trim()
                    .to_string(),
            );
        }
        Disks { devices, _dir: dir }
    }
}

impl Disks {
    /// A blank disk the kernel will not write: blank to kiln's look, so `ceph-volume` is the
    /// one to fail on it.
    fn add_read_only(&mut self) -> String {
        let file = self._dir.path().join("read-only.img");
        std::fs::File::create(&file)
            .unwrap()
            .set_len(4 << 30)
            .unwrap();
        let device = run(Command::new("losetup")
            .args(["-r", "-f", "--show"])
            .arg(&file))
        .trim()
        .to_string();
        self.devices.push(device.clone());
        device
    }
}

impl Drop for Disks {
    fn drop(&mut self) {
        for d in &self.devices {
            let _ = Command::new("losetup").args(["-d", d]).status();
        }
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The node agent with its Ceph controller.
fn start_agent(ns: &CephNs, config: PathBuf) -> TestAgent<CephState> {
    let host = ns.host();
    let logs = ns.root.path().join("var/log/kiln");
    TestAgent::start(config, None, move |trigger| {
        Box::new(CephController::new(
            Box::new(move |_| host.clone()),
            Box::new(move |h: &CephHost| Box::new(Processes::new(logs.clone(), h.prefix.clone()))),
            trigger,
        ))
    })
}

/// Waits until the agent reports a state `done` accepts; returns that one.
fn wait_for(
    agent: &TestAgent<CephState>,
    t0: Instant,
    done: impl Fn(&CephState) -> bool,
) -> CephState {
    let line = |c: &CephState| {
        format!(
            "CephHealthy={} {} {}",
            c.healthy,
            c.reason,
            c.message.lines().next().unwrap_or_default()
        )
    };
    agent.wait_for(t0, line, done).pop().unwrap()
}

/// The cluster reads HEALTH_OK with every placement group active+clean.
fn settled(c: &CephState) -> bool {
    c.report.status.as_ref().is_some_and(|s| {
        s.healthy()
            && s.pgs > 0
            && s.pg_states.len() == 1
            && s.pg_states[0].ends_with(" active+clean")
    })
}

fn osd_flags(cli: &CephCli) -> Vec<(u32, Vec<String>)> {
    let dump: serde_json::Value = cli.json(&["osd", "dump"]).unwrap();
    dump["osds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["osd"].as_u64().unwrap() as u32,
                o["state"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| s.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect()
}

/// Where the guest's hypervisors take an incoming migration (in the node's own namespace).
const MIGRATION_PORT: u16 = 47001;
/// The guest's log on its disk: line `n` in sector `n`.
const TICK: &str = "tick";

/// A busybox initramfs that loads the virtio modules, says `kiln-guest-ready`, then writes
/// `tick <n> <uptime>` into sector n of its disk once a second, synced.
fn guest_initrd(dir: &Path) -> (PathBuf, PathBuf) {
    let kernel = std::env::var_os("KILN_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(&std::env::var("HOME").unwrap()).join(".cache/kiln"))
        .join("guest-kernel/current");
    assert!(
        kernel.join("vmlinuz").exists(),
        "{} is missing: scripts/guest-kernel.sh fetches it",
        kernel.display()
    );
    let tree = dir.join("initrd");
    for d in ["bin", "lib", "dev", "proc"] {
        std::fs::create_dir_all(tree.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", tree.join("bin/busybox")).unwrap();
    let order = std::fs::read_to_string(kernel.join("modules/order")).unwrap();
    for m in order.lines() {
        std::fs::copy(
            kernel.join(format!("modules/{m}.ko")),
            tree.join(format!("lib/{m}.ko")),
        )
        .unwrap();
    }
    std::fs::write(tree.join("lib/order"), &order).unwrap();
    let init = format!(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         mount -t proc proc /proc\n\
         mount -t devtmpfs dev /dev\n\
         for m in $(cat /lib/order); do insmod /lib/$m.ko; done\n\
         while [ ! -b /dev/vda ]; do sleep 0.1; done\n\
         echo kiln-guest-ready\n\
         i=0\n\
         while true; do\n\
           i=$((i+1))\n\
           printf '{TICK} %08d %s\\n' $i \"$(cut -d' ' -f1 /proc/uptime)\" | dd of=/dev/vda bs=512 seek=$i conv=sync,notrunc,fsync 2>/dev/null\n\
           sleep 1\n\
         done\n"
    );
    std::fs::write(tree.join("init"), init).unwrap();
    run(Command::new("chmod").args(["0755"]).arg(tree.join("init")));
    let initrd = dir.join("initrd.cpio");
    run(Command::new("sh").arg("-c").arg(format!(
        "cd {} && find . | cpio -o -H newc --quiet > {}",
        tree.display(),
        initrd.display()
    )));
    (kernel.join("vmlinuz"), initrd)
}

/// A hypervisor process on the node running the guest from RBD image `rbd/<image>`;
/// `incoming`: waiting for the guest to arrive by migration instead of booting it.
fn hypervisor(
    ns: &CephNs,
    name: &str,
    boot: &(PathBuf, PathBuf),
    image: &str,
    incoming: bool,
) -> Vm {
    let root = ns.root.path();
    let drive = format!(
        "file=rbd:rbd/{image}:conf={}:id=admin:keyring={},format=raw,if=virtio,cache=none",
        root.join("etc/ceph/ceph.conf").display(),
        root.join("etc/ceph/ceph.client.admin.keyring").display()
    );
    let mut extra = vec!["-drive".to_string(), drive];
    if incoming {
        extra.extend([
            "-incoming".into(),
            format!("tcp:127.0.0.1:{MIGRATION_PORT}"),
        ]);
    }
    VmBuilder::default()
        .name(name)
        .accel(Accel::Tcg)
        .memory_mib(256)
        .cpus(1)
        .direct_boot(DirectBoot {
            kernel: boot.0.clone(),
            initrd: Some(boot.1.clone()),
            append: "console=ttyS0 quiet".into(),
        })
        .extra_args(extra)
        .netns(ns.netns.name())
        .spawn()
        .unwrap()
}

/// The guest's log from its RBD image: (n, uptime) per line, in sector order.
fn guest_log(ns: &CephNs, image: &str) -> Vec<(u32, f64)> {
    let out = ns.root.path().join(format!("{image}.raw"));
    let _ = std::fs::remove_file(&out);
    ns.sh(&format!("rbd export rbd/{image} {}", out.display()))
        .unwrap();
    let bytes = std::fs::read(&out).unwrap();
    bytes
        .chunks(512)
        .skip(1)
        .map_while(|sector| {
            let line = String::from_utf8_lossy(sector);
            let mut words = line.trim_end_matches('\0').split_whitespace();
            (words.next() == Some(TICK)).then_some(())?;
            Some((words.next()?.parse().ok()?, words.next()?.parse().ok()?))
        })
        .collect()
}

/// QEMU's migration of the guest from `source` to the process listening on
/// [`MIGRATION_PORT`]: its total time and the guest's downtime, in milliseconds.
fn qemu_migrate(source: &Vm) -> Result<(u64, u64), String> {
    source
        .qmp_with(
            "migrate",
            serde_json::json!({"uri": format!("tcp:127.0.0.1:{MIGRATION_PORT}")}),
        )
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let q = source.qmp("query-migrate").map_err(|e| e.to_string())?;
        match q["status"].as_str() {
            Some("completed") => {
                return Ok((
                    q["total-time"].as_u64().unwrap_or_default(),
                    q["downtime"].as_u64().unwrap_or_default(),
                ));
            }
            Some("failed" | "cancelled") => return Err(format!("migration {q}")),
            _ if Instant::now() > deadline => return Err(format!("migration still {q}")),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// The tests' clusters take the machine's two cores: one at a time.
static ONE_CLUSTER_AT_A_TIME: Mutex<()> = Mutex::new(());

#[test]
fn agent_bootstraps_a_native_ceph_node_that_serves_rbd_and_maintenance() {
    let _one = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let t0 = Instant::now();
    let ns = CephNs::create();
    let mut disks = Disks::create(3);
    let bad = disks.devices[3].clone();
    let read_only = disks.add_read_only();
    let data_disks: Vec<String> = disks
        .devices
        .iter()
        .map(|d| format!("  - {{device: {d}, usage: ceph-osd}}\n"))
        .collect();
    let config = ns.root.path().join("node.yaml");
    let write_config = |pools: &str| {
        std::fs::write(
            &config,
            format!(
                "apiVersion: kiln.dev/v1alpha1\nkind: NodeConfig\nspec:\n  dataDisks:\n{}  ceph:\n    monitorAddress: 127.0.0.1\n    publicNetwork: 127.0.0.0/8\n    pools:\n    - {{name: rbd, size: 3, pgNum: 32}}\n{pools}",
                data_disks.concat()
            ),
        )
        .unwrap()
    };
    write_config("");

    // The agent makes the cluster; the disk with a file system stays as it was. A pool added
    // to the config while the bootstrap makes the OSDs is taken up once that bootstrap ends,
    // and the agent goes on reporting meanwhile.
    let agent = start_agent(&ns, config.clone());
    wait_for(&agent, t0, |c| c.message.starts_with("OSD on"));
    write_config("    - {name: vms, size: 3, pgNum: 8}\n");
    wait_for(&agent, t0, |c| {
        c.reason == "BringingUp" && c.message.starts_with("the node config changed")
    });
    let first = wait_for(&agent, t0, settled);
    let pools = ns.sh("ceph osd pool ls").unwrap();
    assert!(
        pools.lines().any(|p| p == "vms"),
        "the pool added mid-bootstrap: {pools}"
    );
    eprintln!(
        "[{:5.1}s] HEALTH_OK, every PG active+clean",
        t0.elapsed().as_secs_f64()
    );
    assert!(!first.healthy, "a failed disk keeps the node unhealthy");
    assert_eq!(first.reason, "DataDiskFailed");
    assert!(
        first.message.contains(&bad) && first.message.contains("ext4"),
        "{}",
        first.message
    );
    assert!(
        first
            .message
            .contains(&format!("{read_only}: ceph-volume raw prepare failed")),
        "the disk ceph-volume failed on, and why: {}",
        first.message
    );
    let osds: Vec<Option<u32>> = first.report.disks.iter().map(|d| d.osd).collect();
    assert_eq!(
        osds,
        [Some(0), Some(1), Some(2), None, None],
        "{:?}",
        first.report
    );
    let ext4 = run(Command::new("blkid").args(["-p", "-o", "value", "-s", "TYPE", &bad]));
    assert_eq!(ext4.trim(), "ext4", "the refused disk is untouched");
    let fsid = first.report.fsid.clone().unwrap();
    let status = first.report.status.clone().unwrap();
    assert_eq!((status.osds, status.osds_up, status.osds_in), (3, 3, 3));

    // An RBD image round-trips.
    let payload = ns.root.path().join("payload");
    let bytes: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&payload, &bytes).unwrap();
    let p = payload.display();
    ns.sh(&format!(
        "rbd import {p} rbd/round-trip && rbd export rbd/round-trip {p}.back"
    ))
    .unwrap();
    assert_eq!(std::fs::read(format!("{p}.back")).unwrap(), bytes);
    eprintln!("[{:5.1}s] RBD round trip", t0.elapsed().as_secs_f64());

    // An OSD killed during RBD writes: the writes finish, the agent reports it and starts it
    // again.
    let argv = ns.prefix();
    let writer = Command::new(&argv[0])
        .args(&argv[1..])
        .args([
            "rbd",
            "bench",
            "--io-type",
            "write",
            "--io-total",
            "192M",
            "--io-size",
            "64K",
            "--image",
            "round-trip",
            "--pool",
            "rbd",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // (The bracket keeps the pattern from matching the shell running it.)
    ns.sh("pkill -9 -f '[c]eph-osd -f --cluster ceph --id 1 '")
        .unwrap();
    let stopped = wait_for(&agent, t0, |c| c.reason == "DaemonStopped");
    assert!(
        stopped.message.contains("ceph-osd-1"),
        "{}",
        stopped.message
    );
    let out = writer.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "RBD writes failed with an OSD down: {out:?}"
    );
    eprintln!(
        "[{:5.1}s] RBD writes finished with osd.1 killed",
        t0.elapsed().as_secs_f64()
    );
    wait_for(&agent, t0, settled);

    // A second bootstrap (the agent restarted, its daemons with it) keeps everything.
    drop(agent);
    let agent = start_agent(&ns, config);
    let again = wait_for(&agent, t0, settled);
    assert_eq!(again.report.fsid.as_deref(), Some(fsid.as_str()));
    assert_eq!(again.report.disks, first.report.disks);
    let cli = ns.host().cli();
    let pools: Vec<String> = cli.json(&["osd", "pool", "ls"]).unwrap();
    assert!(pools.contains(&"rbd".to_string()), "{pools:?}");
    assert_eq!(osd_flags(&cli).len(), 3, "no OSD was made twice");
    eprintln!(
        "[{:5.1}s] second bootstrap changed nothing",
        t0.elapsed().as_secs_f64()
    );

    // A VM of the node: a guest booted from RBD, writing its log; a second hypervisor process
    // waits to take it.
    ns.sh("rbd create --size 16 rbd/vm-disk").unwrap();
    let boot = guest_initrd(ns.root.path());
    let mut source = hypervisor(&ns, "kiln-guest-a", &boot, "vm-disk", false);
    source
        .wait_for_console("kiln-guest-ready", Duration::from_secs(300))
        .unwrap();
    let target = hypervisor(&ns, "kiln-guest-b", &boot, "vm-disk", true);
    while guest_log(&ns, "vm-disk").len() < 3 {
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!(
        "[{:5.1}s] guest on RBD writing its log",
        t0.elapsed().as_secs_f64()
    );
    let source = Arc::new(Mutex::new(source));
    let migrated: Arc<Mutex<Option<(u64, u64)>>> = Arc::default();
    let migrator: kiln_cluster::testing::Migrator = {
        let (source, migrated) = (source.clone(), migrated.clone());
        Arc::new(move |vmi: &str, from: &str, to: &str| {
            eprintln!("migrating VM {vmi} from {from} to {to}");
            let stats = qemu_migrate(&source.lock().unwrap())?;
            *migrated.lock().unwrap() = Some(stats);
            Ok(())
        })
    };

    // Maintenance asks the real Ceph and moves the VM for real.
    let cluster = TestCluster::shared();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let client = cluster.client().await;
            install_kubevirt_fixture_crds(&client).await.unwrap();
            workload::namespace(&client, "vms").await;
            let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client.clone());
            for n in [NODE, "kiln-ceph-b"] {
                nodes
                    .create(&Default::default(), &workload::node(n))
                    .await
                    .unwrap();
            }
            let (vmi, launcher) = workload::vmi("vms", "guest", NODE, None, serde_json::json!([]));
            kube::Api::<kube::api::DynamicObject>::namespaced_with(
                client.clone(),
                "vms",
                &workload::vmi_resource(),
            )
            .create(&Default::default(), &vmi)
            .await
            .unwrap();
            workload::run_pod(&client, &launcher).await.unwrap();
            let _kubelet = standin_kubelet(cluster.standin_client().await, "vms");
            let _virt = standin_virt_controller_with(
                cluster.standin_client().await,
                "vms",
                "kiln-ceph-b",
                Some(migrator),
            );
            let opts = |allow| EnterOptions {
                dry_run: false,
                timeout: Duration::from_secs(300),
                allow_storage_outage: allow,
            };
            let refused = maintenance::enter(&client, NODE, &cli, &opts(false))
                .await
                .unwrap_err()
                .to_string();
            assert!(
                refused.contains("Ceph: stopping osd.0, osd.1, osd.2 now: unsafe to stop"),
                "{refused}"
            );
            let report = maintenance::enter(&client, NODE, &cli, &opts(true))
                .await
                .unwrap();
            assert_eq!(report.plan.osds, [0, 1, 2]);
            assert_eq!(report.plan.warnings.len(), 1, "{:?}", report.plan);
            assert_eq!(report.migrated, 1);
            for (id, flags) in osd_flags(&cli) {
                assert!(flags.contains(&"noout".to_string()), "osd.{id}: {flags:?}");
            }
            maintenance::exit(&client, NODE, &cli).await.unwrap();
            for (id, flags) in osd_flags(&cli) {
                assert!(!flags.contains(&"noout".to_string()), "osd.{id}: {flags:?}");
            }
            // One OSD of three may stop while every pool keeps two copies; not once a pool
            // keeps one.
            assert_eq!(cli.stop_refusal(&[0]).await.unwrap(), None);
            cli.run(&["config", "set", "global", "mon_allow_pool_size_one", "true"])
                .unwrap();
            cli.run(&["osd", "pool", "create", "single", "8", "8", "replicated"])
                .unwrap();
            cli.run(&[
                "osd",
                "pool",
                "set",
                "single",
                "size",
                "1",
                "--yes-i-really-mean-it",
            ])
            .unwrap();
            // Ceph answers for the new pool once its placement groups are active.
            let deadline = Instant::now() + Duration::from_secs(120);
            let refused = loop {
                let mut refused = Vec::new();
                for id in 0..3 {
                    refused.extend(cli.stop_refusal(&[id]).await.unwrap());
                }
                if refused.iter().any(|r| r.contains("unsafe to stop")) || Instant::now() > deadline
                {
                    break refused;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            };
            assert!(
                refused.iter().any(|r| r.contains("unsafe to stop")),
                "no OSD refused to stop with a pool of one copy: {refused:?}"
            );
        });
    eprintln!(
        "[{:5.1}s] maintenance against real Ceph",
        t0.elapsed().as_secs_f64()
    );

    // `kiln cluster status` reads the nodes and Ceph's health and placement groups.
    let status = run(Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["cluster", "status", "--kubeconfig"])
        .arg(&cluster.kubeconfig)
        .arg("--ceph-command")
        .arg(format!("{} ceph", ns.prefix().join(" "))));
    assert!(status.contains("kiln-ceph-b"), "{status}");
    assert!(
        status.contains(&format!("ceph {fsid}: HEALTH_")),
        "{status}"
    );
    assert!(status.contains("3/3 OSDs up, 3 in;"), "{status}");

    // The guest runs on in the second process; its log on RBD has no gap.
    let (total_ms, downtime_ms) = migrated.lock().unwrap().expect("QEMU migrated the guest");
    eprintln!(
        "[{:5.1}s] live migration on RBD: {total_ms} ms, downtime {downtime_ms} ms",
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(target.qmp("query-status").unwrap()["status"], "running");
    let at_migration = guest_log(&ns, "vm-disk").len();
    while guest_log(&ns, "vm-disk").len() < at_migration + 3 {
        std::thread::sleep(Duration::from_millis(500));
    }
    let log = guest_log(&ns, "vm-disk");
    for pair in log.windows(2) {
        assert_eq!(pair[1].0, pair[0].0 + 1, "a line is missing: {log:?}");
        assert!(
            pair[1].1 - pair[0].1 < 3.0,
            "a {:.1} s gap in the guest's log after line {}: {log:?}",
            pair[1].1 - pair[0].1,
            pair[0].0
        );
    }
    drop(target);
    drop(source);
    drop(agent);
}

#[test]
fn three_agents_form_one_cluster_from_the_fleets_keys() {
    let _one = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let t0 = Instant::now();
    let netns = Arc::new(Netns::create("kcephc").unwrap());
    let disks = Disks::create(3);
    // The node configs come from the fleet (`kiln fleet node-config`, as an operator installing
    // from the ISO gives them): its fsid and keys, each node's part from its inventory role
    // (two control planes are monitors, the storage node adds its disk).
    let fleet = tempfile::tempdir().unwrap();
    let spec = fleet.path().join("spec.yaml");
    std::fs::write(
        &spec,
        "apiVersion: kiln.dev/v1alpha1\nkind: Appliance\nmetadata: {name: rack}\nspec:\n  profile: test\n  features: [kubernetes, ceph]\n  cluster:\n    ceph:\n      publicNetwork: 127.0.0.0/8\n      pools: [{name: rbd, size: 3}]\n",
    )
    .unwrap();
    let node = |name: &str, role: &str, address: &str| {
        format!(
            "  - name: {name}\n    role: {role}\n    overrides:\n      network:\n        interfaces: [{{name: eth0, addresses: [{address}/8]}}]\n"
        )
    };
    let inventory = fleet.path().join("inventory.yaml");
    std::fs::write(
        &inventory,
        format!(
            "apiVersion: kiln.dev/v1alpha1\nkind: Inventory\nspec:\n  nodes:\n{}{}{}",
            node("kiln-a", "control-plane", "127.0.0.1"),
            node("kiln-b", "control-plane", "127.0.0.2"),
            node("kiln-c", "storage", "127.0.0.3"),
        ),
    )
    .unwrap();
    let part = |name: &str| {
        let text = run(Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["fleet", "node-config", name, "--inventory"])
            .arg(&inventory)
            .arg("--spec")
            .arg(&spec)
            .arg("--state-dir")
            .arg(fleet.path().join("state")));
        kiln_spec::NodeConfig::from_yaml(&text)
            .unwrap()
            .spec
            .ceph
            .expect("the fleet gives every node its Ceph part")
    };
    let parts: std::collections::BTreeMap<&str, kiln_spec::ceph::CephNode> =
        ["kiln-a", "kiln-b", "kiln-c"].map(|n| (n, part(n))).into();
    let fsid = parts["kiln-a"].fsid.clone().expect("the fleet's fsid");
    let nodes = ["kiln-a", "kiln-b", "kiln-c"];
    let mut agents = Vec::new();
    let mut spaces = Vec::new();
    // All three start together, as a rollout's nodes do: the joining ones wait for the first
    // monitor's quorum.
    for (i, name) in nodes.iter().enumerate() {
        let ns = CephNs::beside(netns.clone(), name);
        let mut config = kiln_spec::NodeConfig::from_yaml(&format!(
            "apiVersion: kiln.dev/v1alpha1\nkind: NodeConfig\nspec:\n  dataDisks:\n  - {{device: {}, usage: ceph-osd}}\n",
            disks.devices[i]
        ))
        .unwrap();
        config.spec.ceph = Some(parts[name].clone());
        let path = ns.root.path().join("node.yaml");
        std::fs::write(&path, config.to_yaml()).unwrap();
        agents.push(start_agent(&ns, path));
        spaces.push(ns);
    }
    let states: Vec<CephState> = agents
        .iter()
        .map(|agent| wait_for(agent, t0, |c| c.healthy && settled(c)))
        .collect();
    eprintln!(
        "[{:5.1}s] three nodes: HEALTH_OK, every PG active+clean",
        t0.elapsed().as_secs_f64()
    );
    let roles = [CephRole::FirstMonitor, CephRole::Monitor, CephRole::Osd];
    for ((state, name), role) in states.iter().zip(&nodes).zip(roles) {
        assert_eq!(state.report.role, role, "{name}");
        assert_eq!(state.report.fsid.as_deref(), Some(fsid.as_str()), "{name}");
        assert_eq!(state.report.disks.len(), 1, "{name}: {:?}", state.report);
        let status = state.report.status.as_ref().unwrap();
        assert_eq!(status.quorum, ["kiln-a", "kiln-b"], "{name}");
        assert_eq!((status.osds, status.osds_up, status.osds_in), (3, 3, 3));
    }
    let cli = spaces[2].host().cli();
    let tree: serde_json::Value = cli.json(&["osd", "tree"]).unwrap();
    let hosts: Vec<(String, usize)> = tree["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["type"] == "host")
        .map(|n| {
            (
                n["name"].as_str().unwrap().to_string(),
                n["children"].as_array().unwrap().len(),
            )
        })
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(
        hosts,
        [
            ("kiln-a".into(), 1),
            ("kiln-b".into(), 1),
            ("kiln-c".into(), 1)
        ]
    );
    let mgr: serde_json::Value = cli.json(&["mgr", "dump"]).unwrap();
    // Whichever manager's beacon the monitors take first is active; the
    // other monitor host's manager stands by.
    let mut managers = vec![mgr["active_name"].as_str().unwrap_or_default()];
    managers.extend(
        mgr["standbys"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| s["name"].as_str().unwrap_or_default()),
    );
    managers.sort_unstable();
    assert_eq!(managers, ["kiln-a", "kiln-b"], "{mgr}");

    // The OSD-only node serves RBD with the admin key the fleet gave it.
    let payload = spaces[2].root.path().join("payload");
    let bytes: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(&payload, &bytes).unwrap();
    let p = payload.display();
    spaces[2]
        .sh(&format!(
            "rbd import {p} rbd/spread && rbd export rbd/spread {p}.back"
        ))
        .unwrap();
    assert_eq!(std::fs::read(format!("{p}.back")).unwrap(), bytes);

    // The joining monitor's second bootstrap (its agent restarted) changes nothing.
    agents.remove(1);
    let again = wait_for(
        &start_agent(&spaces[1], spaces[1].root.path().join("node.yaml")),
        t0,
        |c| c.healthy && settled(c),
    );
    assert_eq!(again.report.disks, states[1].report.disks);
    assert_eq!(osd_flags(&cli).len(), 3, "no OSD was made twice");
    eprintln!(
        "[{:5.1}s] the joined monitor's second bootstrap changed nothing",
        t0.elapsed().as_secs_f64()
    );
    drop(agents);
}
