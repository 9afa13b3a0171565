//! `kiln pxe serve` against real clients in network namespaces: busybox udhcpc (leases,
//! reservations, renewal, persistence across restarts), curl's tftp:// and tftp-hpa (with and
//! without options, past block-number rollover), a windowsize client, curl over HTTP (Range,
//! HEAD, ETag, script, config and phone-home with their tokens, metrics, trace), and
//! `kiln install` fetching its spec and reporting as a netbooted node does.

mod common;
mod pxe_support;

use std::net::UdpSocket;
use std::path::Path;
use std::time::{Duration, Instant};

use common::require;
use pxe_support::Lab;

fn random_file(path: &Path, len: usize) -> Vec<u8> {
    // xorshift: varied bytes without a dependency.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ len as u64;
    let data: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(path, &data).unwrap();
    data
}

/// The `kiln.token=` of an iPXE script.
fn token_in(script: &str) -> String {
    script
        .split_whitespace()
        .find_map(|w| w.strip_prefix("kiln.token="))
        .unwrap_or_else(|| panic!("no token in the script:\n{script}"))
        .to_string()
}

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}")
}

fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
# Records each event and configures the address, as a real client would.
echo "$1 $ip $serverid $lease" >> "$LOG"
case "$1" in
  bound|renew) ip addr replace "$ip/$subnet" dev "$interface" ;;
esac
"#;

#[test]
fn udhcpc_leases_reservations_renewal_and_restart() {
    require("busybox", "busybox-static");
    let mut lab = Lab::new();
    let a = lab.client("02:00:00:00:00:0a");
    let b = lab.client("02:00:00:00:00:0b");
    let c = lab.client("02:00:00:00:00:0c");
    let inventory = lab.inventory(&[
        ("node-a", "02:00:00:00:00:0a", None),
        ("node-b", "02:00:00:00:00:0b", Some("10.33.0.77")),
        ("node-c", "02:00:00:00:00:0c", None),
    ]);
    std::fs::create_dir(lab.path("artifacts")).unwrap();
    pxe_support::write_manifest(&lab.path("artifacts"));
    let script = lab.path("udhcpc.sh");
    std::fs::write(&script, UDHCPC_SCRIPT).unwrap();
    run_ok("chmod", &["755", script.to_str().unwrap()]);
    let args = [
        "--mode",
        "dhcp",
        "--artifacts",
        lab.path("artifacts").to_str().unwrap(),
        "--inventory",
        inventory.to_str().unwrap(),
        "--pool-start",
        "10.33.0.100",
        "--pool-end",
        "10.33.0.110",
        "--lease-time",
        "600",
    ]
    .map(String::from);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    lab.serve(&args);

    // Node a: a pool address, then a forced renewal (SIGUSR1), unicast to the server.
    let log_a = lab.path("a.log");
    let mut cmd = lab.clients[a].command("busybox");
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    cmd.env("LOG", &log_a)
        .args(["udhcpc", "-f", "-i", "eth0", "-t", "5", "-T", "1", "-s"])
        .arg(&script);
    let udhcpc = lab.clients[a].spawn(&mut cmd).unwrap();
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    wait_for("a's lease", Duration::from_secs(30), || {
        read(&log_a).contains("bound 10.33.0.100 10.33.0.1 600")
    });
    run_ok("kill", &["-USR1", &udhcpc.id().to_string()]);
    wait_for("a's renewal", Duration::from_secs(30), || {
        read(&log_a).contains("renew 10.33.0.100 10.33.0.1 600")
    });
    drop(udhcpc);

    // Node b: its reservation from the inventory.
    let log_b = lab.path("b.log");
    udhcpc_once(&lab, b, &script, &log_b);
    assert!(
        read(&log_b).contains("bound 10.33.0.77 "),
        "{}",
        read(&log_b)
    );

    let leases = read(&lab.path("state/leases.json"));
    assert!(
        leases.contains("02:00:00:00:00:0a") && leases.contains("10.33.0.100"),
        "{leases}"
    );
    assert!(leases.contains("10.33.0.77"), "{leases}");

    // After a restart the persisted lease still belongs to a: c gets the next address.
    lab.stop_server();
    lab.serve(&args);
    let log_c = lab.path("c.log");
    udhcpc_once(&lab, c, &script, &log_c);
    assert!(
        read(&log_c).contains("bound 10.33.0.101 "),
        "{}",
        read(&log_c)
    );

    let timeline = lab.trace("02:00:00:00:00:0a", false);
    for step in [
        "discover received on port 67",
        "offer sent, address 10.33.0.100",
        "request received on port 67",
        "ack sent, address 10.33.0.100",
    ] {
        assert!(timeline.contains(step), "{step:?} missing:\n{timeline}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&lab.trace("02-00-00-00-00-0a", true)).unwrap();
    let acks = json
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == "dhcp-sent" && e["message"] == "ack")
        .count();
    assert_eq!(acks, 2, "bind and renewal: {json:#}");
    lab.stop_server();
}

fn udhcpc_once(lab: &Lab, client: usize, script: &Path, log: &Path) {
    let out = lab.clients[client]
        .command("busybox")
        .env("LOG", log)
        .args([
            "udhcpc", "-f", "-q", "-n", "-i", "eth0", "-t", "5", "-T", "1", "-s",
        ])
        .arg(script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "udhcpc failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        lab.server_log()
    );
}

fn run_ok(program: &str, args: &[&str]) {
    let status = std::process::Command::new(program)
        .args(args)
        .status()
        .unwrap();
    assert!(status.success(), "{program} {args:?}");
}

/// A lab serving `ipxe_dir` over TFTP and `artifacts` over HTTP, with one client at
/// 10.33.0.50 whose MAC is in the inventory (node-f), and another node (node-g) that never
/// shows up.
fn file_lab(mode: &str) -> Lab {
    let mut lab = Lab::new();
    let client = lab.client("02:00:00:00:01:01");
    lab.clients[client]
        .add_address("eth0", "10.33.0.50/24")
        .unwrap();
    let inventory = lab.inventory(&[
        ("node-f", "02:00:00:00:01:01", None),
        ("node-g", "02:00:00:00:01:02", None),
    ]);
    for dir in ["ipxe", "artifacts"] {
        std::fs::create_dir(lab.path(dir)).unwrap();
    }
    pxe_support::write_manifest(&lab.path("artifacts"));
    std::fs::copy(
        "/usr/lib/ipxe/undionly.kpxe",
        lab.path("ipxe/undionly.kpxe"),
    )
    .unwrap();
    std::fs::copy("/usr/lib/ipxe/snponly.efi", lab.path("ipxe/ipxe.efi")).unwrap();
    // The same settings as a config file (keys = long option names) for proxy mode, as
    // command-line options for dhcp mode: both paths get exercised. The config file names no
    // spec: the server takes the one beside the manifest, as a build leaves it.
    let mut yaml = format!(
        "mode: {mode}\nartifacts: {}\nipxe-dir: {}\ninventory: {}\n",
        lab.path("artifacts").display(),
        lab.path("ipxe").display(),
        inventory.display()
    );
    let args: Vec<String> = if mode == "dhcp" {
        yaml.push_str("pool-start: 10.33.0.100\npool-end: 10.33.0.110\n");
        let mut args = vec![];
        for line in yaml.lines() {
            let (key, value) = line.split_once(": ").unwrap();
            args.extend([format!("--{key}"), value.to_string()]);
        }
        args
    } else {
        let config = lab.path("pxe.yaml");
        std::fs::write(&config, yaml).unwrap();
        vec!["--config".into(), config.display().to_string()]
    };
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    lab.serve(&args);
    lab
}

#[test]
fn tftp_clients_fetch_with_and_without_options_and_past_rollover() {
    require("curl", "curl");
    require("tftp", "tftp-hpa");
    let lab = file_lab("proxy");
    let kpxe = std::fs::read("/usr/lib/ipxe/undionly.kpxe").unwrap();
    // 8-byte blocks: 65 600 blocks, so block numbers wrap past 65535.
    let big = random_file(&lab.path("ipxe/big.bin"), 8 * 65_600 + 5);

    let out = lab.path("curl.kpxe");
    lab.in_client(
        0,
        "curl",
        &[
            "-sS",
            "--tftp-blksize",
            "1468",
            "-o",
            out.to_str().unwrap(),
            "tftp://10.33.0.1/undionly.kpxe",
        ],
    );
    assert_eq!(
        std::fs::read(&out).unwrap(),
        kpxe,
        "curl with blksize + tsize"
    );

    let out = lab.path("hpa.kpxe");
    lab.in_client(
        0,
        "tftp",
        &[
            "-m",
            "binary",
            "10.33.0.1",
            "-c",
            "get",
            "undionly.kpxe",
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(
        std::fs::read(&out).unwrap(),
        kpxe,
        "tftp-hpa, plain RFC 1350"
    );

    let out = lab.path("big.bin");
    lab.in_client(
        0,
        "curl",
        &[
            "-sS",
            "--tftp-blksize",
            "8",
            "-o",
            out.to_str().unwrap(),
            "tftp://10.33.0.1/big.bin",
        ],
    );
    assert!(
        std::fs::read(&out).unwrap() == big,
        "rollover transfer differs"
    );

    let got = lab.clients[0]
        .enter(|| windowed_fetch("big.bin", 1024, 16))
        .unwrap();
    assert!(got.0 == big, "windowsize transfer differs");
    assert_eq!(
        got.1,
        [
            ("blksize", "1024"),
            ("tsize", "524805"),
            ("windowsize", "16")
        ]
        .map(|(a, b)| (a.to_string(), b.to_string()))
    );

    // This client never used DHCP, so its TFTP reads carry no MAC: count them in the metrics.
    let metrics = lab.in_client(0, "curl", &["-sS", "http://10.33.0.1:8080/metrics"]);
    assert!(
        metrics
            .contains("kiln_netboot_events_total{service=\"tftp\",event=\"read\",result=\"ok\"} 4"),
        "{metrics}"
    );
}

/// A minimal RFC 7440 client: RRQ with options, ACK 0 after the OACK, then one ACK per window.
fn windowed_fetch(file: &str, blksize: usize, window: u16) -> (Vec<u8>, Vec<(String, String)>) {
    use kiln_netboot::tftp::packet::{Packet, parse};
    let sock = UdpSocket::bind("10.33.0.50:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let rrq = Packet::Rrq {
        filename: file.into(),
        mode: "octet".into(),
        options: vec![
            ("blksize".into(), blksize.to_string()),
            ("tsize".into(), "0".into()),
            ("windowsize".into(), window.to_string()),
        ],
    };
    sock.send_to(&rrq.encode(), "10.33.0.1:69").unwrap();
    let mut buf = vec![0u8; 70_000];
    let (n, peer) = sock.recv_from(&mut buf).unwrap();
    let Ok(Packet::Oack { options }) = parse(&buf[..n]) else {
        panic!("expected an OACK, got {:?}", parse(&buf[..n]));
    };
    sock.connect(peer).unwrap();
    sock.send(&Packet::Ack { block: 0 }.encode()).unwrap();
    let mut data = Vec::new();
    let mut expected: u16 = 1;
    let mut in_window = 0;
    loop {
        let n = sock.recv(&mut buf).unwrap();
        let Ok(Packet::Data { block, data: chunk }) = parse(&buf[..n]) else {
            panic!("expected DATA, got {:?}", parse(&buf[..n]));
        };
        assert_eq!(block, expected, "blocks arrive in order on a quiet link");
        data.extend_from_slice(&chunk);
        in_window += 1;
        let last = chunk.len() < blksize;
        if last || in_window == window {
            sock.send(&Packet::Ack { block }.encode()).unwrap();
            in_window = 0;
        }
        if last {
            return (data, options);
        }
        expected = expected.wrapping_add(1);
    }
}

#[test]
fn http_serves_ranges_etags_scripts_config_and_phone_home() {
    require("curl", "curl");
    let lab = file_lab("proxy");
    let initrd = random_file(&lab.path("artifacts/initrd.img"), 100_000);
    let base = "http://10.33.0.1:8080";
    let mac = "02-00-00-00-01-01";
    let curl = |args: &[&str]| lab.in_client(0, "curl", &[&["-sS"], args].concat());

    let out = lab.path("piece");
    let headers = curl(&[
        "-D",
        "-",
        "-r",
        "1000-1999",
        "-o",
        out.to_str().unwrap(),
        &format!("{base}/boot/{mac}/initrd.img"),
    ]);
    assert!(headers.starts_with("HTTP/1.1 206"), "{headers}");
    assert!(
        headers.contains("content-range: bytes 1000-1999/100000"),
        "{headers}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), &initrd[1000..2000]);

    let head = curl(&["-I", &format!("{base}/artifacts/initrd.img")]);
    assert!(
        head.contains("content-length: 100000") && head.contains("accept-ranges: bytes"),
        "{head}"
    );
    let etag = head
        .lines()
        .find_map(|l| l.strip_prefix("etag: "))
        .expect("an ETag")
        .trim()
        .to_string();
    let cached = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        &format!("If-None-Match: {etag}"),
        &format!("{base}/artifacts/initrd.img"),
    ]);
    assert_eq!(cached, "304");
    let beyond = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-r",
        "200000-",
        &format!("{base}/artifacts/initrd.img"),
    ]);
    assert_eq!(beyond, "416");

    let script = curl(&[&format!("{base}/boot/{mac}/boot.ipxe")]);
    assert!(script.starts_with("#!ipxe"), "{script}");
    for arg in [
        "kiln.install=auto".to_string(),
        format!("kiln.config={base}/config/{mac}"),
        format!("kiln.phone-home={base}/phone-home/{mac}"),
    ] {
        assert!(
            script.contains(&format!(" {arg} ")),
            "{arg} missing:\n{script}"
        );
    }
    let token = token_in(&script);
    // Scripts are for anyone who asks: here node-g's, whose token must not work for node-f.
    let other = token_in(&curl(&[&format!(
        "{base}/boot/02-00-00-00-01-02/boot.ipxe"
    )]));
    assert_ne!(token, other);
    let unknown = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("{base}/boot/02-00-00-00-09-09/boot.ipxe"),
    ]);
    assert_eq!(unknown, "404", "unknown MACs are ignored by default");

    let code = |args: &[&str]| curl(&[&["-o", "/dev/null", "-w", "%{http_code}"], args].concat());
    let config_url = format!("{base}/config/{mac}");
    assert_eq!(code(&[&config_url]), "401");
    assert_eq!(code(&["-H", &bearer(&other), &config_url]), "403");
    let config = curl(&["-f", "-H", &bearer(&token), &config_url]);
    let spec = kiln_spec::Appliance::from_yaml(&config).unwrap_or_else(|e| panic!("{e}\n{config}"));
    assert_eq!(spec.spec.hostname, "node-f");

    let phone_home = format!("{base}/phone-home/{mac}");
    let post = |token: &str, body: &str| {
        code(&[
            "-H",
            &bearer(token),
            "-H",
            "content-type: application/json",
            "-d",
            body,
            &phone_home,
        ])
    };
    let report = r#"{"phase":"failed","message":"disk /dev/vda vanished"}"#;
    assert_eq!(post(&token, report), "204");
    assert_eq!(post(&other, report), "403");
    assert_eq!(post(&token, r#"{"phase":"writing-image"}"#), "422");
    assert_eq!(post(&token, r#"{"phase":"planned","ok":false}"#), "422");
    let long = format!(r#"{{"phase":"failed","message":"{}"}}"#, "x".repeat(3000));
    assert_eq!(post(&token, &long), "422");

    let timeline = lab.trace("02:00:00:00:01:01", false);
    for step in [
        "GET /boot/02-00-00-00-01-01/initrd.img from 10.33.0.50: 206, 1000 bytes",
        "HEAD /artifacts/initrd.img from 10.33.0.50: 200",
        "GET /artifacts/initrd.img from 10.33.0.50: 304",
        "FAIL  http        GET /artifacts/initrd.img from 10.33.0.50: 416",
        "GET /boot/02-00-00-00-01-01/boot.ipxe from 10.33.0.50: 200",
        "FAIL  http        GET /config/02-00-00-00-01-01 from 10.33.0.50: 401",
        "<- no token",
        "FAIL  http        GET /config/02-00-00-00-01-01 from 10.33.0.50: 403",
        "<- the token is not this node's",
        "GET /config/02-00-00-00-01-01 from 10.33.0.50: 200",
        "FAIL  phone-home  failed: disk /dev/vda vanished",
        "FAIL  http        POST /phone-home/02-00-00-00-01-01 from 10.33.0.50: 422",
        "unknown variant `writing-image`",
        "unknown field `ok`",
        "message longer than 2048 bytes",
    ] {
        assert!(timeline.contains(step), "{step:?} missing:\n{timeline}");
    }
    let stored = lab.trace("02:00:00:00:01:01", true);
    let json: serde_json::Value = serde_json::from_str(&stored).unwrap();
    let refusals: Vec<u64> = json
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == "http" && e["error"].is_string())
        .filter_map(|e| e["status"].as_u64())
        .filter(|s| [401, 403, 422].contains(s))
        .collect();
    assert_eq!(refusals, [401, 403, 403, 422, 422, 422], "{json:#}");
    for secret in [&token, &other] {
        assert!(!stored.contains(secret.as_str()), "a token in the trace");
        assert!(
            !lab.server_log().contains(secret.as_str()),
            "a token in the log"
        );
    }
    let json: serde_json::Value =
        serde_json::from_str(&curl(&[&format!("{base}/trace/{mac}")])).unwrap();
    assert!(
        json.as_array()
            .unwrap()
            .iter()
            .any(|e| e["event"] == "phone-home" && e["phase"] == "failed")
    );
    let metrics = curl(&[&format!("{base}/metrics")]);
    assert!(
        metrics.contains(
            "kiln_netboot_events_total{service=\"phone-home\",event=\"failed\",result=\"failed\"} 1"
        ),
        "{metrics}"
    );
    common::promtool_check_metrics(&metrics);
}

/// `kiln install` as a netbooted node runs it, its kernel command line (the node's script's
/// arguments) bound over `/proc/cmdline`: it fetches its spec with its token and reports each
/// stage; a disk holding data is refused, reported as failed with the planner's reason, and
/// left as it was.
#[test]
fn the_installer_fetches_its_spec_and_reports_each_stage_with_its_token() {
    require("curl", "curl");
    require("mksquashfs", "squashfs-tools");
    let lab = file_lab("proxy");
    let base = "http://10.33.0.1:8080";
    let mac = "02-00-00-00-01-01";
    let script = lab.in_client(0, "curl", &["-sS", &format!("{base}/boot/{mac}/boot.ipxe")]);
    // The node's own arguments; the image comes from --image, not over HTTP.
    let args: Vec<&str> = script
        .split_whitespace()
        .filter(|w| {
            ["kiln.config=", "kiln.phone-home=", "kiln.token="]
                .iter()
                .any(|p| w.starts_with(p))
        })
        .collect();
    assert_eq!(args.len(), 3, "{script}");
    let cmdline = lab.path("cmdline");
    std::fs::write(&cmdline, args.join(" ") + "\n").unwrap();
    let live = lab.path("live");
    std::fs::create_dir_all(live.join("root/etc")).unwrap();
    std::fs::write(live.join("root/etc/os-release"), "ID=kiln\n").unwrap();
    run_ok(
        "mksquashfs",
        &[
            live.join("root").to_str().unwrap(),
            live.join("rootfs.squashfs").to_str().unwrap(),
            "-noappend",
            "-quiet",
            "-no-progress",
        ],
    );
    std::fs::write(live.join("vmlinuz"), b"kernel").unwrap();
    std::fs::write(live.join("initrd.img"), b"initrd").unwrap();
    let install = |disk: &Path| {
        let out = lab.clients[0]
            .command("unshare")
            .args([
                "-m",
                "sh",
                "-c",
                r#"mount --bind "$0" /proc/cmdline && exec "$@""#,
            ])
            .arg(&cmdline)
            .arg(pxe_support::kiln_bin())
            .args(["install", "--disk-image"])
            .arg(disk)
            .arg("--image")
            .arg(live.join("rootfs.squashfs"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(!text.contains("warning"), "{text}");
        (out.status.success(), text)
    };
    let reports = || -> Vec<String> {
        let json: serde_json::Value =
            serde_json::from_str(&lab.trace("02:00:00:00:01:01", true)).unwrap();
        json.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["event"] == "phone-home")
            .map(|e| match e["message"].as_str() {
                Some(m) => format!("{}: {m}", e["phase"].as_str().unwrap()),
                None => e["phase"].as_str().unwrap().to_string(),
            })
            .collect()
    };

    let disk = lab.path("disk.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(288 << 20)
        .unwrap();
    let (ok, text) = install(&disk);
    assert!(ok, "{text}");
    assert!(
        text.contains("host name node-f"),
        "the node's own spec:\n{text}"
    );
    let d = disk.display();
    assert_eq!(
        reports(),
        [
            "installer-started".to_string(),
            format!("planned: {d} (288.0 MiB)"),
            "installing: wipe".into(),
            "installing: slot-write".into(),
            "installing: esp".into(),
            "installing: state".into(),
            "installing: partition-table".into(),
            format!("installed: node-f on {d}"),
        ]
    );

    let used = lab.path("used.raw");
    std::fs::write(&used, b"precious data").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&used)
        .unwrap()
        .set_len(288 << 20)
        .unwrap();
    let before = std::fs::read(&used).unwrap();
    let (ok, text) = install(&used);
    assert!(!ok, "{text}");
    assert!(
        std::fs::read(&used).unwrap() == before,
        "the disk was written"
    );
    let last = reports().pop().unwrap();
    assert!(
        last.starts_with(&format!(
            "failed: planning the install (nothing was written): refusing to erase {}",
            used.display()
        )),
        "{last}"
    );
}

#[test]
fn malformed_packets_and_traversal_get_errors_and_the_server_keeps_serving() {
    require("curl", "curl");
    require("busybox", "busybox-static");
    use kiln_netboot::tftp::packet::{ErrorCode, Packet, parse};
    let mut lab = file_lab("dhcp");
    std::fs::write(lab.path("artifacts/initrd.img"), b"initrd").unwrap();
    let tftp_errors = lab.clients[0]
        .enter(|| {
            let sock = UdpSocket::bind("10.33.0.50:0").unwrap();
            sock.set_broadcast(true).unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            // DHCP and proxyDHCP: garbage, a truncated discover, an oversized datagram, a
            // header claiming a 200-byte hardware address. No reply is expected.
            let mut discover = vec![1u8, 1, 6, 0];
            discover.resize(240, 0);
            discover[236..240].copy_from_slice(&[99, 130, 83, 99]);
            let mut bad_hlen = discover.clone();
            bad_hlen[2] = 200;
            bad_hlen.extend_from_slice(&[53, 1, 1, 255]);
            for port in [67u16, 4011] {
                for datagram in [
                    &b"\xff\x00garbage"[..],
                    &discover[..100],
                    &vec![0xAB; 65_000][..],
                    &bad_hlen[..],
                ] {
                    sock.send_to(datagram, ("10.33.0.1", port)).unwrap();
                    sock.send_to(datagram, ("255.255.255.255", port)).unwrap();
                }
            }
            let mut errors = Vec::new();
            let rrq = |name: &str| {
                Packet::Rrq {
                    filename: name.into(),
                    mode: "octet".into(),
                    options: vec![],
                }
                .encode()
            };
            let wrq = Packet::Wrq {
                filename: "x".into(),
                mode: "octet".into(),
                options: vec![],
            }
            .encode();
            let requests: Vec<Vec<u8>> = vec![
                wrq,
                b"\x00\x01unterminated".to_vec(),
                vec![0x42; 60_000],
                vec![0],
                rrq("../../etc/passwd"),
                rrq("/etc/passwd"),
                rrq("%2e%2e/%2e%2e/etc/passwd"),
                rrq("..\\..\\etc\\passwd"),
                Packet::Rrq {
                    filename: "undionly.kpxe".into(),
                    mode: "mail".into(),
                    options: vec![],
                }
                .encode(),
            ];
            let mut buf = vec![0u8; 70_000];
            for request in requests {
                sock.send_to(&request, "10.33.0.1:69").unwrap();
                let (n, _) = sock.recv_from(&mut buf).expect("an error packet");
                match parse(&buf[..n]) {
                    Ok(Packet::Error { code, message }) => errors.push((code, message)),
                    other => panic!("expected an error packet, got {other:?}"),
                }
            }
            errors
        })
        .unwrap();
    let codes: Vec<ErrorCode> = tftp_errors.iter().map(|e| e.0).collect();
    assert_eq!(
        codes,
        [
            ErrorCode::AccessViolation,
            ErrorCode::IllegalOperation,
            ErrorCode::IllegalOperation,
            ErrorCode::IllegalOperation,
            ErrorCode::AccessViolation,
            ErrorCode::FileNotFound,
            ErrorCode::FileNotFound,
            ErrorCode::AccessViolation,
            ErrorCode::IllegalOperation,
        ],
        "{tftp_errors:?}"
    );

    let base = "http://10.33.0.1:8080";
    for path in [
        "/artifacts/../../../../etc/passwd",
        "/artifacts/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/artifacts/..%2f..%2f..%2fetc%2fpasswd",
        "/boot/02-00-00-00-01-01/%2e%2e%2f%2e%2e%2fetc/passwd",
        "/ipxe/%2fetc%2fpasswd",
        "/config/not-a-mac",
    ] {
        let code = lab.in_client(
            0,
            "curl",
            &[
                "-sS",
                "--path-as-is",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("{base}{path}"),
            ],
        );
        assert!(code.starts_with('4'), "{path}: HTTP {code}");
    }
    let token = token_in(&lab.in_client(
        0,
        "curl",
        &["-sS", &format!("{base}/boot/02-00-00-00-01-01/boot.ipxe")],
    ));
    let bad_report = lab.in_client(
        0,
        "curl",
        &[
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            &bearer(&token),
            "-H",
            "content-type: application/json",
            "-d",
            "{\"phase\": 7}",
            &format!("{base}/phone-home/02-00-00-00-01-01"),
        ],
    );
    assert_eq!(bad_report, "400");

    // Still serving: a lease, a TFTP download and an HTTP download.
    assert!(
        lab.server.as_mut().unwrap().is_running(),
        "{}",
        lab.server_log()
    );
    let script = lab.path("udhcpc.sh");
    std::fs::write(&script, UDHCPC_SCRIPT).unwrap();
    run_ok("chmod", &["755", script.to_str().unwrap()]);
    let log = lab.path("udhcpc.log");
    udhcpc_once(&lab, 0, &script, &log);
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("bound 10.33.0.100")
    );
    let out = lab.path("after.kpxe");
    lab.in_client(
        0,
        "curl",
        &[
            "-sS",
            "-o",
            out.to_str().unwrap(),
            "tftp://10.33.0.1/undionly.kpxe",
        ],
    );
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read("/usr/lib/ipxe/undionly.kpxe").unwrap()
    );
    assert_eq!(
        lab.in_client(0, "curl", &["-sS", &format!("{base}/artifacts/initrd.img")]),
        "initrd"
    );
    lab.stop_server();
}
