//! `kiln build` end to end: the `test` profile is built once per test run (the base rootfs
//! comes from the cache after the first run), then checked the way a user would check it:
//! digests, the ISO's boot catalogue and partition tables, the initramfs contents, and real
//! boots in QEMU (SeaBIOS from a CD, OVMF from a USB stick, and the PXE bundle over HTTP,
//! where every fetched file is checked against the manifest's digest: a tampered root image is
//! never mounted, a tampered kernel stops the unattended install before it writes a byte).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use kiln_lab::qemu::{DirectBoot, Firmware, Nic, Regex, Vm};

/// Budget for a live boot under software emulation (a full systemd boot of the image).
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

fn kiln() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn tool(name: &str, package: &str) -> Command {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "{name} is missing: install the Debian package {package} (scripts/install-deps.sh)"
    );
    Command::new(name)
}

/// Builds `spec` (None: the embedded default spec) into `out`, signed with `sign_key` when
/// given; returns the JSON report.
fn build(spec: Option<&Path>, out: &Path, sign_key: Option<&Path>) -> serde_json::Value {
    let mut cmd = kiln();
    cmd.arg("build")
        .arg("--out")
        .arg(out)
        .args(["--output", "json"]);
    if let Some(spec) = spec {
        cmd.arg("--spec").arg(spec);
    }
    if let Some(key) = sign_key {
        cmd.arg("--sign-key").arg(key);
    }
    let out = run(&mut cmd);
    serde_json::from_slice(&out.stdout).expect("kiln build --output json prints JSON")
}

/// The default build, shared by the tests of this file. It lives under the cache directory
/// with this process's id; builds of earlier runs (dead processes) are removed first.
fn built() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let cache = kiln_spec::paths::cache_dir();
        let parent = cache.join("test-builds");
        std::fs::create_dir_all(&parent).unwrap();
        for e in std::fs::read_dir(&parent).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let alive = name
                .strip_prefix("build-")
                .and_then(|p| p.parse::<u32>().ok())
                .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
            if !alive {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let out = parent.join(format!("build-{}", std::process::id()));
        let report = build(None, &out, None);
        assert!(
            report["manifest"]["artifacts"]
                .as_array()
                .is_some_and(|a| a.len() == 5)
        );
        out
    })
}

/// One file of an ISO, read with xorriso (this host cannot mount ISO9660).
fn iso_file(iso: &Path, path: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("file");
    run(tool("xorriso", "xorriso")
        .arg("-indev")
        .arg(iso)
        .args(["-osirrox", "on", "-extract", path])
        .arg(&dest));
    std::fs::read_to_string(&dest).unwrap()
}

fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

#[test]
fn build_manifest_matches_the_artifacts() {
    let dir = built();
    let m = manifest(dir);
    let artifacts = m["artifacts"].as_array().unwrap();
    let paths: Vec<&str> = artifacts
        .iter()
        .map(|a| a["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        [
            "kiln.iso",
            "pxe/vmlinuz",
            "pxe/initrd.img",
            "pxe/rootfs.squashfs",
            "pxe/boot.ipxe"
        ]
    );
    for a in artifacts {
        let path = dir.join(a["path"].as_str().unwrap());
        let size = std::fs::metadata(&path).unwrap().len();
        assert_eq!(a["size"].as_u64(), Some(size), "{}", path.display());
        let sum = run(tool("sha256sum", "coreutils").arg(&path));
        let sum = String::from_utf8_lossy(&sum.stdout);
        assert_eq!(
            Some(sum.split_whitespace().next().unwrap()),
            a["sha256"].as_str(),
            "{}",
            path.display()
        );
    }
    let spec = kiln_spec::Appliance::default_spec().to_yaml();
    let iso_spec = iso_file(&dir.join("kiln.iso"), "/kiln/spec.yaml");
    assert_eq!(iso_spec, spec, "the ISO embeds the spec");
    let packages = m["packages"].as_array().unwrap();
    for wanted in [
        "systemd-sysv",
        "linux-image-amd64",
        "e2fsprogs",
        "dosfstools",
        "systemd-boot-efi",
        "grub-pc-bin",
    ] {
        assert!(
            packages.iter().any(
                |p| p["name"] == wanted && p["version"].as_str().is_some_and(|v| !v.is_empty())
            ),
            "{wanted} in the manifest's package list"
        );
    }
    assert_eq!(m["spec_sha256"].as_str().map(str::len), Some(64));
    let squash = artifacts
        .iter()
        .find(|a| a["path"] == "pxe/rootfs.squashfs")
        .unwrap();
    assert!(
        squash["size"].as_u64().unwrap() < 150 << 20,
        "test profile rootfs stays small: {squash}"
    );
}

#[test]
fn iso_is_hybrid_for_bios_and_uefi() {
    let iso = built().join("kiln.iso");
    let out = run(tool("xorriso", "xorriso")
        .arg("-indev")
        .arg(&iso)
        .args(["-report_el_torito", "plain"]));
    let report = String::from_utf8_lossy(&out.stdout);
    let images: Vec<&str> = report
        .lines()
        .filter(|l| l.starts_with("El Torito boot img :"))
        .collect();
    assert!(
        images.iter().any(|l| l.contains(" BIOS ")),
        "a BIOS boot image:\n{report}"
    );
    assert!(
        images.iter().any(|l| l.contains(" UEFI ")),
        "a UEFI boot image:\n{report}"
    );
    let out = run(tool("xorriso", "xorriso")
        .arg("-indev")
        .arg(&iso)
        .args(["-report_system_area", "plain"]));
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("MBR partition"),
        "an MBR partition table:\n{report}"
    );
    assert!(report.contains("GPT partition"), "a GPT:\n{report}");
    let toc = run(tool("xorriso", "xorriso")
        .arg("-indev")
        .arg(&iso)
        .args(["-pvd_info"]));
    assert!(String::from_utf8_lossy(&toc.stdout).contains("Volume Id    : KILN_LIVE"));
    let cfg = iso_file(&iso, "/boot/grub/grub.cfg");
    let titles: Vec<&str> = cfg.lines().filter(|l| l.starts_with("menuentry")).collect();
    assert_eq!(
        titles,
        [
            "menuentry \"Install kiln (unattended)\" {",
            "menuentry \"Live shell\" {",
            "menuentry \"Rescue\" {"
        ]
    );
    // The install starts without a countdown; Esc on the keyboard as GRUB starts shows the menu.
    assert!(cfg.contains("terminal_input console\nterminal_output console serial\nset timeout_style=hidden\nset timeout=0\nset default=0\n"));
    assert!(cfg.contains("kiln.install=auto"));
}

#[test]
fn initramfs_holds_stage1_and_its_modules() {
    let dir = built();
    let raw = run(tool("zstd", "zstd")
        .arg("-dc")
        .arg(dir.join("pxe/initrd.img")));
    let mut cpio = tool("cpio", "cpio")
        .args(["-t", "--quiet"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = cpio.stdin.take().unwrap();
    // The EHCI-before-companions order travels with the modules (stage-1 loads in waves).
    let softdep = b"softdep ohci_pci pre: ehci_pci\n";
    assert!(
        raw.stdout.windows(softdep.len()).any(|w| w == softdep),
        "the initramfs's modules.softdep keeps ohci_pci after ehci_pci"
    );
    let writer = std::thread::spawn(move || stdin.write_all(&raw.stdout));
    let mut listing = String::new();
    cpio.stdout
        .take()
        .unwrap()
        .read_to_string(&mut listing)
        .unwrap();
    writer.join().unwrap().unwrap();
    assert!(cpio.wait().unwrap().success());
    let names: Vec<&str> = listing.lines().collect();
    for wanted in ["init", "dev/console", "lib64/ld-linux-x86-64.so.2"] {
        assert!(
            names.contains(&wanted),
            "{wanted} in the initramfs:\n{listing}"
        );
    }
    for module in [
        "isofs.ko",
        "squashfs.ko",
        "overlay.ko",
        "sr_mod.ko",
        "virtio_blk.ko",
        "ext4.ko",
        "loop.ko",
    ] {
        assert!(
            names.iter().any(|n| n.ends_with(&format!("/{module}"))),
            "{module} in the initramfs"
        );
    }
    for index in ["/modules.dep", "/modules.softdep"] {
        assert!(names.iter().any(|n| n.ends_with(index)), "{index}");
    }
}

#[test]
fn pxe_bundle_has_script_and_image_carries_boot_files() {
    let dir = built();
    let script = std::fs::read_to_string(dir.join("pxe/boot.ipxe")).unwrap();
    assert!(script.starts_with("#!ipxe\n"));
    assert!(script.contains("initrd --name initrd.img ${base}/initrd.img"));
    assert!(script.contains("initrd=initrd.img"));
    assert!(script.contains("kiln.root=${base}/rootfs.squashfs"));
    assert!(
        script.contains(&digest_args(dir)),
        "the script carries the manifest's digests:\n{script}"
    );
    let list = run(tool("unsquashfs", "squashfs-tools")
        .args(["-l", "-d", ""])
        .arg(dir.join("pxe/rootfs.squashfs")));
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.lines().any(|l| l == "/usr/bin/kiln"),
        "the image carries kiln"
    );
    assert!(
        list.lines().any(|l| l.starts_with("/boot/initrd.img-")),
        "and kiln's initramfs"
    );
    assert!(
        !list.lines().any(|l| l.starts_with("/usr/share/man/")),
        "trimmed"
    );
}

/// Boots the live system and waits for stage-1's hand-over and systemd's login prompts.
fn expect_live_boot(mut vm: Vm) {
    vm.wait_for_console("kiln-stage1: found live medium", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("stage-1 finds the medium: {e}"));
    vm.wait_for_console("kiln-stage1: switching root", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("stage-1 switches root: {e}"));
    // The default entry installs unattended. This machine has no disk to install to, so the
    // install fails, says why, and the whole live system comes up for someone to log in: the
    // serial getty's banner ends with its terminal's name.
    let failed = vm
        .wait_for_console("kiln-install: failed", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("the install starts and stops with a reason: {e}"));
    assert!(failed.contains("nothing was written"), "{failed}");
    vm.wait_for_console(Regex::new(r" ttyS0$").unwrap(), BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("the live system offers a login: {e}"));
}

fn vm_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("kiln-build-vm-")
        .tempdir()
        .unwrap()
}

#[test]
fn live_iso_boots_from_cd_on_bios() {
    let iso = built().join("kiln.iso");
    let work = vm_dir();
    let vm = Vm::builder()
        .name(format!("live-bios-{}", std::process::id()))
        .firmware(Firmware::Bios)
        .cdrom(&iso, Some(1))
        .work_dir(work.path())
        .no_reboot(true)
        .spawn()
        .expect("starting QEMU (Debian package qemu-system-x86)");
    expect_live_boot(vm);
}

#[test]
fn live_iso_boots_from_usb_stick_on_uefi() {
    let iso = built().join("kiln.iso");
    let work = vm_dir();
    // A USB stick is written in place by a boot: boot a copy.
    let stick = work.path().join("stick.img");
    std::fs::copy(&iso, &stick).unwrap();
    let vm = Vm::builder()
        .name(format!("live-uefi-{}", std::process::id()))
        .firmware(Firmware::Uefi)
        .usb_stick(&stick, Some(1))
        .work_dir(work.path())
        .no_reboot(true)
        .spawn()
        .expect("starting QEMU with OVMF (Debian packages qemu-system-x86, ovmf)");
    expect_live_boot(vm);
}

/// Serves one directory over HTTP/1.0 on loopback until the test ends (QEMU's user network
/// reaches the host's loopback as 10.0.2.2).
fn serve(dir: PathBuf) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let dir = dir.clone();
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut req = Vec::new();
                let mut byte = [0u8; 1];
                while !req.ends_with(b"\r\n\r\n") && stream.read(&mut byte).is_ok_and(|n| n == 1) {
                    req.push(byte[0]);
                }
                let req = String::from_utf8_lossy(&req);
                let path = req
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or("/")
                    .trim_start_matches('/')
                    .to_string();
                match std::fs::read(dir.join(&path)) {
                    Ok(body) if !path.contains("..") => {
                        let _ = write!(
                            stream,
                            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n",
                            body.len()
                        );
                        let _ = stream.write_all(&body);
                    }
                    _ => {
                        let _ = write!(
                            stream,
                            "HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n"
                        );
                    }
                }
            });
        }
    });
    port
}

/// `kiln.root.sha256=… kiln.kernel.sha256=… kiln.initrd.sha256=…` from the build manifest.
fn digest_args(dir: &Path) -> String {
    let m = manifest(dir);
    let sha = |path: &str| {
        m["artifacts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["path"] == path)
            .and_then(|a| a["sha256"].as_str())
            .unwrap()
            .to_string()
    };
    format!(
        "kiln.root.sha256={} kiln.kernel.sha256={} kiln.initrd.sha256={}",
        sha("pxe/rootfs.squashfs"),
        sha("pxe/vmlinuz"),
        sha("pxe/initrd.img")
    )
}

/// A copy of the PXE bundle for the HTTP server, with `tampered` changed by one appended
/// byte (the others are hard links), and a spec for `kiln.config=`.
fn served_bundle(work: &Path, tampered: &str) -> PathBuf {
    let pxe = built().join("pxe");
    let served = work.join("served");
    std::fs::create_dir_all(&served).unwrap();
    for name in ["vmlinuz", "initrd.img", "rootfs.squashfs"] {
        if name == tampered {
            std::fs::copy(pxe.join(name), served.join(name)).unwrap();
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(served.join(name))
                .unwrap();
            f.write_all(b"\0").unwrap();
        } else {
            std::fs::hard_link(pxe.join(name), served.join(name)).unwrap();
        }
    }
    std::fs::write(
        served.join("spec.yaml"),
        "apiVersion: kiln.dev/v1alpha1\nkind: Appliance\nmetadata:\n  name: pxe-test\n\
         spec:\n  profile: test\n",
    )
    .unwrap();
    served
}

fn pxe_vm(name: &str, work: &Path, append: String) -> kiln_lab::qemu::VmBuilder {
    let pxe = built().join("pxe");
    Vm::builder()
        .name(format!("{name}-{}", std::process::id()))
        .firmware(Firmware::Bios)
        .memory_mib(1536)
        .direct_boot(DirectBoot {
            kernel: pxe.join("vmlinuz"),
            initrd: Some(pxe.join("initrd.img")),
            append,
        })
        .nic(Nic::User {
            mac: "52:54:00:4b:00:01".into(),
            hostfwd: Vec::new(),
            bootindex: None,
            isolated: false,
        })
        .work_dir(work)
        .no_reboot(true)
}

/// The live system boots with its root fetched over HTTP and verified; the unattended install
/// fetches the kernel, finds it tampered with and stops before it writes anything.
#[test]
fn pxe_root_is_verified_and_a_tampered_kernel_stops_the_install() {
    let work = vm_dir();
    let served = served_bundle(work.path(), "vmlinuz");
    let port = serve(served);
    let disk = work.path().join("disk.raw");
    kiln_lab::qemu::create_sparse_disk(&disk, 4 << 30).unwrap();
    let url = format!("http://10.0.2.2:{port}");
    let mut vm = pxe_vm(
        "live-http",
        work.path(),
        format!(
            "kiln.root={url}/rootfs.squashfs {} kiln.install=auto kiln.config={url}/spec.yaml \
             console=ttyS0,115200",
            digest_args(built())
        ),
    )
    .disk(kiln_lab::qemu::Disk::new(&disk).serial("pxe-disk"))
    .spawn()
    .expect("starting QEMU");
    vm.wait_for_console("kiln-stage1: verified sha256", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("stage-1 fetches and verifies the image: {e}"));
    vm.wait_for_console("kiln-stage1: switching root", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("stage-1 switches root: {e}"));
    let failed = vm
        .wait_for_console("kiln-install: failed", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("the install stops on the tampered kernel: {e}"));
    assert!(
        failed.contains("/vmlinuz: sha256 is") && failed.contains("nothing was written"),
        "{failed}"
    );
    let _ = vm.quit();
    let bytes = std::fs::read(&disk).unwrap();
    assert!(bytes.iter().all(|&b| b == 0), "the disk was written");
}

/// A root image that does not match its digest is never mounted.
#[test]
fn pxe_root_with_a_wrong_digest_is_not_mounted() {
    let work = vm_dir();
    let served = served_bundle(work.path(), "rootfs.squashfs");
    let port = serve(served);
    let mut vm = pxe_vm(
        "tampered-root",
        work.path(),
        format!(
            "kiln.root=http://10.0.2.2:{port}/rootfs.squashfs {} console=ttyS0,115200",
            digest_args(built())
        ),
    )
    .spawn()
    .expect("starting QEMU");
    let error = vm
        .wait_for_console("kiln-stage1: error:", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("stage-1 refuses the image: {e}"));
    assert!(
        error.contains("rootfs.squashfs: sha256 is") && error.contains("nothing was mounted"),
        "{error}"
    );
    vm.wait_for_console("kiln-stage1: emergency", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("stage-1 stops: {e}"));
    let console = std::fs::read_to_string(vm.serial_log()).unwrap();
    assert!(!console.contains("switching root"), "{console}");
    let _ = vm.quit();
}

#[test]
fn rebuild_after_an_overlay_change_reuses_the_cached_rootfs_and_is_signed() {
    let first = manifest(built());
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    run(kiln().args(["key", "generate", "--out"]).arg(&keys));
    let (key, public) = (keys.join("kiln.key"), keys.join("kiln.pub"));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let again = kiln()
        .args(["key", "generate", "--out"])
        .arg(&keys)
        .output()
        .unwrap();
    assert!(
        !again.status.success() && String::from_utf8_lossy(&again.stderr).contains("exists"),
        "a second generate replaced the key: {again:?}"
    );
    let spec = dir.path().join("kiln.yaml");
    std::fs::write(
        &spec,
        "apiVersion: kiln.dev/v1alpha1\nkind: Appliance\nmetadata:\n  name: rebuilt\n\
         spec:\n  profile: test\n  os:\n    kernelArgs:\n      - kiln.test=rebuilt\n",
    )
    .unwrap();
    let out = dir.path().join("out");
    let report = build(Some(&spec), &out, Some(&key));
    assert_eq!(
        report["rootfs_cache_hit"], true,
        "mmdebstrap did not run again: {report}"
    );
    assert_eq!(
        report["manifest"]["rootfs_cache_key"],
        first["rootfs_cache_key"]
    );
    let steps: Vec<&str> = report["timings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["step"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        [
            "rootfs",
            "unpack",
            "trim",
            "overlay",
            "initramfs",
            "squashfs",
            "iso",
            "manifest"
        ]
    );
    let cfg = iso_file(&out.join("kiln.iso"), "/boot/grub/grub.cfg");
    assert!(
        cfg.contains("kiln.test=rebuilt"),
        "the change is in the new ISO"
    );
    assert_ne!(manifest(&out)["spec_sha256"], first["spec_sha256"]);
    // The overlay's /etc/hostname follows the spec's name: the changed file is in the image.
    let hostname = run(tool("unsquashfs", "squashfs-tools")
        .arg("-cat")
        .arg(out.join("pxe/rootfs.squashfs"))
        .arg("/etc/hostname"));
    assert_eq!(String::from_utf8_lossy(&hostname.stdout).trim(), "rebuilt");

    // Signed: OpenSSL verifies the manifest's signature with the generated public key, the
    // image trusts that key, and `kiln key verify` checks every artifact against the manifest.
    let signed_by = report["signed_by"].as_str().unwrap();
    let verified = run(tool("openssl", "openssl")
        .args(["pkeyutl", "-verify", "-pubin", "-rawin", "-inkey"])
        .arg(&public)
        .arg("-in")
        .arg(out.join("manifest.json"))
        .arg("-sigfile")
        .arg(out.join("manifest.json.sig")));
    assert!(
        String::from_utf8_lossy(&verified.stdout).contains("Signature Verified Successfully"),
        "{verified:?}"
    );
    let trusted = run(tool("unsquashfs", "squashfs-tools")
        .arg("-cat")
        .arg(out.join("pxe/rootfs.squashfs"))
        .arg(format!(
            "/usr/share/kiln/trusted-keys/{}.pub",
            signed_by.replace(':', "-")
        )));
    assert_eq!(trusted.stdout, std::fs::read(&public).unwrap());
    let ok = run(kiln()
        .args(["key", "verify", "--key"])
        .arg(&public)
        .arg(&out));
    assert!(
        String::from_utf8_lossy(&ok.stdout)
            .contains(&format!("signed by {signed_by}; 5 artifacts")),
        "{ok:?}"
    );
    let mut script = std::fs::read_to_string(out.join("pxe/boot.ipxe")).unwrap();
    script.push_str("echo tampered\n");
    std::fs::write(out.join("pxe/boot.ipxe"), script).unwrap();
    let tampered = kiln()
        .args(["key", "verify", "--key"])
        .arg(&public)
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&tampered.stderr);
    assert!(
        !tampered.status.success() && err.contains("pxe/boot.ipxe: ") && !err.contains("kiln.iso"),
        "a changed boot script: {tampered:?}"
    );
}

#[test]
fn unreachable_mirror_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("kiln.yaml");
    // Port 9 (discard) on loopback: nothing listens, the connection is refused at once.
    std::fs::write(
        &spec,
        "apiVersion: kiln.dev/v1alpha1\nkind: Appliance\nmetadata:\n  name: offline\n\
         spec:\n  profile: test\n  os:\n    mirror: http://127.0.0.1:9/debian\n",
    )
    .unwrap();
    let out = dir.path().join("out");
    let cache = dir.path().join("cache");
    let res = kiln()
        .arg("build")
        .arg("--spec")
        .arg(&spec)
        .arg("--out")
        .arg(&out)
        .arg("--cache")
        .arg(&cache)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success(), "the build fails");
    assert!(
        stderr.contains("the mirror http://127.0.0.1:9/debian is unreachable"),
        "a clear message:\n{stderr}"
    );
    assert!(!out.exists(), "nothing in --out");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".kiln-build-"))
        .collect();
    assert!(left.is_empty(), "no staging directory left: {left:?}");
    let cached: Vec<_> = std::fs::read_dir(cache.join("rootfs"))
        .map(|d| d.flatten().count())
        .into_iter()
        .collect();
    assert!(
        cached.iter().all(|&n| n == 0),
        "no cache entry, not even a temporary one"
    );
}

#[test]
fn a_kiln_without_its_stage1_beside_it_builds_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let lone = dir.path().join("kiln");
    std::fs::copy(env!("CARGO_BIN_EXE_kiln"), &lone).unwrap();
    let out = dir.path().join("out");
    let res = Command::new(&lone)
        .args(["build", "--profile", "test", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success(), "the build fails");
    assert!(
        stderr.contains(&format!("{}-init is missing", lone.display())),
        "names the missing stage-1:\n{stderr}"
    );
    assert!(!out.exists(), "nothing in --out");
}
