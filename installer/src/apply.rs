//! Writing an install onto the target disk — the only part of the installer that changes a
//! disk. The order makes an interrupted install harmless: nothing is bootable until the very
//! last step writes the partition table (and the BIOS boot code with it).
//!
//! 1. wipe: zero the first and last MiB (old MBR, both GPTs)
//! 2. slot-write: stream the image into `KILN_A`, hashing; read it back and compare; zero the
//!    start of `KILN_B` (no image there yet)
//! 3. esp: FAT32 with the plan's loader files, each slot's kernel and initrd, and systemd-boot
//!    itself when the plan chose it
//! 4. bios-boot (GRUB plans only): core.img into `BIOSBOOT`
//! 5. state: ext4 `KILN_STATE` seeded with the plan's files and the host name
//! 6. partition-table: GPT (names and types from the layout) + protective MBR (with GRUB's
//!    boot code for GRUB plans)
//!
//! Everything it does is decided by the [`InstallPlan`]; apply only carries it out.
//!
//! Any failure: the error is logged, the partition table area is zeroed again, and the error
//! says the disk was left without a partition table.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use kiln_spec::boot::{self, SlotImage, SlotsRecord};
use kiln_spec::layout::{Layout, PartitionRole, Slot};
use serde::Serialize;

use crate::biosboot::{self, BiosBootError};
use crate::blockdev::{BlockDevError, MIB, Target};
use crate::esp::{self, EspError, EspFile, EspSource};
use crate::plan::{BootLoaderKind, InstallPlan};
use crate::preflight::{self, PreflightError};
use crate::statefs::{self, StateError, StateFile};
use crate::tools::ToolError;

/// Environment variable naming a failpoint: `after-<step>` makes the install fail right
/// after that step, as a crash there would.
pub const FAILPOINT_ENV: &str = "KILN_FAILPOINT";

/// The steps, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    Wipe,
    SlotWrite,
    Esp,
    BiosBoot,
    State,
    PartitionTable,
}

impl Step {
    pub const ALL: [Step; 6] = [
        Step::Wipe,
        Step::SlotWrite,
        Step::Esp,
        Step::BiosBoot,
        Step::State,
        Step::PartitionTable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Step::Wipe => "wipe",
            Step::SlotWrite => "slot-write",
            Step::Esp => "esp",
            Step::BiosBoot => "bios-boot",
            Step::State => "state",
            Step::PartitionTable => "partition-table",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Step::Wipe => "erasing the old partition tables",
            Step::SlotWrite => "writing and verifying the OS image in slot A",
            Step::Esp => "creating the EFI system partition (boot loader files, kernel, initrd)",
            Step::BiosBoot => "installing GRUB for BIOS into BIOSBOOT",
            Step::State => "creating KILN_STATE with the node configuration",
            Step::PartitionTable => "writing the GPT and the protective MBR",
        }
    }
}

/// Progress of an install, one event at a time (rendered as text or JSON lines).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Progress {
    StepStarted {
        step: Step,
        message: &'static str,
    },
    Bytes {
        step: Step,
        done: u64,
        total: u64,
    },
    StepDone {
        step: Step,
        seconds: f64,
    },
    Done {
        seconds: f64,
        image_sha256: String,
        image_bytes: u64,
        image_mib_per_second: f64,
    },
    Failed {
        step: Step,
        error: String,
        disk_left: &'static str,
    },
}

/// How to carry out a plan.
#[derive(Debug, Clone, Default)]
pub struct ApplyOptions {
    /// The device or image to write; the plan's stable path when unset.
    pub target: Option<PathBuf>,
    /// `after-<step>`: fail right after that step, as a crash there would (tests; the CLI
    /// reads it from `KILN_FAILPOINT`).
    pub failpoint: Option<String>,
}

/// The steps a plan needs, in order.
pub fn steps(plan: &InstallPlan) -> Vec<Step> {
    Step::ALL
        .into_iter()
        .filter(|s| *s != Step::BiosBoot || plan.boot_loader.kind == BootLoaderKind::Grub)
        .collect()
}

/// The ESP's files: the plan's loader files, every entry's kernel and initrd, and the
/// systemd-boot binary (as the removable-media default loader too) for systemd-boot plans.
pub fn esp_files(plan: &InstallPlan) -> Vec<EspFile> {
    let mut files = Vec::new();
    if plan.boot_loader.kind == BootLoaderKind::SystemdBoot {
        for path in ["/EFI/BOOT/BOOTX64.EFI", "/EFI/systemd/systemd-bootx64.efi"] {
            files.push(EspFile {
                path: path.into(),
                source: EspSource::Copy(esp::SYSTEMD_BOOT_EFI.into()),
            });
        }
    }
    for f in &plan.boot_loader.files {
        files.push(EspFile {
            path: f.path.clone(),
            source: EspSource::Content(f.content.clone()),
        });
    }
    for e in &plan.boot_loader.entries {
        files.push(EspFile {
            path: e.kernel.clone(),
            source: EspSource::Copy(plan.image.kernel.path.clone().into()),
        });
        files.push(EspFile {
            path: e.initrd.clone(),
            source: EspSource::Copy(plan.image.initrd.path.clone().into()),
        });
    }
    files
}

/// `KILN_STATE`'s files: the plan's seed files inside the root overlay's upper layer, plus
/// `/etc/hostname` so the installed system comes up with its name.
pub fn state_files(plan: &InstallPlan) -> Vec<StateFile> {
    let upper = |path: &str| {
        format!(
            "{}/{}",
            statefs::OVERLAY_UPPER,
            path.trim_start_matches('/')
        )
    };
    let mut files: Vec<StateFile> = plan
        .seed
        .iter()
        .map(|f| StateFile {
            path: upper(&f.path),
            mode: u32::from_str_radix(f.mode.trim_start_matches("0o"), 8).unwrap_or(0o644),
            content: f.content.clone(),
        })
        .collect();
    files.push(StateFile {
        path: upper("/etc/hostname"),
        mode: 0o644,
        content: format!("{}\n", plan.hostname),
    });
    files
}

/// The slot record of a fresh install: slot A holds the image just written.
fn slot_a_record(sha256: &str, source: &str) -> SlotsRecord {
    let mut record = SlotsRecord::default();
    record.images.insert(
        Slot::A,
        SlotImage {
            rootfs_sha256: sha256.to_string(),
            source: source.to_string(),
            written: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        },
    );
    record
}

/// `slots.json` in the root overlay's upper layer.
fn slots_record_file(record: &SlotsRecord) -> StateFile {
    StateFile {
        path: format!(
            "{}/{}",
            statefs::OVERLAY_UPPER,
            boot::SLOTS_RECORD_PATH.trim_start_matches('/')
        ),
        mode: 0o644,
        content: serde_json::to_string_pretty(record).expect("a record serializes") + "\n",
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    BlockDev(#[from] BlockDevError),
    #[error(transparent)]
    Esp(#[from] EspError),
    #[error(transparent)]
    BiosBoot(#[from] BiosBootError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error("writing the GPT to {path}: {reason}")]
    Gpt { path: PathBuf, reason: String },
    #[error("failpoint {0} reached ({FAILPOINT_ENV})")]
    Failpoint(String),
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    #[error("preparing a staging directory: {0}")]
    Staging(std::io::Error),
    #[error(
        "install failed while {step}: {source}\nthe disk was left without a partition table and will not boot"
    )]
    Failed {
        step: &'static str,
        #[source]
        source: Box<ApplyError>,
    },
    #[error(
        "install failed while {step}: {source}\nclearing the partition tables failed too ({wipe}): the disk may hold a partial install"
    )]
    FailedDirty {
        step: &'static str,
        #[source]
        source: Box<ApplyError>,
        wipe: BlockDevError,
    },
}

/// What a finished install did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ApplyReport {
    pub image_sha256: String,
    pub image_bytes: u64,
    pub image_seconds: f64,
    pub seconds: f64,
}

/// Writes the install. On failure the disk is left without a partition table.
pub fn apply(
    plan: &InstallPlan,
    opts: &ApplyOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<ApplyReport, ApplyError> {
    let path = opts
        .target
        .clone()
        .unwrap_or_else(|| PathBuf::from(&plan.disk.stable_path));
    let target = Target::open(&path)?;
    preflight::check(&plan.disk, plan.layout.disk_bytes, &target)?;
    let disk_guid = uuid::Uuid::from_str(&plan.disk_guid).map_err(|e| ApplyError::Gpt {
        path: path.clone(),
        reason: format!("the plan's disk GUID {:?}: {e}", plan.disk_guid),
    })?;
    let staging = tempfile::Builder::new()
        .prefix("kiln-install-")
        .tempdir()
        .map_err(ApplyError::Staging)?;
    let start = Instant::now();
    let mut run = Run {
        plan,
        target: &target,
        staging: staging.path(),
        progress,
        disk_guid,
        image: None,
    };
    for step in steps(plan) {
        (run.progress)(&Progress::StepStarted {
            step,
            message: step.describe(),
        });
        let t = Instant::now();
        let result = run.step(step).and_then(|()| match &opts.failpoint {
            Some(fp) if *fp == format!("after-{}", step.as_str()) => {
                Err(ApplyError::Failpoint(fp.clone()))
            }
            _ => Ok(()),
        });
        if let Err(e) = result {
            // The error first, then make sure nothing half-written can boot.
            tracing::error!(step = step.as_str(), "install failed: {e}");
            let wipe = target.wipe_partition_tables();
            (run.progress)(&Progress::Failed {
                step,
                error: e.to_string(),
                disk_left: if wipe.is_ok() {
                    "without a partition table"
                } else {
                    "possibly partially written"
                },
            });
            return Err(match wipe {
                Ok(()) => ApplyError::Failed {
                    step: step.describe(),
                    source: Box::new(e),
                },
                Err(wipe) => ApplyError::FailedDirty {
                    step: step.describe(),
                    source: Box::new(e),
                    wipe,
                },
            });
        }
        (run.progress)(&Progress::StepDone {
            step,
            seconds: t.elapsed().as_secs_f64(),
        });
    }
    let (image, image_seconds) = run.image.take().expect("the slot step ran");
    let seconds = start.elapsed().as_secs_f64();
    (run.progress)(&Progress::Done {
        seconds,
        image_sha256: image.sha256.clone(),
        image_bytes: image.bytes,
        image_mib_per_second: image.bytes as f64 / (1 << 20) as f64 / image_seconds.max(1e-9),
    });
    Ok(ApplyReport {
        image_sha256: image.sha256,
        image_bytes: image.bytes,
        image_seconds,
        seconds,
    })
}

struct Run<'a> {
    plan: &'a InstallPlan,
    target: &'a Target,
    staging: &'a Path,
    progress: &'a mut dyn FnMut(&Progress),
    disk_guid: uuid::Uuid,
    image: Option<(crate::blockdev::WrittenImage, f64)>,
}

impl Run<'_> {
    fn offset(&self, role: PartitionRole) -> (u64, u64) {
        let p = self.plan.layout.partition(role);
        (
            p.offset_bytes(self.plan.layout.logical_sector_size),
            p.size_bytes,
        )
    }

    /// The FAT volume id of the ESP, which GRUB searches for: derived from the disk GUID.
    fn esp_volume_id(&self) -> u32 {
        let b = self.disk_guid.as_bytes();
        u32::from_be_bytes([b[0], b[1], b[2], b[3]])
    }

    fn step(&mut self, step: Step) -> Result<(), ApplyError> {
        let path = self.target.path();
        match step {
            Step::Wipe => self.target.wipe_partition_tables()?,
            Step::SlotWrite => {
                let (offset, len) = self.offset(PartitionRole::Slot(Slot::A));
                let t = Instant::now();
                let progress = &mut *self.progress;
                let rootfs = &self.plan.image.rootfs;
                let written = self.target.write_image_verified(
                    Path::new(&rootfs.path),
                    offset,
                    len,
                    rootfs.sha256.as_deref(),
                    |done, total| progress(&Progress::Bytes { step, done, total }),
                )?;
                self.image = Some((written, t.elapsed().as_secs_f64()));
                let (b_offset, b_len) = self.offset(PartitionRole::Slot(Slot::B));
                self.target.zero(b_offset, b_len.min(MIB))?;
            }
            Step::Esp => {
                let (offset, len) = self.offset(PartitionRole::Esp);
                esp::make_fat32(path, offset, len, self.esp_volume_id())?;
                esp::populate(path, offset, &esp_files(self.plan), self.staging)?;
            }
            Step::BiosBoot => {
                let (offset, len) = self.offset(PartitionRole::BiosBoot);
                let lba = offset / u64::from(self.plan.layout.logical_sector_size);
                let core = biosboot::build_core_img(self.staging, self.esp_volume_id())?;
                let core = biosboot::place_core_img(&core, lba, len)?;
                self.target.write_at(offset, &core)?;
            }
            Step::State => {
                let (offset, len) = self.offset(PartitionRole::State);
                let seed = self.staging.join("state");
                let mut files = state_files(self.plan);
                if let Some((written, _)) = &self.image {
                    files.push(slots_record_file(&slot_a_record(
                        &written.sha256,
                        &self.plan.image.rootfs.path,
                    )));
                }
                statefs::write_seed(&files, &seed)?;
                statefs::make_ext4(path, offset, len, &seed)?;
            }
            Step::PartitionTable => {
                self.target.sync()?;
                let bootcode = match self.plan.boot_loader.kind {
                    BootLoaderKind::Grub => {
                        let core_lba = self.offset(PartitionRole::BiosBoot).0
                            / u64::from(self.plan.layout.logical_sector_size);
                        biosboot::mbr_bootcode(&biosboot::read_boot_img()?, core_lba)
                    }
                    BootLoaderKind::SystemdBoot => [0; biosboot::BOOTCODE_LEN],
                };
                write_gpt(self.target, &self.plan.layout, self.disk_guid, &bootcode)?;
                self.target.sync()?;
            }
        }
        Ok(())
    }
}

/// Writes the GPT (both headers and tables) and then LBA 0: the protective MBR carrying the
/// BIOS boot code.
fn write_gpt(
    target: &Target,
    layout: &Layout,
    guid: uuid::Uuid,
    bootcode: &[u8; biosboot::BOOTCODE_LEN],
) -> Result<(), ApplyError> {
    let gpt_err = |reason: String| ApplyError::Gpt {
        path: target.path().to_path_buf(),
        reason,
    };
    let lb = match layout.logical_sector_size {
        4096 => gpt::disk::LogicalBlockSize::Lb4096,
        _ => gpt::disk::LogicalBlockSize::Lb512,
    };
    let device = target
        .file()
        .try_clone()
        .map_err(|e| gpt_err(e.to_string()))?;
    let mut disk = gpt::GptConfig::new()
        .writable(true)
        .logical_block_size(lb)
        .create_from_device(device, Some(guid))
        .map_err(|e| gpt_err(e.to_string()))?;
    let mut partitions = BTreeMap::new();
    for p in &layout.partitions {
        let type_guid =
            uuid::Uuid::from_str(&p.type_guid).map_err(|e| gpt_err(format!("{}: {e}", p.name)))?;
        partitions.insert(
            p.number,
            gpt::partition::Partition {
                part_type_guid: gpt::partition_types::Type::from(type_guid),
                part_guid: uuid::Uuid::new_v4(),
                first_lba: p.first_lba,
                last_lba: p.last_lba,
                flags: 0,
                name: p.name.clone(),
            },
        );
    }
    disk.update_partitions(partitions)
        .map_err(|e| gpt_err(e.to_string()))?;
    let mut device = disk.write().map_err(|e| gpt_err(e.to_string()))?;
    let sectors = layout.disk_bytes / u64::from(layout.logical_sector_size);
    let mut mbr =
        gpt::mbr::ProtectiveMBR::with_lb_size(u32::try_from(sectors - 1).unwrap_or(u32::MAX));
    mbr.set_bootcode(*bootcode);
    mbr.overwrite_lba0(&mut device)
        .map_err(|e| gpt_err(e.to_string()))?;
    Ok(())
}
