//! Host-side install onto a sparse disk image: the GPT, the ESP, KILN_STATE and the slot are
//! checked with the tools a user would use (sgdisk, mtools, debugfs), and failures are shown
//! to leave a disk without a partition table.

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_installer::apply::{self, ApplyError, ApplyOptions, Progress, Step};
use kiln_installer::plan::{self, Artifact, ImageSource, InstallPlan, PlanOptions, WipeConsent};
use kiln_spec::Appliance;
use kiln_spec::appliance::ProfileName;
use kiln_spec::hardware::{Disk, Firmware, HardwareInventory, Nic, Transport};
use kiln_spec::layout::{PartitionRole, Slot};
use kiln_spec::size::ByteSize;

const DISK_BYTES: u64 = 512 << 20;

fn tool(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd)
        .args(args)
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .unwrap_or_else(|e| panic!("{cmd} must be installed (scripts/install-deps.sh): {e}"));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

struct Fixture {
    dir: tempfile::TempDir,
    disk: PathBuf,
    plan: InstallPlan,
    opts: ApplyOptions,
    image_bytes: Vec<u8>,
}

fn artifact(path: &Path) -> Artifact {
    Artifact {
        path: path.display().to_string(),
        size_bytes: std::fs::metadata(path).unwrap().len(),
        sha256: None,
    }
}

/// A sparse disk image, a small squashfs image, and the plan for installing it there.
fn fixture(firmware: Firmware, kernel: Option<&Path>) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/os-release"), "ID=kiln\n").unwrap();
    // Incompressible content so the image spans several write chunks.
    let noise: Vec<u8> = (0u32..3 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(root.join("noise"), &noise).unwrap();
    let image = dir.path().join("rootfs.squashfs");
    let (ok, out) = tool(
        "mksquashfs",
        &[
            root.to_str().unwrap(),
            image.to_str().unwrap(),
            "-noappend",
            "-quiet",
            "-no-progress",
        ],
    );
    assert!(ok, "mksquashfs (squashfs-tools): {out}");
    let initrd = dir.path().join("initrd.img");
    std::fs::write(&initrd, b"initrd bytes").unwrap();
    let kernel = match kernel {
        Some(k) => k.to_path_buf(),
        None => {
            let k = dir.path().join("vmlinuz");
            std::fs::write(&k, b"kernel bytes").unwrap();
            k
        }
    };
    let disk = dir.path().join("disk.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(DISK_BYTES)
        .unwrap();

    let mut spec = Appliance::profile(ProfileName::Test);
    spec.spec.install.esp_size = ByteSize::mib(64);
    spec.spec.install.slot_size = ByteSize::mib(64);
    spec.spec.install.state_size = ByteSize::mib(64);
    let hw = HardwareInventory {
        firmware,
        disks: vec![Disk {
            dev_path: disk.display().to_string(),
            by_id: vec![],
            size_bytes: DISK_BYTES,
            logical_sector_size: 512,
            model: Some("QEMU HARDDISK".into()),
            serial: Some("test-disk".into()),
            wwn: None,
            rotational: false,
            removable: false,
            transport: Transport::Virtio,
            read_only: false,
            holds_boot_medium: false,
            partition_table: None,
            signatures: vec![],
            unreadable: None,
        }],
        nics: vec![Nic {
            name: "ens3".into(),
            mac: "52:54:00:12:34:56".into(),
        }],
        memory_bytes: 1 << 30,
        cpus: 1,
        boot_medium_unresolved: None,
    };
    let opts = PlanOptions {
        image: ImageSource {
            rootfs: artifact(&image),
            kernel: artifact(&kernel),
            initrd: artifact(&initrd),
        },
        wipe: WipeConsent::None,
        node_name: None,
        disk_guid: uuid::Uuid::new_v4().to_string(),
        unattended: false,
        enrolment: None,
    };
    let plan = plan::plan(&spec, &hw, &opts).unwrap();
    let image_bytes = std::fs::read(&image).unwrap();
    Fixture {
        dir,
        disk,
        plan,
        opts: ApplyOptions::default(),
        image_bytes,
    }
}

fn offset(plan: &InstallPlan, role: PartitionRole) -> u64 {
    plan.layout.partition(role).offset_bytes(512)
}

fn mtools_image(disk: &Path, offset: u64) -> String {
    format!("{}@@{offset}", disk.display())
}

fn sha256_file(path: &Path) -> String {
    let (ok, out) = tool("sha256sum", &[path.to_str().unwrap()]);
    assert!(ok);
    out.split_whitespace().next().unwrap().to_string()
}

fn run(f: &Fixture) -> (Result<apply::ApplyReport, ApplyError>, Vec<Progress>) {
    let mut events = Vec::new();
    let r = apply::apply(&f.plan, &f.opts, &mut |p| events.push(p.clone()));
    (r, events)
}

/// The checks both firmwares share: GPT, slot, KILN_STATE.
fn assert_common(f: &Fixture, report: &apply::ApplyReport, events: &[Progress]) -> Vec<u8> {
    let plan = &f.plan;
    let disk = &f.disk;
    // Every step started and finished, in order; the image bytes were reported.
    let done: Vec<Step> = events
        .iter()
        .filter_map(|e| match e {
            Progress::StepDone { step, .. } => Some(*step),
            _ => None,
        })
        .collect();
    assert_eq!(done, apply::steps(plan));
    assert!(events.iter().any(|e| matches!(
        e,
        Progress::Bytes {
            step: Step::SlotWrite,
            ..
        }
    )));
    assert!(matches!(events.last(), Some(Progress::Done { .. })));

    // sgdisk finds a clean GPT.
    let (ok, out) = tool("sgdisk", &["-v", disk.to_str().unwrap()]);
    assert!(ok && out.contains("No problems found"), "sgdisk -v: {out}");

    // Names, types and extents are exactly the layout's.
    let gpt = gpt::GptConfig::new().writable(false).open(disk).unwrap();
    let got: Vec<(u32, String, String, u64, u64)> = gpt
        .partitions()
        .iter()
        .map(|(n, p)| {
            (
                *n,
                p.name.clone(),
                p.part_type_guid.guid.to_string().to_uppercase(),
                p.first_lba,
                p.last_lba,
            )
        })
        .collect();
    let want: Vec<(u32, String, String, u64, u64)> = plan
        .layout
        .partitions
        .iter()
        .map(|p| {
            (
                p.number,
                p.name.clone(),
                p.type_guid.clone(),
                p.first_lba,
                p.last_lba,
            )
        })
        .collect();
    assert_eq!(got, want);

    // The slot holds the image, byte for byte.
    let slot = offset(plan, PartitionRole::Slot(Slot::A)) as usize;
    let bytes = std::fs::read(disk).unwrap();
    assert!(
        bytes[slot..slot + f.image_bytes.len()] == f.image_bytes[..],
        "slot A differs from the image"
    );
    assert_eq!(
        report.image_sha256,
        sha256_file(Path::new(&plan.image.rootfs.path))
    );
    assert_eq!(report.image_bytes, f.image_bytes.len() as u64);

    // The ESP is a clean FAT (checked on a copy: fsck.vfat has no offset option).
    let esp_off = offset(plan, PartitionRole::Esp) as usize;
    let esp_len = plan.layout.partition(PartitionRole::Esp).size_bytes as usize;
    let esp_copy = f.dir.path().join("esp.img");
    std::fs::write(&esp_copy, &bytes[esp_off..esp_off + esp_len]).unwrap();
    let (ok, out) = tool("fsck.vfat", &["-n", esp_copy.to_str().unwrap()]);
    assert!(ok, "fsck.vfat: {out}");
    let esp = mtools_image(disk, esp_off as u64);
    let (ok, kernel) = tool("mtype", &["-i", &esp, "::/kiln/a/vmlinuz"]);
    assert!(ok, "{kernel}");
    assert_eq!(
        kernel.as_bytes(),
        std::fs::read(&plan.image.kernel.path).unwrap()
    );

    // KILN_STATE: ext4 labelled KILN_STATE holding the seeded files in the root overlay.
    let state = format!(
        "{}?offset={}",
        disk.display(),
        offset(plan, PartitionRole::State)
    );
    let (ok, sb) = tool("dumpe2fs", &["-h", &state]);
    assert!(
        ok && sb.contains("Filesystem volume name:   KILN_STATE"),
        "{sb}"
    );
    for seeded in &plan.seed {
        let (ok, content) = tool(
            "debugfs",
            &["-R", &format!("cat /root/upper{}", seeded.path), &state],
        );
        assert!(
            ok && content.contains(&seeded.content),
            "{}: {content}",
            seeded.path
        );
    }
    let (ok, host) = tool("debugfs", &["-R", "cat /root/upper/etc/hostname", &state]);
    assert!(
        ok && host.contains(&format!("{}\n", plan.hostname)),
        "{host}"
    );
    // The slot record: slot A holds the image just written, by its digest.
    let (ok, record) = tool(
        "debugfs",
        &[
            "-R",
            &format!("cat /root/upper{}", kiln_spec::boot::SLOTS_RECORD_PATH),
            &state,
        ],
    );
    assert!(ok, "{record}");
    // debugfs adds its banner to what it prints.
    let json = &record[record.find('{').unwrap_or(0)..=record.rfind('}').unwrap_or(0)];
    let record: kiln_spec::boot::SlotsRecord =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("slots.json: {e}\n{record}"));
    assert_eq!(
        record.images[&kiln_spec::layout::Slot::A].rootfs_sha256,
        report.image_sha256
    );
    bytes
}

#[test]
fn a_uefi_install_onto_a_disk_image_gives_a_valid_kiln_disk() {
    let f = fixture(Firmware::Uefi, None);
    let (report, events) = run(&f);
    let bytes = assert_common(&f, &report.unwrap(), &events);
    let esp = mtools_image(&f.disk, offset(&f.plan, PartitionRole::Esp));
    let (ok, out) = tool("mdir", &["-i", &esp, "-b", "-/", "::/"]);
    assert!(ok, "mdir: {out}");
    for path in [
        "::/EFI/BOOT/BOOTX64.EFI",
        "::/EFI/systemd/systemd-bootx64.efi",
        "::/loader/loader.conf",
        "::/loader/entries/kiln-1-a+3.conf",
        "::/kiln/a/vmlinuz",
        "::/kiln/a/initrd.img",
    ] {
        assert!(
            out.lines().any(|l| l.eq_ignore_ascii_case(path)),
            "{path} missing from the ESP:\n{out}"
        );
    }
    let (ok, entry) = tool("mtype", &["-i", &esp, "::/loader/entries/kiln-1-a+3.conf"]);
    assert!(ok, "{entry}");
    assert!(entry.contains("kiln.slot=A"), "{entry}");
    // No BIOS boot code: the plan chose systemd-boot.
    assert!(bytes[..440].iter().all(|&b| b == 0));
    assert_eq!(&bytes[510..512], &[0x55, 0xaa]);
}

#[test]
fn a_bios_install_puts_grub_into_the_mbr_and_biosboot() {
    let f = fixture(Firmware::Bios, None);
    let (report, events) = run(&f);
    let bytes = assert_common(&f, &report.unwrap(), &events);
    assert!(apply::steps(&f.plan).contains(&Step::BiosBoot));
    // boot.img in LBA 0 points at core.img in BIOSBOOT (LBA 2048), whose blocklist points
    // at the sector after it.
    assert_eq!(&bytes[0x5c..0x64], &2048u64.to_le_bytes());
    assert_eq!(&bytes[510..512], &[0x55, 0xaa]);
    let core = 2048 * 512;
    assert_eq!(&bytes[core + 500..core + 508], &2049u64.to_le_bytes());
    let esp = mtools_image(&f.disk, offset(&f.plan, PartitionRole::Esp));
    let (ok, cfg) = tool("mtype", &["-i", &esp, "::/grub/grub.cfg"]);
    assert!(ok && cfg.contains("load_env"), "{cfg}");
    let (ok, entry) = tool("mtype", &["-i", &esp, "::/grub/kiln-a.cfg"]);
    assert!(
        ok && entry.contains("linux /kiln/a/vmlinuz kiln.slot=A"),
        "{entry}"
    );
    // Slot A on trial: generation 1, three tries, in the block GRUB rewrites in place.
    let (ok, env) = tool("mtype", &["-i", &esp, "::/grub/grubenv"]);
    assert!(ok && env.len() == 1024, "{env}");
    let entries = kiln_spec::boot::grubenv_entries(&kiln_spec::boot::parse_grubenv(&env));
    let names: Vec<String> = entries.iter().map(|e| e.file_name()).collect();
    assert_eq!(names, ["kiln-1-a+3.conf"]);
}

#[test]
fn a_crash_after_the_slot_write_leaves_no_partition_table() {
    let mut f = fixture(Firmware::Uefi, None);
    f.opts.failpoint = Some("after-slot-write".into());
    let (r, events) = run(&f);
    let err = r.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ApplyError::Failed { .. }), "{msg}");
    assert!(msg.contains("failpoint after-slot-write"), "{msg}");
    assert!(
        msg.contains("left without a partition table and will not boot"),
        "{msg}"
    );
    assert!(matches!(
        events.last(),
        Some(Progress::Failed {
            step: Step::SlotWrite,
            disk_left: "without a partition table",
            ..
        })
    ));
    let bytes = std::fs::read(&f.disk).unwrap();
    let mib = 1 << 20;
    assert!(bytes[..mib].iter().all(|&b| b == 0), "first MiB not zero");
    assert!(
        bytes[bytes.len() - mib..].iter().all(|&b| b == 0),
        "last MiB not zero"
    );
    let (_, out) = tool("sgdisk", &["-p", f.disk.to_str().unwrap()]);
    assert!(!out.contains("KILN_A"), "a partition table survived: {out}");
}

#[test]
fn a_failure_while_writing_the_esp_also_clears_the_disk() {
    let mut f = fixture(Firmware::Uefi, None);
    // The kernel vanishes after planning: the ESP step fails after the slot was written.
    std::fs::remove_file(&f.plan.image.kernel.path).unwrap();
    f.opts.failpoint = None;
    let (r, _) = run(&f);
    let msg = r.unwrap_err().to_string();
    assert!(msg.contains("vmlinuz does not exist"), "{msg}");
    assert!(msg.contains("without a partition table"), "{msg}");
    let bytes = std::fs::read(&f.disk).unwrap();
    assert!(bytes[..1 << 20].iter().all(|&b| b == 0));
}

#[test]
fn a_disk_that_changed_size_since_planning_is_not_touched() {
    let f = fixture(Firmware::Uefi, None);
    std::fs::File::options()
        .write(true)
        .open(&f.disk)
        .unwrap()
        .set_len(DISK_BYTES + (1 << 20))
        .unwrap();
    let before = sha256_file(&f.disk);
    let (r, _) = run(&f);
    let err = r.unwrap_err();
    assert!(err.to_string().contains("plan again"), "{err}");
    assert_eq!(sha256_file(&f.disk), before);
}

/// The loaders written by apply really start: SeaBIOS runs boot.img → core.img → the GRUB menu
/// from the ESP; OVMF runs systemd-boot, which starts the counted entry's "kernel". iPXE stands
/// in for the kernel (Debian `ipxe`: an EFI application and a bzImage), as the host has no
/// Linux kernel; the chain with the real kernel runs in tests/lab_install.rs.
#[test]
fn the_written_loaders_boot_under_seabios_and_ovmf() {
    use kiln_lab::qemu::{self, Vm};
    use std::time::Duration;
    for (firmware, vm_firmware, kernel, expect) in [
        // GRUB's menu entry, drawn on the serial console.
        (
            Firmware::Bios,
            qemu::Firmware::Bios,
            "/boot/ipxe.lkrn",
            "kiln-test (slot A)",
        ),
        // iPXE's banner, printed by the EFI application systemd-boot started.
        (
            Firmware::Uefi,
            qemu::Firmware::Uefi,
            "/boot/ipxe.efi",
            "iPXE",
        ),
    ] {
        assert!(
            Path::new(kernel).exists(),
            "{kernel} missing (Debian package ipxe)"
        );
        let f = fixture(firmware, Some(Path::new(kernel)));
        let (r, _) = run(&f);
        r.unwrap();
        let mut vm = Vm::builder()
            .name(format!("loader-{vm_firmware}"))
            .firmware(vm_firmware)
            .memory_mib(512)
            .cpus(1)
            .disk(qemu::Disk::new(&f.disk).bootindex(1))
            .spawn()
            .expect("qemu-system-x86 must be installed");
        vm.wait_for_console(expect, Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("{vm_firmware}: {e}"));
    }
}
