//! OpenIPMI `ipmi_sim` instances: configuration, start/stop, chassis control of a QEMU VM.
//!
//! Each instance is a real IPMI 2.0 LAN BMC on a loopback UDP port with its own `lan.conf`,
//! emulation command file and state directory. With a VM attached, the simulator's
//! `chassis_control` program owns power: `power on` starts QEMU (the argv comes from
//! [`crate::qemu::VmBuilder::command_line`]) booting from the device the BMC was told to use,
//! `power off` stops it, and the machine reaches the simulator over `ipmi-bmc-extern`.

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::qemu::VmBuilder;

const IPMI_SIM: &str = "ipmi_sim";

#[derive(Debug, thiserror::Error)]
pub enum IpmiSimError {
    #[error("{program} not found (install the Debian package {package})")]
    Missing {
        program: &'static str,
        package: &'static str,
    },
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    #[error("ipmi_sim on 127.0.0.1:{port} did not answer within {waited:?}; its output:\n{log}")]
    NotReady {
        port: u16,
        waited: Duration,
        log: String,
    },
    #[error("preparing the VM: {0}")]
    Vm(#[from] crate::qemu::QemuError),
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> IpmiSimError {
    let context = context.into();
    move |source| IpmiSimError::Io { context, source }
}

/// What the BMC's FRU 0 says about the machine (product info area).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FruInfo {
    pub manufacturer: String,
    pub product: String,
    pub serial: String,
}

/// FRU inventory image with a product info area (Platform Management FRU Information Storage
/// Definition v1.0 §8–10): common header, then manufacturer, product name, part number,
/// version, serial, asset tag and FRU file ID as 8-bit ASCII type/length fields, each area
/// checksummed.
pub fn fru_image(info: &FruInfo) -> Vec<u8> {
    fn zero_sum(bytes: &[u8]) -> u8 {
        bytes
            .iter()
            .fold(0u8, |a, b| a.wrapping_add(*b))
            .wrapping_neg()
    }
    let mut header = vec![0x01, 0, 0, 0, 0x01, 0, 0];
    header.push(zero_sum(&header));
    let mut area = vec![0x01, 0x00, 0x00];
    for field in [
        info.manufacturer.as_str(),
        info.product.as_str(),
        "",
        "",
        info.serial.as_str(),
        "",
        "",
    ] {
        let bytes = &field.as_bytes()[..field.len().min(63)];
        area.push(0xC0 | bytes.len() as u8);
        area.extend_from_slice(bytes);
    }
    area.push(0xC1);
    // Room for the checksum, then whole 8-byte units.
    area.resize((area.len() + 1).div_ceil(8) * 8, 0);
    let units = area.len() / 8;
    area[1] = units as u8;
    let last = area.len() - 1;
    area[last] = zero_sum(&area[..last]);
    header.extend_from_slice(&area);
    header
}

/// A full sensor record (SDR type 01h, IPMI 2.0 §43.1) for a linear temperature sensor in °C
/// read as an unsigned byte, without thresholds.
fn temperature_sdr(record_id: u16, sensor_number: u8, name: &str) -> Vec<u8> {
    let mut r = Vec::new();
    r.extend_from_slice(&record_id.to_le_bytes());
    r.extend_from_slice(&[0x51, 0x01, 0x00]); // SDR version, type, length (set below)
    r.extend_from_slice(&[0x20, 0x00, sensor_number]); // owner 0x20, LUN 0, number
    r.extend_from_slice(&[0x03, 0x01]); // entity: processor 1
    r.extend_from_slice(&[0x7F, 0x68]); // initialization, capabilities
    r.extend_from_slice(&[0x01, 0x01]); // type temperature, threshold reading
    r.extend_from_slice(&[0, 0, 0, 0, 0, 0]); // event and reading masks
    r.extend_from_slice(&[0x00, 0x01, 0x00]); // unsigned; degrees C; no modifier
    r.extend_from_slice(&[0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00]); // linear, M=1, B=0, exps 0
    r.extend_from_slice(&[0x00, 0x00, 0x00, 0x00, 0xFF, 0x00]); // flags, nominal, normal, range
    r.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // thresholds, hysteresis, OEM
    let name = &name.as_bytes()[..name.len().min(16)];
    r.push(0xC0 | name.len() as u8);
    r.extend_from_slice(name);
    r[4] = (r.len() - 5) as u8;
    r
}

/// Shell single-quoting.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The boot device ipmi_sim hands its chassis control program (`set boot DEV`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimBoot {
    /// No override (also what ipmi_sim calls the hard disk).
    Default,
    Pxe,
    Cdrom,
    Bios,
}

impl SimBoot {
    const ALL: [SimBoot; 4] = [
        SimBoot::Default,
        SimBoot::Pxe,
        SimBoot::Cdrom,
        SimBoot::Bios,
    ];

    fn word(self) -> &'static str {
        match self {
            SimBoot::Default => "default",
            SimBoot::Pxe => "pxe",
            SimBoot::Cdrom => "cdrom",
            SimBoot::Bios => "bios",
        }
    }
}

/// The machine as it is started for a given boot device (the firmware of a real machine reads
/// the device from its BMC; QEMU's firmware cannot, so the boot order is set at start).
pub type MachineFor = std::sync::Arc<dyn Fn(SimBoot) -> VmBuilder + Send + Sync>;

/// Sends the QMP commands in a file (one JSON object a line) to a just-started QEMU, waiting
/// for its socket; a small program because the chassis control must return at once.
const QMP_SEND: &str = r#"import json, socket, sys, time
sock, commands = sys.argv[1], sys.argv[2]
for _ in range(200):
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect(sock)
        break
    except OSError:
        time.sleep(0.05)
else:
    sys.exit("no QMP socket at " + sock)
f = s.makefile("rw")
f.readline()
for line in ["{\"execute\": \"qmp_capabilities\"}"] + open(commands).read().splitlines():
    f.write(line + "\n")
    f.flush()
    print(line, "->", f.readline().strip())
"#;

/// Describes one simulated BMC.
#[derive(Clone)]
pub struct IpmiSimBuilder {
    name: String,
    username: String,
    password: String,
    port: Option<u16>,
    fru: FruInfo,
    temperature: u8,
    vm: Option<MachineFor>,
    own_process_group: bool,
    one_time_pxe: Vec<serde_json::Value>,
}

impl std::fmt::Debug for IpmiSimBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IpmiSimBuilder")
            .field("name", &self.name)
            .field("port", &self.port)
            .field("vm", &self.vm.is_some())
            .finish_non_exhaustive()
    }
}

impl IpmiSimBuilder {
    pub fn new(name: impl Into<String>) -> IpmiSimBuilder {
        IpmiSimBuilder {
            name: name.into(),
            username: "admin".into(),
            password: "kiln-test".into(),
            port: None,
            fru: FruInfo {
                manufacturer: "Kiln Lab".into(),
                product: "Virtual Node".into(),
                serial: "KL-0001".into(),
            },
            temperature: 42,
            vm: None,
            own_process_group: false,
            one_time_pxe: Vec::new(),
        }
    }

    /// The administrator account (user 2).
    pub fn user(mut self, name: impl Into<String>, password: impl Into<String>) -> Self {
        self.username = name.into();
        self.password = password.into();
        self
    }

    /// The UDP port on 127.0.0.1; a free one when unset.
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    pub fn fru(mut self, fru: FruInfo) -> Self {
        self.fru = fru;
        self
    }

    /// The reading of the "CPU Temp" sensor, in °C.
    pub fn temperature(mut self, celsius: u8) -> Self {
        self.temperature = celsius;
        self
    }

    /// Starts ipmi_sim in its own process group, so that a Ctrl-C aimed at the caller's
    /// terminal does not reach it: for simulators handed over with [`IpmiSim::detach`].
    pub fn own_process_group(mut self) -> Self {
        self.own_process_group = true;
        self
    }

    /// The machine this BMC powers, described per boot device (e.g. a NIC with a `bootindex`
    /// for [`SimBoot::Pxe`]). Its serial console shows the firmware (SeaBIOS is told to use
    /// the serial port) and it reaches the simulator over `ipmi-bmc-extern`.
    pub fn vm(mut self, machine: impl Fn(SimBoot) -> VmBuilder + Send + Sync + 'static) -> Self {
        self.vm = Some(std::sync::Arc::new(machine));
        self
    }

    /// Makes the PXE boot device one-time, as IPMI's is by default: after starting the
    /// machine from the network, these QMP commands (e.g. `qom-set` of the NIC's `bootindex`
    /// behind the disk) are sent to it, so every later reset of the running machine boots as
    /// if no override had been set. QEMU rereads the boot order at each reset.
    pub fn one_time_pxe(mut self, qmp_commands: Vec<serde_json::Value>) -> Self {
        self.one_time_pxe = qmp_commands;
        self
    }

    fn lan_conf(&self, dir: &Path, port: u16, vm_port: Option<u16>) -> String {
        let mut c = String::new();
        let _ = writeln!(c, "# ipmi_sim configuration written by kiln-lab");
        let _ = writeln!(c, "name \"{}\"", self.name);
        let _ = writeln!(c, "set_working_mc 0x20");
        let _ = writeln!(c, "  startlan 1");
        let _ = writeln!(c, "    addr 127.0.0.1 {port}");
        let _ = writeln!(c, "    priv_limit admin");
        for level in ["callback", "user", "operator", "admin"] {
            let _ = writeln!(c, "    allowed_auths_{level} md5");
        }
        let _ = writeln!(c, "    guid a123456789abcdefa123456789abcdef");
        let _ = writeln!(c, "  endlan");
        if let Some(vm_port) = vm_port {
            let _ = writeln!(
                c,
                "  chassis_control \"{}\"",
                dir.join("chassis-control").display()
            );
            let _ = writeln!(c, "  serial 15 127.0.0.1 {vm_port} codec VM");
        }
        let _ = writeln!(
            c,
            "  user 2 true \"{}\" \"{}\" admin 10 md5",
            self.username, self.password
        );
        c
    }

    fn emu(&self) -> String {
        let hex = |bytes: &[u8]| {
            bytes
                .iter()
                .map(|b| format!("{b:#04x}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let fru = fru_image(&self.fru);
        let sdr = temperature_sdr(1, 1, "CPU Temp");
        format!(
            "# ipmi_sim emulation written by kiln-lab\n\
             mc_setbmc 0x20\n\
             mc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr\n\
             sel_enable 0x20 1000 0x0a\n\
             mc_add_fru_data 0x20 0 {fru_len} data {fru}\n\
             main_sdr_add 0x20 {sdr}\n\
             sensor_add 0x20 0 1 0x01 0x01\n\
             sensor_set_value 0x20 0 1 {temp} 0\n\
             sel_add 0x20 0x02 0 0 0 0 0x20 0x00 0x04 0x01 0x01 0x01 0x57 {temp} 40\n\
             mc_enable 0x20\n",
            fru_len = fru.len(),
            fru = hex(&fru),
            sdr = hex(&sdr),
            temp = self.temperature,
        )
    }

    /// The `chassis_control` program: ipmi_sim runs it as `PROG get power|boot` (answer
    /// `power:0|1`, `boot:DEV`) and `PROG set power 0|1 | boot DEV | reset 1 | shutdown 1`. It must return
    /// within a second or the BMC's client retransmits, so QEMU is started in the background.
    fn chassis_control(
        dir: &Path,
        argv_for: &[(SimBoot, Vec<String>)],
        qmp_socket: &Path,
    ) -> String {
        let cases: String = argv_for
            .iter()
            .map(|(boot, argv)| {
                let argv: Vec<String> = argv.iter().map(|a| sh_quote(a)).collect();
                format!("    {}) set -- {} ;;\n", boot.word(), argv.join(" "))
            })
            .collect();
        format!(
            r#"#!/bin/sh
# ipmi_sim chassis_control program written by kiln-lab: power and boot device of one VM.
dir={dir}
echo "$*" >> "$dir/chassis.log"
running() {{
  [ -f "$dir/vm.pid" ] || return 1
  state=$(cut -d' ' -f3 "/proc/$(cat "$dir/vm.pid")/stat" 2>/dev/null)
  [ -n "$state" ] && [ "$state" != Z ]
}}
bootdev() {{ cat "$dir/boot" 2>/dev/null || echo default; }}
start() {{
  case "$(bootdev)" in
{cases}    *) return 1 ;;
  esac
  echo "power-on boot=$(bootdev)" >> "$dir/boots.log"
  setsid "$@" >"$dir/qemu.log" 2>&1 </dev/null &
  echo $! > "$dir/vm.pid"
  if [ "$(bootdev)" = pxe ] && [ -f "$dir/one-time-pxe.qmp" ]; then
    setsid python3 "$dir/qmp-send.py" {qmp} "$dir/one-time-pxe.qmp" \
      >>"$dir/qmp.log" 2>&1 </dev/null &
  fi
}}
stop() {{
  if running; then
    pid=$(cat "$dir/vm.pid")
    kill "$pid"
    i=0
    while running && [ $i -lt 40 ]; do sleep 0.02; i=$((i + 1)); done
    running && kill -9 "$pid"
  fi
  rm -f "$dir/vm.pid"
}}
case "$1 $2" in
  "get power") if running; then echo power:1; else echo power:0; fi ;;
  "get boot") echo "boot:$(bootdev)" ;;
  "set power") if [ "$3" = 1 ]; then running || start; else stop; fi ;;
  "set boot") echo "$3" > "$dir/boot" ;;
  "set reset") stop; start ;;
  # ACPI soft-off: recorded only; a firmware-only guest has no handler for it.
  "set shutdown") ;;
esac
"#,
            dir = sh_quote(&dir.display().to_string()),
            qmp = sh_quote(&qmp_socket.display().to_string()),
        )
    }

    /// Writes the configuration to a temporary directory and starts `ipmi_sim`; returns once
    /// it answers on its port.
    pub fn start(self) -> Result<IpmiSim, IpmiSimError> {
        let temp = tempfile::Builder::new()
            .prefix(&format!("ipmi-sim-{}-", self.name))
            .tempdir()
            .map_err(io_err("creating the ipmi_sim directory"))?;
        self.start_with(temp.path().to_path_buf(), Some(temp))
    }

    /// Like [`IpmiSimBuilder::start`], with the configuration, state and the VM's files kept in
    /// `dir` (created if missing).
    pub fn start_in(self, dir: impl Into<PathBuf>) -> Result<IpmiSim, IpmiSimError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        self.start_with(dir, None)
    }

    fn start_with(
        self,
        path: PathBuf,
        temp: Option<tempfile::TempDir>,
    ) -> Result<IpmiSim, IpmiSimError> {
        // A reused directory: the records and boot device of an earlier simulator are stale.
        for stale in ["chassis.log", "boots.log", "vm.pid", "boot"] {
            match fs::remove_file(path.join(stale)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(IpmiSimError::Io {
                        context: format!("removing {}", path.join(stale).display()),
                        source: e,
                    });
                }
                _ => {}
            }
        }
        let port = match self.port {
            Some(p) => p,
            None => free_port(false)?,
        };
        let mut serial_log = None;
        let vm_port = match &self.vm {
            None => None,
            Some(machine) => {
                let vm_port = free_port(true)?;
                let sercon = path.join("sercon-port.bin");
                // SeaBIOS mirrors its screen to the serial port named in this fw_cfg file.
                fs::write(&sercon, 0x3F8u16.to_le_bytes())
                    .map_err(io_err("writing the SeaBIOS serial console setting"))?;
                let work = path.join("vm");
                let mut argv_for = Vec::new();
                for boot in SimBoot::ALL {
                    let vm = machine(boot).work_dir(&work).extra_args([
                        "-fw_cfg".to_string(),
                        format!("name=etc/sercon-port,file={}", sercon.display()),
                        "-chardev".into(),
                        format!("socket,id=ipmi0,host=127.0.0.1,port={vm_port},reconnect=10"),
                        "-device".into(),
                        "ipmi-bmc-extern,chardev=ipmi0,id=bmc0".into(),
                        "-device".into(),
                        "isa-ipmi-kcs,bmc=bmc0".into(),
                    ]);
                    vm.prepare_work_dir(&work)?;
                    serial_log = Some(vm.serial_log_path(&work));
                    argv_for.push((boot, vm.command_line(&work)));
                }
                if !self.one_time_pxe.is_empty() {
                    let lines: String =
                        self.one_time_pxe.iter().map(|c| format!("{c}\n")).collect();
                    fs::write(path.join("one-time-pxe.qmp"), lines)
                        .map_err(io_err("writing the one-time boot commands"))?;
                    fs::write(path.join("qmp-send.py"), QMP_SEND)
                        .map_err(io_err("writing the QMP client"))?;
                }
                let program = path.join("chassis-control");
                let qmp = crate::qemu::VmBuilder::qmp_path(&work);
                fs::write(&program, Self::chassis_control(&path, &argv_for, &qmp))
                    .map_err(io_err("writing the chassis control program"))?;
                fs::set_permissions(&program, fs::Permissions::from_mode(0o755))
                    .map_err(io_err("making the chassis control program executable"))?;
                Some(vm_port)
            }
        };
        let conf = path.join("lan.conf");
        fs::write(&conf, self.lan_conf(&path, port, vm_port))
            .map_err(io_err("writing lan.conf"))?;
        let emu = path.join("sim.emu");
        fs::write(&emu, self.emu()).map_err(io_err("writing the emulation commands"))?;
        let state = path.join("state");
        fs::create_dir_all(&state).map_err(io_err("creating the state directory"))?;
        let log_path = path.join("ipmi_sim.log");
        let log = fs::File::create(&log_path).map_err(io_err("creating the ipmi_sim log"))?;
        let log_err = log
            .try_clone()
            .map_err(io_err("duplicating a log handle"))?;
        let mut cmd = Command::new(IPMI_SIM);
        if self.own_process_group {
            std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        }
        let child = cmd
            .arg("-c")
            .arg(&conf)
            .arg("-f")
            .arg(&emu)
            .arg("-s")
            .arg(&state)
            .arg("-n")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => IpmiSimError::Missing {
                    program: IPMI_SIM,
                    package: "openipmi",
                },
                _ => IpmiSimError::Io {
                    context: "starting ipmi_sim".into(),
                    source: e,
                },
            })?;
        let mut sim = IpmiSim {
            child,
            port,
            serial_log,
            username: self.username,
            password: self.password,
            records: ChassisRecords::new(&path),
            dir: path,
            temp,
            detached: false,
        };
        sim.wait_ready(Duration::from_secs(10))?;
        Ok(sim)
    }
}

/// A free loopback port of the given kind, as the kernel hands it out.
fn free_port(tcp: bool) -> Result<u16, IpmiSimError> {
    let port = if tcp {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
    } else {
        UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .map(|a| a.port())
    };
    port.map_err(io_err("finding a free port"))
}

/// A running simulator; dropping it stops the simulator and its VM unless it was detached.
#[derive(Debug)]
pub struct IpmiSim {
    child: Child,
    port: u16,
    serial_log: Option<PathBuf>,
    username: String,
    password: String,
    dir: PathBuf,
    records: ChassisRecords,
    temp: Option<tempfile::TempDir>,
    detached: bool,
}

/// What the chassis control program of a simulator records in its directory: readable while
/// the simulator runs and after it was detached from its starter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChassisRecords {
    dir: PathBuf,
}

impl ChassisRecords {
    /// The records in a simulator's directory ([`IpmiSim::dir`]).
    pub fn new(dir: impl Into<PathBuf>) -> ChassisRecords {
        ChassisRecords { dir: dir.into() }
    }

    /// Every call of the chassis control program, e.g. `set boot pxe`, `set power 1`.
    pub fn chassis_calls(&self) -> Vec<String> {
        read_lines(&self.dir.join("chassis.log"))
    }

    /// One line per VM power-on with the boot device it was started with (`power-on boot=pxe`).
    pub fn power_ons(&self) -> Vec<String> {
        read_lines(&self.dir.join("boots.log"))
    }

    /// The QEMU process id while the VM runs.
    pub fn vm_pid(&self) -> Option<u32> {
        let pid: u32 = fs::read_to_string(self.dir.join("vm.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let state = stat.rsplit(')').next()?.split_whitespace().next()?;
        (state != "Z").then_some(pid)
    }

    /// QEMU's own output of the latest power-on.
    pub fn qemu_log(&self) -> String {
        fs::read_to_string(self.dir.join("qemu.log")).unwrap_or_default()
    }
}

impl IpmiSim {
    pub fn builder(name: impl Into<String>) -> IpmiSimBuilder {
        IpmiSimBuilder::new(name)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn username(&self) -> &str {
        &self.username
    }

    pub fn password(&self) -> &str {
        &self.password
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Leaves the simulator, its VM and its directory running and in place when this handle
    /// is gone (they outlive the process); returns the simulator's process id.
    pub fn detach(mut self) -> u32 {
        self.detached = true;
        if let Some(temp) = self.temp.take() {
            let _ = temp.keep();
        }
        self.child.id()
    }

    /// The VM's serial console log (the file of its latest power-on).
    pub fn serial_log(&self) -> Option<&Path> {
        self.serial_log.as_deref()
    }

    /// Every call of the chassis control program, e.g. `set boot pxe`, `set power 1`.
    pub fn chassis_calls(&self) -> Vec<String> {
        self.records.chassis_calls()
    }

    /// One line per VM power-on with the boot device it was started with (`power-on boot=pxe`).
    pub fn power_ons(&self) -> Vec<String> {
        self.records.power_ons()
    }

    /// The QEMU process id while the VM runs.
    pub fn vm_pid(&self) -> Option<u32> {
        self.records.vm_pid()
    }

    /// Waits until ipmi_sim answers a Get Channel Authentication Capabilities request.
    fn wait_ready(&mut self, timeout: Duration) -> Result<(), IpmiSimError> {
        // RMCP, IPMI 1.5 session-less, Get Channel Auth Capabilities (channel E, admin).
        const PING: [u8; 23] = [
            0x06, 0x00, 0xFF, 0x07, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0x09, 0x20, 0x18, 0xC8, 0x81,
            0x00, 0x38, 0x8E, 0x04, 0xB5,
        ];
        let sock = UdpSocket::bind("127.0.0.1:0").map_err(io_err("binding a UDP socket"))?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .map_err(io_err("setting a socket timeout"))?;
        let start = Instant::now();
        let mut buf = [0u8; 512];
        while start.elapsed() < timeout {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(IpmiSimError::NotReady {
                    port: self.port,
                    waited: start.elapsed(),
                    log: format!("exited with {status}\n{}", self.log()),
                });
            }
            let _ = sock.send_to(&PING, self.addr());
            if let Ok((n, _)) = sock.recv_from(&mut buf)
                && n > 0
            {
                return Ok(());
            }
        }
        Err(IpmiSimError::NotReady {
            port: self.port,
            waited: timeout,
            log: self.log(),
        })
    }

    /// The simulator's own output.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("ipmi_sim.log")).unwrap_or_default()
    }

    fn stop_vm(&self) {
        if let Some(pid) = self.vm_pid() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn read_lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .map(|t| t.lines().map(str::to_string).collect())
        .unwrap_or_default()
}

impl Drop for IpmiSim {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        self.stop_vm();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fru_image_areas_are_checksummed_and_aligned() {
        let fru = fru_image(&FruInfo {
            manufacturer: "Acme".into(),
            product: "R1".into(),
            serial: "S1".into(),
        });
        assert_eq!(fru[..8].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let area = &fru[8..];
        assert_eq!(area.len(), area[1] as usize * 8);
        assert_eq!(area.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert_eq!(&area[3..8], b"\xC4Acme");
    }

    #[test]
    fn sdr_length_byte_counts_the_body() {
        let sdr = temperature_sdr(1, 1, "CPU Temp");
        assert_eq!(sdr[4] as usize, sdr.len() - 5);
        assert_eq!(sdr.len(), 48 + 8);
    }

    #[test]
    fn shell_quoting_survives_quotes() {
        assert_eq!(sh_quote("a'b"), r"'a'\''b'");
    }
}
