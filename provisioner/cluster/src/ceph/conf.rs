//! What a Ceph node is made of, from its node config (pure): the cluster's `ceph.conf`, the
//! keys' capabilities, and the daemons it runs.

use std::net::IpAddr;

use kiln_spec::ceph::{CephKeys, CephNode, CephRole, CephSecret};

use crate::node::Service;

/// Node paths (relative to its root); Ceph's own defaults, so its tools find them.
pub mod paths {
    pub const CONF: &str = "etc/ceph/ceph.conf";
    pub const ADMIN_KEYRING: &str = "etc/ceph/ceph.client.admin.keyring";
    pub const BOOTSTRAP_OSD_KEYRING: &str = "var/lib/ceph/bootstrap-osd/ceph.keyring";
    /// The monitor's first keyring and map, gone once the monitor exists.
    pub const MON_SEED_KEYRING: &str = "var/lib/ceph/tmp/kiln-mon.keyring";
    pub const MONMAP: &str = "var/lib/ceph/tmp/kiln-monmap";
    pub const OSD_DIR: &str = "var/lib/ceph/osd";
    /// Directories Ceph's daemons write, owned by the daemons' user.
    pub const DAEMON_DIRS: [&str; 8] = [
        "var/lib/ceph/mon",
        "var/lib/ceph/mgr",
        OSD_DIR,
        "var/lib/ceph/bootstrap-osd",
        "var/lib/ceph/tmp",
        "var/lib/ceph/crash",
        "run/ceph",
        "var/log/ceph",
    ];

    pub fn mon_data(name: &str) -> String {
        format!("var/lib/ceph/mon/ceph-{name}")
    }

    pub fn mgr_data(name: &str) -> String {
        format!("var/lib/ceph/mgr/ceph-{name}")
    }

    pub fn osd_data(id: u32) -> String {
        format!("{OSD_DIR}/ceph-{id}")
    }
}

pub const MON_V2_PORT: u16 = 3300;
pub const MON_V1_PORT: u16 = 6789;

/// Capabilities of the keys the first monitor makes (`ceph-authtool --cap` pairs).
pub const MON_CAPS: &[(&str, &str)] = &[("mon", "allow *")];
pub const ADMIN_CAPS: &[(&str, &str)] = &[
    ("mon", "allow *"),
    ("osd", "allow *"),
    ("mds", "allow *"),
    ("mgr", "allow *"),
];
pub const BOOTSTRAP_OSD_CAPS: &[(&str, &str)] =
    &[("mon", "profile bootstrap-osd"), ("mgr", "allow r")];
pub const MGR_CAPS: &[(&str, &str)] = &[
    ("mon", "allow profile mgr"),
    ("osd", "allow *"),
    ("mds", "allow *"),
];

/// A monitor's addresses in both protocols: `[v2:10.0.0.1:3300,v1:10.0.0.1:6789]`.
pub fn mon_addrs(ip: IpAddr) -> String {
    let host = match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    };
    format!("[v2:{host}:{MON_V2_PORT},v1:{host}:{MON_V1_PORT}]")
}

/// The cluster's `ceph.conf` on a node named `host_name`. `shared_disk`: the monitor's disk
/// is a machine's shared with much else (a test host), so only a nearly full one warns.
pub fn ceph_conf(node: &CephNode, fsid: &str, host_name: &str, shared_disk: bool) -> String {
    let mon_host: Vec<String> = node.all_monitors().into_iter().map(mon_addrs).collect();
    let mut c = format!(
        "# Written by the kiln agent from the node config (spec.ceph).\n\
         [global]\n\
         fsid = {fsid}\n\
         mon host = {mon_host}\n\
         public network = {net}\n\
         auth cluster required = cephx\n\
         auth service required = cephx\n\
         auth client required = cephx\n\
         auth allow insecure global id reclaim = false\n",
        mon_host = mon_host.join(","),
        net = node.public_network,
    );
    if node.role == CephRole::FirstMonitor {
        c.push_str(&format!("mon initial members = {host_name}\n"));
    }
    if node.single_node() {
        c.push_str(
            "# One host: the copies of an object go to different OSDs of it.\n\
             osd crush chooseleaf type = 0\n",
        );
    }
    if node.pools.iter().any(|p| p.size == 1) {
        c.push_str(
            "# The spec asks for pools of one copy; kiln reports that itself.\n\
             mon allow pool size one = true\n\
             mon warn on pool no redundancy = false\n",
        );
    }
    if shared_disk {
        c.push_str("mon data avail warn = 2\nmon data avail crit = 1\n");
    }
    if let Some(ip) = node.monitor_ip() {
        // A joining monitor is in no monitor map yet: this is the address it asks to join with.
        c.push_str(&format!("\n[mon.{host_name}]\npublic addr = {ip}\n"));
    }
    c.push_str(&format!(
        "\n[osd]\ncrush location = root=default host={host_name}\n"
    ));
    c
}

/// A new cephx key as Ceph writes it in keyrings: base64 of its type (1, AES), creation time
/// and length (16), then 16 random bytes.
pub fn new_secret() -> CephSecret {
    use base64::Engine as _;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut raw = Vec::with_capacity(28);
    raw.extend(1u16.to_le_bytes());
    raw.extend((now.as_secs() as u32).to_le_bytes());
    raw.extend(now.subsec_nanos().to_le_bytes());
    raw.extend(16u16.to_le_bytes());
    raw.extend(rand::random::<[u8; 16]>());
    CephSecret(base64::engine::general_purpose::STANDARD.encode(raw))
}

/// The keys of a cluster of several nodes, made once (by the fleet).
pub fn new_keys() -> CephKeys {
    CephKeys {
        monitor: Some(new_secret()),
        admin: new_secret(),
        bootstrap_osd: new_secret(),
    }
}

/// The fsid a `ceph.conf` names.
pub fn conf_fsid(conf: &str) -> Option<String> {
    conf.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == "fsid").then(|| v.trim().to_string())
    })
}

/// Daemons run as `user` (Debian's `ceph`) when given, in the foreground under the
/// supervisor.
fn daemon(name: String, program: &str, id: &str, user: Option<&str>) -> Service {
    let mut argv: Vec<String> = [program, "-f", "--cluster", "ceph", "--id", id]
        .map(String::from)
        .to_vec();
    if let Some(u) = user {
        argv.extend(["--setuser".into(), u.into(), "--setgroup".into(), u.into()]);
    }
    Service { name, argv }
}

pub fn mon_service(host_name: &str, user: Option<&str>) -> Service {
    daemon(format!("ceph-mon-{host_name}"), "ceph-mon", host_name, user)
}

pub fn mgr_service(host_name: &str, user: Option<&str>) -> Service {
    daemon(format!("ceph-mgr-{host_name}"), "ceph-mgr", host_name, user)
}

pub fn osd_service(id: u32, user: Option<&str>) -> Service {
    daemon(format!("ceph-osd-{id}"), "ceph-osd", &id.to_string(), user)
}

/// `--cap mon 'allow *' …` for `ceph-authtool`.
pub fn cap_args(caps: &[(&str, &str)]) -> Vec<String> {
    caps.iter()
        .flat_map(|(daemon, cap)| ["--cap".to_string(), daemon.to_string(), cap.to_string()])
        .collect()
}

/// The same capabilities as `ceph auth get-or-create` takes them.
pub fn auth_caps(caps: &[(&str, &str)]) -> Vec<String> {
    caps.iter()
        .flat_map(|(daemon, cap)| [daemon.to_string(), cap.to_string()])
        .collect()
}
