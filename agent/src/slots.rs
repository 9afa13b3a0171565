//! The node's A/B slots: upgrades and rollbacks asked for through the API, and the boot
//! assessment that blesses a slot on trial once the node is healthy, or rejects it and
//! reboots into the last good slot (the rules are in [`kiln_spec::boot`]; the writes in
//! [`kiln_installer::upgrade`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_installer::upgrade::{self, Esp, ImageRef, NodeDisk, UpgradeError, UpgradeProgress};
use kiln_spec::boot::{
    self, Assessment, BootEntryName, BootStatus, EntryState, SLOTS_RECORD_PATH, SlotsRecord,
};
use kiln_spec::layout::Slot;
use kiln_spec::signing::TRUSTED_KEYS_DIR;
use serde::{Deserialize, Serialize};

use crate::controllers::Shared;
use crate::status::{Event, now};
use crate::sysroot::{Meta, Sysroot, sync_dir, write_atomic};

/// How long a slot on trial has to become healthy before the agent gives up on it.
pub const HEALTH_DEADLINE: Duration = Duration::from_secs(600);
const HEALTH_POLL: Duration = Duration::from_secs(5);

/// Where an upgrade downloads its files: on `KILN_STATE`, which has room for an image while
/// a tmpfs may not.
const STAGING_DIR: &str = "/var/lib/kiln/upgrade";

/// The installed disk and the slot this system booted, `None` on a live or netbooted system.
fn installed(sysroot: &Sysroot) -> Result<Option<(Slot, NodeDisk)>, UpgradeError> {
    if !sysroot.is_live() {
        return Ok(None);
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let (slot, guid) = match upgrade::booted(&cmdline) {
        Ok(b) => b,
        Err(UpgradeError::NotInstalled) => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(Some((slot, NodeDisk::find(guid)?)))
}

fn installed_or_refuse(sysroot: &Sysroot) -> Result<(Slot, NodeDisk), UpgradeError> {
    installed(sysroot)?.ok_or(UpgradeError::NotInstalled)
}

/// A systemd-boot ESP, or the refusal for GRUB machines.
fn counting_esp(disk: &NodeDisk) -> Result<Esp, UpgradeError> {
    let esp = disk.esp();
    if esp.has_entry_dir() {
        Ok(esp)
    } else {
        Err(UpgradeError::NoBootCounting)
    }
}

pub fn read_record(sysroot: &Sysroot) -> SlotsRecord {
    sysroot
        .read(SLOTS_RECORD_PATH)
        .ok()
        .flatten()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn write_record(sysroot: &Sysroot, record: &SlotsRecord) -> std::io::Result<()> {
    let path = sysroot.path(SLOTS_RECORD_PATH);
    let dir = path.parent().expect("an absolute path");
    std::fs::create_dir_all(dir)?;
    let json = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
    write_atomic(
        &path,
        &json,
        Meta {
            mode: 0o644,
            uid: 0,
            gid: 0,
        },
    )?;
    sync_dir(dir)
}

/// The A/B state for `kiln node status`; `None` where there are no slots (live, netboot,
/// GRUB).
pub fn status(sysroot: &Sysroot) -> Option<BootStatus> {
    let (booted, disk) = installed(sysroot).ok()??;
    let entries = counting_esp(&disk).ok()?.entries().ok()?;
    Some(boot::boot_status(booted, &entries, &read_record(sysroot)))
}

/// What `POST /v1/upgrade` is asked.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpgradeRequest {
    pub image: String,
    #[serde(default)]
    pub reboot: bool,
    #[serde(default)]
    pub dry_run: bool,
}

/// What an upgrade did (or, dry, would do).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpgradeReport {
    pub plan: upgrade::UpgradePlan,
    pub signed_by: String,
    pub rootfs_sha256: String,
    pub applied: bool,
    pub rebooting: bool,
    pub seconds: f64,
}

/// Verifies the image, plans, and (unless dry) writes the other slot. The node's booted slot
/// is never written; any failure leaves the node booting it.
pub fn run_upgrade(
    sysroot: &Sysroot,
    shared: &Shared,
    req: &UpgradeRequest,
) -> Result<UpgradeReport, UpgradeError> {
    let start = Instant::now();
    let (booted, disk) = installed_or_refuse(sysroot)?;
    let esp = counting_esp(&disk)?;
    let entries = esp.entries()?;
    // The booted slot's state refuses early, before any download.
    upgrade::plan(booted, &entries, &disk.guid, &[], "")?;
    let keys = upgrade::trusted_keys(&sysroot.path(TRUSTED_KEYS_DIR))?;
    let staging = sysroot.path(STAGING_DIR);
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|source| UpgradeError::Io {
        what: format!("creating {}", staging.display()),
        source,
    })?;
    let say = |msg: String| shared.emit(Event::new("upgrade", msg, None));
    let source = ImageRef::parse(&req.image);
    say(format!("checking {}", source.describe()));
    let result = (|| -> Result<UpgradeReport, UpgradeError> {
        let image =
            upgrade::fetch_and_verify(&source, &keys, &staging, kiln_installer::FETCH_PATIENCE)?;
        let plan = upgrade::plan(
            booted,
            &entries,
            &disk.guid,
            &image.manifest.kernel_args,
            &image.rootfs_sha256,
        )?;
        let mut report = UpgradeReport {
            plan,
            signed_by: image.signed_by.clone(),
            rootfs_sha256: image.rootfs_sha256.clone(),
            applied: false,
            rebooting: false,
            seconds: 0.0,
        };
        if req.dry_run {
            return Ok(report);
        }
        let mut record = read_record(sysroot);
        // A new upgrade starts a new trial: nothing of an earlier assessment carries over.
        record.last_assessment = None;
        record.images.remove(&report.plan.target);
        write_record(sysroot, &record).map_err(|source| UpgradeError::Io {
            what: format!("writing {SLOTS_RECORD_PATH}"),
            source,
        })?;
        let mut last_tenth = 0;
        let title = format!("kiln (slot {})", report.plan.target.letter());
        let written = upgrade::apply(
            &report.plan,
            &image,
            &disk,
            &title,
            &staging,
            &mut |p| match p {
                UpgradeProgress::Step(s) => say(s),
                UpgradeProgress::Bytes { done, total } => {
                    let tenth = done * 10 / total.max(1);
                    if tenth > last_tenth {
                        last_tenth = tenth;
                        say(format!("written {}% of the root image", tenth * 10));
                    }
                }
            },
        )?;
        record.images.insert(report.plan.target, written);
        write_record(sysroot, &record).map_err(|source| UpgradeError::Io {
            what: format!("writing {SLOTS_RECORD_PATH}"),
            source,
        })?;
        report.applied = true;
        report.rebooting = req.reboot;
        Ok(report)
    })();
    let _ = std::fs::remove_dir_all(&staging);
    let mut report = result?;
    report.seconds = start.elapsed().as_secs_f64();
    say(format!(
        "slot {} holds the new image; the next boot tries it",
        report.plan.target.letter()
    ));
    Ok(report)
}

/// Makes the other slot's good image the default.
pub fn run_rollback(sysroot: &Sysroot, shared: &Shared) -> Result<BootEntryName, UpgradeError> {
    let (booted, disk) = installed_or_refuse(sysroot)?;
    let esp = counting_esp(&disk)?;
    let to = upgrade::rollback(booted, &esp)?;
    shared.emit(Event::new(
        "rollback",
        format!(
            "slot {} is the default again ({}); reboot to use it",
            to.slot.letter(),
            to.file_name()
        ),
        None,
    ));
    Ok(to)
}

/// Reboots the node shortly, so the API answer reaches the caller first.
pub fn reboot_soon() {
    let _ = std::thread::Builder::new()
        .name("kiln-reboot".into())
        .spawn(|| {
            std::thread::sleep(Duration::from_secs(2));
            let _ = std::process::Command::new("systemctl")
                .arg("reboot")
                .status();
        });
}

/// Whether the node is healthy by the agent's own account: converged, nothing failed.
fn healthy(shared: &Shared) -> Result<(), String> {
    let st = shared.status.read().map(|s| s.clone()).unwrap_or_default();
    let cond = |kind: &str| st.condition(kind).cloned();
    if let Some(c) = cond("Failed").filter(|c| c.status) {
        return Err(format!("{}: {}", c.reason, c.message));
    }
    match cond("Ready") {
        Some(c) if c.status => Ok(()),
        Some(c) => Err(format!("not converged: {} {}", c.reason, c.message)),
        None => Err("not converged yet".into()),
    }
}

fn console(sysroot: &Sysroot, line: &str) {
    use std::io::Write;
    println!("{line}");
    if sysroot.is_live()
        && let Ok(mut c) = std::fs::OpenOptions::new().write(true).open("/dev/console")
    {
        let _ = writeln!(c, "{line}");
    }
}

/// The boot assessment, after the agent's first converge: a slot on trial is blessed once
/// healthy, or marked bad and left by a reboot after [`HEALTH_DEADLINE`]. A slot that never
/// reached the agent (the loader gave up on it) is recorded as such from the slot the node
/// fell back to.
pub fn assess(sysroot: Sysroot, shared: Arc<Shared>, deadline: Duration) {
    let Ok(Some((booted, disk))) = installed(&sysroot) else {
        return;
    };
    let Ok(esp) = counting_esp(&disk) else {
        return;
    };
    let Ok(entries) = esp.entries() else {
        return;
    };
    let Some(current) = entries
        .iter()
        .filter(|e| e.slot == booted)
        .max_by_key(|e| e.generation)
        .copied()
    else {
        return;
    };
    let mut record = read_record(&sysroot);
    let say = |shared: &Shared, msg: String| {
        console(&sysroot, &format!("kiln-agent: {msg}"));
        shared.emit(Event::new("boot", msg, None));
    };
    if current.state() != EntryState::OnTrial {
        // Fell back here from a newer slot the loader gave up on, unnoticed so far?
        if let Some(failed) = entries.iter().find(|e| {
            e.slot != booted && e.generation > current.generation && e.state() == EntryState::Bad
        }) && record
            .last_assessment
            .as_ref()
            .is_none_or(|a| a.slot != failed.slot || a.generation != failed.generation)
        {
            let reason = format!(
                "slot {} (generation {}) used up its {} boot tries without reaching the agent; \
                 the loader went back to slot {}",
                failed.slot.letter(),
                failed.generation,
                failed.tries.map_or(boot::BOOT_TRIES, |t| t.done),
                booted.letter()
            );
            record.last_assessment = Some(Assessment {
                slot: failed.slot,
                generation: failed.generation,
                good: false,
                reason: reason.clone(),
                at: now(),
            });
            let _ = write_record(&sysroot, &record);
            say(&shared, format!("rolled back: {reason}"));
        }
        return;
    }
    let started = Instant::now();
    let verdict = loop {
        match healthy(&shared) {
            Ok(()) => break Ok(()),
            Err(why) if started.elapsed() >= deadline => break Err(why),
            Err(_) => std::thread::sleep(HEALTH_POLL),
        }
    };
    let (to, good, reason) = match verdict {
        Ok(()) => (
            current.blessed(),
            true,
            "the agent converged with nothing failed".to_string(),
        ),
        Err(why) => (
            current.marked_bad(),
            false,
            format!("not healthy within {} s: {why}", deadline.as_secs()),
        ),
    };
    if let Err(e) = esp.rename_entry(&current, &to) {
        say(
            &shared,
            format!("could not record the assessment on the ESP: {e}"),
        );
        return;
    }
    record.last_assessment = Some(Assessment {
        slot: booted,
        generation: current.generation,
        good,
        reason: reason.clone(),
        at: now(),
    });
    let _ = write_record(&sysroot, &record);
    if good {
        say(
            &shared,
            format!(
                "slot {} (generation {}) is good: {reason}",
                booted.letter(),
                current.generation
            ),
        );
    } else {
        say(
            &shared,
            format!(
                "slot {} (generation {}) failed its health check ({reason}); rebooting into the last good slot",
                booted.letter(),
                current.generation
            ),
        );
        reboot_soon();
    }
}
