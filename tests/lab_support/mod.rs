//! Shared by the QEMU lab tests: the ISO fixtures, `kiln lab install`, reading a disk image's
//! GPT with `sgdisk`, mounting its `KILN_STATE` and reading a finished VM's console.

#![allow(dead_code)] // each test file uses its own subset

pub mod upgrade;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use kiln_lab::qemu::ConsoleLog;

pub const KILN: &str = env!("CARGO_BIN_EXE_kiln");

/// The `test` profile ISO, built once per test process (kiln's build cache makes a rebuild of
/// unchanged inputs fast) into `$KILN_CACHE/lab-install-iso`, signed with
/// [`test_signing_key`].
pub fn test_iso() -> PathBuf {
    static ISO: OnceLock<Mutex<Option<PathBuf>>> = OnceLock::new();
    let mut iso = ISO.get_or_init(|| Mutex::new(None)).lock().unwrap();
    if let Some(p) = iso.as_ref() {
        return p.clone();
    }
    let key = test_signing_key().with_extension("key");
    let path = build_iso(
        &["--profile", "test", "--sign-key", key.to_str().unwrap()],
        "lab-install-iso",
    );
    *iso = Some(path.clone());
    path
}

/// The public half of the key the test ISO is signed with, made by `kiln key generate` under
/// `$KILN_CACHE/test-signing` on first use (the private half beside it, `kiln.key`).
pub fn test_signing_key() -> PathBuf {
    let dir = kiln_spec::paths::cache_dir().join("test-signing");
    let public = dir.join("kiln.pub");
    if public.exists() {
        public
    } else {
        generate_key(&dir)
    }
}

/// `kiln key generate` into `dir`: the public key's path.
pub fn generate_key(dir: &Path) -> PathBuf {
    let out = Command::new(KILN)
        .args(["key", "generate", "--out"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "kiln key generate:\n{}", text(&out));
    dir.join("kiln.pub")
}

/// `kiln build` with `args` (the spec to build) into `$KILN_CACHE/<out>`: its ISO.
pub fn build_iso(args: &[&str], out: &str) -> PathBuf {
    let out = kiln_spec::paths::cache_dir().join(out);
    let status = Command::new(KILN)
        .arg("build")
        .args(args)
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "kiln build {args:?} failed");
    out.join("kiln.iso")
}

/// `kiln lab install` of `iso` onto `disk` (of `disk_size`, e.g. `4GiB`, when created), with a
/// JSON summary.
pub fn lab_install(iso: &Path, disk: &Path, firmware: &str, disk_size: &str) -> Output {
    Command::new(KILN)
        .args(["lab", "install", "--output", "json", "--firmware", firmware])
        .arg("--iso")
        .arg(iso)
        .arg("--disk")
        .arg(disk)
        .args(["--disk-size", disk_size, "--timeout", "12m"])
        .output()
        .unwrap()
}

/// A fingerprint of a (sparse) disk image that changes with any byte of it and with nothing
/// else: the sha256 of the offset and bytes of every non-zero 4 KiB block. The extent map itself
/// is not part of it: on ext4 a range the guest zeroed (an unwritten extent) turns from hole to
/// data in `SEEK_DATA` once its pages are merely read. Visiting only allocated extents keeps
/// multi-GiB sparse disks cheap to compare.
pub fn disk_fingerprint(path: &Path) -> String {
    use nix::unistd::{Whence, lseek};
    use sha2::Digest;
    use std::io::{Read, Seek, SeekFrom};
    use std::os::fd::AsFd;
    const BLOCK: usize = 4096;
    let mut f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len();
    let mut hasher = sha2::Sha256::new();
    let mut pos = 0u64;
    let mut buf = vec![0u8; BLOCK];
    while pos < len {
        let Ok(start) = lseek(f.as_fd(), pos as i64, Whence::SeekData) else {
            break; // nothing but holes from here on
        };
        let end = lseek(f.as_fd(), start, Whence::SeekHole).unwrap() as u64;
        // Extents start on filesystem block boundaries; align down anyway so blocks are the same
        // whatever the map looks like.
        let mut block = start as u64 / BLOCK as u64 * BLOCK as u64;
        f.seek(SeekFrom::Start(block)).unwrap();
        while block < end {
            let want = (len - block).min(BLOCK as u64) as usize;
            f.read_exact(&mut buf[..want])
                .unwrap_or_else(|e| panic!("reading {} at {block}: {e}", path.display()));
            if buf[..want].iter().any(|&b| b != 0) {
                hasher.update(block.to_le_bytes());
                hasher.update(&buf[..want]);
            }
            block += want as u64;
        }
        pos = end.max(block);
    }
    format!("{len}:{}", hex::encode(hasher.finalize()))
}

/// A command's stdout and stderr, for assertion messages.
pub fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

/// One field of `sgdisk -i N`, e.g. `"Partition name:"` → `'KILN_A'`.
pub fn sgdisk_field(disk: &Path, n: u32, prefix: &str) -> String {
    let out = Command::new("sgdisk")
        .arg(format!("-i{n}"))
        .arg(disk)
        .output()
        .expect("sgdisk (gdisk) must be installed");
    let t = String::from_utf8_lossy(&out.stdout).into_owned();
    t.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("sgdisk -i{n}: no {prefix:?} in\n{t}"))
        .trim()
        .to_string()
}

/// `KILN_STATE` is the fifth partition of kiln's layout.
const STATE_PARTITION: u32 = 5;

/// `KILN_STATE` of a disk image, loop-mounted at its byte range (the host kernel does not read
/// partition tables); mounting also replays the journal of a node that was stopped hard.
pub struct StateMount {
    dir: tempfile::TempDir,
}

impl StateMount {
    pub fn new(disk: &Path) -> StateMount {
        let sector = |prefix: &str| -> u64 {
            let field = sgdisk_field(disk, STATE_PARTITION, prefix);
            field
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("sgdisk {prefix} {field:?}"))
        };
        assert_eq!(
            sgdisk_field(disk, STATE_PARTITION, "Partition name:"),
            "'KILN_STATE'"
        );
        let first = sector("First sector:");
        let last = sector("Last sector:");
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "ext4", "-o"])
            .arg(format!(
                "loop,offset={},sizelimit={}",
                first * 512,
                (last + 1 - first) * 512
            ))
            .arg(disk)
            .arg(dir.path())
            .output()
            .expect("mount (util-linux) must be installed");
        assert!(out.status.success(), "mounting KILN_STATE: {}", text(&out));
        StateMount { dir }
    }

    /// A path of the installed system, in the overlay's upper directory.
    pub fn upper(&self, path: &str) -> PathBuf {
        self.dir
            .path()
            .join(kiln_installer::statefs::OVERLAY_UPPER)
            .join(path.trim_start_matches('/'))
    }
}

impl Drop for StateMount {
    fn drop(&mut self) {
        let out = Command::new("umount").arg(self.dir.path()).output();
        if !matches!(&out, Ok(o) if o.status.success()) {
            eprintln!("umount {}: {out:?}", self.dir.path().display());
        }
    }
}

/// Every complete line of a finished VM's console, with terminal escapes removed.
pub fn console_lines(path: &Path) -> Vec<String> {
    let mut log = ConsoleLog::new(path);
    let mut lines = Vec::new();
    // The log is complete: the first wait that finds no further line ends the reading.
    while let Ok(line) = log.wait_for_line("finished", "", Duration::ZERO) {
        lines.push(line);
    }
    lines
}

/// The text after `<prefix>: ` on each console line that has it (what a node's probe said).
pub fn prefixed(lines: &[String], prefix: &str) -> Vec<String> {
    let prefix = format!("{prefix}: ");
    lines
        .iter()
        .filter_map(|l| l.split_once(prefix.as_str()).map(|(_, s)| s.to_string()))
        .collect()
}

/// A node config's `units:` section: `name`.service running `/usr/local/bin/<name>`, the probe
/// a VM tier's node reports to the console with.
pub fn probe_unit(name: &str, description: &str) -> String {
    format!(
        r#"  units:
    - name: {name}.service
      enabled: true
      started: true
      content: |
        [Unit]
        Description={description}

        [Service]
        ExecStart=/usr/local/bin/{name}

        [Install]
        WantedBy=multi-user.target
"#
    )
}

/// Makes `127.0.0.1:port` inside network namespace `netns` lead to `127.0.0.1:port` of the
/// test's own namespace (a TCP relay on both loopbacks), so a command run in a lab rack
/// reaches a test's API server with the kubeconfig the test uses. Stops accepting on drop.
pub struct LoopbackRelay(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for LoopbackRelay {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

pub fn relay_into_netns(netns: &str, port: u16) -> LoopbackRelay {
    use std::net::{Shutdown, TcpListener, TcpStream};
    let ns = kiln_lab::netns::Netns::existing(netns).expect("the rack's namespace");
    let listener = ns
        .enter(|| TcpListener::bind(("127.0.0.1", port)))
        .expect("entering the rack's namespace")
        .expect("listening in the rack's namespace");
    listener.set_nonblocking(true).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    std::thread::spawn(move || {
        while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
            let inside = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                Err(_) => return,
            };
            let Ok(outside) = TcpStream::connect(("127.0.0.1", port)) else {
                continue;
            };
            inside.set_nonblocking(false).unwrap();
            for (mut from, mut to) in [
                (inside.try_clone().unwrap(), outside.try_clone().unwrap()),
                (outside, inside),
            ] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(Shutdown::Write);
                });
            }
        }
    });
    LoopbackRelay(stop)
}
