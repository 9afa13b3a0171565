//! The A/B upgrade run of the install tier, on real firmware (OVMF with systemd-boot): a node
//! installed from the signed `test` ISO (v1) upgrades itself with `kiln node upgrade` from a
//! media disk.
//!
//! One machine, one run of boots:
//! 1. v1 in slot A: the agent blesses generation 1; an unsigned bundle and one whose manifest
//!    was edited after signing are refused; the signed v2 (the same spec plus one kernel
//!    argument) starts going into slot B, and the power fails (QEMU is killed) mid-write.
//! 2. The node comes back on slot A with nothing staged; the upgrade runs again, completes,
//!    and the node reboots; the power fails again while slot B boots for the first time.
//! 3. v2 in slot B: the new kernel argument is on the command line, the agent blesses
//!    generation 2, and a signed bundle whose initrd cannot boot goes into slot A.
//! 4. Slot A panics three times (`panic=10`); systemd-boot marks it bad and boots B, the last
//!    good slot, where the agent reports the rollback and why. v2 does not allow unsigned
//!    builds, so `--allow-unsigned` is refused; a signed build whose spec requires a unit the
//!    image does not have goes into slot A.
//! 5. Slot A boots, the agent finds the required unit missing, marks the slot bad and reboots.
//! 6. Back on B, which reports why A failed, v3 (requiring a unit it has, and allowing unsigned
//!    builds) goes into slot A.
//! 7. v3 in slot A, blessed, with B as its fallback; its dry run of an unsigned build is taken.
//!
//! The boot menu's entries are read back from the disk image at the end. GRUB's counting (its
//! `grubenv`) goes through the rack's rolling upgrade on a BIOS node instead (`fleet_rollout`):
//! one long run per boot loader.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kiln_lab::qemu::{Disk, Firmware, Nic, QemuError, Vm};

use super::{KILN, StateMount, console_lines, probe_unit, sgdisk_field, test_signing_key, text};

const PROBE_SCRIPT: &str = "/usr/local/bin/kiln-lab-upgrade";
const MEDIA_SERIAL: &str = "kiln-upgrades";

fn override_yaml() -> String {
    format!(
        r#"apiVersion: kiln.dev/v1alpha1
kind: NodeConfig
spec:
  files:
    - path: {PROBE_SCRIPT}
      mode: "0755"
      content: |
        #!/bin/sh
        say() {{ echo "kiln-lab-upgrade: $*" > /dev/console; }}
        mkdir -p /run/upgrades
        mount -o ro /dev/disk/by-id/virtio-{MEDIA_SERIAL} /run/upgrades || say "cannot mount the upgrade media"
        slot=$(sed -n 's/.*kiln\.slot=\([AB]\).*/\1/p' /proc/cmdline)
        say "boot slot=$slot cmdline $(sed 's/\\/\//g' /proc/cmdline)"
        # The assessment of this boot is over once no slot is on trial.
        until /usr/bin/kiln node status > /run/st 2>&1 && grep -q '^boot:' /run/st && ! grep -q 'on-trial' /run/st; do sleep 2; done
        sed 's/^/kiln-lab-status: /' /run/st > /dev/console
        upgrade() {{
          bundle=$1; shift
          /usr/bin/kiln node upgrade --image "/run/upgrades/$bundle" "$@" > /run/out 2>&1
          rc=$?
          say "$bundle exit $rc: $(tr '\n' ' ' < /run/out)"
        }}
        # Each step is marked done on the state partition before it starts.
        next() {{
          say "ready for $1"
          touch "/var/lib/kiln-lab-$1"; sync
        }}
        if [ "$slot" = A ] && [ ! -e /var/lib/kiln-lab-bad ]; then
          attempt=$(cat /var/lib/kiln-lab-attempts 2>/dev/null || echo 0)
          if [ "$attempt" = 0 ]; then upgrade unsigned; upgrade tampered; fi
          echo $((attempt + 1)) > /var/lib/kiln-lab-attempts; sync
          say "v1 attempt $attempt"
          upgrade v2 --reboot
        elif [ "$slot" = A ]; then
          if grep -q 'booted A (generation [0-9]*, good)' /run/st; then
            upgrade unsigned --allow-unsigned --dry-run
            say "done"
          else
            say "slot A is not good"
          fi
        elif [ ! -e /var/lib/kiln-lab-bad ]; then
          next bad
          upgrade bad --reboot
        elif [ ! -e /var/lib/kiln-lab-unhealthy ]; then
          upgrade unsigned --allow-unsigned --dry-run
          next unhealthy
          upgrade unhealthy --reboot
        elif [ ! -e /var/lib/kiln-lab-v3 ]; then
          next v3
          upgrade v3 --reboot
        else
          say "back on B after v3"
        fi
        exec sleep infinity
"#
    ) + &probe_unit("kiln-lab-upgrade", "kiln lab upgrade probe")
}

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}:\n{}", text(&out));
    out
}

/// A test-profile build named `name`, with the kernel argument `kiln.test=NAME` and `extra`
/// added to its spec, signed with the key v1 trusts.
fn build(dir: &Path, key: &Path, name: &str, extra: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let spec = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &spec,
        format!(
            "apiVersion: kiln.dev/v1alpha1\nkind: Appliance\nmetadata:\n  name: kiln-test\n\
             spec:\n  profile: test\n  os:\n    kernelArgs: [console=tty0, \"console=ttyS0,115200\", \
             kiln.test={name}]\n{extra}"
        ),
    )
    .unwrap();
    let out = dir.join(format!("{name}-build"));
    run(Command::new(KILN)
        .arg("build")
        .arg("--spec")
        .arg(&spec)
        .arg("--sign-key")
        .arg(key)
        .arg("--out")
        .arg(&out));
    out
}

/// Copies what an upgrade reads from a build (manifest, signature, spec, boot files).
fn copy_bundle(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.join("pxe")).unwrap();
    for f in [
        "manifest.json",
        "manifest.json.sig",
        "spec.yaml",
        "pxe/vmlinuz",
        "pxe/initrd.img",
        "pxe/rootfs.squashfs",
    ] {
        std::fs::copy(from.join(f), to.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
    }
}

/// The media: v2, v2 without its signature, v2 with its manifest edited after signing, a v2 whose
/// initrd is garbage, re-signed with the trusted key (a bad build from a trusted builder),
/// and the `unhealthy` and `v3` builds.
fn make_media(v2: &Path, others: &[(&str, PathBuf)], key: &Path, dir: &Path) -> PathBuf {
    let tree = dir.join("media");
    copy_bundle(v2, &tree.join("v2"));
    for (name, build) in others {
        copy_bundle(build, &tree.join(name));
    }
    let unsigned = tree.join("unsigned");
    copy_bundle(v2, &unsigned);
    std::fs::remove_file(unsigned.join("manifest.json.sig")).unwrap();
    let tampered = tree.join("tampered");
    std::fs::create_dir_all(&tampered).unwrap();
    std::fs::copy(
        v2.join("manifest.json.sig"),
        tampered.join("manifest.json.sig"),
    )
    .unwrap();
    let manifest = std::fs::read_to_string(v2.join("manifest.json")).unwrap();
    std::fs::write(
        tampered.join("manifest.json"),
        manifest.replacen(
            "\"kernel_args\": [",
            "\"kernel_args\": [\n    \"init=/bin/sh\",",
            1,
        ),
    )
    .unwrap();

    let bad = tree.join("bad");
    copy_bundle(v2, &bad);
    let garbage: Vec<u8> = (0..65536u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    std::fs::write(bad.join("pxe/initrd.img"), &garbage).unwrap();
    let mut m: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    for a in m["artifacts"].as_array_mut().unwrap() {
        if a["path"] == "pxe/initrd.img" {
            a["size"] = garbage.len().into();
            a["sha256"] = kiln_image::manifest::sha256_hex(&garbage).into();
        }
    }
    std::fs::write(
        bad.join("manifest.json"),
        serde_json::to_string_pretty(&m).unwrap(),
    )
    .unwrap();
    run(Command::new("openssl")
        .args(["pkeyutl", "-sign", "-rawin", "-inkey"])
        .arg(key)
        .arg("-in")
        .arg(bad.join("manifest.json"))
        .arg("-out")
        .arg(bad.join("manifest.json.sig")));

    let image = dir.join("media.img");
    run(Command::new("mke2fs")
        .args(["-q", "-t", "ext4", "-d"])
        .arg(&tree)
        .arg(&image)
        .arg("1280M"));
    image
}

/// The kiln entries of an installed disk image's boot menu: systemd-boot's entry files.
fn boot_entries(disk: &Path) -> Vec<String> {
    let first: u64 = sgdisk_field(disk, 2, "First sector:")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let image = format!("{}@@{}", disk.display(), first * 512);
    let out = run(Command::new("mdir").env("MTOOLS_SKIP_CHECK", "1").args([
        "-i",
        &image,
        "-b",
        "::/loader/entries",
    ]));
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().rsplit('/').next().map(str::to_string))
        .filter(|n| !n.is_empty())
        .collect();
    names.sort();
    names
}

/// The signed builds the upgrade runs use, made once per test process under
/// `$KILN_CACHE/lab-upgrade`.
#[derive(Debug)]
pub struct Bundles {
    /// One directory per bundle: `v2`, `unsigned`, `tampered`, `bad`, `unhealthy`, `v3`.
    pub tree: PathBuf,
    /// The same as an ext4 image, for a machine's media disk.
    pub media: PathBuf,
    /// sha256 of v2's root image.
    pub v2_rootfs: String,
    /// sha256 of v3's root image.
    pub v3_rootfs: String,
}

/// The unit the `unhealthy` build requires and does not have.
const MISSING_UNIT: &str = "kiln-lab-never.service";

fn rootfs_sha256(build: &Path) -> String {
    let manifest: kiln_spec::manifest::Manifest =
        serde_json::from_slice(&std::fs::read(build.join("manifest.json")).unwrap()).unwrap();
    manifest
        .sha256_of("pxe/rootfs.squashfs")
        .unwrap()
        .to_string()
}

pub fn bundles() -> &'static Bundles {
    static BUNDLES: OnceLock<Bundles> = OnceLock::new();
    BUNDLES.get_or_init(|| {
        let key = test_signing_key().with_extension("key");
        let dir = kiln_spec::paths::cache_dir().join("lab-upgrade");
        let v2 = build(&dir, &key, "v2", "");
        let unhealthy = build(
            &dir,
            &key,
            "unhealthy",
            &format!(
                "  upgrade:\n    health:\n      requiredUnits: [systemd-journald.service, \
                 {MISSING_UNIT}]\n"
            ),
        );
        let v3 = build(
            &dir,
            &key,
            "v3",
            "  upgrade:\n    allowUnsigned: true\n    health:\n      requiredUnits: \
             [systemd-journald.service]\n      timeoutSeconds: 900\n",
        );
        let _ = std::fs::remove_dir_all(dir.join("media"));
        let _ = std::fs::remove_file(dir.join("media.img"));
        Bundles {
            v2_rootfs: rootfs_sha256(&v2),
            v3_rootfs: rootfs_sha256(&v3),
            media: make_media(&v2, &[("unhealthy", unhealthy), ("v3", v3)], &key, &dir),
            tree: dir.join("media"),
        }
    })
}

/// How long a kernel in early boot may print nothing before the machine counts as hung.
const KERNEL_HANG: Duration = Duration::from_secs(240);

/// Waits for `what` on the console as [`Vm::wait_for_console`] does, but resets a machine
/// whose kernel hung in early boot, as a BMC's boot watchdog would: under emulation on a busy
/// host a guest kernel has (rarely) stopped for good in its first seconds, before anything of
/// the image ran. Returns how many times the machine was reset.
fn wait_resetting_a_hung_kernel(
    node: &mut Vm,
    what: &str,
    limit: Duration,
) -> Result<usize, QemuError> {
    let start = Instant::now();
    let console_len = |node: &Vm| std::fs::metadata(node.serial_log()).map_or(0, |m| m.len());
    let mut quiet = (console_len(node), Instant::now());
    let mut resets = 0;
    loop {
        let slice = limit
            .saturating_sub(start.elapsed())
            .min(Duration::from_secs(30));
        match node.wait_for_console(what, slice) {
            Ok(_) => return Ok(resets),
            Err(QemuError::ConsoleTimeout { .. }) if start.elapsed() < limit => {}
            Err(QemuError::ConsoleTimeout {
                vm, pattern, tail, ..
            }) => {
                return Err(QemuError::ConsoleTimeout {
                    vm,
                    pattern,
                    waited: limit,
                    tail,
                });
            }
            Err(e) => return Err(e),
        }
        let len = console_len(node);
        if len != quiet.0 {
            quiet = (len, Instant::now());
            continue;
        }
        let last = node.console_tail(1);
        if quiet.1.elapsed() >= KERNEL_HANG && kernel_uptime(&last).is_some_and(|t| t < 60.0) {
            let registers = node
                .qmp_with(
                    "human-monitor-command",
                    serde_json::json!({ "command-line": "info registers -a" }),
                )
                .map_or_else(|e| e.to_string(), |r| r.as_str().unwrap_or_default().into());
            eprintln!(
                "{}: the kernel printed nothing for {} s after {last:?}; resetting the machine. \
                 Its CPUs:\n{registers}",
                node.name(),
                KERNEL_HANG.as_secs()
            );
            node.qmp("system_reset")?;
            resets += 1;
            quiet = (len, Instant::now());
        }
    }
}

/// The uptime a kernel message line starts with (`[    2.094196] ...`).
fn kernel_uptime(line: &str) -> Option<f64> {
    let (stamp, _) = line.strip_prefix('[')?.split_once(']')?;
    stamp.trim().parse().ok()
}

/// The whole run on the UEFI machine whose installed disk is `disk`; QEMU is also killed in the
/// middle of the slot write and during the new slot's first boot.
pub fn upgrade_and_fall_back(disk: &Path) {
    let name = "uefi";
    let dir = tempfile::tempdir().unwrap();
    {
        let state = StateMount::new(disk);
        let path = state.upper(kiln_agent::controllers::OVERRIDE_CONFIG);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, override_yaml()).unwrap();
    }
    let Bundles {
        media,
        v2_rootfs,
        v3_rootfs,
        ..
    } = bundles();

    // Each power-on gets its own console log; a power cut is a killed QEMU.
    let mut consoles: Vec<PathBuf> = Vec::new();
    let mut power_on = || {
        let console = dir
            .path()
            .join(format!("console-{}.log", consoles.len() + 1));
        consoles.push(console.clone());
        Vm::builder()
            .name(format!("kiln-lab-upgrade-{name}-{}", std::process::id()))
            .firmware(Firmware::Uefi)
            .memory_mib(2048)
            .disk(Disk::new(disk).bootindex(1).serial("kiln-lab-disk"))
            .disk(Disk::new(media).serial(MEDIA_SERIAL).read_only(true))
            .nic(Nic::lab(Vec::new()))
            .serial_log(console)
            .spawn()
            .unwrap()
    };
    let start = Instant::now();
    let resets = std::cell::Cell::new(0);
    let wait = |node: &mut Vm, what: &str, secs: u64| {
        let reset = wait_resetting_a_hung_kernel(node, what, Duration::from_secs(secs))
            .unwrap_or_else(|e| panic!("{name}: waiting for {what:?}: {e}"));
        resets.set(resets.get() + reset);
        let t = start.elapsed().as_secs_f64();
        eprintln!("{name} {t:7.1} s  {what}");
        t
    };
    let mut node = power_on();
    wait(&mut node, "kiln-lab-upgrade: v1 attempt 0", 600);
    // Power fails while the root image goes into slot B.
    wait(&mut node, "written 30% of the root image", 300);
    node.kill();
    node = power_on();
    let write_start = wait(&mut node, "kiln-lab-upgrade: v1 attempt 1", 600);
    let written = wait(&mut node, "kiln-lab-upgrade: v2 exit", 600);
    // And again while the new slot boots for the first time.
    wait(&mut node, "kiln-stage1: found KILN_B", 300);
    node.kill();
    node = power_on();
    let blessed = wait(
        &mut node,
        "kiln-lab-status: boot: booted B (generation 2, good)",
        900,
    );
    let bad_written = wait(&mut node, "kiln-lab-upgrade: bad exit", 600);
    let reset_before = resets.get();
    let fell_back = wait(&mut node, "kiln-lab-upgrade: ready for unhealthy", 1200);
    let resets_while_falling_back = resets.get() - reset_before;
    let unhealthy_written = wait(&mut node, "kiln-lab-upgrade: unhealthy exit", 600);
    let rolled_back = wait(&mut node, "kiln-lab-upgrade: ready for v3", 1200);
    let v3_written = wait(&mut node, "kiln-lab-upgrade: v3 exit", 600);
    let v3_blessed = wait(&mut node, "kiln-lab-upgrade: done", 900);
    let _ = node.quit();
    eprintln!(
        "{name}: upgrade to v2: {:.0} s write; {:.0} s from the reboot to slot B blessed (one \
         boot cut short); rollback from the unbootable image: {:.0} s and from the unhealthy one: {:.0} s, \
         each from the upgrade's answer to slot B blessed; upgrade to v3: {:.0} s from the \
         upgrade's answer to slot A blessed",
        written - write_start,
        blessed - written,
        fell_back - bad_written,
        rolled_back - unhealthy_written,
        v3_blessed - v3_written,
    );

    let logs: Vec<String> = consoles
        .iter()
        .map(|c| console_lines(c).join("\n"))
        .collect();
    let all = logs.join("\n");
    let said = |log: &str, prefix: &str| -> String {
        log.lines()
            .find_map(|l| l.split_once(prefix).map(|(_, rest)| rest.to_string()))
            .unwrap_or_else(|| panic!("{name}: no {prefix:?} on the console:\n{log}"))
    };
    // Refused before anything was written.
    let unsigned = said(&all, "kiln-lab-upgrade: unsigned exit ");
    assert!(
        !unsigned.starts_with('0') && unsigned.contains("manifest.json.sig"),
        "{unsigned}"
    );
    let tampered = said(&all, "kiln-lab-upgrade: tampered exit ");
    assert!(
        !tampered.starts_with('0') && tampered.contains("not signed by any of the trusted keys"),
        "{tampered}"
    );
    // After the cut write: slot A, good, nothing staged.
    let second = &logs[1];
    assert!(second.contains("kiln-stage1: found KILN_A"), "{second}");
    assert!(
        second.contains("kiln-lab-status: boot: booted A (generation 1, good)")
            && !second.contains("kiln-lab-status:   staged"),
        "{second}"
    );
    let upgraded = said(&all, "kiln-lab-upgrade: v2 exit ");
    assert!(upgraded.starts_with("0:"), "{upgraded}");
    // Slot B runs v2, blessed, with A as its fallback.
    let on_b = said(&all, "kiln-lab-upgrade: boot slot=B cmdline ");
    assert!(on_b.contains("kiln.test=v2"), "{on_b}");
    let blessed_line = format!("booted B (generation 2, good) image {}", &v2_rootfs[..16]);
    assert!(all.contains(&blessed_line), "no {blessed_line:?}:\n{all}");
    assert!(
        all.contains("kiln-lab-status:   rollback A (generation 1, good)"),
        "{all}"
    );
    let bad = said(&all, "kiln-lab-upgrade: bad exit ");
    assert!(bad.starts_with("0:"), "{bad}");
    // The bad slot panicked until its tries ran out; the node is back on B.
    let after_bad = all.split_once("kiln-lab-upgrade: bad exit").unwrap().1;
    // A boot reset after its kernel hung used up a try too (and may have been B's).
    let panics = after_bad.matches("Kernel panic").count();
    assert!(
        panics <= 3 && panics + resets_while_falling_back >= 3,
        "slot A should be tried exactly three times ({resets_while_falling_back} boots reset):\n{after_bad}"
    );
    let (after_bad, after_unhealthy) = after_bad
        .split_once("kiln-lab-upgrade: unhealthy exit")
        .unwrap();
    let last = said(after_bad, "kiln-lab-upgrade: boot slot=");
    assert!(last.starts_with("B cmdline"), "{last}");
    assert!(
        after_bad.contains(
            "last assessment: slot A generation 3 FAILED: slot A (generation 3) used up its 3 boot tries"
        ),
        "{after_bad}"
    );
    // v2 does not take unsigned builds.
    let refused = said(after_bad, "kiln-lab-upgrade: unsigned exit ");
    assert!(
        !refused.starts_with('0') && refused.contains("does not take unsigned builds"),
        "{refused}"
    );
    assert!(after_unhealthy.starts_with(" 0:"), "{after_unhealthy}");

    // The unhealthy build booted in slot A; its missing unit failed it at once and the
    // agent went back to B, which tells why.
    let (unhealthy_boot, on_v3) = after_unhealthy
        .split_once("kiln-lab-upgrade: v3 exit")
        .unwrap();
    let booted = said(unhealthy_boot, "kiln-lab-upgrade: boot slot=");
    assert!(
        booted.starts_with("A cmdline") && booted.contains("kiln.test=unhealthy"),
        "{booted}"
    );
    let reason = format!("{MISSING_UNIT} is not installed");
    assert!(
        unhealthy_boot.contains(&format!(
            "kiln-agent: slot A (generation 4) failed its health check ({reason}); rebooting \
             into the last good slot"
        )),
        "{unhealthy_boot}"
    );
    let back = unhealthy_boot
        .rsplit_once("kiln-lab-upgrade: boot slot=")
        .unwrap()
        .1;
    assert!(back.starts_with("B cmdline"), "{back}");
    assert!(
        back.contains(&format!(
            "last assessment: slot A generation 4 FAILED: {reason}"
        )),
        "{back}"
    );

    // v3 in slot A, blessed once its required unit was active; it takes unsigned builds.
    assert!(on_v3.starts_with(" 0:"), "{on_v3}");
    let on_a = said(on_v3, "kiln-lab-upgrade: boot slot=");
    assert!(
        on_a.starts_with("A cmdline") && on_a.contains("kiln.test=v3"),
        "{on_a}"
    );
    let blessed_line = format!("booted A (generation 5, good) image {}", &v3_rootfs[..16]);
    assert!(
        on_v3.contains(&blessed_line),
        "no {blessed_line:?}:\n{on_v3}"
    );
    assert!(
        on_v3.contains("kiln-lab-status:   rollback B (generation 2, good)"),
        "{on_v3}"
    );
    assert!(on_v3.contains("systemd-journald.service active"), "{on_v3}");
    let unsigned = said(on_v3, "kiln-lab-upgrade: unsigned exit ");
    assert!(
        unsigned.starts_with("0:") && unsigned.contains(kiln_installer::upgrade::UNSIGNED),
        "{unsigned}"
    );
    assert_eq!(boot_entries(disk), ["kiln-2-b.conf", "kiln-5-a.conf"]);
}
