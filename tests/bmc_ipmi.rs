//! `kiln bmc` against OpenIPMI's ipmi_sim on loopback with a QEMU VM attached: power really
//! starts and stops the machine, the boot device reaches the firmware, and every operation is
//! cross-checked both ways with `ipmitool -I lanplus -C 3`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::wait_until;
use kiln_lab::ipmi_sim::{IpmiSim, SimBoot};
use kiln_lab::qemu::{Nic, Vm};

struct Bmc {
    sim: IpmiSim,
    password_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Bmc {
    fn start(sim: IpmiSim) -> Bmc {
        let dir = tempfile::tempdir().unwrap();
        let password_file = dir.path().join("bmc-password");
        std::fs::write(&password_file, format!("{}\n", sim.password())).unwrap();
        Bmc {
            sim,
            password_file,
            _dir: dir,
        }
    }

    fn kiln(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("bmc")
            .args(args)
            .args(["--host", "127.0.0.1", "--port"])
            .arg(self.sim.port().to_string())
            .args(["--user", self.sim.username(), "--password-file"])
            .arg(&self.password_file)
            .output()
            .expect("running kiln")
    }

    /// Runs `kiln bmc ARGS`, asserts success and returns stdout.
    fn kiln_ok(&self, args: &[&str]) -> String {
        let out = self.kiln(args);
        assert!(
            out.status.success(),
            "kiln bmc {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn ipmitool(&self, args: &[&str]) -> String {
        let out = Command::new("ipmitool")
            .args(["-I", "lanplus", "-C", "3", "-H", "127.0.0.1", "-p"])
            .arg(self.sim.port().to_string())
            .args(["-U", self.sim.username(), "-P", self.sim.password()])
            .args(args)
            .output()
            .expect("ipmitool not found (install the Debian package ipmitool)");
        assert!(
            out.status.success(),
            "ipmitool {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Bmc {
    /// Waits for the VM's serial console to satisfy `check`; on failure shows the console,
    /// QEMU's own output and what the chassis control program was asked.
    fn wait_console(&self, what: &str, check: impl Fn(&str) -> bool) {
        let log = self.sim.serial_log().unwrap();
        let start = Instant::now();
        while !check(&serial(log)) {
            if start.elapsed() > Duration::from_secs(120) {
                panic!(
                    "timed out waiting for {what}\nserial:\n{}\nqemu:\n{}\nchassis calls: {:?}",
                    serial(log),
                    std::fs::read_to_string(self.sim.dir().join("qemu.log")).unwrap_or_default(),
                    self.sim.chassis_calls()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn serial(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).replace('\r', "")
}

fn vm_sim(name: &str) -> IpmiSim {
    // A machine without disks whose only NIC is on QEMU's internal user network: iPXE can ask
    // QEMU's built-in DHCP server and nothing leaves the QEMU process. The NIC is a boot
    // device (with its iPXE ROM) only when the BMC says PXE.
    let vm_name = name.to_string();
    IpmiSim::builder(name)
        .vm(move |boot| {
            Vm::builder()
                .name(&vm_name)
                .memory_mib(128)
                .cpus(1)
                .nic(Nic::User {
                    mac: "52:54:00:4b:4c:01".into(),
                    hostfwd: Vec::new(),
                    bootindex: (boot == SimBoot::Pxe).then_some(1),
                    isolated: false,
                })
        })
        .start()
        .unwrap()
}

#[test]
fn power_and_pxe_boot_reach_the_vm_and_agree_with_ipmitool() {
    let bmc = Bmc::start(vm_sim("kiln-bmc-vm"));
    let log = bmc.sim.serial_log().unwrap().to_path_buf();

    assert_eq!(bmc.kiln_ok(&["power", "status"]).trim(), "power off");
    assert!(bmc.sim.vm_pid().is_none());

    // One-time PXE: the BMC keeps it (ipmitool reads it back) and the machine is started
    // from the network.
    let out = bmc.kiln_ok(&["bootdev", "pxe", "--once"]);
    assert_eq!(out.trim(), "boot pxe (next boot, legacy)");
    let param = bmc.ipmitool(&["chassis", "bootparam", "get", "5"]);
    assert!(param.contains("Force PXE"), "{param}");
    assert!(param.contains("Options apply to only next boot"), "{param}");
    assert!(bmc.sim.chassis_calls().iter().any(|c| c == "set boot pxe"));

    bmc.kiln_ok(&["power", "on"]);
    wait_until("the QEMU process", Duration::from_secs(10), || {
        bmc.sim.vm_pid().is_some()
    });
    assert_eq!(bmc.sim.power_ons(), ["power-on boot=pxe"]);
    bmc.wait_console("SeaBIOS and iPXE on the serial console", |s| {
        s.contains("SeaBIOS") && s.contains("iPXE") && s.contains("net0: 52:54:00:4b:4c:01")
    });
    let s = serial(&log);
    let ipxe = s.find("iPXE").unwrap();
    assert!(
        s.find("Booting from Hard Disk")
            .is_none_or(|disk| disk > ipxe),
        "the disk was tried before the network:\n{s}"
    );
    assert!(
        bmc.ipmitool(&["chassis", "power", "status"])
            .contains("is on")
    );
    assert_eq!(bmc.kiln_ok(&["power", "status"]).trim(), "power on");

    bmc.kiln_ok(&["power", "off"]);
    wait_until("QEMU to exit", Duration::from_secs(10), || {
        bmc.sim.vm_pid().is_none()
    });
    assert!(
        bmc.ipmitool(&["chassis", "power", "status"])
            .contains("is off")
    );

    // The other direction: ipmitool sets, kiln reads, and the VM follows ipmitool. (ipmi_sim
    // keeps only the device of the boot flags, not the persistent and EFI bits.)
    bmc.ipmitool(&["chassis", "bootdev", "disk"]);
    let out = bmc.kiln_ok(&["bootparam", "--output", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["device"], "disk", "{out}");
    bmc.ipmitool(&["chassis", "power", "on"]);
    wait_until("the QEMU process", Duration::from_secs(10), || {
        bmc.sim.vm_pid().is_some()
    });
    // ipmi_sim names the hard disk "default" to its chassis control program.
    assert_eq!(bmc.sim.power_ons().last().unwrap(), "power-on boot=default");
    assert_eq!(bmc.kiln_ok(&["power", "status"]).trim(), "power on");
    bmc.wait_console("SeaBIOS trying the disk", |s| {
        s.contains("Booting from Hard Disk")
    });

    // Reset restarts the machine; a soft power-off reaches the BMC as an ACPI shutdown
    // request (which this firmware-only guest cannot act on).
    let before = bmc.sim.vm_pid().unwrap();
    bmc.kiln_ok(&["power", "reset"]);
    wait_until("a second QEMU process", Duration::from_secs(10), || {
        bmc.sim.vm_pid().is_some_and(|pid| pid != before)
    });
    assert_eq!(bmc.sim.power_ons().len(), 3);
    bmc.kiln_ok(&["power", "soft"]);
    assert_eq!(bmc.sim.chassis_calls().last().unwrap(), "set shutdown 1");
    assert!(bmc.sim.vm_pid().is_some());

    bmc.kiln_ok(&["power", "off"]);
    wait_until("QEMU to exit", Duration::from_secs(10), || {
        bmc.sim.vm_pid().is_none()
    });
}

#[test]
fn info_sensors_and_event_log_agree_with_ipmitool() {
    let bmc = Bmc::start(IpmiSim::builder("kiln-bmc-info").start().unwrap());

    let info: serde_json::Value =
        serde_json::from_str(&bmc.kiln_ok(&["info", "-o", "json"])).unwrap();
    let fru = bmc.ipmitool(&["fru", "print", "0"]);
    for (key, label) in [
        ("vendor", "Product Manufacturer"),
        ("model", "Product Name"),
        ("serial", "Product Serial"),
    ] {
        let line = fru.lines().find(|l| l.contains(label)).unwrap();
        let theirs = line.split_once(':').unwrap().1.trim();
        assert_eq!(info[key], theirs, "{key}: {fru}");
    }
    let mc = bmc.ipmitool(&["mc", "info"]);
    assert!(
        mc.contains(&format!(
            "Firmware Revision         : {}",
            info["firmware"].as_str().unwrap()
        )),
        "{mc}\n{info}"
    );
    assert_eq!(info["chassis"]["power"], "off");

    let sensors = bmc.kiln_ok(&["sensors"]);
    let sdr = bmc.ipmitool(&["sdr", "list"]);
    assert!(
        sdr.contains("CPU Temp") && sdr.contains("42 degrees C"),
        "{sdr}"
    );
    let ours = sensors.lines().find(|l| l.starts_with("CPU Temp")).unwrap();
    assert!(ours.ends_with("42 degrees C"), "{sensors}");

    let sel: serde_json::Value =
        serde_json::from_str(&bmc.kiln_ok(&["sel", "-o", "json"])).unwrap();
    let listed = bmc.ipmitool(&["sel", "list"]);
    assert_eq!(
        sel.as_array().unwrap().len(),
        listed.lines().count(),
        "{sel}\n{listed}"
    );
    assert!(
        sel[0]["message"].as_str().unwrap().contains("Temperature"),
        "{sel}"
    );
    bmc.kiln_ok(&["sel", "--clear"]);
    let info = bmc.ipmitool(&["sel", "info"]);
    assert!(info.contains("Entries          : 0"), "{info}");
    assert_eq!(bmc.kiln_ok(&["sel"]).trim(), "event log empty");

    let probe: serde_json::Value =
        serde_json::from_str(&bmc.kiln_ok(&["probe", "-o", "json"])).unwrap();
    assert_eq!(probe["authenticated"], true);
    assert_eq!(probe["power"], "off");
    // Without a chassis control program ipmi_sim cannot keep boot options; ipmitool agrees.
    assert_eq!(probe["bootOverride"], false, "{probe}");
    let out = Command::new("ipmitool")
        .args(["-I", "lanplus", "-C", "3", "-H", "127.0.0.1", "-p"])
        .arg(bmc.sim.port().to_string())
        .args(["-U", bmc.sim.username(), "-P", bmc.sim.password()])
        .args(["chassis", "bootparam", "get", "5"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&out.stdout).contains("Boot Device Selector"));
    // ipmi_sim 2.0.33 refuses suite 17; the probe reports that instead of failing.
    assert_eq!(probe["cipherSuites"], serde_json::json!([3]), "{probe}");
}

#[test]
fn wrong_password_fails_as_authentication_and_is_never_logged() {
    let bmc = Bmc::start(IpmiSim::builder("kiln-bmc-auth").start().unwrap());
    // The right password with -vv: the secret appears nowhere in the output.
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "-vv",
            "bmc",
            "power",
            "status",
            "--host",
            "127.0.0.1",
            "--port",
        ])
        .arg(bmc.sim.port().to_string())
        .args(["--user", bmc.sim.username(), "--password-file"])
        .arg(&bmc.password_file)
        .output()
        .unwrap();
    assert!(out.status.success());
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        all.contains("session open"),
        "no debug output at -vv:\n{all}"
    );
    assert!(
        !all.contains(bmc.sim.password()),
        "password in output:\n{all}"
    );

    std::fs::write(&bmc.password_file, "wrong-password").unwrap();
    let out = bmc.kiln(&["power", "status"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("authentication failed"), "{err}");
}

#[test]
fn fleet_results_stream_per_node_from_the_inventory() {
    let sims: Vec<IpmiSim> = (0..3)
        .map(|i| IpmiSim::builder(format!("kiln-fleet-{i}")).start().unwrap())
        .collect();
    // A node whose BMC never answers.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = String::new();
    for (i, sim) in sims.iter().enumerate() {
        std::fs::write(dir.path().join(format!("pw-{i}")), sim.password()).unwrap();
        nodes.push_str(&format!(
            "    - name: rack-{i}\n      role: {role}\n      bmc: {{protocol: ipmi, address: 127.0.0.1, port: {port}, username: {user}, passwordRef: {{file: pw-{i}}}}}\n",
            role = if i == 0 { "control-plane" } else { "worker" },
            port = sim.port(),
            user = sim.username(),
        ));
    }
    nodes.push_str(&format!(
        "    - name: rack-9\n      role: storage\n      bmc: {{protocol: ipmi, address: 127.0.0.1, port: {}, username: admin, passwordRef: {{env: KILN_TEST_FLEET_PW}}}}\n",
        silent.local_addr().unwrap().port()
    ));
    let inventory = dir.path().join("fleet.yaml");
    std::fs::write(
        &inventory,
        format!("apiVersion: kiln.dev/v1alpha1\nkind: Inventory\nspec:\n  nodes:\n{nodes}"),
    )
    .unwrap();
    let fleet = |selector: &str| {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["bmc", "power", "status", "-o", "json", "--inventory"])
            .arg(&inventory)
            .args([
                "--nodes",
                selector,
                "--timeout",
                "200ms",
                "--retries",
                "1",
                "--attempts",
                "2",
            ])
            .env("KILN_TEST_FLEET_PW", "unused")
            .output()
            .unwrap()
    };

    let out = fleet("rack-*");
    assert!(!out.status.success(), "a failed node must fail the command");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4, "{lines:?}");
    for line in &lines {
        if line["node"] == "rack-9" {
            assert_eq!(line["ok"], false);
            assert_eq!(line["errorKind"], "timeout");
            assert_eq!(line["attempts"], 2, "timeouts are retried");
        } else {
            assert_eq!(line["ok"], true, "{line}");
            assert_eq!(line["value"]["power"], "off");
        }
    }
    // The silent node comes last: the others are reported as soon as they answer.
    assert_eq!(lines[3]["node"], "rack-9");

    let out = fleet("role=worker");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["node"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    names.sort();
    assert_eq!(names, ["rack-1", "rack-2"]);
}
