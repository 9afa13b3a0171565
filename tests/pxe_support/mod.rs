//! Shared by the `pxe_*` tests: a lab network namespace with a bridge, client namespaces
//! plugged into it, an inventory, an appliance spec, and `kiln pxe serve` running inside the
//! lab namespace.

#![allow(dead_code)] // each test file uses its own subset

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_lab::netns::{Netns, Process, run};

pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 33, 0, 1);
pub const BRIDGE: &str = "br0";
pub const HTTP_PORT: u16 = 8080;

/// The appliance spec the lab's nodes install: each is named as in the inventory, and the
/// layout is small enough for a disk image file.
pub const SPEC: &str = "apiVersion: kiln.dev/v1alpha1\nkind: Appliance\nmetadata:\n  name: pxe-lab\n\
                        spec:\n  profile: test\n  hostname: \"{name}\"\n  install:\n    \
                        espSize: 64MiB\n    slotSize: 64MiB\n    stateSize: 64MiB\n";

pub fn kiln_bin() -> &'static str {
    env!("CARGO_BIN_EXE_kiln")
}

/// A namespace with bridge `br0` at 10.33.0.1/24, where the server runs.
pub struct Lab {
    pub dir: tempfile::TempDir,
    pub server: Option<Process>,
    pub clients: Vec<Netns>,
    pub ns: Netns,
}

impl Lab {
    pub fn new() -> Lab {
        let ns = Netns::create("kpxe").expect("creating the lab namespace (needs root, iproute2)");
        ns.add_bridge(BRIDGE, Some(&format!("{SERVER_IP}/24")))
            .unwrap();
        Lab {
            dir: tempfile::tempdir().unwrap(),
            server: None,
            clients: Vec::new(),
            ns,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A client namespace whose `eth0` (with `mac`) is plugged into the bridge.
    pub fn client(&mut self, mac: &str) -> usize {
        let ns = Netns::create("kpxc").unwrap();
        let port = kiln_lab::netns::unique_name("vp");
        self.ns.add_veth(&port, &ns, "eth0").unwrap();
        self.ns.set_master(&port, BRIDGE).unwrap();
        ns.ip(&["link", "set", "eth0", "address", mac]).unwrap();
        self.clients.push(ns);
        self.clients.len() - 1
    }

    /// Writes an inventory with `(name, mac, reserved address)` nodes.
    pub fn inventory(&self, nodes: &[(&str, &str, Option<&str>)]) -> PathBuf {
        let mut yaml =
            String::from("apiVersion: kiln.dev/v1alpha1\nkind: Inventory\nspec:\n  nodes:\n");
        for (name, mac, addr) in nodes {
            yaml.push_str(&format!(
                "    - name: {name}\n      bootMACs: [\"{mac}\"]\n"
            ));
            if let Some(a) = addr {
                yaml.push_str(&format!("      bootAddress: {a}\n"));
            }
        }
        let path = self.path("fleet.yaml");
        std::fs::write(&path, yaml).unwrap();
        path
    }

    /// Starts `kiln pxe serve` on the bridge with `args` added, and waits until HTTP answers.
    /// Unless `args` name a spec or a config file, the server gets [`SPEC`].
    pub fn serve(&mut self, args: &[&str]) {
        let log = std::fs::File::create(self.path("server.log")).unwrap();
        let mut cmd = self.ns.command(kiln_bin());
        cmd.args(["-v", "pxe", "serve", "--interface", BRIDGE])
            .arg("--state")
            .arg(self.path("state"))
            .args(args);
        if !args.iter().any(|a| *a == "--spec" || *a == "--config") {
            let spec = self.path("spec.yaml");
            std::fs::write(&spec, SPEC).unwrap();
            cmd.arg("--spec").arg(spec);
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let mut server = self.ns.spawn(&mut cmd).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let http = SocketAddr::from((SERVER_IP, HTTP_PORT));
        loop {
            let up = self
                .ns
                .enter(|| TcpStream::connect_timeout(&http, Duration::from_millis(200)).is_ok())
                .unwrap();
            if up {
                break;
            }
            assert!(
                server.is_running(),
                "kiln pxe serve exited:\n{}",
                self.server_log()
            );
            assert!(
                Instant::now() < deadline,
                "server did not come up:\n{}",
                self.server_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        self.server = Some(server);
    }

    /// Stops the server with SIGTERM and asserts it shut down cleanly.
    pub fn stop_server(&mut self) {
        if let Some(mut s) = self.server.take() {
            let status = s.terminate(Duration::from_secs(10));
            assert!(
                status.is_some_and(|s| s.success()),
                "server did not exit cleanly on SIGTERM ({status:?}):\n{}",
                self.server_log()
            );
        }
    }

    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.path("server.log")).unwrap_or_default()
    }

    /// Runs a command in client `i`'s namespace and returns its output (must succeed).
    pub fn in_client(&self, i: usize, program: &str, args: &[&str]) -> String {
        run(self.clients[i].command(program).args(args))
            .unwrap_or_else(|e| panic!("{e}\nserver log:\n{}", self.server_log()))
    }

    /// `kiln pxe trace MAC` against this server's state.
    pub fn trace(&self, mac: &str, json: bool) -> String {
        let mut cmd = Command::new(kiln_bin());
        cmd.args(["pxe", "trace", mac, "--state"])
            .arg(self.path("state"));
        if json {
            cmd.args(["--output", "json"]);
        }
        run(&mut cmd).unwrap()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Processes first, then namespaces (fields drop in declaration order).
        self.server.take();
        self.clients.clear();
    }
}

/// The netboot bundle (Debian kernel + marker initramfs), built once and cached.
pub fn fixtures() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/netboot-fixtures.sh");
    let out = Command::new(&script)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(out.status.success(), "{} failed", script.display());
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// A build manifest in `dir` naming the PXE files, for a server whose tests do not boot them
/// (the digests are placeholders), and [`SPEC`] beside it as a build leaves its spec.
pub fn write_manifest(dir: &Path) {
    std::fs::write(dir.join("spec.yaml"), SPEC).unwrap();
    let artifacts: Vec<String> = ["vmlinuz", "initrd.img", "rootfs.squashfs"]
        .iter()
        .map(|f| {
            format!(
                r#"{{"path":"pxe/{f}","size":0,"sha256":"{}"}}"#,
                "0".repeat(64)
            )
        })
        .collect();
    std::fs::write(
        dir.join("manifest.json"),
        format!(
            r#"{{"kiln_version":"test","spec_sha256":"","suite":"","mirror":"","kernel":"",
            "kernel_args":[],"rootfs_cache_key":"","packages":[],"artifacts":[{}]}}"#,
            artifacts.join(",")
        ),
    )
    .unwrap();
}
