//! A local virtual rack: powered-off QEMU machines, each behind its own `ipmi_sim` BMC, on a
//! bridge in a network namespace that also holds the provisioner's interface, and the fleet
//! inventory that describes them, so that a rollout can be tried on one machine.
//!
//! Everything runs inside the namespace: the BMCs listen on its loopback, and the QEMU they
//! start opens its tap there. The provisioner reaches both by running in the namespace too
//! ([`exec`]). [`up`] returns a [`Rack`] that tears everything down when dropped; `kiln lab
//! rack up` detaches it instead and [`down`] stops it later from what `rack.json` records.

use std::convert::Infallible;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs;
use std::io::{self, BufRead, BufReader, Write as _};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use kiln_spec::NodeRole;
use serde::{Deserialize, Serialize};

use crate::ipmi_sim::{ChassisRecords, IpmiSim, IpmiSimError, SimBoot};
use crate::netns::{Netns, NetnsError};
use crate::qemu::{Disk, Firmware, Nic, Vm};

/// The boot network's bridge, which is also the provisioner's interface.
pub const BRIDGE: &str = "kilnbr0";
/// The provisioner's address on the bridge.
pub const PROVISIONER_CIDR: &str = "10.77.0.1/24";
/// The DHCP pool the inventory gives the netboot server.
pub const POOL_START: &str = "10.77.0.100";
pub const POOL_END: &str = "10.77.0.199";
/// Every BMC's administrator account.
pub const BMC_USER: &str = "admin";
/// The pool has room for this many machines.
pub const MAX_NODES: usize = 100;
pub const INVENTORY_FILE: &str = "fleet.yaml";
pub const STATE_FILE: &str = "rack.json";
const SECRETS_DIR: &str = "secrets";
const ADVERTISER_LOG: &str = "advertiser.log";
/// Where every BMC listens: the loopback of the rack's namespace.
const BMC_ADDRESS: &str = "127.0.0.1";

#[derive(Debug, thiserror::Error)]
pub enum RackError {
    #[error("the virtual rack needs root (network namespaces, bridges and taps): run kiln as root")]
    NotRoot,
    #[error("{program} not found (install the Debian package {package})")]
    Missing {
        program: String,
        package: &'static str,
    },
    #[error("{0}")]
    Spec(String),
    #[error(
        "a rack is already up in {dir} (namespace {netns}): take it down first with `kiln lab rack down --dir {dir}`",
        dir = .dir.display()
    )]
    AlreadyUp { dir: PathBuf, netns: String },
    #[error("no rack in {} ({STATE_FILE} is missing)", .0.display())]
    NoRack(PathBuf),
    #[error("the rack's namespace {0} is gone (the rack is down): bring it up again")]
    NamespaceGone(String),
    #[error("{context}")]
    Io { context: String, source: io::Error },
    #[error("reading {}", .path.display())]
    State {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("creating the disk {}", .path.display())]
    Disk {
        path: PathBuf,
        source: crate::qemu::QemuError,
    },
    #[error("BMC of {node}")]
    Bmc { node: String, source: IpmiSimError },
    #[error("the router advertisement sender did not start: {0}")]
    Advertiser(String),
    #[error("the rendered inventory does not validate")]
    Inventory(#[source] kiln_spec::SpecError),
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> RackError {
    let context = context.into();
    move |source| RackError::Io { context, source }
}

/// Which firmware the machines get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RackFirmware {
    /// BIOS, UEFI, BIOS, … (node-01 is BIOS).
    #[default]
    Mixed,
    Bios,
    Uefi,
}

impl RackFirmware {
    /// The firmware of the machine at `index` (0-based).
    pub fn for_node(self, index: usize) -> Firmware {
        match self {
            RackFirmware::Bios => Firmware::Bios,
            RackFirmware::Uefi => Firmware::Uefi,
            RackFirmware::Mixed if index.is_multiple_of(2) => Firmware::Bios,
            RackFirmware::Mixed => Firmware::Uefi,
        }
    }
}

/// What to build.
#[derive(Debug, Clone)]
pub struct RackSpec {
    /// Where disks, logs, secrets, `fleet.yaml` and `rack.json` go.
    pub dir: PathBuf,
    pub nodes: usize,
    pub firmware: RackFirmware,
    /// Each machine's disks in bytes (sparse files); the first is the boot disk.
    pub disks: Vec<u64>,
    pub memory_mib: u32,
    /// The program that keeps sending router advertisements on the bridge, as argv with the
    /// namespace and the bridge appended; it must call [`advertise`] (`kiln lab rack
    /// advertise`). A process, so that the advertisements outlive a detached rack's starter.
    pub advertiser: Vec<OsString>,
}

impl RackSpec {
    /// `nodes` machines with the defaults: mixed firmware, one 8 GiB disk, 2 GiB of memory.
    pub fn new(dir: impl Into<PathBuf>, nodes: usize, advertiser: Vec<OsString>) -> RackSpec {
        RackSpec {
            dir: dir.into(),
            nodes,
            firmware: RackFirmware::Mixed,
            disks: vec![8 << 30],
            memory_mib: 2048,
            advertiser,
        }
    }

    fn check(&self) -> Result<(), RackError> {
        let problem = if !(1..=MAX_NODES).contains(&self.nodes) {
            format!(
                "a rack has 1 to {MAX_NODES} nodes (the DHCP pool's size), not {}",
                self.nodes
            )
        } else if self.disks.is_empty() || self.disks.contains(&0) {
            "every node needs at least one disk, each larger than 0 bytes".into()
        } else if self.memory_mib < 128 {
            format!(
                "{} MiB of memory is too little for the firmware (128 MiB at least)",
                self.memory_mib
            )
        } else if self.advertiser.is_empty() {
            "no router advertisement sender given".into()
        } else {
            return Ok(());
        };
        Err(RackError::Spec(problem))
    }
}

/// One machine of the rack and its BMC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RackNode {
    pub name: String,
    pub role: NodeRole,
    pub mac: String,
    #[serde(with = "firmware_name")]
    pub firmware: Firmware,
    /// The machine's tap on the bridge.
    pub tap: String,
    /// The BMC's UDP port on the namespace's 127.0.0.1.
    pub bmc_port: u16,
    pub bmc_pid: u32,
    /// The simulator's configuration, state and records (see [`RackNode::records`]).
    pub bmc_dir: PathBuf,
    pub password_file: PathBuf,
    /// The serial console of the machine's latest power-on.
    pub console_log: PathBuf,
    pub disks: Vec<PathBuf>,
}

impl RackNode {
    /// What the BMC's chassis control did: calls, power-ons with their boot device, the
    /// running QEMU.
    pub fn records(&self) -> ChassisRecords {
        ChassisRecords::new(&self.bmc_dir)
    }
}

mod firmware_name {
    use super::Firmware;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(firmware: &Firmware, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(firmware)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Firmware, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Everything [`down`] and [`exec`] need, kept in `DIR/rack.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RackState {
    pub dir: PathBuf,
    pub netns: String,
    pub bridge: String,
    pub provisioner_cidr: String,
    pub advertiser_pid: u32,
    pub nodes: Vec<RackNode>,
}

impl RackState {
    /// The state of the rack in `dir`.
    pub fn load(dir: &Path) -> Result<RackState, RackError> {
        let path = dir.join(STATE_FILE);
        let text = match fs::read_to_string(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(RackError::NoRack(dir.to_path_buf()));
            }
            other => other.map_err(io_err(format!("reading {}", path.display())))?,
        };
        serde_json::from_str(&text).map_err(|source| RackError::State { path, source })
    }

    pub fn inventory_path(&self) -> PathBuf {
        self.dir.join(INVENTORY_FILE)
    }

    fn save(&self) -> Result<(), RackError> {
        let text = serde_json::to_string_pretty(self).expect("the state serialises");
        write_atomically(&self.dir.join(STATE_FILE), &text)
    }
}

/// A rack brought up by this process: dropping it stops the machines, BMCs and advertisements
/// and deletes the namespace, unless it was [detached](Rack::detach).
#[derive(Debug)]
pub struct Rack {
    state: RackState,
    sims: Vec<IpmiSim>,
    advertiser: Option<Child>,
    netns: Option<Netns>,
}

impl Rack {
    pub fn state(&self) -> &RackState {
        &self.state
    }

    pub fn nodes(&self) -> &[RackNode] {
        &self.state.nodes
    }

    pub fn inventory_path(&self) -> PathBuf {
        self.state.inventory_path()
    }

    /// Leaves the rack running after this process is gone; [`down`] stops it.
    pub fn detach(mut self) -> RackState {
        for sim in self.sims.drain(..) {
            sim.detach();
        }
        // A dropped `Child` is neither killed nor waited for.
        self.advertiser.take();
        if let Some(ns) = self.netns.take() {
            ns.detach();
        }
        self.state.clone()
    }
}

impl Drop for Rack {
    fn drop(&mut self) {
        // Machines and BMCs first: they live in the namespace.
        self.sims.clear();
        if let Some(mut child) = self.advertiser.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.netns.take();
    }
}

/// Fails unless this process runs as root.
pub fn require_root() -> Result<(), RackError> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(RackError::NotRoot)
    }
}

fn on_path(program: &str) -> bool {
    if program.contains('/') {
        return Path::new(program).is_file();
    }
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(program).is_file()))
}

fn require_program(program: &str, package: &'static str) -> Result<(), RackError> {
    if on_path(program) {
        Ok(())
    } else {
        Err(RackError::Missing {
            program: program.into(),
            package,
        })
    }
}

/// Node `index` (1-based) is `node-NN`.
pub fn node_name(index: usize) -> String {
    format!("node-{index:02}")
}

/// Node `index` (1-based) boots from `52:54:00:6b:HH:LL`, its index in the last two bytes.
pub fn node_mac(index: usize) -> String {
    format!(
        "52:54:00:6b:{:02x}:{:02x}",
        (index >> 8) & 0xff,
        index & 0xff
    )
}

/// The password file of a node, relative to the rack directory (and so to the inventory).
fn password_file(name: &str) -> PathBuf {
    Path::new(SECRETS_DIR).join(format!("{name}.bmc"))
}

/// The rack's machines as the spec describes them, under `dir`; BMC ports and process ids
/// are zero until the BMCs run.
pub fn plan_nodes(dir: &Path, spec: &RackSpec) -> Vec<RackNode> {
    (1..=spec.nodes)
        .map(|index| {
            let name = node_name(index);
            let node_dir = dir.join(&name);
            RackNode {
                role: if index == 1 {
                    NodeRole::ControlPlane
                } else {
                    NodeRole::Worker
                },
                mac: node_mac(index),
                firmware: spec.firmware.for_node(index - 1),
                tap: format!("tap-{name}"),
                bmc_port: 0,
                bmc_pid: 0,
                bmc_dir: node_dir.join("bmc"),
                password_file: dir.join(password_file(&name)),
                console_log: node_dir.join("console.log"),
                disks: (0..spec.disks.len())
                    .map(|d| node_dir.join(format!("disk{d}.raw")))
                    .collect(),
                name,
            }
        })
        .collect()
}

/// The fleet inventory of the rack: netboot on the bridge with the rack's pool, and each
/// node's boot MAC, its address (reserved in the pool, in node order) and BMC (password files
/// relative to the inventory's directory).
pub fn render_inventory(nodes: &[RackNode]) -> String {
    let mut y = String::new();
    let _ = writeln!(
        y,
        "# The virtual rack of `kiln lab rack up`; its BMCs listen on {BMC_ADDRESS} inside the\n\
         # rack's network namespace: use it through `kiln lab rack exec --dir DIR -- …`.\n\
         apiVersion: {api}\n\
         kind: Inventory\n\
         metadata:\n\
         \x20 name: lab-rack\n\
         spec:\n\
         \x20 netboot:\n\
         \x20   interface: {BRIDGE}\n\
         \x20   mode: dhcp\n\
         \x20   poolStart: {POOL_START}\n\
         \x20   poolEnd: {POOL_END}\n\
         \x20 nodes:",
        api = kiln_spec::API_VERSION,
    );
    let first: std::net::Ipv4Addr = POOL_START.parse().expect("POOL_START is an address");
    for (i, n) in nodes.iter().enumerate() {
        // Reserved in the pool, so each node keeps one address its agent is reached at.
        let address = std::net::Ipv4Addr::from(u32::from(first) + i as u32);
        let role = n.role.as_str();
        let _ = writeln!(
            y,
            "    - name: {name}\n\
             \x20     role: {role}\n\
             \x20     bootMACs: [\"{mac}\"]\n\
             \x20     bootAddress: {address}\n\
             \x20     bmc:\n\
             \x20       protocol: ipmi\n\
             \x20       address: {BMC_ADDRESS}\n\
             \x20       port: {port}\n\
             \x20       username: {BMC_USER}\n\
             \x20       passwordRef:\n\
             \x20         file: {secret}",
            name = n.name,
            mac = n.mac,
            port = n.bmc_port,
            secret = password_file(&n.name).display(),
        );
    }
    y
}

/// A random BMC password: 16 letters and digits (IPMI allows 20 bytes; nothing to quote).
fn random_password() -> String {
    use rand::distr::{Alphanumeric, SampleString};
    Alphanumeric.sample_string(&mut rand::rng(), 16)
}

fn write_atomically(path: &Path, text: &str) -> Result<(), RackError> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).map_err(io_err(format!("writing {}", tmp.display())))?;
    fs::rename(&tmp, path).map_err(io_err(format!("writing {}", path.display())))
}

fn write_secret(path: &Path, secret: &str) -> Result<(), RackError> {
    let context = || format!("writing {}", path.display());
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(context()))?;
    // `mode` applies to new files only.
    f.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(io_err(context()))?;
    writeln!(f, "{secret}").map_err(io_err(context()))
}

/// The QOM id of every rack machine's NIC (the builder names its first NIC so).
const NIC_ID: &str = "nic0";

/// The machine of `node` as it starts for a boot device: from the NIC for PXE (the disk
/// next), otherwise from the first disk.
fn machine(node: &RackNode, memory_mib: u32, boot: SimBoot) -> crate::qemu::VmBuilder {
    let pxe = boot == SimBoot::Pxe;
    let mut vm = Vm::builder()
        .name(&node.name)
        .firmware(node.firmware)
        .memory_mib(memory_mib)
        .serial_log(&node.console_log);
    for (i, path) in node.disks.iter().enumerate() {
        let mut disk = Disk::new(path).serial(format!("{}-disk{i}", node.name));
        if i == 0 {
            disk = disk.bootindex(if pxe { 2 } else { 1 });
        }
        vm = vm.disk(disk);
    }
    let bootindex = pxe.then_some(1);
    match node.firmware {
        // SeaBIOS netboots through the NIC's option ROM (iPXE).
        Firmware::Bios => vm.nic(Nic::Tap {
            ifname: node.tap.clone(),
            mac: node.mac.clone(),
            bootindex,
        }),
        // Without the option ROM OVMF uses its own PXE client, as a real UEFI machine does.
        Firmware::Uefi => vm.extra_args([
            "-netdev".to_string(),
            format!("tap,id=pxe0,ifname={},script=no,downscript=no", node.tap),
            "-device".into(),
            format!(
                "virtio-net-pci,netdev=pxe0,id={NIC_ID},mac={}{},romfile=",
                node.mac,
                bootindex
                    .map(|i| format!(",bootindex={i}"))
                    .unwrap_or_default()
            ),
        ]),
    }
}

/// Starts the router advertisement sender and waits for its `ready` line.
fn start_advertiser(argv: &[OsString], netns: &str, dir: &Path) -> Result<Child, RackError> {
    let log_path = dir.join(ADVERTISER_LOG);
    let log =
        fs::File::create(&log_path).map_err(io_err(format!("creating {}", log_path.display())))?;
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .arg(netns)
        .arg(BRIDGE)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .process_group(0);
    let mut child = cmd
        .spawn()
        .map_err(io_err(format!("starting {}", kiln_exec::describe(&cmd))))?;
    let mut line = String::new();
    let stdout = child.stdout.take().expect("stdout is piped");
    let read = BufReader::new(stdout).read_line(&mut line);
    if read.is_err() || line.trim() != "ready" {
        let _ = child.kill();
        let _ = child.wait();
        return Err(RackError::Advertiser(format!(
            "{}: {}",
            kiln_exec::describe(&cmd),
            fs::read_to_string(&log_path).unwrap_or_default().trim()
        )));
    }
    Ok(child)
}

/// Brings up the rack described by `spec`: namespace, bridge, router advertisements, taps,
/// one BMC per (powered-off) machine, `fleet.yaml` (validated) and `rack.json`.
pub fn up(spec: &RackSpec) -> Result<Rack, RackError> {
    require_root()?;
    spec.check()?;
    require_program("ipmi_sim", "openipmi")?;
    let qemu = std::env::var("KILN_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into());
    require_program(&qemu, "qemu-system-x86")?;
    fs::create_dir_all(&spec.dir).map_err(io_err(format!("creating {}", spec.dir.display())))?;
    let dir = spec
        .dir
        .canonicalize()
        .map_err(io_err(format!("resolving {}", spec.dir.display())))?;
    match RackState::load(&dir) {
        Ok(old) if Netns::existing(&old.netns).is_ok() => {
            return Err(RackError::AlreadyUp {
                dir,
                netns: old.netns,
            });
        }
        // A rack that was taken down: its disks are reused, the rest is rewritten.
        Ok(_) | Err(RackError::NoRack(_) | RackError::State { .. }) => {}
        Err(e) => return Err(e),
    }

    let netns = Netns::create("kilnrack")?;
    // From here on, an error drops `rack`, which undoes what was done so far.
    let mut rack = Rack {
        state: RackState {
            dir: dir.clone(),
            netns: netns.name().to_string(),
            bridge: BRIDGE.into(),
            provisioner_cidr: PROVISIONER_CIDR.into(),
            advertiser_pid: 0,
            nodes: Vec::new(),
        },
        sims: Vec::new(),
        advertiser: None,
        netns: Some(netns),
    };
    let ns = rack.netns.as_ref().expect("set above");
    ns.add_bridge(BRIDGE, Some(PROVISIONER_CIDR))?;
    let planned = plan_nodes(&dir, spec);
    for node in &planned {
        ns.add_tap(&node.tap, BRIDGE)?;
    }
    let advertiser = start_advertiser(&spec.advertiser, ns.name(), &dir)?;
    rack.state.advertiser_pid = advertiser.id();
    rack.advertiser = Some(advertiser);

    let secrets = dir.join(SECRETS_DIR);
    fs::create_dir_all(&secrets).map_err(io_err(format!("creating {}", secrets.display())))?;
    fs::set_permissions(&secrets, fs::Permissions::from_mode(0o700))
        .map_err(io_err(format!("restricting {}", secrets.display())))?;
    for mut node in planned {
        let password = random_password();
        write_secret(&node.password_file, &password)?;
        for (path, size) in node.disks.iter().zip(&spec.disks) {
            let parent = path.parent().expect("disks are in the node directory");
            fs::create_dir_all(parent).map_err(io_err(format!("creating {}", parent.display())))?;
            crate::qemu::create_sparse_disk(path, *size).map_err(|source| RackError::Disk {
                path: path.clone(),
                source,
            })?;
        }
        let machine_node = node.clone();
        let memory = spec.memory_mib;
        let builder = IpmiSim::builder(&node.name)
            .user(BMC_USER, password)
            .own_process_group()
            .vm(move |boot| machine(&machine_node, memory, boot))
            // Behind the disks once the machine has netbooted: a reboot boots the disk.
            .one_time_pxe(vec![serde_json::json!({
                "execute": "qom-set",
                "arguments": {
                    "path": format!("/machine/peripheral/{NIC_ID}"),
                    "property": "bootindex",
                    "value": 9,
                }
            })]);
        let bmc_dir = node.bmc_dir.clone();
        // Its lan.conf holds the password.
        fs::create_dir_all(&bmc_dir).map_err(io_err(format!("creating {}", bmc_dir.display())))?;
        fs::set_permissions(&bmc_dir, fs::Permissions::from_mode(0o700))
            .map_err(io_err(format!("restricting {}", bmc_dir.display())))?;
        // Started from a thread inside the namespace: the simulator, and the QEMU it starts,
        // live there.
        let sim = ns
            .enter(move || builder.start_in(bmc_dir))?
            .map_err(|source| RackError::Bmc {
                node: node.name.clone(),
                source,
            })?;
        node.bmc_port = sim.port();
        node.bmc_pid = sim.pid();
        rack.sims.push(sim);
        rack.state.nodes.push(node);
    }

    let inventory = render_inventory(&rack.state.nodes);
    kiln_spec::Inventory::from_yaml(&inventory).map_err(RackError::Inventory)?;
    write_atomically(&rack.state.inventory_path(), &inventory)?;
    rack.state.save()?;
    Ok(rack)
}

/// What [`down`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DownReport {
    /// Whether the directory held a rack at all.
    pub found: bool,
    /// The processes stopped, e.g. `node-01 QEMU (pid 1234)`.
    pub stopped: Vec<String>,
    /// The namespace deleted, if it still existed.
    pub netns_deleted: Option<String>,
    /// Whether disks, logs, secrets and the inventory were removed.
    pub purged: bool,
}

/// Whether `pid` runs (a zombie does not).
fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z")
    })
}

/// Whether `pid` runs with `marker` in its command line: a recorded process id may since
/// belong to an unrelated process.
fn runs_with(pid: u32, marker: &str) -> bool {
    pid != 0
        && alive(pid)
        && fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
            cmdline
                .windows(marker.len())
                .any(|w| w == marker.as_bytes())
        })
}

/// SIGTERM, then SIGKILL if `pid` is still running after a grace period.
fn stop(pid: u32) {
    use nix::sys::signal::{Signal, kill};
    let target = nix::unistd::Pid::from_raw(pid as i32);
    for (signal, grace) in [
        (Signal::SIGTERM, Duration::from_secs(3)),
        (Signal::SIGKILL, Duration::from_secs(2)),
    ] {
        if kill(target, signal).is_err() {
            return;
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if !alive(pid) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Removes a file or directory tree; a missing one is fine.
fn remove(path: &Path) -> Result<(), RackError> {
    let result = if path.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    match result {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(io_err(format!("removing {}", path.display()))(e))
        }
        _ => Ok(()),
    }
}

/// Stops the rack in `dir`: BMCs (so nothing powers a machine on again), machines, the
/// advertisement sender and whatever else still runs in the namespace, then deletes the
/// namespace. Repeating it is harmless. Disks and logs stay unless `purge`.
pub fn down(dir: &Path, purge: bool) -> Result<DownReport, RackError> {
    require_root()?;
    let state = match RackState::load(dir) {
        Err(RackError::NoRack(_)) => return Ok(DownReport::default()),
        other => other?,
    };
    let mut report = DownReport {
        found: true,
        ..DownReport::default()
    };
    for node in &state.nodes {
        let marker = node.bmc_dir.to_string_lossy();
        if runs_with(node.bmc_pid, &marker) {
            stop(node.bmc_pid);
            report
                .stopped
                .push(format!("{} BMC (pid {})", node.name, node.bmc_pid));
        }
        if let Some(pid) = node.records().vm_pid()
            && runs_with(pid, &marker)
        {
            stop(pid);
            report
                .stopped
                .push(format!("{} QEMU (pid {pid})", node.name));
        }
    }
    if runs_with(state.advertiser_pid, &state.netns) {
        stop(state.advertiser_pid);
        report.stopped.push(format!(
            "router advertisements (pid {})",
            state.advertiser_pid
        ));
    }
    if Netns::existing(&state.netns).is_ok() {
        // Whatever else was started in the rack (a provisioner run through `exec`) would keep
        // the namespace alive after it is deleted.
        let pids = crate::netns::run(Command::new("ip").args(["netns", "pids", &state.netns]))?;
        for pid in pids.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
            if alive(pid) {
                let command = fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                    .unwrap_or_default();
                stop(pid);
                report
                    .stopped
                    .push(format!("{} (pid {pid})", command.trim()));
            }
        }
        crate::netns::run(Command::new("ip").args(["netns", "del", &state.netns]))?;
        report.netns_deleted = Some(state.netns.clone());
    }
    if purge {
        for node in &state.nodes {
            remove(&dir.join(&node.name))?;
        }
        for path in [SECRETS_DIR, INVENTORY_FILE, ADVERTISER_LOG, STATE_FILE] {
            remove(&dir.join(path))?;
        }
        // Only if nothing else is in it.
        let _ = fs::remove_dir(dir);
        report.purged = true;
    }
    Ok(report)
}

/// Runs `argv` inside the rack's namespace, where the BMCs and the bridge are, with this
/// process's standard input and output; returns its exit status.
pub fn exec(dir: &Path, argv: &[OsString]) -> Result<ExitStatus, RackError> {
    require_root()?;
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| RackError::Spec("no command to run".into()))?;
    let state = RackState::load(dir)?;
    let ns =
        Netns::existing(&state.netns).map_err(|_| RackError::NamespaceGone(state.netns.clone()))?;
    ns.enter(|| Command::new(program).args(args).status())?
        .map_err(io_err(format!("running {}", program.to_string_lossy())))
}

/// Sends router advertisements on `bridge` in namespace `netns` until the process is killed,
/// after printing `ready` on standard output: the sender [`up`] starts (iPXE waits about
/// 13 s for IPv6 autoconfiguration on a link without a router).
pub fn advertise(netns: &str, bridge: &str) -> Result<Infallible, RackError> {
    let ns = Netns::existing(netns)?;
    let _advertiser = ns.start_router_advertisements(bridge)?;
    let mut stdout = io::stdout();
    writeln!(stdout, "ready")
        .and_then(|()| stdout.flush())
        .map_err(io_err("reporting readiness"))?;
    loop {
        std::thread::park();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(nodes: usize) -> RackSpec {
        RackSpec::new("/rack", nodes, vec!["kiln".into()])
    }

    fn planned(nodes: usize) -> Vec<RackNode> {
        let mut nodes = plan_nodes(Path::new("/rack"), &spec(nodes));
        for (i, n) in nodes.iter_mut().enumerate() {
            n.bmc_port = 40001 + i as u16;
        }
        nodes
    }

    #[test]
    fn inventory_of_a_two_node_rack_is_the_golden_text_and_validates() {
        let yaml = render_inventory(&planned(2));
        let golden = r#"# The virtual rack of `kiln lab rack up`; its BMCs listen on 127.0.0.1 inside the
# rack's network namespace: use it through `kiln lab rack exec --dir DIR -- …`.
apiVersion: kiln.dev/v1alpha1
kind: Inventory
metadata:
  name: lab-rack
spec:
  netboot:
    interface: kilnbr0
    mode: dhcp
    poolStart: 10.77.0.100
    poolEnd: 10.77.0.199
  nodes:
    - name: node-01
      role: control-plane
      bootMACs: ["52:54:00:6b:00:01"]
      bootAddress: 10.77.0.100
      bmc:
        protocol: ipmi
        address: 127.0.0.1
        port: 40001
        username: admin
        passwordRef:
          file: secrets/node-01.bmc
    - name: node-02
      role: worker
      bootMACs: ["52:54:00:6b:00:02"]
      bootAddress: 10.77.0.101
      bmc:
        protocol: ipmi
        address: 127.0.0.1
        port: 40002
        username: admin
        passwordRef:
          file: secrets/node-02.bmc
"#;
        assert_eq!(yaml, golden);
        let inv = kiln_spec::Inventory::from_yaml(&yaml).unwrap();
        let netboot = inv.spec.netboot.unwrap();
        assert_eq!(netboot.interface, BRIDGE);
        assert_eq!(netboot.mode, kiln_spec::inventory::NetbootMode::Dhcp);
        let bmc = inv.spec.nodes[1].bmc.as_ref().unwrap();
        assert_eq!(bmc.port(), 40002);
        assert_eq!(
            bmc.password_ref,
            kiln_spec::SecretRef::File("secrets/node-02.bmc".into())
        );
    }

    #[test]
    fn a_full_rack_validates_with_distinct_names_and_macs() {
        let nodes = planned(MAX_NODES);
        assert_eq!(nodes[9].name, "node-10");
        assert_eq!(nodes[9].mac, "52:54:00:6b:00:0a");
        assert_eq!(nodes[99].name, "node-100");
        assert_eq!(nodes[99].mac, "52:54:00:6b:00:64");
        assert_eq!(node_mac(256), "52:54:00:6b:01:00");
        let inv = kiln_spec::Inventory::from_yaml(&render_inventory(&nodes)).unwrap();
        assert_eq!(inv.spec.nodes.len(), MAX_NODES);
        assert!(nodes.iter().all(|n| n.tap.len() <= 15), "interface names");
    }

    #[test]
    fn mixed_firmware_alternates_from_bios_and_paths_follow_the_node() {
        let nodes = planned(3);
        let firmware: Vec<Firmware> = nodes.iter().map(|n| n.firmware).collect();
        assert_eq!(firmware, [Firmware::Bios, Firmware::Uefi, Firmware::Bios]);
        assert_eq!(RackFirmware::Uefi.for_node(0), Firmware::Uefi);
        let n = &nodes[1];
        assert_eq!(n.role, NodeRole::Worker);
        assert_eq!(n.console_log, Path::new("/rack/node-02/console.log"));
        assert_eq!(n.disks, [PathBuf::from("/rack/node-02/disk0.raw")]);
        assert_eq!(n.password_file, Path::new("/rack/secrets/node-02.bmc"));
    }

    #[test]
    fn the_machine_boots_from_the_nic_only_for_pxe() {
        let nodes = planned(2);
        let argv = |n: &RackNode, boot| machine(n, 512, boot).args(Path::new("/w")).join(" ");
        let bios_pxe = argv(&nodes[0], SimBoot::Pxe);
        assert!(
            bios_pxe.contains("mac=52:54:00:6b:00:01,bootindex=1"),
            "{bios_pxe}"
        );
        assert!(bios_pxe.contains("serial=node-01-disk0,bootindex=2"));
        assert!(bios_pxe.contains("-serial file:/rack/node-01/console.log"));
        let uefi_disk = argv(&nodes[1], SimBoot::Default);
        assert!(
            uefi_disk.contains("mac=52:54:00:6b:00:02,romfile="),
            "{uefi_disk}"
        );
        assert!(uefi_disk.contains("serial=node-02-disk0,bootindex=1"));
        assert!(argv(&nodes[1], SimBoot::Pxe).contains("bootindex=1,romfile="));
    }

    #[test]
    fn specs_outside_the_limits_are_refused() {
        for bad in [
            spec(0),
            spec(MAX_NODES + 1),
            RackSpec {
                disks: vec![],
                ..spec(1)
            },
            RackSpec {
                memory_mib: 64,
                ..spec(1)
            },
            RackSpec {
                advertiser: vec![],
                ..spec(1)
            },
        ] {
            assert!(matches!(bad.check(), Err(RackError::Spec(_))), "{bad:?}");
        }
        spec(1).check().unwrap();
    }

    #[test]
    fn state_survives_a_round_trip_through_json() {
        let state = RackState {
            dir: "/rack".into(),
            netns: "kilnrack1x0".into(),
            bridge: BRIDGE.into(),
            provisioner_cidr: PROVISIONER_CIDR.into(),
            advertiser_pid: 7,
            nodes: planned(2),
        };
        let text = serde_json::to_string(&state).unwrap();
        assert!(text.contains(r#""firmware":"uefi""#), "{text}");
        assert!(text.contains(r#""role":"control-plane""#), "{text}");
        assert_eq!(serde_json::from_str::<RackState>(&text).unwrap(), state);
    }

    #[test]
    fn a_rack_handle_tears_everything_down_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        // Stands in for `kiln lab rack advertise`: ready at once, then idle.
        let advertiser = ["sh", "-c", "echo ready; exec sleep 600", "sh"];
        let spec = RackSpec {
            disks: vec![1 << 20],
            ..RackSpec::new(
                dir.path(),
                1,
                advertiser.iter().map(OsString::from).collect(),
            )
        };
        let rack = up(&spec).expect("needs root, iproute2 and openipmi");
        let state = rack.state().clone();
        assert_eq!(rack.nodes().len(), 1);
        assert!(runs_with(state.nodes[0].bmc_pid, "lan.conf"));
        assert!(Netns::existing(&state.netns).is_ok());
        // The directory holds a rack that is up: a second one is refused.
        let again = up(&spec).unwrap_err();
        assert!(matches!(again, RackError::AlreadyUp { .. }), "{again}");
        drop(rack);
        assert!(!alive(state.nodes[0].bmc_pid));
        assert!(!alive(state.advertiser_pid));
        assert!(Netns::existing(&state.netns).is_err());
    }

    #[test]
    fn secrets_are_private_and_passwords_random() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.bmc");
        fs::write(&path, "old").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let password = random_password();
        write_secret(&path, &password).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(fs::read_to_string(&path).unwrap(), format!("{password}\n"));
        assert_eq!(password.len(), 16);
        assert_ne!(password, random_password());
    }
}
