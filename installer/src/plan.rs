//! The install plan: a pure function of (appliance spec, hardware snapshot, options) that
//! decides everything the installer will do — which disk, which partitions, which boot
//! loader, which files — before anything is written. `kiln install --dry-run` prints it;
//! `apply` carries it out and decides nothing itself.
//!
//! Disk choice, in order:
//! 1. A disk is out if it holds the boot medium, is read-only, is removable (unless
//!    `install.disk.allowRemovable`), fails any rule of `install.disk`, or is too small for
//!    the layout. Every reason is recorded.
//! 2. Of the disks left, `install.disk.prefer` picks the smallest (default) or the largest;
//!    `only` refuses when more than one is left. Ties go to the device path in natural
//!    order (`/dev/sda` < `/dev/sdb` < `/dev/sdaa`, `/dev/nvme2n1` < `/dev/nvme10n1`; see
//!    `device_order`).
//! 3. The disk's contents never influence the choice. A disk that is not blank (anything
//!    on it, or unreadable) is erased only with consent: `install.wipe: always`,
//!    `install.wipe: kilnOnly` for a disk that holds only an earlier kiln install, or
//!    `kiln install --wipe[=DISK]`. An unattended install takes only consent that names the
//!    disk (`--wipe=DISK`, `kiln.wipe=DISK` on the kernel command line).
//! 4. When the live medium could not be traced to a disk, no disk is picked unless the rules
//!    name one by serial, WWN or by-id path without wildcards.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

use kiln_spec::Appliance;
use kiln_spec::appliance::{
    AfterInstall, DataDiskRules, DiskPreference, DiskRules, FirmwareChoice, WipePolicy,
};
use kiln_spec::boot::{self, BootEntryName};
use kiln_spec::enrol::{ENROLMENT_PATH, Enrolment};
use kiln_spec::glob::glob_match;
use kiln_spec::hardware::{Disk, Firmware, HardwareInventory};
use kiln_spec::layout::{self, Layout, LayoutSizes, PartitionRole, Slot};
use kiln_spec::nodeconfig::{DataDisk, DataUsage, node_config_for};
use kiln_spec::size::ByteSize;

/// Where the installed system finds its node config (the agent's lowest-priority source).
pub const NODE_CONFIG_PATH: &str = "/var/lib/kiln/node.yaml";
/// Where the installed system keeps the spec it was installed from.
pub const APPLIANCE_SPEC_PATH: &str = "/etc/kiln/appliance.yaml";

/// What the caller knows beyond the spec and the hardware.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanOptions {
    pub image: ImageSource,
    /// Consent given on the command line to erase a disk that holds data.
    #[serde(default)]
    pub wipe: WipeConsent,
    /// The node's name from the inventory, for `{name}` in the host name pattern.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// The GPT disk GUID the install gives the disk; the boot entries pin stage-1 to it.
    pub disk_guid: String,
    /// No one is at the console: only consent naming the disk may erase data.
    #[serde(default)]
    pub unattended: bool,
    /// A netboot install's enrolment, seeded for the installed node's agent to report with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrolment: Option<Enrolment>,
}

/// The OS image to install: the root file system and the kernel and initrd that boot it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageSource {
    pub rootfs: Artifact,
    pub kernel: Artifact,
    pub initrd: Artifact,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Artifact {
    pub path: String,
    pub size_bytes: u64,
    /// Hex sha256, when the build manifest gives it; apply verifies what it wrote against it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// `kiln install --wipe` (any disk the rules select) or `--wipe=DISK` (only that one).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum WipeConsent {
    #[default]
    None,
    Any,
    /// A device path, one of its `/dev/disk/by-id` links, its serial or its WWN.
    Disk(String),
}

impl WipeConsent {
    /// Whether this consent names `disk`.
    pub fn names(&self, disk: &Disk) -> bool {
        match self {
            WipeConsent::Disk(given) => {
                *given == disk.dev_path
                    || disk.by_id.contains(given)
                    || disk.serial.as_ref() == Some(given)
                    || disk.wwn.as_ref() == Some(given)
            }
            _ => false,
        }
    }
}

/// Everything the installer will do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstallPlan {
    pub disk: SelectedDisk,
    /// The GPT disk GUID written to the disk and named on every boot entry (`kiln.disk=`).
    pub disk_guid: String,
    /// Disks not chosen, each with why.
    pub rejected: Vec<DiskVerdict>,
    /// Disks kept for data and recorded in the node config; nothing is written to them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data_disks: Vec<DataDiskPlan>,
    /// Disks the data disk rules did not take, each with why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data_rejected: Vec<DiskVerdict>,
    pub layout: Layout,
    /// The machine's firmware.
    pub firmware: Firmware,
    pub boot_loader: BootLoader,
    pub image: ImageSource,
    /// The installed system's kernel command line.
    pub kernel_args: Vec<String>,
    pub hostname: String,
    /// Files written into `KILN_STATE`, by their path in the installed system.
    pub seed: Vec<PlannedFile>,
    pub after_install: AfterInstall,
    /// The destructive steps, in order, as a person reads them.
    pub steps: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SelectedDisk {
    pub dev_path: String,
    /// The path apply opens: the first by-id link (stable across reboots), else `dev_path`.
    pub stable_path: String,
    pub size_bytes: u64,
    pub logical_sector_size: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wwn: Option<String>,
    /// Why this disk.
    pub reasons: Vec<String>,
    /// What is on it now and will be erased; empty for a blank disk.
    pub erases: Vec<String>,
    /// Which consent allows erasing it, when it is not blank.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wipe_consent: Option<String>,
}

/// A data disk: how the node config names it and what it is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DataDiskPlan {
    pub dev_path: String,
    /// The path the node config records: the first by-id link, else `dev_path`.
    pub stable_path: String,
    pub size_bytes: u64,
    pub usage: DataUsage,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DiskVerdict {
    pub dev_path: String,
    pub size_bytes: u64,
    pub reasons: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootLoaderKind {
    /// systemd-boot on the ESP, with boot counting for automatic fallback.
    SystemdBoot,
    /// GRUB for BIOS: core image in `BIOSBOOT`, configuration on the ESP.
    Grub,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BootLoader {
    pub kind: BootLoaderKind,
    pub entries: Vec<BootEntry>,
    /// Files written to the ESP besides kernels and initrds (loader configuration, entries),
    /// by their path on the ESP.
    pub files: Vec<PlannedFile>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BootEntry {
    pub id: String,
    pub title: String,
    pub slot: Slot,
    /// Kernel path on the ESP.
    pub kernel: String,
    /// Initrd path on the ESP.
    pub initrd: String,
    pub options: String,
    /// Boot attempts left before the loader falls back (systemd-boot boot counting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tries_left: Option<u32>,
}

/// A file apply writes, with its content.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlannedFile {
    pub path: String,
    /// Octal permission bits, `"0644"`.
    pub mode: String,
    pub content: String,
    /// It holds a credential: a printed plan (JSON or debug) shows no content.
    #[serde(default)]
    pub secret: bool,
}

impl PlannedFile {
    /// What a printed plan shows as the content.
    fn shown(&self) -> &str {
        if self.secret {
            "(withheld: it holds a credential)"
        } else {
            &self.content
        }
    }
}

impl Serialize for PlannedFile {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("PlannedFile", 3 + usize::from(self.secret))?;
        st.serialize_field("path", &self.path)?;
        st.serialize_field("mode", &self.mode)?;
        st.serialize_field("content", self.shown())?;
        if self.secret {
            st.serialize_field("secret", &true)?;
        }
        st.end()
    }
}

impl std::fmt::Debug for PlannedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlannedFile")
            .field("path", &self.path)
            .field("mode", &self.mode)
            .field("content", &self.shown())
            .finish()
    }
}

/// Why no plan could be made. Nothing has been written when this is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("no disks found on this machine")]
    NoDisks,
    #[error("no disk matches the install rules:{}", verdict_lines(.disks))]
    NoMatchingDisk { disks: Vec<DiskVerdict> },
    #[error("no disk is left for data by spec.install.dataDisks:{}", verdict_lines(.disks))]
    NoMatchingDataDisk { disks: Vec<DiskVerdict> },
    #[error(
        "disk {disk} is too small: it has {} ({have} bytes), the layout needs {} ({needed} bytes); \
         use a bigger disk or lower spec.install slotSize/stateSize/espSize",
        ByteSize(*have).human(), ByteSize(*needed).human()
    )]
    DiskTooSmall {
        disk: String,
        needed: u64,
        have: u64,
    },
    #[error(
        "{} disks match the install rules and spec.install.disk.prefer is \"only\": {}; \
         narrow the rules (model, serial, wwn, byIdPath) to one disk",
        candidates.len(), candidates.join(", ")
    )]
    AmbiguousDisks { candidates: Vec<String> },
    #[error(
        "refusing to erase {disk}, it holds: {}; rerun with --wipe={disk} to erase it, or set \
         spec.install.wipe",
        found.join("; ")
    )]
    WipeNotConsented { disk: String, found: Vec<String> },
    #[error(
        "refusing to erase {disk} in an unattended install, it holds: {}; only consent naming \
         this disk erases it: kiln.wipe={disk} on the kernel command line, or kiln install \
         --wipe={disk} at the console",
        found.join("; ")
    )]
    UnattendedWipeNeedsDisk { disk: String, found: Vec<String> },
    #[error(
        "cannot tell which disk holds the live medium ({reason}), so no disk is picked \
         automatically; name the target in spec.install.disk by serial, wwn or byIdPath \
         (without wildcards)"
    )]
    BootMediumUnresolved { reason: String },
    #[error(
        "--wipe={given} names a disk the rules did not select (they selected {selected}); nothing was erased"
    )]
    ConsentForOtherDisk { given: String, selected: String },
    #[error(
        "the root image {} is {} but a slot holds {}; raise spec.install.slotSize",
        path, ByteSize(*image).human(), ByteSize(*slot).human()
    )]
    ImageTooLarge { path: String, image: u64, slot: u64 },
    #[error(
        "kernel and initrd take {} per slot, two slots do not fit the {} ESP; raise spec.install.espSize",
        ByteSize(*per_slot).human(), ByteSize(*esp).human()
    )]
    EspTooSmall { per_slot: u64, esp: u64 },
    #[error("spec.install.firmware is uefi but this machine booted in BIOS mode")]
    NotUefi,
    #[error("cannot name the host: {0}")]
    Hostname(String),
}

fn verdict_lines(disks: &[DiskVerdict]) -> String {
    disks
        .iter()
        .map(|d| {
            format!(
                "\n  {} ({}): {}",
                d.dev_path,
                ByteSize(d.size_bytes).human(),
                d.reasons.join("; ")
            )
        })
        .collect()
}

/// Makes the install plan. Pure: same inputs, same plan.
pub fn plan(
    spec: &Appliance,
    hw: &HardwareInventory,
    opts: &PlanOptions,
) -> Result<InstallPlan, PlanError> {
    let install = &spec.spec.install;
    let sizes = LayoutSizes::from_spec(install);

    if opts.image.rootfs.size_bytes > install.slot_size.0 {
        return Err(PlanError::ImageTooLarge {
            path: opts.image.rootfs.path.clone(),
            image: opts.image.rootfs.size_bytes,
            slot: install.slot_size.0,
        });
    }
    let per_slot = opts.image.kernel.size_bytes + opts.image.initrd.size_bytes;
    // Two slots' kernels and initrds, plus room for FAT itself and the loader files.
    if 2 * per_slot + 8 * ByteSize::mib(1).0 > install.esp_size.0 {
        return Err(PlanError::EspTooSmall {
            per_slot,
            esp: install.esp_size.0,
        });
    }
    let boot_loader_kind = match (install.firmware, hw.firmware) {
        (FirmwareChoice::Uefi, Firmware::Bios) => return Err(PlanError::NotUefi),
        (FirmwareChoice::Bios, _) | (FirmwareChoice::Auto, Firmware::Bios) => BootLoaderKind::Grub,
        (FirmwareChoice::Uefi | FirmwareChoice::Auto, Firmware::Uefi) => {
            BootLoaderKind::SystemdBoot
        }
    };
    let hostname = spec
        .hostname_for(opts.node_name.as_deref(), hw.primary_mac().as_ref())
        .map_err(PlanError::Hostname)?;

    if let Some(reason) = &hw.boot_medium_unresolved
        && !pins_one_disk(&install.disk)
    {
        return Err(PlanError::BootMediumUnresolved {
            reason: reason.clone(),
        });
    }
    let (disk, mut reasons, rejected) = choose_disk(&install.disk, &sizes, hw)?;
    let (erases, wipe_consent) = check_consent(disk, install.wipe, &opts.wipe, opts.unattended)?;
    if erases.is_empty() {
        reasons.push("it is blank".into());
    }
    let layout = layout::compute(disk.size_bytes, disk.logical_sector_size, &sizes)
        .expect("choose_disk keeps only disks the layout fits");
    let (data_disks, data_rejected) = match &install.data_disks {
        Some(rules) => choose_data_disks(rules, disk, hw)?,
        None => (Vec::new(), Vec::new()),
    };

    let kernel_args = boot::slot_kernel_args(Slot::A, &opts.disk_guid, &spec.kernel_args());
    let boot_loader = boot_loader(boot_loader_kind, spec, &kernel_args);
    let seed = seed_files(spec, &hostname, &data_disks, opts.enrolment.as_ref());

    let selected = SelectedDisk {
        dev_path: disk.dev_path.clone(),
        stable_path: disk
            .by_id
            .first()
            .cloned()
            .unwrap_or_else(|| disk.dev_path.clone()),
        size_bytes: disk.size_bytes,
        logical_sector_size: disk.logical_sector_size,
        model: disk.model.clone(),
        serial: disk.serial.clone(),
        wwn: disk.wwn.clone(),
        reasons,
        erases,
        wipe_consent,
    };
    let steps = steps(
        &selected,
        &layout,
        &opts.image,
        &boot_loader,
        &seed,
        install.after_install,
    );
    Ok(InstallPlan {
        disk: selected,
        disk_guid: opts.disk_guid.clone(),
        rejected,
        data_disks,
        data_rejected,
        layout,
        firmware: hw.firmware,
        boot_loader,
        image: opts.image.clone(),
        kernel_args,
        hostname,
        seed,
        after_install: install.after_install,
        steps,
    })
}

/// Picks the disk; returns it, why, and every other disk with why not.
fn choose_disk<'a>(
    rules: &DiskRules,
    sizes: &LayoutSizes,
    hw: &'a HardwareInventory,
) -> Result<(&'a Disk, Vec<String>, Vec<DiskVerdict>), PlanError> {
    if hw.disks.is_empty() {
        return Err(PlanError::NoDisks);
    }
    let mut disks: Vec<&Disk> = hw.disks.iter().collect();
    disks.sort_by(|a, b| device_order(&a.dev_path, &b.dev_path));

    let mut candidates = Vec::new();
    let mut rejected = Vec::new();
    // The largest disk refused for its size alone: the error to give if nothing fits.
    let mut too_small: Option<(&Disk, u64)> = None;
    for d in disks {
        let needed = layout::required_disk_bytes(sizes, d.logical_sector_size);
        let mut why = rule_failures("spec.install.disk", rules, d);
        if why.is_empty()
            && d.size_bytes < needed
            && too_small.is_none_or(|(t, _)| d.size_bytes > t.size_bytes)
        {
            too_small = Some((d, needed));
        }
        let esp_min = min_fat32_bytes(d.logical_sector_size);
        if sizes.esp.0 < esp_min {
            why.push(format!(
                "its {}-byte sectors need an ESP of at least {} for FAT32 (spec.install.espSize is {})",
                d.logical_sector_size,
                ByteSize(esp_min),
                sizes.esp
            ));
        }
        if d.size_bytes < needed {
            why.push(format!(
                "{} is smaller than the {} the layout needs",
                ByteSize(d.size_bytes).human(),
                ByteSize(needed).human()
            ));
        }
        if why.is_empty() {
            candidates.push(d);
        } else {
            rejected.push(DiskVerdict {
                dev_path: d.dev_path.clone(),
                size_bytes: d.size_bytes,
                reasons: why,
            });
        }
    }
    if candidates.is_empty() {
        return Err(match too_small {
            Some((d, needed)) => PlanError::DiskTooSmall {
                disk: d.dev_path.clone(),
                needed,
                have: d.size_bytes,
            },
            None => PlanError::NoMatchingDisk { disks: rejected },
        });
    }
    let mut reasons = vec![rules_summary(rules)];
    let chosen = if candidates.len() == 1 {
        candidates[0]
    } else {
        let n = candidates.len();
        let word = match rules.prefer {
            DiskPreference::Only => {
                return Err(PlanError::AmbiguousDisks {
                    candidates: candidates.iter().map(|d| d.dev_path.clone()).collect(),
                });
            }
            DiskPreference::Smallest => {
                candidates.sort_by(|a, b| {
                    a.size_bytes
                        .cmp(&b.size_bytes)
                        .then_with(|| device_order(&a.dev_path, &b.dev_path))
                });
                "smallest"
            }
            DiskPreference::Largest => {
                candidates.sort_by(|a, b| {
                    b.size_bytes
                        .cmp(&a.size_bytes)
                        .then_with(|| device_order(&a.dev_path, &b.dev_path))
                });
                "largest"
            }
        };
        let pick = candidates[0];
        for d in candidates.iter().filter(|d| d.dev_path != pick.dev_path) {
            rejected.push(DiskVerdict {
                dev_path: d.dev_path.clone(),
                size_bytes: d.size_bytes,
                reasons: vec![format!(
                    "matches too, but {} is the {word} of {n} matching disks",
                    pick.dev_path
                )],
            });
        }
        rejected.sort_by(|a, b| device_order(&a.dev_path, &b.dev_path));
        reasons.push(format!(
            "the {word} of {n} matching disks (spec.install.disk.prefer)"
        ));
        pick
    };
    Ok((chosen, reasons, rejected))
}

/// The smallest FAT32 file system on a disk with this sector size: FAT32 needs 65525
/// clusters and a cluster is at least one sector; 4 MiB covers the FATs and reserved sectors.
fn min_fat32_bytes(logical_sector_size: u32) -> u64 {
    (65525 * u64::from(logical_sector_size)).next_multiple_of(ByteSize::mib(1).0)
        + ByteSize::mib(4).0
}

/// The data disks: every disk other than `install` the rules select, if blank; and every
/// other disk with why not. Nothing left is an error naming each disk's reasons.
fn choose_data_disks(
    rules: &DataDiskRules,
    install: &Disk,
    hw: &HardwareInventory,
) -> Result<(Vec<DataDiskPlan>, Vec<DiskVerdict>), PlanError> {
    let mut disks: Vec<&Disk> = hw
        .disks
        .iter()
        .filter(|d| d.dev_path != install.dev_path)
        .collect();
    disks.sort_by(|a, b| device_order(&a.dev_path, &b.dev_path));
    let mut taken = Vec::new();
    let mut rejected = Vec::new();
    for d in disks {
        let mut why = rule_failures("spec.install.dataDisks.rules", &rules.rules, d);
        if why.is_empty() && !d.is_blank() {
            why.push(format!(
                "holds {}: data disks are taken only blank, kiln never erases one",
                d.contents().join("; ")
            ));
        }
        if why.is_empty() {
            taken.push(DataDiskPlan {
                dev_path: d.dev_path.clone(),
                stable_path: d
                    .by_id
                    .first()
                    .cloned()
                    .unwrap_or_else(|| d.dev_path.clone()),
                size_bytes: d.size_bytes,
                usage: rules.usage,
            });
        } else {
            rejected.push(DiskVerdict {
                dev_path: d.dev_path.clone(),
                size_bytes: d.size_bytes,
                reasons: why,
            });
        }
    }
    if taken.is_empty() {
        return Err(PlanError::NoMatchingDataDisk { disks: rejected });
    }
    Ok((taken, rejected))
}

/// Why `d` fails the rules (empty when it passes); `at` is where the rules are in the spec.
fn rule_failures(at: &str, rules: &DiskRules, d: &Disk) -> Vec<String> {
    let mut why = Vec::new();
    if d.holds_boot_medium {
        why.push("holds the boot medium".to_string());
    }
    if d.read_only {
        why.push("is read-only".to_string());
    }
    if d.removable && !rules.allow_removable {
        why.push(format!("is removable ({at}.allowRemovable is false)"));
    }
    if let Some(min) = rules.min_size
        && d.size_bytes < min.0
    {
        why.push(format!(
            "{} is below minSize {min}",
            ByteSize(d.size_bytes).human()
        ));
    }
    if let Some(max) = rules.max_size
        && d.size_bytes > max.0
    {
        why.push(format!(
            "{} is above maxSize {max}",
            ByteSize(d.size_bytes).human()
        ));
    }
    let text_rule =
        |why: &mut Vec<String>, field: &str, pattern: &Option<String>, have: &Option<String>| {
            if let Some(p) = pattern {
                match have {
                    Some(h) if glob_match(p, h.trim()) => {}
                    Some(h) => why.push(format!("{field} {:?} does not match {p:?}", h.trim())),
                    None => why.push(format!("has no {field} to match {p:?}")),
                }
            }
        };
    text_rule(&mut why, "model", &rules.model, &d.model);
    text_rule(&mut why, "serial", &rules.serial, &d.serial);
    if let Some(w) = &rules.wwn {
        match &d.wwn {
            Some(have) if normalize_wwn(have) == normalize_wwn(w) => {}
            Some(have) => why.push(format!("wwn {have} is not {w}")),
            None => why.push(format!("has no wwn to match {w}")),
        }
    }
    if let Some(p) = &rules.by_id_path
        && !d.by_id.iter().any(|id| glob_match(p, id))
    {
        why.push(format!("no /dev/disk/by-id link matches {p:?}"));
    }
    if let Some(r) = rules.rotational
        && d.rotational != r
    {
        why.push(if d.rotational {
            "is rotational (rules ask for a solid-state disk)".to_string()
        } else {
            "is solid-state (rules ask for a rotational disk)".to_string()
        });
    }
    if !rules.transport.is_empty() && !rules.transport.contains(&d.transport) {
        let allowed: Vec<&str> = rules.transport.iter().map(|t| t.as_str()).collect();
        why.push(format!(
            "transport {} is not {}",
            d.transport.as_str(),
            allowed.join(" or ")
        ));
    }
    why
}

/// The rules a chosen disk met, in one line.
fn rules_summary(rules: &DiskRules) -> String {
    let mut held = vec!["not the boot medium".to_string()];
    if let Some(m) = rules.min_size {
        held.push(format!("minSize {m}"));
    }
    if let Some(m) = rules.max_size {
        held.push(format!("maxSize {m}"));
    }
    for (field, v) in [
        ("model", &rules.model),
        ("serial", &rules.serial),
        ("wwn", &rules.wwn),
        ("byIdPath", &rules.by_id_path),
    ] {
        if let Some(v) = v {
            held.push(format!("{field} {v:?}"));
        }
    }
    if let Some(r) = rules.rotational {
        held.push(if r { "rotational" } else { "solid-state" }.to_string());
    }
    if !rules.transport.is_empty() {
        let t: Vec<&str> = rules.transport.iter().map(|t| t.as_str()).collect();
        held.push(format!("transport {}", t.join("/")));
    }
    held.push("big enough for the layout".to_string());
    format!("meets the install rules: {}", held.join(", "))
}

/// Rules that can match one disk only: an exact serial, WWN or by-id path.
fn pins_one_disk(rules: &DiskRules) -> bool {
    let exact = |v: &Option<String>| {
        v.as_deref()
            .is_some_and(|v| !v.is_empty() && !v.contains(['*', '?', '[']))
    };
    exact(&rules.serial) || exact(&rules.wwn) || exact(&rules.by_id_path)
}

/// What will be erased and which consent allows it.
fn check_consent(
    disk: &Disk,
    policy: WipePolicy,
    cli: &WipeConsent,
    unattended: bool,
) -> Result<(Vec<String>, Option<String>), PlanError> {
    if let WipeConsent::Disk(given) = cli
        && !cli.names(disk)
    {
        return Err(PlanError::ConsentForOtherDisk {
            given: given.clone(),
            selected: disk.dev_path.clone(),
        });
    }
    if disk.is_blank() {
        return Ok((Vec::new(), None));
    }
    let found = disk.contents();
    if unattended && !cli.names(disk) {
        return Err(PlanError::UnattendedWipeNeedsDisk {
            disk: disk.dev_path.clone(),
            found,
        });
    }
    let consent = match (cli, policy) {
        (WipeConsent::Disk(given), _) => Some(format!("--wipe={given}")),
        (WipeConsent::Any, _) => Some("--wipe".to_string()),
        (WipeConsent::None, WipePolicy::Always) => Some("spec.install.wipe is always".to_string()),
        (WipeConsent::None, WipePolicy::KilnOnly) if disk.carries_kiln_layout() => Some(
            "spec.install.wipe is kilnOnly and the disk holds only an earlier kiln install"
                .to_string(),
        ),
        (WipeConsent::None, WipePolicy::Never | WipePolicy::KilnOnly) => None,
    };
    match consent {
        Some(c) => Ok((found, Some(c))),
        None => Err(PlanError::WipeNotConsented {
            disk: disk.dev_path.clone(),
            found,
        }),
    }
}

fn boot_loader(kind: BootLoaderKind, spec: &Appliance, kernel_args: &[String]) -> BootLoader {
    let slot = Slot::A;
    let dir = slot.esp_dir();
    // The first generation, on trial like every later one: the agent blesses it.
    let counted = BootEntryName::on_trial(1, slot);
    let entry = BootEntry {
        id: match kind {
            BootLoaderKind::SystemdBoot => counted.id(),
            BootLoaderKind::Grub => format!("kiln-{}", slot.letter().to_ascii_lowercase()),
        },
        title: slot_title(spec, slot),
        slot,
        kernel: format!("{dir}/vmlinuz"),
        initrd: format!("{dir}/initrd.img"),
        options: kernel_args.join(" "),
        tries_left: Some(boot::BOOT_TRIES),
    };
    let files = match kind {
        BootLoaderKind::SystemdBoot => vec![
            PlannedFile {
                path: boot::LOADER_CONF.into(),
                mode: "0644".into(),
                content: boot::loader_conf(),
                secret: false,
            },
            PlannedFile {
                // `+N` is systemd-boot's boot counter: tries left before the entry is bad.
                path: counted.path(),
                mode: "0644".into(),
                content: boot::entry_conf(&entry.title, slot, &entry.options),
                secret: false,
            },
        ],
        BootLoaderKind::Grub => {
            let mut env = std::collections::BTreeMap::new();
            boot::set_grubenv_entry(&mut env, slot, Some(&counted));
            boot::set_grubenv_entry(&mut env, slot.other(), None);
            let file = |path: String, content: String| PlannedFile {
                path,
                mode: "0644".into(),
                content,
                secret: false,
            };
            vec![
                file(boot::GRUB_CFG.into(), boot::grub_cfg()),
                file(
                    boot::grub_entry_path(slot),
                    boot::grub_entry(&entry.title, slot, &entry.options),
                ),
                // The try counter GRUB counts down, as systemd-boot does in file names.
                file(boot::GRUBENV.into(), boot::render_grubenv(&env)),
            ]
        }
    };
    BootLoader {
        kind,
        entries: vec![entry],
        files,
    }
}

/// The boot menu's title of a slot.
pub fn slot_title(spec: &Appliance, slot: Slot) -> String {
    format!("{} (slot {})", spec.metadata.name, slot.letter())
}

/// The node config and the spec, seeded into `KILN_STATE` for the agent, and the enrolment
/// it reports with. The spec is the node's: the installer sees no inventory, so its
/// overrides are already applied.
fn seed_files(
    spec: &Appliance,
    hostname: &str,
    data_disks: &[DataDiskPlan],
    enrolment: Option<&Enrolment>,
) -> Vec<PlannedFile> {
    let mut node = node_config_for(spec, None, hostname);
    node.spec
        .data_disks
        .extend(data_disks.iter().map(|d| DataDisk {
            part_label: None,
            device: Some(d.stable_path.clone()),
            usage: d.usage,
        }));
    // A cluster node's config carries its join token (and on the first control plane the
    // CA's key): then it is for root alone.
    let secret = node.spec.kubernetes.is_some();
    let mut files = vec![
        PlannedFile {
            path: NODE_CONFIG_PATH.into(),
            mode: if secret { "0600" } else { "0644" }.into(),
            content: node.to_yaml(),
            secret,
        },
        PlannedFile {
            // It may carry password hashes.
            path: APPLIANCE_SPEC_PATH.into(),
            mode: "0600".into(),
            content: spec.to_yaml(),
            secret,
        },
    ];
    if let Some(e) = enrolment {
        files.push(PlannedFile {
            path: ENROLMENT_PATH.into(),
            mode: "0600".into(),
            content: serde_json::to_string_pretty(e).expect("an enrolment serializes") + "\n",
            secret: true,
        });
    }
    files
}

fn steps(
    disk: &SelectedDisk,
    layout: &Layout,
    image: &ImageSource,
    boot: &BootLoader,
    seed: &[PlannedFile],
    after: AfterInstall,
) -> Vec<String> {
    let part = |role| layout.partition(role);
    let at = |role| {
        let p = part(role);
        format!(
            "{} (LBA {}–{}, {})",
            p.name,
            p.first_lba,
            p.last_lba,
            ByteSize(p.size_bytes).human()
        )
    };
    let mut s = Vec::new();
    let dev = &disk.dev_path;
    if disk.erases.is_empty() {
        s.push(format!("zero the first and last MiB of {dev} (blank disk)"));
    } else {
        s.push(format!(
            "erase {dev} ({}): zero its first and last MiB, destroying {}",
            disk.wipe_consent.as_deref().unwrap_or_default(),
            disk.erases.join("; ")
        ));
    }
    let sha = |a: &Artifact| {
        a.sha256
            .as_deref()
            .map(|h| format!(", sha256 {h}"))
            .unwrap_or_default()
    };
    s.push(format!(
        "write {} ({} bytes{}) to {} and verify it by reading it back",
        image.rootfs.path,
        image.rootfs.size_bytes,
        sha(&image.rootfs),
        at(PartitionRole::Slot(Slot::A)),
    ));
    s.push(format!(
        "zero the first MiB of {} (no image yet)",
        at(PartitionRole::Slot(Slot::B))
    ));
    s.push(format!(
        "create a FAT32 file system on {} and copy {} to {}/vmlinuz and {} to {}/initrd.img",
        at(PartitionRole::Esp),
        image.kernel.path,
        Slot::A.esp_dir(),
        image.initrd.path,
        Slot::A.esp_dir(),
    ));
    let seeded: Vec<&str> = seed.iter().map(|f| f.path.as_str()).collect();
    s.push(format!(
        "create an ext4 file system on {} holding {}",
        at(PartitionRole::State),
        seeded.join(", ")
    ));
    let free = if layout.free_bytes > 0 {
        format!(
            ", leaving {} free for data",
            ByteSize(layout.free_bytes).human()
        )
    } else {
        String::new()
    };
    s.push(format!(
        "write the GPT on {dev}: {} partitions ({}){free}",
        layout.partitions.len(),
        layout
            .partitions
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    ));
    let files: Vec<&str> = boot.files.iter().map(|f| f.path.as_str()).collect();
    s.push(match boot.kind {
        BootLoaderKind::SystemdBoot => format!(
            "install systemd-boot to the ESP as the default EFI loader and write {} (slot A, {} tries)",
            files.join(", "),
            boot::BOOT_TRIES
        ),
        BootLoaderKind::Grub => format!(
            "install GRUB for BIOS: boot code in the protective MBR, core image in {} (LBA {}), {} on the ESP",
            layout::BIOSBOOT,
            part(PartitionRole::BiosBoot).first_lba,
            files.join(", ")
        ),
    });
    s.push(match after {
        AfterInstall::Reboot => "reboot".to_string(),
        AfterInstall::Poweroff => "power off".to_string(),
        AfterInstall::Stay => "stay in the live system".to_string(),
    });
    s
}

/// Natural order of device paths: the path splits into runs of digits and of other
/// characters; runs compare shorter first, then character by character. So numbers compare
/// as numbers (`nvme2n1` < `nvme10n1`) and kernel disk names in their own order (`sdb` <
/// `sdaa`). A total order, so ties between disks are always broken the same way.
fn device_order(a: &str, b: &str) -> Ordering {
    fn runs(s: &str) -> Vec<&str> {
        let bytes = s.as_bytes();
        let mut out = Vec::new();
        let mut start = 0;
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push(&s[start..i]);
                start = i;
            }
        }
        out
    }
    let key = |s| {
        runs(s)
            .into_iter()
            .map(|r: &str| (r.len(), r))
            .collect::<Vec<_>>()
    };
    key(a).cmp(&key(b))
}

fn normalize_wwn(w: &str) -> String {
    let w = w.trim().to_ascii_lowercase();
    w.strip_prefix("0x").map(str::to_string).unwrap_or(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_enrolment_is_seeded_private_and_never_printed() {
        // The golden case's inputs; its committed plan shows the file withheld.
        let case = |name: &str| {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/golden/unattended-netboot-seeds-the-enrolment");
            std::fs::read_to_string(dir.join(name)).unwrap()
        };
        let spec = Appliance::from_yaml(&case("spec.yaml")).unwrap();
        let hw = HardwareInventory::from_json(&case("hardware.json")).unwrap();
        let enrolment = Enrolment {
            phone_home: "http://10.0.0.1:8080/phone-home/52-54-00-12-34-56".into(),
            token: "s3cr3t-token".into(),
            image_sha256: "a".repeat(64),
        };
        let art = |path: &str| Artifact {
            path: path.into(),
            size_bytes: 1 << 20,
            sha256: None,
        };
        let opts = PlanOptions {
            image: ImageSource {
                rootfs: art("rootfs.squashfs"),
                kernel: art("vmlinuz"),
                initrd: art("initrd.img"),
            },
            wipe: WipeConsent::None,
            node_name: None,
            disk_guid: "6b696c6e-0000-4000-8000-000000000001".into(),
            unattended: true,
            enrolment: Some(enrolment.clone()),
        };
        let plan = plan(&spec, &hw, &opts).unwrap();
        let file = plan.seed.iter().find(|f| f.path == ENROLMENT_PATH).unwrap();
        assert_eq!(file.mode, "0600");
        assert_eq!(
            serde_json::from_str::<Enrolment>(&file.content).unwrap(),
            enrolment
        );
        for printed in [serde_json::to_string(&plan).unwrap(), format!("{plan:?}")] {
            assert!(!printed.contains("s3cr3t-token"), "{printed}");
        }
    }

    #[test]
    fn device_paths_sort_as_the_kernel_names_them() {
        let mut v = vec![
            "/dev/sdaa",
            "/dev/sdb",
            "/dev/nvme10n1",
            "/dev/sda",
            "/dev/nvme2n1",
            "/dev/nvme0n1p2",
        ];
        v.sort_by(|a, b| device_order(a, b));
        assert_eq!(
            v,
            [
                "/dev/sda",
                "/dev/sdb",
                "/dev/nvme0n1p2",
                "/dev/nvme2n1",
                "/dev/nvme10n1",
                "/dev/sdaa"
            ]
        );
    }
}
