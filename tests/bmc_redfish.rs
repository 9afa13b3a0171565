//! `kiln bmc --protocol redfish` against sushy-emulator (PyPI sushy-tools, fake driver) on
//! 127.0.0.1 over HTTPS with a test CA, cross-checked with curl.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::free_port;

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A test CA and a server certificate for 127.0.0.1 signed by it (openssl).
fn make_certs(dir: &Path) {
    let ossl = |args: &[&str]| run(Command::new("openssl").args(args).current_dir(dir));
    ossl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=kiln test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    ossl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "bmc.key",
        "-out",
        "bmc.csr",
    ]);
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    ossl(&[
        "x509",
        "-req",
        "-in",
        "bmc.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "bmc.pem",
    ]);
}

/// sushy-emulator with the fake driver, HTTPS and basic authentication; killed on drop.
struct Sushy {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

const PASSWORD: &str = "redfish-s3cret";

impl Sushy {
    fn start() -> Sushy {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        make_certs(d);
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/redfish-sim.sh");
        run(Command::new(&script).arg("--install"));
        let cache = kiln_spec::paths::cache_dir();
        // The users file takes bcrypt hashes only; the virtualenv has bcrypt.
        let hash = run(Command::new(cache.join("venv-sushy/bin/python")).args([
            "-c",
            &format!(
                "import bcrypt; print(bcrypt.hashpw(b'{PASSWORD}', bcrypt.gensalt()).decode())"
            ),
        ]))
        .stdout;
        std::fs::write(
            d.join("users"),
            format!("admin:{}", String::from_utf8_lossy(&hash)),
        )
        .unwrap();
        std::fs::write(
            d.join("emulator.conf"),
            format!(
                "SUSHY_EMULATOR_AUTH_FILE = {:?}\nSUSHY_EMULATOR_STATE_DIR = {:?}\n",
                d.join("users"),
                d.join("state")
            ),
        )
        .unwrap();
        let port = free_port();
        let log = std::fs::File::create(d.join("sushy.log")).unwrap();
        let child = Command::new(&script)
            .args(["--fake", "-i", "127.0.0.1", "-p", &port.to_string()])
            .arg("--config")
            .arg(d.join("emulator.conf"))
            .arg("--ssl-certificate")
            .arg(d.join("bmc.pem"))
            .arg("--ssl-key")
            .arg(d.join("bmc.key"))
            .env("KILN_CACHE", &cache)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut s = Sushy { child, port, dir };
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = s.child.try_wait() {
                panic!("sushy-emulator exited ({status}): {}", s.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "sushy-emulator did not listen: {}",
                s.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        std::fs::write(s.dir.path().join("pw"), PASSWORD).unwrap();
        s
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sushy.log")).unwrap_or_default()
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn kiln(&self, tls: &[&str], args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("bmc")
            .args(args)
            .args(["--protocol", "redfish", "--host", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .args(["--user", "admin", "--password-file"])
            .arg(self.dir.path().join("pw"))
            .args(tls)
            .output()
            .unwrap()
    }

    fn kiln_ok(&self, args: &[&str]) -> String {
        let ca = self.ca().display().to_string();
        let out = self.kiln(&["--ca-cert", &ca], args);
        assert!(
            out.status.success(),
            "kiln bmc {args:?}: {}\nsushy log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The ComputerSystem as curl sees it.
    fn system(&self) -> serde_json::Value {
        let members = self.curl("/redfish/v1/Systems");
        self.curl(members["Members"][0]["@odata.id"].as_str().unwrap())
    }

    /// The CD virtual media slot as curl sees it.
    fn cd(&self) -> serde_json::Value {
        let system = self.system();
        let id = system["@odata.id"].as_str().unwrap();
        self.curl(&format!("{id}/VirtualMedia/Cd"))
    }

    /// GET with curl, verifying the server with the test CA: the independent view.
    fn curl(&self, path: &str) -> serde_json::Value {
        let out = run(Command::new("curl")
            .args(["-sS", "--fail", "--cacert"])
            .arg(self.ca())
            .args(["-u", &format!("admin:{PASSWORD}")])
            .arg(format!("https://127.0.0.1:{}{path}", self.port)));
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Drop for Sushy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Serves one file over plain HTTP on loopback for virtual media to fetch.
fn serve_image(body: &'static [u8]) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut req = [0u8; 4096];
            let _ = stream.read(&mut req);
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(body);
        }
    });
    port
}

fn wait_power(s: &Sushy, want: &str) {
    let start = Instant::now();
    // The fake driver applies power changes 1–11 s after the request, as real hardware lags.
    loop {
        let system = s.system();
        if system["PowerState"] == want {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "power never became {want}: {system}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(
        s.kiln_ok(&["power", "status"]).trim(),
        format!("power {}", want.to_lowercase())
    );
}

#[test]
fn redfish_power_boot_override_media_and_tls() {
    let s = Sushy::start();

    // TLS: the BMC's certificate is refused without its CA, accepted with it or --insecure.
    let out = s.kiln(&[], &["power", "status"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("TLS") && err.contains("--ca-cert"), "{err}");
    let out = s.kiln(&["--insecure"], &["power", "status"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Power, checked against the Redfish resource itself.
    assert_eq!(s.kiln_ok(&["power", "status"]).trim(), "power off");
    s.kiln_ok(&["power", "on"]);
    wait_power(&s, "On");
    s.kiln_ok(&["power", "off"]);
    wait_power(&s, "Off");

    // Boot override: target and mode land in the ComputerSystem.
    let out = s.kiln_ok(&["bootdev", "pxe", "--once", "--uefi", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["device"].as_str(), v["uefi"].as_bool()),
        (Some("pxe"), Some(true)),
        "{out}"
    );
    let boot = &s.system()["Boot"];
    assert_eq!(boot["BootSourceOverrideTarget"], "Pxe", "{boot}");
    assert_eq!(boot["BootSourceOverrideMode"], "UEFI", "{boot}");
    s.kiln_ok(&["bootdev", "disk"]);
    let boot = &s.system()["Boot"];
    assert_eq!(boot["BootSourceOverrideTarget"], "Hdd", "{boot}");
    assert_eq!(boot["BootSourceOverrideMode"], "Legacy", "{boot}");
    // A target the service does not list is refused before anything is sent.
    let ca = s.ca().display().to_string();
    let out = s.kiln(&["--ca-cert", &ca], &["bootdev", "bios"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not supported"));

    // Virtual media: the service fetches the image and reports it inserted.
    let http = serve_image(b"kiln test image\n");
    let url = format!("http://127.0.0.1:{http}/kiln.iso");
    s.kiln_ok(&["media", "insert", &url]);
    let cd = s.cd();
    assert_eq!(cd["Inserted"], true, "{cd}");
    assert_eq!(cd["Image"], url.as_str(), "{cd}");
    s.kiln_ok(&["media", "eject"]);
    let cd = s.cd();
    assert_ne!(cd["Inserted"], true, "{cd}");

    // Identity and capabilities.
    let info: serde_json::Value =
        serde_json::from_str(&s.kiln_ok(&["info", "-o", "json"])).unwrap();
    let system = s.system();
    for (ours, theirs) in [
        ("vendor", "Manufacturer"),
        ("model", "Model"),
        ("serial", "SerialNumber"),
    ] {
        if system[theirs].is_string() {
            assert_eq!(info[ours], system[theirs], "{ours}");
        }
    }
    let probe: serde_json::Value =
        serde_json::from_str(&s.kiln_ok(&["probe", "-o", "json"])).unwrap();
    assert_eq!(probe["protocol"], "redfish");
    assert_eq!(probe["bootOverride"], true);
    assert_eq!(probe["virtualMedia"], true);
    assert_eq!(probe["version"], s.curl("/redfish/v1/")["RedfishVersion"]);

    // With -vv the HTTP exchanges are logged, the password (sent as basic auth) is not.
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["-vv", "bmc", "power", "status", "--protocol", "redfish"])
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &s.port.to_string(),
            "--ca-cert",
            &ca,
        ])
        .args(["--user", "admin", "--password-file"])
        .arg(s.dir.path().join("pw"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        all.contains("redfish request"),
        "no debug output at -vv:\n{all}"
    );
    assert!(!all.contains(PASSWORD), "password in output:\n{all}");

    // Wrong password: an authentication error.
    std::fs::write(s.dir.path().join("pw"), "wrong").unwrap();
    let out = s.kiln(&["--ca-cert", &ca], &["power", "status"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("authentication failed"), "{err}");
}
