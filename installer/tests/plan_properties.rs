//! Safety properties of the install planner over generated machines: whatever the disks,
//! rules and consent, a plan never targets the boot medium, a read-only or unwanted
//! removable disk, a disk too small, or a disk holding data (or unreadable) without consent,
//! and unattended never without consent naming the disk; the choice
//! does not depend on the order the disks were found in; a refusal explains every disk.

use kiln_installer::plan::{Artifact, ImageSource, PlanError, PlanOptions, WipeConsent, plan};
use kiln_spec::appliance::WipePolicy;
use kiln_spec::hardware::{
    Disk, ExistingPartition, Firmware, HardwareInventory, Nic, PartitionTable, PartitionTableKind,
    Signature, Transport, UNRECOGNISED_DATA,
};
use kiln_spec::layout::{self, LayoutSizes};
use kiln_spec::{Appliance, ProfileName};
use proptest::prelude::*;

const GIB: u64 = 1 << 30;

type Contents = (Option<PartitionTable>, Vec<Signature>, Option<String>);

fn contents() -> impl Strategy<Value = Contents> {
    let part = |n: u32, name: &str| ExistingPartition {
        number: n,
        name: Some(name.to_string()),
        type_id: None,
        size_bytes: GIB,
        filesystem: None,
        label: None,
    };
    let kiln = PartitionTable {
        kind: PartitionTableKind::Gpt,
        partitions: layout::KILN_NAMES
            .iter()
            .zip(1..)
            .map(|(n, i)| part(i, n))
            .collect(),
    };
    let data = PartitionTable {
        kind: PartitionTableKind::Gpt,
        partitions: vec![part(1, "data")],
    };
    let sig = |kind: &str, usage: &str| Signature {
        kind: kind.to_string(),
        offset: 0x218,
        usage: Some(usage.to_string()),
        label: None,
    };
    prop_oneof![
        Just((None, vec![], None)),
        Just((
            Some(kiln.clone()),
            vec![sig("gpt", "partition-table")],
            None
        )),
        Just((Some(kiln), vec![sig("linux_raid_member", "raid")], None)),
        Just((Some(data), vec![], None)),
        Just((None, vec![sig("LVM2_member", "raid")], None)),
        Just((None, vec![sig(UNRECOGNISED_DATA, "other")], None)),
        Just((
            None,
            vec![],
            Some("reading 4194304 bytes at offset 0: I/O error".to_string())
        )),
    ]
}

fn disk(i: usize) -> impl Strategy<Value = Disk> {
    (
        prop::sample::select(vec![1u64, 2, 3, 8, 20, 500]),
        prop::sample::select(vec![512u32, 4096]),
        any::<(bool, bool, bool, bool)>(),
        prop::sample::select(vec![
            Transport::Nvme,
            Transport::Sata,
            Transport::Usb,
            Transport::Virtio,
        ]),
        contents(),
    )
        .prop_map(
            move |(
                gib,
                sector,
                (rot, removable, ro, boot),
                transport,
                (table, sigs, unreadable),
            )| Disk {
                dev_path: format!("/dev/vd{}", (b'a' + i as u8) as char),
                by_id: vec![format!("/dev/disk/by-id/virtio-disk{i}")],
                size_bytes: gib * GIB,
                logical_sector_size: sector,
                model: Some(format!("model-{}", i % 2)),
                serial: Some(format!("serial-{i}")),
                wwn: None,
                rotational: rot,
                removable,
                transport,
                read_only: ro,
                holds_boot_medium: boot,
                partition_table: table,
                signatures: sigs,
                unreadable,
            },
        )
}

fn machine() -> impl Strategy<Value = HardwareInventory> {
    (1usize..6)
        .prop_flat_map(|n| (0..n).map(disk).collect::<Vec<_>>())
        .prop_map(|disks| HardwareInventory {
            firmware: Firmware::Uefi,
            disks,
            nics: vec![Nic {
                name: "enp1s0".into(),
                mac: "52:54:00:00:00:01".into(),
            }],
            memory_bytes: 4 * GIB,
            cpus: 2,
            boot_medium_unresolved: None,
        })
}

fn setup() -> impl Strategy<Value = (Appliance, WipeConsent, bool)> {
    let policy = prop::sample::select(vec![
        WipePolicy::Never,
        WipePolicy::KilnOnly,
        WipePolicy::Always,
    ]);
    let consent = prop_oneof![
        Just(WipeConsent::None),
        Just(WipeConsent::Any),
        (0usize..6).prop_map(|i| WipeConsent::Disk(format!("/dev/vd{}", (b'a' + i as u8) as char))),
    ];
    (policy, any::<bool>(), any::<bool>(), consent, any::<bool>()).prop_map(
        |(policy, removable, ssd, consent, unattended)| {
            let mut spec = Appliance::profile(ProfileName::Test);
            spec.spec.install.wipe = policy;
            spec.spec.install.disk.allow_removable = removable;
            if ssd {
                spec.spec.install.disk.rotational = Some(false);
            }
            (spec, consent, unattended)
        },
    )
}

fn opts(wipe: WipeConsent, unattended: bool) -> PlanOptions {
    let art = |p: &str, size| Artifact {
        path: p.into(),
        size_bytes: size,
        sha256: None,
    };
    PlanOptions {
        image: ImageSource {
            rootfs: art("rootfs.squashfs", 200 << 20),
            kernel: art("vmlinuz", 8 << 20),
            initrd: art("initrd.img", 20 << 20),
        },
        wipe,
        node_name: None,
        disk_guid: "6b696c6e-0000-4000-8000-000000000001".into(),
        unattended,
        enrolment: None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn plans_never_break_the_safety_rules((spec, consent, unattended) in setup(), hw in machine()) {
        let result = plan(&spec, &hw, &opts(consent.clone(), unattended));
        match &result {
            Ok(p) => {
                let d = hw.disks.iter().find(|d| d.dev_path == p.disk.dev_path).unwrap();
                prop_assert!(!d.holds_boot_medium);
                prop_assert!(!d.read_only);
                prop_assert!(!d.removable || spec.spec.install.disk.allow_removable);
                prop_assert!(spec.spec.install.disk.rotational != Some(false) || !d.rotational);
                let sizes = LayoutSizes::from_spec(&spec.spec.install);
                prop_assert!(d.size_bytes >= layout::required_disk_bytes(&sizes, d.logical_sector_size));
                if !d.is_blank() {
                    let consented = match &consent {
                        // Unattended, only consent naming the disk counts.
                        WipeConsent::Disk(p) if unattended => *p == d.dev_path,
                        _ if unattended => false,
                        WipeConsent::Any => true,
                        WipeConsent::Disk(p) => *p == d.dev_path,
                        WipeConsent::None => match spec.spec.install.wipe {
                            WipePolicy::Always => true,
                            WipePolicy::KilnOnly => d.carries_kiln_layout(),
                            WipePolicy::Never => false,
                        },
                    };
                    prop_assert!(consented, "erases {} without consent", d.dev_path);
                    prop_assert!(!p.disk.erases.is_empty());
                }
                let sector = u64::from(p.layout.logical_sector_size);
                // Before the backup GPT: its header (last LBA) and its 16 KiB of entries.
                let last_usable = d.size_bytes / sector - 2 - 16384 / sector;
                for w in p.layout.partitions.windows(2) {
                    prop_assert!(w[0].last_lba < w[1].first_lba);
                }
                prop_assert!(p.layout.partitions.last().unwrap().last_lba <= last_usable);
            }
            Err(PlanError::NoMatchingDisk { disks }) => {
                prop_assert_eq!(disks.len(), hw.disks.len());
                prop_assert!(disks.iter().all(|d| !d.reasons.is_empty()));
            }
            Err(_) => {}
        }
        // The order disks are found in does not change the outcome.
        let mut reversed = hw.clone();
        reversed.disks.reverse();
        let again = plan(&spec, &reversed, &opts(consent, unattended));
        prop_assert_eq!(
            result.map(|p| p.disk.dev_path),
            again.map(|p| p.disk.dev_path)
        );
    }
}
