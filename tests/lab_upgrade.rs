//! End to end on real UEFI firmware (OVMF, systemd-boot) under QEMU: a node installed from
//! the signed `test` ISO (v1) upgrades itself with `kiln node upgrade` from a media disk.
//!
//! One machine, one run of boots:
//! 1. v1 in slot A: the agent blesses generation 1; an unsigned bundle and one whose manifest
//!    was edited after signing are refused; the signed v2 (the same spec plus one kernel
//!    argument) goes into slot B and the node reboots.
//! 2. v2 in slot B: the new kernel argument is on the command line, the agent blesses
//!    generation 2, and a signed bundle whose initrd cannot boot goes into slot A.
//! 3. Slot A panics three times (`panic=10`); systemd-boot marks it bad and boots B, the last
//!    good slot, where the agent reports the rollback and why.
//!
//! The ESP's entries are read back from the disk image at the end.

mod lab_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_lab::qemu::{Disk, Firmware, Nic, Vm};
use lab_support::{
    KILN, StateMount, console_lines, lab_install, sgdisk_field, test_iso, test_signing_key, text,
};

const PROBE_UNIT: &str = "kiln-lab-upgrade.service";
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
        # The assessment of this boot is over once no slot is on trial.
        until /usr/bin/kiln node status > /run/st 2>&1 && grep -q '^boot:' /run/st && ! grep -q 'on-trial' /run/st; do sleep 2; done
        sed 's/^/kiln-lab-status: /' /run/st > /dev/console
        step=$(cat /var/lib/kiln-lab-step 2>/dev/null || echo 0)
        say "step $step cmdline $(cat /proc/cmdline)"
        upgrade() {{
          /usr/bin/kiln node upgrade --image "/run/upgrades/$1" $2 > /run/out 2>&1
          rc=$?
          say "$1 exit $rc: $(tr '\n' ' ' < /run/out)"
        }}
        case "$step" in
          0) upgrade unsigned; upgrade tampered
             echo 1 > /var/lib/kiln-lab-step; sync
             upgrade v2 --reboot ;;
          1) echo 2 > /var/lib/kiln-lab-step; sync
             upgrade bad --reboot ;;
          *) say "done" ;;
        esac
        exec sleep infinity
  units:
    - name: {PROBE_UNIT}
      enabled: true
      started: true
      content: |
        [Unit]
        Description=kiln lab upgrade probe

        [Service]
        ExecStart={PROBE_SCRIPT}

        [Install]
        WantedBy=multi-user.target
"#
    )
}

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}:\n{}", text(&out));
    out
}

/// v2: the test profile with one more kernel argument, signed with the key v1 trusts.
fn build_v2(dir: &Path, key: &Path) -> PathBuf {
    let spec = dir.join("v2.yaml");
    std::fs::write(
        &spec,
        "apiVersion: kiln.dev/v1alpha1\nkind: Appliance\nmetadata:\n  name: kiln-test\n\
         spec:\n  profile: test\n  os:\n    kernelArgs:\n      - console=tty0\n      - console=ttyS0,115200\n      - kiln.test=v2\n",
    )
    .unwrap();
    let out = dir.join("v2-build");
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

/// The media: v2, v2 unsigned, v2 with its manifest edited after signing, and a v2 whose
/// initrd is garbage, re-signed with the trusted key (a bad build from a trusted builder).
fn make_media(v2: &Path, key: &Path, dir: &Path) -> PathBuf {
    let tree = dir.join("media");
    copy_bundle(v2, &tree.join("v2"));
    let unsigned = tree.join("unsigned");
    std::fs::create_dir_all(&unsigned).unwrap();
    std::fs::copy(v2.join("manifest.json"), unsigned.join("manifest.json")).unwrap();
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
        .arg("768M"));
    image
}

/// The file names in the ESP's entry directory of an installed disk image.
fn esp_entries(disk: &Path) -> Vec<String> {
    let first: u64 = sgdisk_field(disk, 2, "First sector:")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let out = run(Command::new("mdir")
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(["-b", "-i"])
        .arg(format!("{}@@{}", disk.display(), first * 512))
        .arg("::/loader/entries"));
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().rsplit('/').next().map(str::to_string))
        .filter(|n| !n.is_empty())
        .collect();
    names.sort();
    names
}

#[test]
fn a_node_upgrades_into_the_other_slot_and_falls_back_from_a_bad_image() {
    let iso = test_iso();
    let key = test_signing_key().with_extension("key");
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    let out = lab_install(&iso, &disk, "uefi", "4GiB");
    assert!(out.status.success(), "kiln lab install:\n{}", text(&out));
    {
        let state = StateMount::new(&disk);
        let path = state.upper(kiln_agent::controllers::OVERRIDE_CONFIG);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, override_yaml()).unwrap();
    }
    let v2 = build_v2(dir.path(), &key);
    let v2_manifest: kiln_spec::manifest::Manifest =
        serde_json::from_slice(&std::fs::read(v2.join("manifest.json")).unwrap()).unwrap();
    let v2_rootfs = v2_manifest
        .sha256_of("pxe/rootfs.squashfs")
        .unwrap()
        .to_string();
    let media = make_media(&v2, &key, dir.path());

    let console = dir.path().join("upgrade-console.log");
    let mut node = Vm::builder()
        .name(format!("kiln-lab-upgrade-{}", std::process::id()))
        .firmware(Firmware::Uefi)
        .memory_mib(2048)
        .disk(Disk::new(&disk).bootindex(1).serial("kiln-lab-disk"))
        .disk(Disk::new(&media).serial(MEDIA_SERIAL).read_only(true))
        .nic(Nic::User {
            mac: "52:54:00:4b:49:4c".into(),
            hostfwd: Vec::new(),
            bootindex: None,
            isolated: true,
        })
        .serial_log(&console)
        .spawn()
        .unwrap();
    let start = Instant::now();
    let wait = |node: &mut Vm, what: &str, secs: u64| {
        node.wait_for_console(what, Duration::from_secs(secs))
            .unwrap_or_else(|e| panic!("waiting for {what:?}: {e}"));
        let t = start.elapsed().as_secs_f64();
        eprintln!("{t:7.1} s  {what}");
        t
    };
    wait(&mut node, "kiln-lab-upgrade: step 0", 600);
    let write_start = wait(&mut node, "kiln-lab-upgrade: tampered exit", 300);
    let written = wait(&mut node, "kiln-lab-upgrade: v2 exit", 600);
    let blessed = wait(&mut node, "kiln-lab-upgrade: step 1", 900);
    let bad_written = wait(&mut node, "kiln-lab-upgrade: bad exit", 600);
    let fell_back = wait(&mut node, "kiln-lab-upgrade: step 2", 1200);
    let _ = node.quit();
    eprintln!(
        "upgrade to v2: {:.0} s write, {:.0} s reboot + health until blessed; \
         rollback from the bad image: {:.0} s from its reboot to the old slot blessed",
        written - write_start,
        blessed - written,
        fell_back - bad_written
    );

    let lines = console_lines(&console);
    let log = lines.join("\n");
    let said = |prefix: &str| -> String {
        lines
            .iter()
            .find_map(|l| l.split_once(prefix).map(|(_, rest)| rest.to_string()))
            .unwrap_or_else(|| panic!("no {prefix:?} on the console:\n{log}"))
    };
    // Refused before anything was written.
    let unsigned = said("kiln-lab-upgrade: unsigned exit ");
    assert!(
        !unsigned.starts_with('0') && unsigned.contains("manifest.json.sig"),
        "{unsigned}"
    );
    let tampered = said("kiln-lab-upgrade: tampered exit ");
    assert!(
        !tampered.starts_with('0') && tampered.contains("not signed by a key this node trusts"),
        "{tampered}"
    );
    let upgraded = said("kiln-lab-upgrade: v2 exit ");
    assert!(upgraded.starts_with("0:"), "{upgraded}");
    // After the reboot: slot B runs v2, blessed.
    let step1 = said("kiln-lab-upgrade: step 1 cmdline ");
    assert!(
        step1.contains("kiln.slot=B") && step1.contains("kiln.test=v2"),
        "{step1}"
    );
    let blessed_line = format!("booted B (generation 2, good) image {}", &v2_rootfs[..16]);
    assert!(log.contains(&blessed_line), "no {blessed_line:?}:\n{log}");
    let bad = said("kiln-lab-upgrade: bad exit ");
    assert!(bad.starts_with("0:"), "{bad}");
    // The bad slot panicked until its tries ran out; the node is back on B.
    let after_bad = log.split_once("kiln-lab-upgrade: bad exit").unwrap().1;
    assert_eq!(
        after_bad.matches("Kernel panic").count(),
        3,
        "slot A should be tried exactly three times:\n{after_bad}"
    );
    let step2 = said("kiln-lab-upgrade: step 2 cmdline ");
    assert!(step2.contains("kiln.slot=B"), "{step2}");
    assert!(
        after_bad.contains(
            "last assessment: slot A generation 3 FAILED: slot A (generation 3) used up its 3 boot tries"
        ),
        "{after_bad}"
    );
    assert_eq!(esp_entries(&disk), ["kiln-2-b.conf", "kiln-3-a+0-3.conf"]);
}
