//! Makes a node its Ceph cluster's first monitor and its data disks OSDs, with Debian's tools
//! (`ceph-authtool`, `monmaptool`, `ceph-mon --mkfs`, `ceph-volume raw`), as pveceph does.
//!
//! Every step looks first and acts only when needed, so a second run on a running cluster
//! changes nothing: the fsid and keys stay, monitors and OSDs that exist are started, not made
//! again. A data disk is prepared only when it is blank: one that holds any signature (a file
//! system, another cluster's OSD) is reported with the reason and left untouched, and the
//! other disks go on.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use kiln_spec::ceph::{CephNode, CephPool, CephRole, CephSecret};
use serde::Deserialize;

use super::conf::{self, paths};
use super::{CephCli, CephStatus, run};
use crate::Error;
use crate::node::bringup::Supervisor;

/// Where and how a node runs Ceph. [`CephHost::appliance`] is the installed appliance; a
/// test host gives each node its own root and namespaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CephHost {
    /// Ceph's directories (`etc/ceph`, `var/lib/ceph`, …) are below this as kiln writes them;
    /// commands and daemons see them at their usual paths (`/` on the appliance; a test
    /// bind-mounts them there in the node's mount namespace).
    pub root: PathBuf,
    /// Runs every Ceph command and daemon (the tests' `nsenter` into a node's namespaces).
    pub prefix: Vec<String>,
    /// The monitor's and manager's id and the OSDs' CRUSH host.
    pub node_name: String,
    /// The daemons' user (Debian's `ceph`); `None` runs them as root.
    pub user: Option<String>,
    /// See [`conf::ceph_conf`].
    pub shared_disk: bool,
}

/// How long a monitor may take to form a quorum (minutes under emulation).
const QUORUM_TIMEOUT: Duration = Duration::from_secs(600);
/// A `ceph` call gives up on an unreachable monitor after this long instead of hanging.
const CONNECT_TIMEOUT_SECS: &str = "60";

impl CephHost {
    pub fn appliance(node_name: &str) -> CephHost {
        CephHost {
            root: PathBuf::from("/"),
            prefix: Vec::new(),
            node_name: node_name.to_string(),
            user: Some("ceph".into()),
            shared_disk: false,
        }
    }

    /// Where kiln reads and writes a node path.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// The `ceph` CLI with the admin key, as the node runs it.
    pub fn cli(&self) -> CephCli {
        let mut argv = self.prefix.clone();
        argv.extend(["ceph", "--connect-timeout", CONNECT_TIMEOUT_SECS].map(String::from));
        CephCli::from_argv(argv)
    }

    /// Runs a node command (paths in `args` as the node sees them).
    fn run(&self, args: &[&str]) -> Result<Vec<u8>, Error> {
        let mut argv = self.prefix.clone();
        argv.extend(args.iter().map(|a| a.to_string()));
        run(&argv)
    }

    fn io(&self, rel: &str) -> impl FnOnce(std::io::Error) -> Error {
        let path = self.path(rel);
        move |source| Error::Io { path, source }
    }

    /// Gives a node path to the daemons' user, recursively.
    fn chown(&self, rel: &str) -> Result<(), Error> {
        if let Some(user) = &self.user {
            self.run(&["chown", "-R", &format!("{user}:{user}"), &node_path(rel)])?;
        }
        Ok(())
    }

    fn write(&self, rel: &str, content: &str, mode: u32) -> Result<(), Error> {
        let path = self.path(rel);
        let tmp = path.with_extension("kiln-tmp");
        std::fs::write(&tmp, content)
            .and_then(|()| std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)))
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(self.io(rel))
    }
}

/// A node path as commands see it.
fn node_path(rel: &str) -> String {
    format!("/{rel}")
}

/// One data disk's fate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskOutcome {
    pub disk: String,
    /// The OSD it carries, or why it carries none.
    pub osd: Result<u32, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub fsid: String,
    pub disks: Vec<DiskOutcome>,
}

/// Brings the node's Ceph part up: configuration and keys, the monitor and manager, an OSD on
/// each of `disks` (device paths), the pools. `progress` hears each step.
pub fn bootstrap(
    node: &CephNode,
    disks: &[String],
    host: &CephHost,
    supervisor: &mut dyn Supervisor,
    progress: &dyn Fn(&str),
) -> Result<Outcome, Error> {
    let user = host.user.as_deref();
    progress("writing the cluster configuration");
    for rel in ["etc/ceph"].iter().chain(&paths::DAEMON_DIRS) {
        std::fs::create_dir_all(host.path(rel)).map_err(host.io(rel))?;
    }
    let existing = std::fs::read_to_string(host.path(paths::CONF))
        .ok()
        .and_then(|c| conf::conf_fsid(&c));
    let fsid = match (&node.fsid, existing) {
        (Some(wanted), Some(have)) if *wanted != have => {
            return Err(Error::Ceph {
                command: "bootstrap".into(),
                reason: format!(
                    "the node already belongs to Ceph cluster {have}; spec.ceph.fsid names {wanted}"
                ),
            });
        }
        (Some(wanted), _) => wanted.clone(),
        (None, Some(have)) => have,
        (None, None) => uuid::Uuid::new_v4().to_string(),
    };
    host.write(
        paths::CONF,
        &conf::ceph_conf(node, &fsid, &host.node_name, host.shared_disk),
        0o644,
    )?;
    let keys = node.keys.as_ref();
    for (rel, name, caps, key) in [
        (
            paths::ADMIN_KEYRING,
            "client.admin",
            conf::ADMIN_CAPS,
            keys.map(|k| &k.admin),
        ),
        (
            paths::BOOTSTRAP_OSD_KEYRING,
            "client.bootstrap-osd",
            conf::BOOTSTRAP_OSD_CAPS,
            keys.map(|k| &k.bootstrap_osd),
        ),
    ] {
        if !host.path(rel).exists() {
            new_keyring(host, rel, name, caps, key)?;
        }
    }
    for rel in paths::DAEMON_DIRS {
        host.chown(rel)?;
    }

    if node.role.runs_monitor() {
        start_monitor(node, &fsid, host, supervisor, progress)?;
    } else {
        progress("waiting for the cluster's monitors");
        wait_for_quorum(host, None)?;
    }

    let mut outcomes = Vec::new();
    for disk in disks {
        progress(&format!("OSD on {disk}"));
        let osd = osd_on(disk, &fsid, host);
        if let Ok(id) = osd {
            supervisor.start(&conf::osd_service(id, user))?;
        }
        outcomes.push(DiskOutcome {
            disk: disk.clone(),
            osd: osd.map_err(|e| match e {
                Error::Ceph { reason, .. } => reason,
                other => other.to_string(),
            }),
        });
    }

    if node.role == CephRole::FirstMonitor {
        progress("creating pools");
        ensure_pools(host, &node.pools)?;
    }
    Ok(Outcome {
        fsid,
        disks: outcomes,
    })
}

/// The node's monitor (made when missing: the cluster's first, or one joining the quorum)
/// in quorum, and its manager running.
fn start_monitor(
    node: &CephNode,
    fsid: &str,
    host: &CephHost,
    supervisor: &mut dyn Supervisor,
    progress: &dyn Fn(&str),
) -> Result<(), Error> {
    let user = host.user.as_deref();
    let mon = paths::mon_data(&host.node_name);
    if !host.path(&format!("{mon}/done")).exists() {
        progress(&format!("creating monitor {}", host.node_name));
        create_monitor(node, fsid, host)?;
    }
    let service = conf::mon_service(&host.node_name, user);
    supervisor.start(&service)?;
    progress("waiting for the monitor's quorum");
    wait_for_quorum(host, Some((supervisor, &service.name)))?;

    let mgr = paths::mgr_data(&host.node_name);
    let mgr_keyring = format!("{mgr}/keyring");
    if !host.path(&mgr_keyring).exists() {
        progress(&format!("creating manager {}", host.node_name));
        std::fs::create_dir_all(host.path(&mgr)).map_err(host.io(&mgr))?;
        let mut args = vec![
            "auth".to_string(),
            "get-or-create".into(),
            format!("mgr.{}", host.node_name),
        ];
        args.extend(conf::auth_caps(conf::MGR_CAPS));
        args.extend(["-o".into(), node_path(&mgr_keyring)]);
        host.cli()
            .run(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
        host.chown(&mgr)?;
    }
    supervisor.start(&conf::mgr_service(&host.node_name, user))?;
    Ok(())
}

/// A keyring of one key: `key` when the cluster's keys are given, a new one otherwise.
fn new_keyring(
    host: &CephHost,
    rel: &str,
    name: &str,
    caps: &[(&str, &str)],
    key: Option<&CephSecret>,
) -> Result<(), Error> {
    let mut args = vec![
        "ceph-authtool".to_string(),
        "--create-keyring".into(),
        node_path(rel),
    ];
    match key {
        Some(k) => args.extend(["--add-key".into(), k.0.clone()]),
        None => args.push("--gen-key".into()),
    }
    args.extend(["-n".into(), name.into()]);
    args.extend(conf::cap_args(caps));
    host.run(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    std::fs::set_permissions(host.path(rel), std::fs::Permissions::from_mode(0o600))
        .map_err(host.io(rel))
}

/// `ceph-mon --mkfs` with the monitors' key and the admin and bootstrap-osd keys: the first
/// monitor with a monitor map of itself alone, a joining one with the cluster's current map
/// (it asks the quorum to take it in once it runs).
fn create_monitor(node: &CephNode, fsid: &str, host: &CephHost) -> Result<(), Error> {
    let ip = node.monitor_ip().ok_or_else(|| Error::Ceph {
        command: "bootstrap".into(),
        reason: format!("{:?} is not an IP address", node.monitor_address),
    })?;
    let seed = node_path(paths::MON_SEED_KEYRING);
    let monmap = node_path(paths::MONMAP);
    let _ = std::fs::remove_file(host.path(paths::MON_SEED_KEYRING));
    let mon_key = node.keys.as_ref().and_then(|k| k.monitor.as_ref());
    new_keyring(
        host,
        paths::MON_SEED_KEYRING,
        "mon.",
        conf::MON_CAPS,
        mon_key,
    )?;
    for rel in [paths::ADMIN_KEYRING, paths::BOOTSTRAP_OSD_KEYRING] {
        host.run(&["ceph-authtool", &seed, "--import-keyring", &node_path(rel)])?;
    }
    if node.role == CephRole::FirstMonitor {
        host.run(&[
            "monmaptool",
            "--create",
            "--clobber",
            "--fsid",
            fsid,
            "--addv",
            &host.node_name,
            &conf::mon_addrs(ip),
            &monmap,
        ])?;
    } else {
        wait_for_quorum(host, None)?;
        host.cli().run(&["mon", "getmap", "-o", &monmap])?;
    }
    let mon = paths::mon_data(&host.node_name);
    let _ = std::fs::remove_dir_all(host.path(&mon));
    std::fs::create_dir_all(host.path(&mon)).map_err(host.io(&mon))?;
    host.run(&[
        "ceph-mon",
        "--cluster",
        "ceph",
        "--mkfs",
        "--id",
        &host.node_name,
        "--monmap",
        &monmap,
        "--keyring",
        &seed,
    ])?;
    // The mark that the monitor is complete: a run cut off before it starts over.
    host.write(&format!("{mon}/done"), "", 0o644)?;
    host.chown(&mon)?;
    for rel in [paths::MON_SEED_KEYRING, paths::MONMAP] {
        let _ = std::fs::remove_file(host.path(rel));
    }
    Ok(())
}

/// Waits until the cluster's monitors have a quorum, with this node's monitor in it when it
/// runs one (`monitor`: its service, which must keep running meanwhile).
fn wait_for_quorum(
    host: &CephHost,
    mut monitor: Option<(&mut dyn Supervisor, &str)>,
) -> Result<CephStatus, Error> {
    let deadline = Instant::now() + QUORUM_TIMEOUT;
    loop {
        if let Some((supervisor, service)) = monitor.as_mut() {
            supervisor.check(Some(service))?;
        }
        match host.cli().status() {
            Ok(s)
                if !s.quorum.is_empty()
                    && (monitor.is_none() || s.quorum.contains(&host.node_name)) =>
            {
                return Ok(s);
            }
            Ok(_) | Err(_) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(500))
            }
            Ok(s) => {
                return Err(Error::Timeout {
                    after: QUORUM_TIMEOUT,
                    condition: format!("a monitor quorum ({})", s.summary()),
                });
            }
            Err(e) => {
                return Err(Error::Timeout {
                    after: QUORUM_TIMEOUT,
                    condition: format!("a monitor quorum ({e})"),
                });
            }
        }
    }
}

/// `ceph-volume raw list DEV` output, by OSD uuid.
#[derive(Deserialize)]
struct RawOsd {
    ceph_fsid: String,
    osd_id: u32,
}

/// The OSD on `disk`: the one there when it is this cluster's, a new one when the disk is
/// blank, none otherwise. Activated (its directory primed, the device given to the daemons'
/// user) either way.
fn osd_on(disk: &str, fsid: &str, host: &CephHost) -> Result<u32, Error> {
    let refuse = |reason: String| Error::Ceph {
        command: format!("OSD on {disk}"),
        reason: format!("{disk}: {reason}"),
    };
    // ceph-volume's `raw` commands fail on a link (`/dev/disk/by-id/…`): they get the
    // kernel's name for the disk.
    let device = host
        .run(&["readlink", "-e", disk])
        .map(|out| String::from_utf8_lossy(&out).trim().to_string())
        .map_err(|_| refuse("no such device".into()))?;
    let kind = host
        .run(&["stat", "-c", "%F", &device])
        .map_err(|_| refuse("no such device".into()))?;
    if String::from_utf8_lossy(&kind).trim() != "block special file" {
        return Err(refuse("not a block device".into()));
    }
    let failed = |e: Error| refuse(e.to_string());
    let id = match existing_osd(&device, host).map_err(failed)? {
        Some(osd) if osd.ceph_fsid == fsid => osd.osd_id,
        Some(osd) => {
            return Err(refuse(format!(
                "holds OSD {} of another Ceph cluster ({}); kiln does not take it over",
                osd.osd_id, osd.ceph_fsid
            )));
        }
        None => {
            if let Some(signature) = signature(&device, host).map_err(failed)? {
                return Err(refuse(format!(
                    "holds {signature}; kiln makes OSDs only on blank disks (wipe it first if it is meant for Ceph)"
                )));
            }
            let before = osd_dirs(host);
            host.run(&[
                "ceph-volume",
                "raw",
                "prepare",
                "--bluestore",
                "--no-tmpfs",
                "--data",
                &device,
            ])
            .map_err(|e| {
                // ceph-volume gives the OSD id back but leaves its directory, which would
                // break the next OSD to get that id.
                for dir in osd_dirs(host).difference(&before) {
                    let _ = std::fs::remove_dir_all(host.path(paths::OSD_DIR).join(dir));
                }
                refuse(format!("ceph-volume raw prepare failed: {e}"))
            })?;
            existing_osd(&device, host)
                .map_err(failed)?
                .map(|o| o.osd_id)
                .ok_or_else(|| refuse("ceph-volume prepared no OSD on it".into()))?
        }
    };
    host.run(&[
        "ceph-volume",
        "raw",
        "activate",
        "--device",
        &device,
        "--no-systemd",
        "--no-tmpfs",
    ])
    .map_err(|e| refuse(format!("ceph-volume raw activate failed: {e}")))?;
    Ok(id)
}

/// The OSD directories on the node, by name.
fn osd_dirs(host: &CephHost) -> std::collections::BTreeSet<std::ffi::OsString> {
    std::fs::read_dir(host.path(paths::OSD_DIR))
        .map(|dir| dir.filter_map(|e| e.ok().map(|e| e.file_name())).collect())
        .unwrap_or_default()
}

fn existing_osd(disk: &str, host: &CephHost) -> Result<Option<RawOsd>, Error> {
    let out = host.run(&["ceph-volume", "raw", "list", disk, "--format", "json"])?;
    let osds: std::collections::BTreeMap<String, RawOsd> =
        serde_json::from_slice(&out).map_err(|e| Error::Ceph {
            command: format!("ceph-volume raw list {disk}"),
            reason: format!("unexpected output: {e}"),
        })?;
    Ok(osds.into_values().next())
}

/// What libblkid finds on `disk`, if anything.
fn signature(disk: &str, host: &CephHost) -> Result<Option<String>, Error> {
    let mut argv = host.prefix.clone();
    argv.extend(["blkid", "-p", "-o", "export", disk].map(String::from));
    let output = std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .output()
        .map_err(|e| Error::Ceph {
            command: argv.join(" "),
            reason: e.to_string(),
        })?;
    // blkid exits 2 when it finds nothing.
    if output.status.code() == Some(2) {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .map(str::to_string)
    };
    Ok(Some(match (field("TYPE"), field("PTTYPE")) {
        (Some(t), _) => format!("data libblkid recognises as {t}"),
        (None, Some(pt)) => format!("a {pt} partition table"),
        (None, None) => "a signature libblkid recognises".into(),
    }))
}

#[derive(Deserialize)]
struct PoolDetail {
    pool_name: String,
    size: u8,
}

/// Creates missing pools and sets the size of existing ones to the spec's.
fn ensure_pools(host: &CephHost, pools: &[CephPool]) -> Result<(), Error> {
    let cli = host.cli();
    let have: Vec<PoolDetail> = cli.json(&["osd", "pool", "ls", "detail"])?;
    for p in pools {
        let existing = have.iter().find(|h| h.pool_name == p.name);
        if existing.is_none() {
            let pg = p.pg_num.to_string();
            cli.run(&["osd", "pool", "create", &p.name, &pg, &pg, "replicated"])?;
            cli.run(&[
                "osd",
                "pool",
                "application",
                "enable",
                &p.name,
                &p.application,
            ])?;
        }
        if existing.is_none_or(|h| h.size != p.size) {
            let size = p.size.to_string();
            let mut args = vec!["osd", "pool", "set", &p.name, "size", &size];
            if p.size == 1 {
                args.push("--yes-i-really-mean-it");
            }
            cli.run(&args)?;
            // Ceph's own rule: writes need a majority of the copies.
            let min = (p.size - p.size / 2).to_string();
            cli.run(&["osd", "pool", "set", &p.name, "min_size", &min])?;
        }
    }
    Ok(())
}
