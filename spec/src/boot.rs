//! A/B boot assessment: the boot entries the loader chooses from, and the node's record of
//! which image each slot holds and how its last assessment ended.
//!
//! On UEFI, systemd-boot reads one entry per slot, `/loader/entries/kiln-<gen>-<slot>.conf`,
//! with a try counter (`+LEFT[-DONE]`) while the slot is on trial. `loader.conf` names the
//! glob `kiln-*` as its default, and systemd-boot sorts entries with no tries left last and
//! the rest newest generation first, so it boots the newest entry that is not bad:
//! - an upgrade writes the other slot's entry with the next generation and three tries;
//! - systemd-boot counts each boot of it down; the agent blesses it (drops the counter) once
//!   the node is healthy, or marks it bad (`+0`) and reboots when it is not;
//! - three boots that never reach the agent make it bad by themselves.
//!
//! Either way the loader then boots the newest good generation: the last slot marked good,
//! never whichever slot happens to be "the other one".

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::layout::Slot;

/// Boots a slot on trial gets before the loader gives up on it.
pub const BOOT_TRIES: u32 = 3;
/// Where systemd-boot reads entries from, on the ESP.
pub const ENTRY_DIR: &str = "/loader/entries";
pub const LOADER_CONF: &str = "/loader/loader.conf";
/// The record of the slots' images and the last assessment, on `KILN_STATE`.
pub const SLOTS_RECORD_PATH: &str = "/var/lib/kiln/slots.json";
/// A kernel panic reboots after this many seconds, so a slot whose kernel or initramfs cannot
/// boot uses up its tries without anyone at the console.
pub const PANIC_REBOOT_SECS: u32 = 10;

/// `loader.conf`: boot the newest kiln entry that is not bad, at once. The try counters choose
/// the slot, not a person, so the menu stays hidden (a key held during boot shows it) instead
/// of costing every boot of every node its timeout.
pub fn loader_conf() -> String {
    "default kiln-*\ntimeout 0\neditor no\nconsole-mode keep\n".to_string()
}

/// The kernel command line of an installed slot: which slot and disk stage-1 mounts, a panic
/// that reboots, then the spec's arguments.
pub fn slot_kernel_args(slot: Slot, disk_guid: &str, spec_args: &[String]) -> Vec<String> {
    let mut args = vec![
        slot.kernel_arg(),
        format!("{}={disk_guid}", crate::layout::DISK_KERNEL_ARG),
        format!("panic={PANIC_REBOOT_SECS}"),
    ];
    args.extend(spec_args.iter().cloned());
    args
}

/// A systemd-boot entry file's text.
pub fn entry_conf(title: &str, slot: Slot, options: &str) -> String {
    let dir = slot.esp_dir();
    format!("title   {title}\nlinux   {dir}/vmlinuz\ninitrd  {dir}/initrd.img\noptions {options}\n")
}

/// GRUB (BIOS machines) follows the same rules from a script: the ESP's `grubenv` holds each
/// slot's generation and tries (`kiln_a_gen=1`, `kiln_b_tries=2`, `good` once blessed, `0`
/// when bad), `grub.cfg` boots the newest slot that is not bad and counts its try down with
/// `save_env`, and each slot's menu entry is its own file, like a systemd-boot entry.
pub const GRUB_CFG: &str = "/grub/grub.cfg";
pub const GRUBENV: &str = "/grub/grubenv";
/// What `grub-editenv` writes: a 1024-byte block GRUB rewrites in place.
const GRUBENV_HEADER: &str = "# GRUB Environment Block\n";
const GRUBENV_SIZE: usize = 1024;
const GOOD: &str = "good";

/// The menu entry file of a slot on the ESP: `/grub/kiln-a.cfg`.
pub fn grub_entry_path(slot: Slot) -> String {
    format!("/grub/kiln-{}.cfg", slot.letter().to_ascii_lowercase())
}

/// A slot's GRUB menu entry, with the id `grub.cfg` selects it by.
pub fn grub_entry(title: &str, slot: Slot, options: &str) -> String {
    let s = slot.letter().to_ascii_lowercase();
    let dir = slot.esp_dir();
    format!(
        "menuentry \"{title}\" --id kiln-{s} {{\n    linux {dir}/vmlinuz {options}\n    initrd {dir}/initrd.img\n}}\n"
    )
}

/// How every kiln GRUB menu talks and waits: output on the screen and the serial port, the
/// menu hidden and no countdown, so the default entry boots at once and Esc pressed as GRUB
/// starts shows the menu. GRUB takes keys from the firmware's console only: the keyboard, a
/// BMC's KVM, and the serial port where the firmware redirects it (OVMF does, as does server
/// firmware with console redirection on; SeaBIOS does not). The hidden menu looks for a key
/// at once, and GRUB reading the serial port itself made that take 3.2 s on every boot under
/// QEMU, against 0.15 s without, on BIOS and UEFI alike.
pub const GRUB_CONSOLE_MENU: &str = "serial --unit=0 --speed=115200\n\
     terminal_input console\n\
     terminal_output console serial\n\
     set timeout_style=hidden\n\
     set timeout=0\n";

/// `grub.cfg`: picks the slot as systemd-boot would pick its entries and counts its try down.
/// GRUB has no arithmetic, so each count is a branch. Like systemd-boot's, the menu is hidden
/// ([`GRUB_CONSOLE_MENU`]).
pub fn grub_cfg() -> String {
    let boot = |s: &str| {
        let mut t = String::new();
        for left in (1..=BOOT_TRIES).rev() {
            let kw = if left == BOOT_TRIES { "if" } else { "elif" };
            t.push_str(&format!(
                "    {kw} [ \"$kiln_{s}_tries\" = {left} ]; then set kiln_{s}_tries={}; save_env kiln_{s}_tries\n",
                left - 1
            ));
        }
        t.push_str(&format!("    fi\n    set default=kiln-{s}\n"));
        t
    };
    format!(
        "{GRUB_CONSOLE_MENU}load_env\n\
         if [ -z \"$kiln_a_gen\" ]; then set kiln_a_gen=0; fi\n\
         if [ -z \"$kiln_b_gen\" ]; then set kiln_b_gen=0; fi\n\
         # The newest slot that is not bad; the newest at all when both are.\n\
         if [ \"$kiln_b_gen\" -gt \"$kiln_a_gen\" -a \"$kiln_b_tries\" != 0 ]; then\n{b}\
         elif [ \"$kiln_a_gen\" != 0 -a \"$kiln_a_tries\" != 0 ]; then\n{a}\
         elif [ \"$kiln_b_gen\" != 0 -a \"$kiln_b_tries\" != 0 ]; then\n{b}\
         elif [ \"$kiln_b_gen\" -gt \"$kiln_a_gen\" ]; then\n    set default=kiln-b\n\
         else\n    set default=kiln-a\nfi\n\
         for kiln_slot in a b; do\n    \
         if [ -f \"$prefix/kiln-$kiln_slot.cfg\" ]; then source \"$prefix/kiln-$kiln_slot.cfg\"; fi\n\
         done\n",
        a = boot("a"),
        b = boot("b"),
    )
}

/// The variables of a `grubenv` block, in order.
pub fn parse_grubenv(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A `grubenv` block: the header, the variables, `#` padding to 1024 bytes.
pub fn render_grubenv(vars: &BTreeMap<String, String>) -> String {
    let mut t = GRUBENV_HEADER.to_string();
    for (k, v) in vars {
        t.push_str(&format!("{k}={v}\n"));
    }
    let pad = GRUBENV_SIZE.saturating_sub(t.len());
    t.push_str(&"#".repeat(pad));
    t
}

/// The kiln entries a `grubenv` describes, newest generation first.
pub fn grubenv_entries(vars: &BTreeMap<String, String>) -> Vec<BootEntryName> {
    let mut out = Vec::new();
    for slot in [Slot::A, Slot::B] {
        let s = slot.letter().to_ascii_lowercase();
        let Some(generation) = vars
            .get(&format!("kiln_{s}_gen"))
            .and_then(|g| g.parse::<u32>().ok())
            .filter(|g| *g > 0)
        else {
            continue;
        };
        let tries = match vars.get(&format!("kiln_{s}_tries")).map(String::as_str) {
            None | Some(GOOD) => None,
            Some(n) => n.parse::<u32>().ok().map(|left| Tries {
                left,
                done: BOOT_TRIES.saturating_sub(left),
            }),
        };
        out.push(BootEntryName {
            generation,
            slot,
            tries,
        });
    }
    out.sort_by_key(|e| std::cmp::Reverse(e.generation));
    out
}

/// Sets (or, with `None`, clears) `slot`'s entry in `vars`.
pub fn set_grubenv_entry(
    vars: &mut BTreeMap<String, String>,
    slot: Slot,
    entry: Option<&BootEntryName>,
) {
    let s = slot.letter().to_ascii_lowercase();
    let generation = entry.map_or(0, |e| e.generation);
    vars.insert(format!("kiln_{s}_gen"), generation.to_string());
    let tries = match entry.and_then(|e| e.tries) {
        None => GOOD.to_string(),
        Some(t) => t.left.to_string(),
    };
    vars.insert(format!("kiln_{s}_tries"), tries);
}

/// systemd-boot's boot counter in an entry's file name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tries {
    pub left: u32,
    pub done: u32,
}

/// Where a slot's entry stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EntryState {
    /// Blessed: it booted and passed its health checks.
    Good,
    /// On trial: booted fewer times than it may be, not blessed yet.
    OnTrial,
    /// No tries left: the loader boots it only when nothing else is there.
    Bad,
}

/// One kiln entry on the ESP: `kiln-<generation>-<slot>[+LEFT[-DONE]].conf`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootEntryName {
    pub generation: u32,
    pub slot: Slot,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tries: Option<Tries>,
}

impl BootEntryName {
    /// A new entry on trial.
    pub fn on_trial(generation: u32, slot: Slot) -> BootEntryName {
        BootEntryName {
            generation,
            slot,
            tries: Some(Tries {
                left: BOOT_TRIES,
                done: 0,
            }),
        }
    }

    /// Parses an entry's file name; `None` for anything kiln did not write.
    pub fn parse(file: &str) -> Option<BootEntryName> {
        let stem = file.strip_suffix(".conf")?.strip_prefix("kiln-")?;
        let (id, counter) = match stem.split_once('+') {
            Some((id, c)) => (id, Some(c)),
            None => (stem, None),
        };
        let (generation, slot) = id.split_once('-')?;
        let generation = generation.parse().ok()?;
        let slot = match slot {
            "a" => Slot::A,
            "b" => Slot::B,
            _ => return None,
        };
        let tries = match counter {
            None => None,
            Some(c) => {
                let (left, done) = match c.split_once('-') {
                    Some((l, d)) => (l.parse().ok()?, d.parse().ok()?),
                    None => (c.parse().ok()?, 0),
                };
                Some(Tries { left, done })
            }
        };
        Some(BootEntryName {
            generation,
            slot,
            tries,
        })
    }

    /// `kiln-2-b`: the entry's id without counter or suffix.
    pub fn id(&self) -> String {
        format!(
            "kiln-{}-{}",
            self.generation,
            self.slot.letter().to_ascii_lowercase()
        )
    }

    pub fn file_name(&self) -> String {
        match self.tries {
            None => format!("{}.conf", self.id()),
            Some(Tries { left, done: 0 }) => format!("{}+{left}.conf", self.id()),
            Some(Tries { left, done }) => format!("{}+{left}-{done}.conf", self.id()),
        }
    }

    /// Its path on the ESP.
    pub fn path(&self) -> String {
        format!("{ENTRY_DIR}/{}", self.file_name())
    }

    pub fn state(&self) -> EntryState {
        match self.tries {
            None => EntryState::Good,
            Some(t) if t.left == 0 => EntryState::Bad,
            Some(_) => EntryState::OnTrial,
        }
    }

    pub fn blessed(&self) -> BootEntryName {
        BootEntryName {
            tries: None,
            ..*self
        }
    }

    pub fn marked_bad(&self) -> BootEntryName {
        let done = self.tries.map(|t| t.left + t.done).unwrap_or(1);
        BootEntryName {
            tries: Some(Tries { left: 0, done }),
            ..*self
        }
    }
}

/// The kiln entries among the file names of the entry directory, newest generation first.
pub fn entries<'a>(files: impl IntoIterator<Item = &'a str>) -> Vec<BootEntryName> {
    let mut out: Vec<BootEntryName> = files.into_iter().filter_map(BootEntryName::parse).collect();
    out.sort_by_key(|e| std::cmp::Reverse(e.generation));
    out
}

/// `slot`'s newest entry.
pub fn slot_entry(entries: &[BootEntryName], slot: Slot) -> Option<&BootEntryName> {
    entries
        .iter()
        .filter(|e| e.slot == slot)
        .max_by_key(|e| e.generation)
}

/// The generation a new or re-promoted entry gets: one above every entry there is.
pub fn next_generation(entries: &[BootEntryName]) -> u32 {
    entries.iter().map(|e| e.generation).max().unwrap_or(0) + 1
}

/// The entry systemd-boot boots next given the default `kiln-*`: the newest that is not bad,
/// else the newest.
pub fn next_boot(entries: &[BootEntryName]) -> Option<&BootEntryName> {
    entries
        .iter()
        .filter(|e| e.state() != EntryState::Bad)
        .max_by_key(|e| e.generation)
        .or_else(|| entries.iter().max_by_key(|e| e.generation))
}

/// The image a slot holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlotImage {
    /// sha256 of the root image written into the slot.
    pub rootfs_sha256: String,
    /// Where it came from (an install medium, a bundle directory or URL).
    pub source: String,
    /// When it was written (RFC 3339).
    pub written: String,
}

/// How the last boot of a slot on trial ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Assessment {
    pub slot: Slot,
    pub generation: u32,
    pub good: bool,
    pub reason: String,
    pub at: String,
}

/// `slots.json`: which image each slot holds and how the last trial ended. It lives on
/// `KILN_STATE`, which both slots share, so the slot a node falls back to can say why.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlotsRecord {
    #[serde(default)]
    pub images: BTreeMap<Slot, SlotImage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_assessment: Option<Assessment>,
}

/// One slot as `kiln node status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlotReport {
    pub slot: Slot,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<EntryState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tries_left: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<SlotImage>,
}

/// The node's A/B state: the booted slot, a slot staged for the next boot, the slot a failure
/// falls back to, and the last assessment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BootStatus {
    pub booted: SlotReport,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staged: Option<SlotReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<SlotReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_boot: Option<Slot>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_assessment: Option<Assessment>,
}

/// The A/B state from the booted slot, the ESP's entries and the record.
pub fn boot_status(booted: Slot, entries: &[BootEntryName], record: &SlotsRecord) -> BootStatus {
    let report = |slot: Slot| {
        let entry = slot_entry(entries, slot);
        SlotReport {
            slot,
            generation: entry.map(|e| e.generation),
            state: entry.map(BootEntryName::state),
            tries_left: entry.and_then(|e| e.tries).map(|t| t.left),
            image: record.images.get(&slot).cloned(),
        }
    };
    let next = next_boot(entries);
    let other = slot_entry(entries, booted.other());
    BootStatus {
        booted: report(booted),
        staged: next
            .filter(|n| n.slot != booted && n.state() == EntryState::OnTrial)
            .map(|n| report(n.slot)),
        rollback: other
            .filter(|o| o.state() == EntryState::Good)
            .map(|o| report(o.slot)),
        next_boot: next.map(|n| n.slot),
        last_assessment: record.last_assessment.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(files: &[&str]) -> Vec<BootEntryName> {
        entries(files.iter().copied())
    }

    #[test]
    fn entry_names_round_trip_with_and_without_counters() {
        for f in [
            "kiln-1-a.conf",
            "kiln-2-b+3.conf",
            "kiln-2-b+2-1.conf",
            "kiln-12-a+0-3.conf",
        ] {
            assert_eq!(BootEntryName::parse(f).unwrap().file_name(), f);
        }
        let e = BootEntryName::parse("kiln-2-b+2-1.conf").unwrap();
        assert_eq!(e.id(), "kiln-2-b");
        assert_eq!(e.state(), EntryState::OnTrial);
        assert_eq!(e.blessed().file_name(), "kiln-2-b.conf");
        assert_eq!(e.marked_bad().file_name(), "kiln-2-b+0-3.conf");
        for other in [
            "kiln-a.conf",
            "kiln-x-a.conf",
            "kiln-1-c.conf",
            "debian.conf",
            "kiln-1-a+x.conf",
        ] {
            assert_eq!(BootEntryName::parse(other), None, "{other}");
        }
    }

    #[test]
    fn the_loader_boots_the_newest_entry_that_is_not_bad() {
        let next = |files: &[&str]| next_boot(&names(files)).map(|e| e.file_name());
        assert_eq!(
            next(&["kiln-1-a.conf", "kiln-2-b+3.conf"]).unwrap(),
            "kiln-2-b+3.conf"
        );
        assert_eq!(
            next(&["kiln-1-a.conf", "kiln-2-b+0-3.conf"]).unwrap(),
            "kiln-1-a.conf"
        );
        // Upgraded back into A: the newer A wins; when it fails, B (the last good) again.
        assert_eq!(
            next(&["kiln-3-a+3.conf", "kiln-2-b.conf"]).unwrap(),
            "kiln-3-a+3.conf"
        );
        assert_eq!(
            next(&["kiln-3-a+0-3.conf", "kiln-2-b.conf"]).unwrap(),
            "kiln-2-b.conf"
        );
        // Generations compare as numbers, as systemd-boot's version sort does.
        assert_eq!(
            next(&["kiln-9-a.conf", "kiln-10-b.conf"]).unwrap(),
            "kiln-10-b.conf"
        );
        // Nothing good left: the loader still boots something.
        assert_eq!(next(&["kiln-1-a+0-3.conf"]).unwrap(), "kiln-1-a+0-3.conf");
        assert_eq!(next(&[]), None);
    }

    #[test]
    fn status_names_the_staged_and_the_rollback_slot() {
        let record = SlotsRecord::default();
        let s = boot_status(
            Slot::A,
            &names(&["kiln-1-a.conf", "kiln-2-b+3.conf"]),
            &record,
        );
        assert_eq!(s.staged.as_ref().map(|r| r.slot), Some(Slot::B));
        assert_eq!(s.next_boot, Some(Slot::B));
        assert_eq!(s.rollback, None, "B is not good yet");
        let s = boot_status(
            Slot::B,
            &names(&["kiln-1-a.conf", "kiln-2-b.conf"]),
            &record,
        );
        assert_eq!(s.staged, None);
        assert_eq!(s.rollback.as_ref().map(|r| r.slot), Some(Slot::A));
        assert_eq!(s.booted.state, Some(EntryState::Good));
    }

    #[test]
    fn grubenv_holds_the_same_entries_as_systemd_boot_files() {
        let mut vars = BTreeMap::new();
        let a = BootEntryName::on_trial(1, Slot::A);
        set_grubenv_entry(&mut vars, Slot::A, Some(&a.blessed()));
        set_grubenv_entry(
            &mut vars,
            Slot::B,
            Some(&BootEntryName::on_trial(2, Slot::B)),
        );
        let text = render_grubenv(&vars);
        assert_eq!(text.len(), 1024);
        assert!(text.starts_with("# GRUB Environment Block\nkiln_a_gen=1\nkiln_a_tries=good\n"));
        let back = grubenv_entries(&parse_grubenv(&text));
        let files: Vec<String> = back.iter().map(BootEntryName::file_name).collect();
        assert_eq!(files, ["kiln-2-b+3.conf", "kiln-1-a.conf"]);
        // GRUB counted two boots; the agent marks it bad.
        vars.insert("kiln_b_tries".into(), "1".into());
        let b = grubenv_entries(&vars)[0];
        assert_eq!(b.tries, Some(Tries { left: 1, done: 2 }));
        set_grubenv_entry(&mut vars, Slot::B, Some(&b.marked_bad()));
        assert_eq!(vars["kiln_b_tries"], "0");
        assert_eq!(next_boot(&grubenv_entries(&vars)).unwrap().slot, Slot::A);
        set_grubenv_entry(&mut vars, Slot::B, None);
        assert_eq!(grubenv_entries(&vars).len(), 1);
    }

    #[test]
    fn grub_cfg_counts_down_and_sources_each_slot() {
        let cfg = grub_cfg();
        assert!(cfg.contains("load_env\n"));
        assert!(cfg.contains(
            "if [ \"$kiln_b_tries\" = 3 ]; then set kiln_b_tries=2; save_env kiln_b_tries\n"
        ));
        assert!(cfg.contains(
            "elif [ \"$kiln_a_tries\" = 1 ]; then set kiln_a_tries=0; save_env kiln_a_tries\n"
        ));
        assert!(cfg.contains("source \"$prefix/kiln-$kiln_slot.cfg\""));
        assert_eq!(
            grub_entry("t", Slot::B, "kiln.slot=B"),
            "menuentry \"t\" --id kiln-b {\n    linux /kiln/b/vmlinuz kiln.slot=B\n    initrd /kiln/b/initrd.img\n}\n"
        );
    }

    #[test]
    fn slot_kernel_args_lead_with_the_slot_and_disk() {
        assert_eq!(
            slot_kernel_args(Slot::B, "G", &["console=ttyS0".into()]).join(" "),
            "kiln.slot=B kiln.disk=G panic=10 console=ttyS0"
        );
    }
}
