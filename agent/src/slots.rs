//! The node's A/B slots: upgrades and rollbacks asked for through the API, and the boot
//! assessment that blesses a slot on trial once the node is healthy, or rejects it and
//! reboots into the last good slot (the rules are in [`kiln_spec::boot`]; the writes in
//! [`kiln_installer::upgrade`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_installer::upgrade::{
    self, BootMenu, ImageRef, NodeDisk, Trust, UpgradeError, UpgradeProgress,
};
use kiln_spec::appliance::{IMAGE_UPGRADE_RULES_PATH, UpgradeSpec};
use kiln_spec::boot::{
    self, Assessment, BootEntryName, BootStatus, EntryState, SLOTS_RECORD_PATH, SlotsRecord,
};
use kiln_spec::layout::Slot;
use kiln_spec::signing::TRUSTED_KEYS_DIR;
use serde::{Deserialize, Serialize};

use crate::controllers::Shared;
use crate::status::{Event, now};
use crate::sysroot::{Meta, Sysroot, sync_dir, write_atomic};

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

fn boot_menu(disk: &NodeDisk) -> Result<BootMenu, UpgradeError> {
    BootMenu::on(disk.esp())
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

fn save_record(sysroot: &Sysroot, record: &SlotsRecord) -> Result<(), UpgradeError> {
    write_record(sysroot, record).map_err(|source| UpgradeError::Io {
        what: format!("writing {SLOTS_RECORD_PATH}"),
        source,
    })
}

/// The A/B state for `kiln node status`; `None` where there are no slots (live, netboot,
/// GRUB).
pub fn status(sysroot: &Sysroot) -> Option<BootStatus> {
    let (booted, disk) = installed(sysroot).ok()??;
    let entries = boot_menu(&disk).ok()?.entries().ok()?;
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
    /// Take a build without a signature, if the running image's spec allows that.
    #[serde(default)]
    pub allow_unsigned: bool,
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
    let menu = boot_menu(&disk)?;
    let entries = menu.entries()?;
    // Refused early, before any download.
    upgrade::check_booted(booted, &entries)?;
    if req.allow_unsigned && !image_rules(sysroot).is_ok_and(|r| r.allow_unsigned) {
        return Err(UpgradeError::UnsignedNotAllowed);
    }
    let trust = Trust {
        keys: match upgrade::trusted_keys(&sysroot.path(TRUSTED_KEYS_DIR)) {
            Ok(keys) => keys,
            Err(_) if req.allow_unsigned => Vec::new(),
            Err(e) => return Err(e),
        },
        unsigned_ok: req.allow_unsigned,
    };
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
            upgrade::fetch_and_verify(&source, &trust, &staging, kiln_installer::FETCH_PATIENCE)?;
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
        save_record(sysroot, &record)?;
        let mut last_tenth = 0;
        let title = format!("kiln (slot {})", report.plan.target.letter());
        let written = upgrade::apply(
            &report.plan,
            &image,
            &disk,
            &menu,
            &title,
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
        save_record(sysroot, &record)?;
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
    let menu = boot_menu(&disk)?;
    let to = upgrade::rollback(booted, &menu)?;
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

/// The running image's upgrade rules (its build's `spec.upgrade`); an image built before
/// they existed has the defaults.
fn image_rules(sysroot: &Sysroot) -> Result<UpgradeSpec, String> {
    let path = sysroot.path(IMAGE_UPGRADE_RULES_PATH);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(UpgradeSpec::default()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// How a slot on trial stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Healthy, and what showed it.
    Good(String),
    /// Not yet: the deadline decides.
    NotYet(String),
    /// Failed for good (a required unit missing or failed): waiting would change nothing.
    Failed(String),
}

/// The node's health: the agent converged with nothing failed, and every required unit active.
fn healthy(shared: &Shared, units: &[String]) -> Health {
    let st = shared.status.read().map(|s| s.clone()).unwrap_or_default();
    let cond = |kind: &str| st.condition(kind).cloned();
    if let Some(c) = cond("Failed").filter(|c| c.status) {
        return Health::NotYet(format!("{}: {}", c.reason, c.message));
    }
    match cond("Ready") {
        Some(c) if c.status => {}
        Some(c) => return Health::NotYet(format!("not converged: {} {}", c.reason, c.message)),
        None => return Health::NotYet("not converged yet".into()),
    }
    let converged = "the agent converged with nothing failed";
    if units.is_empty() {
        return Health::Good(converged.into());
    }
    let out = std::process::Command::new("systemctl")
        .args([
            "show",
            "--property=LoadState,ActiveState,SubState,Result",
            "--",
        ])
        .args(units)
        .output();
    match out {
        Ok(o) if o.status.success() => {
            match units_health(&String::from_utf8_lossy(&o.stdout), units) {
                Health::Good(active) => Health::Good(format!("{converged}; {active}")),
                other => other,
            }
        }
        Ok(o) => Health::NotYet(format!(
            "systemctl show: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Health::NotYet(format!("running systemctl: {e}")),
    }
}

/// The required `units` judged from `systemctl show` of them (one block per unit, in order).
pub fn units_health(show: &str, units: &[String]) -> Health {
    let blocks: Vec<&str> = show.split("\n\n").collect();
    let (mut failed, mut waiting) = (Vec::new(), Vec::new());
    for (i, unit) in units.iter().enumerate() {
        let prop = |key: &str| {
            blocks.get(i).and_then(|b| {
                b.lines()
                    .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            })
        };
        match (prop("LoadState"), prop("ActiveState")) {
            (Some("not-found"), _) => failed.push(format!("{unit} is not installed")),
            (Some("masked"), _) => failed.push(format!("{unit} is masked")),
            (Some("bad-setting" | "error"), _) => failed.push(format!("{unit} cannot be loaded")),
            (_, Some("failed")) => failed.push(format!(
                "{unit} failed ({})",
                prop("Result").unwrap_or("no result")
            )),
            (_, Some("active" | "reloading")) => {}
            (_, Some(state)) => waiting.push(format!(
                "{unit} is {state} ({})",
                prop("SubState").unwrap_or("")
            )),
            (_, None) => waiting.push(format!("{unit}: systemd said nothing about it")),
        }
    }
    if !failed.is_empty() {
        Health::Failed(failed.join("; "))
    } else if !waiting.is_empty() {
        Health::NotYet(waiting.join("; "))
    } else {
        Health::Good(format!("{} active", units.join(", ")))
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

/// What a boot assessment decided: what to tell, and whether to leave the slot by a reboot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub message: String,
    pub reboot: bool,
}

/// The boot assessment, after the agent's first converge: a slot on trial is blessed once
/// healthy by its own image's rules (`spec.upgrade.health`), or marked bad and left by a
/// reboot when a check fails or the rules' timeout passes. A slot that never reached the
/// agent (the loader gave up on it) is recorded as such from the slot the node fell back to.
pub fn assess(sysroot: Sysroot, shared: Arc<Shared>) {
    let Ok(Some((booted, disk))) = installed(&sysroot) else {
        return;
    };
    let Ok(menu) = boot_menu(&disk) else {
        return;
    };
    let mut record = read_record(&sysroot);
    let rules = image_rules(&sysroot);
    let deadline = Duration::from_secs(
        rules
            .as_ref()
            .map_or(UpgradeSpec::default().health.timeout_seconds, |r| {
                r.health.timeout_seconds
            }),
    );
    let say = |msg: String| {
        console(&sysroot, &format!("kiln-agent: {msg}"));
        shared.emit(Event::new("boot", msg, None));
    };
    match assess_boot(
        booted,
        &menu,
        &mut record,
        || match &rules {
            Ok(r) => healthy(&shared, &r.health.required_units),
            Err(e) => Health::Failed(format!("the image's upgrade rules cannot be read: {e}")),
        },
        deadline,
        HEALTH_POLL,
    ) {
        Ok(None) => {}
        Ok(Some(verdict)) => {
            if let Err(e) = write_record(&sysroot, &record) {
                say(format!("could not write {SLOTS_RECORD_PATH}: {e}"));
            }
            say(verdict.message);
            if verdict.reboot {
                reboot_soon();
            }
        }
        Err(e) => say(format!("could not assess this boot: {e}")),
    }
}

/// The decision of [`assess`], with the node's health as `health` and its boot menu as `menu`:
/// renames the booted slot's entry (blessed or bad) and records the assessment in `record`.
/// `None` when there is nothing to decide.
pub fn assess_boot(
    booted: Slot,
    menu: &BootMenu,
    record: &mut SlotsRecord,
    mut health: impl FnMut() -> Health,
    deadline: Duration,
    poll: Duration,
) -> Result<Option<Verdict>, UpgradeError> {
    let entries = menu.entries()?;
    let Some(current) = boot::slot_entry(&entries, booted).copied() else {
        return Ok(None);
    };
    if current.state() != EntryState::OnTrial {
        // Fell back here from a newer slot the loader gave up on, unnoticed so far?
        let Some(failed) = entries.iter().find(|e| {
            e.slot != booted && e.generation > current.generation && e.state() == EntryState::Bad
        }) else {
            return Ok(None);
        };
        if record
            .last_assessment
            .as_ref()
            .is_some_and(|a| a.slot == failed.slot && a.generation == failed.generation)
        {
            return Ok(None);
        }
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
        return Ok(Some(Verdict {
            message: format!("rolled back: {reason}"),
            reboot: false,
        }));
    }
    let started = Instant::now();
    let (to, good, reason) = loop {
        match health() {
            Health::Good(why) => break (current.blessed(), true, why),
            Health::Failed(why) => break (current.marked_bad(), false, why),
            Health::NotYet(why) if started.elapsed() >= deadline => {
                let why = format!("not healthy within {} s: {why}", deadline.as_secs());
                break (current.marked_bad(), false, why);
            }
            Health::NotYet(_) => std::thread::sleep(poll),
        }
    };
    menu.set(&current, &to)?;
    record.last_assessment = Some(Assessment {
        slot: booted,
        generation: current.generation,
        good,
        reason: reason.clone(),
        at: now(),
    });
    let slot = booted.letter();
    let generation = current.generation;
    let fallback = entries
        .iter()
        .any(|e| e.slot != booted && e.state() == EntryState::Good);
    Ok(Some(if good {
        Verdict {
            message: format!("slot {slot} (generation {generation}) is good: {reason}"),
            reboot: false,
        }
    } else if !fallback {
        // A reboot would come back here: stay up, reachable, and say so.
        Verdict {
            message: format!(
                "slot {slot} (generation {generation}) failed its health check ({reason}); \
                 there is no good slot to fall back to, so the node stays on it"
            ),
            reboot: false,
        }
    } else {
        Verdict {
            message: format!(
                "slot {slot} (generation {generation}) failed its health check ({reason}); \
                 rebooting into the last good slot"
            ),
            reboot: true,
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_installer::upgrade::Esp;
    use std::path::Path;
    use std::process::Command;

    /// A real FAT file system in a file holding `entries` in the menu of `loader`
    /// (`systemd-boot` or `grub`).
    fn menu_with(dir: &Path, loader: &str, entries: &[&str]) -> BootMenu {
        let image = dir.join(format!("{loader}.img"));
        let file = std::fs::File::create(&image).unwrap();
        file.set_len(40 << 20).unwrap();
        let out = Command::new("mkfs.vfat")
            .args(["-F", "32"])
            .arg(&image)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let esp = Esp::at(&image, 0);
        if loader == "grub" {
            esp.make_dir("/grub").unwrap();
            esp.write(boot::GRUBENV, &boot::render_grubenv(&Default::default()))
                .unwrap();
        } else {
            esp.make_dir("/loader").unwrap();
            esp.make_dir(boot::ENTRY_DIR).unwrap();
        }
        let menu = BootMenu::on(esp).unwrap();
        for e in entries {
            let name = BootEntryName::parse(e).unwrap();
            menu.add(&name, "t", "kiln.slot=X").unwrap();
        }
        menu
    }

    fn files(menu: &BootMenu) -> Vec<String> {
        let mut f: Vec<String> = menu
            .entries()
            .unwrap()
            .iter()
            .map(|e| e.file_name())
            .collect();
        f.sort();
        f
    }

    const LOADERS: [&str; 2] = ["systemd-boot", "grub"];

    /// [`assess_boot`] with no waiting: the health as it is now decides.
    fn decide(
        booted: Slot,
        menu: &BootMenu,
        record: &mut SlotsRecord,
        health: impl FnMut() -> Health,
    ) -> Option<Verdict> {
        assess_boot(booted, menu, record, health, Duration::ZERO, Duration::ZERO).unwrap()
    }

    fn good() -> Health {
        Health::Good("converged".into())
    }

    #[test]
    fn a_healthy_slot_on_trial_is_blessed() {
        for loader in LOADERS {
            let dir = tempfile::tempdir().unwrap();
            let menu = menu_with(dir.path(), loader, &["kiln-1-a.conf", "kiln-2-b+2-1.conf"]);
            let mut record = SlotsRecord::default();
            let mut calls = 0;
            let health = || {
                calls += 1;
                if calls < 3 {
                    Health::NotYet("converging".to_string())
                } else {
                    Health::Good("converged".to_string())
                }
            };
            let v = assess_boot(
                Slot::B,
                &menu,
                &mut record,
                health,
                Duration::from_secs(60),
                Duration::ZERO,
            )
            .unwrap()
            .unwrap();
            assert!(!v.reboot, "{v:?}");
            assert!(
                v.message.starts_with("slot B (generation 2) is good"),
                "{v:?}"
            );
            assert_eq!(files(&menu), ["kiln-1-a.conf", "kiln-2-b.conf"]);
            let a = record.last_assessment.unwrap();
            assert!(a.good && a.slot == Slot::B && a.generation == 2);
        }
    }

    #[test]
    fn an_unhealthy_slot_is_marked_bad_and_left_for_the_last_good_one() {
        for loader in LOADERS {
            let dir = tempfile::tempdir().unwrap();
            let menu = menu_with(dir.path(), loader, &["kiln-1-a.conf", "kiln-2-b+2-1.conf"]);
            let mut record = SlotsRecord::default();
            let v = decide(Slot::B, &menu, &mut record, || {
                Health::NotYet("ActionFailed: unit:web.service: start failed".to_string())
            })
            .unwrap();
            assert!(v.reboot, "{v:?}");
            assert!(v.message.contains("unit:web.service"), "{v:?}");
            assert_eq!(files(&menu), ["kiln-1-a.conf", "kiln-2-b+0-3.conf"]);
            // The loader's next choice is the last good slot.
            assert_eq!(
                boot::next_boot(&menu.entries().unwrap()).unwrap().slot,
                Slot::A
            );
            // Back on A: the failure is already recorded, nothing more to say.
            let again = decide(Slot::A, &menu, &mut record, good);
            assert_eq!(again, None);
            assert!(!record.last_assessment.unwrap().good);
        }
    }

    #[test]
    fn a_failed_required_unit_fails_the_slot_at_once() {
        for loader in LOADERS {
            let dir = tempfile::tempdir().unwrap();
            let menu = menu_with(dir.path(), loader, &["kiln-1-a.conf", "kiln-2-b+2-1.conf"]);
            let mut record = SlotsRecord::default();
            let started = Instant::now();
            // A day's deadline: only the failure can end the wait.
            let v = assess_boot(
                Slot::B,
                &menu,
                &mut record,
                || Health::Failed("web.service is not installed".into()),
                Duration::from_secs(86_400),
                Duration::from_secs(60),
            )
            .unwrap()
            .unwrap();
            assert!(started.elapsed() < Duration::from_secs(60));
            assert!(v.reboot, "{v:?}");
            assert!(
                v.message
                    .contains("failed its health check (web.service is not installed)"),
                "{v:?}"
            );
            assert_eq!(files(&menu), ["kiln-1-a.conf", "kiln-2-b+0-3.conf"]);
        }
    }

    fn units(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn required_units_are_judged_from_systemctl_show() {
        let wanted = units(&["a.service", "b.target", "c.service"]);
        let all_up = "LoadState=loaded\nActiveState=active\nSubState=running\nResult=success\n\n\
                      LoadState=loaded\nActiveState=active\nSubState=active\nResult=success\n\n\
                      LoadState=loaded\nActiveState=reloading\nSubState=reload\nResult=success\n";
        assert_eq!(
            units_health(all_up, &wanted),
            Health::Good("a.service, b.target, c.service active".into())
        );
        let starting = "LoadState=loaded\nActiveState=activating\nSubState=start\nResult=success\n\n\
                        LoadState=loaded\nActiveState=inactive\nSubState=dead\nResult=success\n\n\
                        LoadState=loaded\nActiveState=active\nSubState=running\nResult=success\n";
        assert_eq!(
            units_health(starting, &wanted),
            Health::NotYet("a.service is activating (start); b.target is inactive (dead)".into())
        );
        // Missing or failed outweighs waiting: no point in waiting for the others.
        let broken = "LoadState=not-found\nActiveState=inactive\nSubState=dead\nResult=success\n\n\
                      LoadState=loaded\nActiveState=activating\nSubState=start\nResult=success\n\n\
                      LoadState=loaded\nActiveState=failed\nSubState=failed\nResult=exit-code\n";
        assert_eq!(
            units_health(broken, &wanted),
            Health::Failed("a.service is not installed; c.service failed (exit-code)".into())
        );
        assert_eq!(
            units_health("", &units(&["a.service"])),
            Health::NotYet("a.service: systemd said nothing about it".into())
        );
    }

    #[test]
    fn an_unhealthy_slot_without_a_fallback_keeps_running() {
        for loader in LOADERS {
            let dir = tempfile::tempdir().unwrap();
            let menu = menu_with(dir.path(), loader, &["kiln-1-a+2-1.conf"]);
            let mut record = SlotsRecord::default();
            let v = decide(Slot::A, &menu, &mut record, || {
                Health::NotYet("ConfigRejected".to_string())
            })
            .unwrap();
            assert!(!v.reboot, "{v:?}");
            assert!(v.message.contains("no good slot to fall back to"), "{v:?}");
            assert_eq!(files(&menu), ["kiln-1-a+0-3.conf"]);
        }
    }

    #[test]
    fn a_rollback_promotes_the_other_good_slot_only() {
        for loader in LOADERS {
            let dir = tempfile::tempdir().unwrap();
            let menu = menu_with(dir.path(), loader, &["kiln-1-a.conf", "kiln-2-b.conf"]);
            let to = upgrade::rollback(Slot::B, &menu).unwrap();
            assert_eq!(to.file_name(), "kiln-3-a.conf");
            assert_eq!(files(&menu), ["kiln-2-b.conf", "kiln-3-a.conf"]);
            assert_eq!(
                boot::next_boot(&menu.entries().unwrap()).unwrap().slot,
                Slot::A
            );
            let dir = tempfile::tempdir().unwrap();
            let menu = menu_with(dir.path(), loader, &["kiln-2-b.conf", "kiln-3-a+0-3.conf"]);
            let e = upgrade::rollback(Slot::B, &menu).unwrap_err();
            assert!(matches!(e, UpgradeError::NothingToRollBackTo { .. }), "{e}");
        }
    }

    #[test]
    fn a_slot_the_loader_gave_up_on_is_reported_from_the_fallback() {
        for loader in LOADERS {
            let dir = tempfile::tempdir().unwrap();
            let menu = menu_with(dir.path(), loader, &["kiln-2-b.conf", "kiln-3-a+0-3.conf"]);
            let mut record = SlotsRecord::default();
            let v = decide(Slot::B, &menu, &mut record, good).unwrap();
            assert!(!v.reboot);
            assert!(
                v.message
                    .contains("slot A (generation 3) used up its 3 boot tries"),
                "{v:?}"
            );
            assert_eq!(
                files(&menu),
                ["kiln-2-b.conf", "kiln-3-a+0-3.conf"],
                "nothing renamed"
            );
            // Once recorded, later boots say nothing new.
            let again = decide(Slot::B, &menu, &mut record, good);
            assert_eq!(again, None);
        }
    }
}
