//! A/B upgrades of a running node: a signed build goes into the slot the node did not boot
//! from, with a boot entry on trial; the agent blesses or rejects it after the next boot
//! ([`kiln_spec::boot`] has the rules the loader follows).
//!
//! The order of the writes is what keeps the node bootable when power fails at any point:
//! the target slot's old entry goes first (the loader must never pick a half-written slot),
//! then the root image (read back and checked), kernel and initrd, and the new entry last,
//! written under a name the loader ignores and renamed into place. The booted slot and its
//! entry are never touched; `KILN_STATE` is shared and not part of an upgrade.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_spec::boot::{self, BootEntryName, EntryState, SlotImage};
use kiln_spec::layout::{self, Slot};
use kiln_spec::manifest::Manifest;
use kiln_spec::signing::{PublicKey, SIGNATURE_FILE};
use serde::{Deserialize, Serialize};

use crate::blockdev::{BlockDevError, Target};
use crate::stage1::Cmdline;
use crate::tools::{self, Tool, ToolError};

const MDIR: Tool = Tool::new("mdir", "mtools");
const MDEL: Tool = Tool::new("mdel", "mtools");
const MREN: Tool = Tool::new("mren", "mtools");
const MTYPE: Tool = Tool::new("mtype", "mtools");

/// The bundle files an upgrade uses, as the build names them.
pub const ROOTFS: &str = "pxe/rootfs.squashfs";
pub const KERNEL: &str = "pxe/vmlinuz";
pub const INITRD: &str = "pxe/initrd.img";

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error(
        "this system was not booted from an installed slot (no kiln.slot and kiln.disk on its \
         kernel command line): only an installed node can be upgraded"
    )]
    NotInstalled,
    #[error("kiln.disk={0:?} on the kernel command line is not a GUID")]
    BadDisk(String),
    #[error("no partition named {name} on the disk with GPT GUID {disk}")]
    NoPartition {
        disk: uuid::Uuid,
        name: &'static str,
    },
    #[error(
        "the ESP has neither systemd-boot entries nor kiln's GRUB environment (/grub/grubenv): \
         this node was installed before kiln counted boots, and upgrading it could leave it \
         without a fallback; reinstall it"
    )]
    NoBootCounting,
    #[error(
        "slot {slot} is still on trial (generation {generation}, {left} boot(s) left): wait until \
         the agent has blessed it, or roll back, before upgrading; writing slot {other} now \
         would destroy the last good system"
    )]
    BootedOnTrial {
        slot: &'static str,
        other: &'static str,
        generation: u32,
        left: u32,
    },
    #[error(
        "slot {slot} (generation {generation}) failed its health check and the node is about to \
         go back to slot {other}, the last good system: writing slot {other} now would destroy \
         it; upgrade once the node runs slot {other} again"
    )]
    BootedBad {
        slot: &'static str,
        other: &'static str,
        generation: u32,
    },
    #[error(
        "this node trusts no image signing key (its image has nothing in {0}; it was built \
         without --sign-key), so it cannot check an upgrade"
    )]
    NoTrustedKeys(String),
    #[error(
        "this node's image does not take unsigned builds (its spec's upgrade.allowUnsigned is \
         off); sign the build with kiln build --sign-key"
    )]
    UnsignedNotAllowed,
    #[error("{image}: manifest.json is not signed by any of the trusted keys ({keys})")]
    Untrusted { image: String, keys: String },
    #[error("{image}: {reason}")]
    Bundle { image: String, reason: String },
    #[error(transparent)]
    Fetch(#[from] crate::source::SourceError),
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error(transparent)]
    BlockDev(#[from] BlockDevError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("no kiln boot entry for the booted slot {0} on the ESP")]
    NoBootedEntry(&'static str),
    #[error("slot {slot} has no good entry to roll back to ({why})")]
    NothingToRollBackTo { slot: &'static str, why: String },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> UpgradeError {
    let what = what.into();
    move |source| UpgradeError::Io { what, source }
}

/// Which slot the running system booted and from which disk: `kiln.slot` and `kiln.disk`.
pub fn booted(cmdline: &str) -> Result<(Slot, uuid::Uuid), UpgradeError> {
    let c = Cmdline::parse(cmdline);
    let (Some(slot), Some(disk)) = (
        c.get(layout::SLOT_KERNEL_ARG),
        c.get(layout::DISK_KERNEL_ARG),
    ) else {
        return Err(UpgradeError::NotInstalled);
    };
    let slot = match slot {
        "A" => Slot::A,
        "B" => Slot::B,
        _ => return Err(UpgradeError::NotInstalled),
    };
    let guid = disk
        .parse()
        .map_err(|_| UpgradeError::BadDisk(disk.to_string()))?;
    Ok((slot, guid))
}

/// The partitions of the installed disk, by their GPT names.
#[derive(Debug, Clone)]
pub struct NodeDisk {
    pub guid: uuid::Uuid,
    pub esp: PathBuf,
    pub a: PathBuf,
    pub b: PathBuf,
}

impl NodeDisk {
    pub fn find(guid: uuid::Uuid) -> Result<NodeDisk, UpgradeError> {
        let part = |name: &'static str| {
            crate::stage1::find_partition(&guid, name)
                .ok_or(UpgradeError::NoPartition { disk: guid, name })
        };
        Ok(NodeDisk {
            guid,
            esp: part(layout::ESP)?,
            a: part(layout::KILN_A)?,
            b: part(layout::KILN_B)?,
        })
    }

    pub fn slot(&self, slot: Slot) -> &Path {
        match slot {
            Slot::A => &self.a,
            Slot::B => &self.b,
        }
    }

    pub fn esp(&self) -> Esp {
        Esp {
            image: tools::mtools_image(&self.esp, 0),
        }
    }
}

/// The ESP of a running node, through mtools: nothing mounts it, so nothing caches it.
#[derive(Debug, Clone)]
pub struct Esp {
    image: String,
}

impl Esp {
    pub fn at(path: &Path, offset: u64) -> Esp {
        Esp {
            image: tools::mtools_image(path, offset),
        }
    }

    fn on(&self, path: &str) -> String {
        format!("::{path}")
    }

    pub fn exists(&self, path: &str) -> bool {
        tools::run(
            MDIR,
            "listing the ESP",
            ["-b", "-i", &self.image, &self.on(path)],
        )
        .is_ok()
    }

    /// The names in directory `dir`.
    pub fn list(&self, dir: &str) -> Result<Vec<String>, ToolError> {
        let out = tools::run(
            MDIR,
            "listing the ESP",
            ["-b", "-i", &self.image, &self.on(dir)],
        )?;
        Ok(out
            .lines()
            .filter_map(|l| l.trim().rsplit('/').next())
            .filter(|n| !n.is_empty())
            .map(str::to_string)
            .collect())
    }

    pub fn read(&self, path: &str) -> Result<String, ToolError> {
        tools::run(
            MTYPE,
            "reading from the ESP",
            ["-i", &self.image, &self.on(path)],
        )
    }

    /// Makes `dir` unless it exists.
    pub fn make_dir(&self, dir: &str) -> Result<(), ToolError> {
        if self.exists(dir) {
            return Ok(());
        }
        tools::run(
            tools::MMD,
            "creating a directory on the ESP",
            ["-i", &self.image, &self.on(dir)],
        )
        .map(drop)
    }

    pub fn copy(&self, src: &Path, path: &str) -> Result<(), ToolError> {
        tools::run(
            tools::MCOPY,
            "copying onto the ESP",
            [
                "-o".to_string(),
                "-i".into(),
                self.image.clone(),
                src.display().to_string(),
                self.on(path),
            ],
        )
        .map(drop)
    }

    pub fn delete(&self, path: &str) -> Result<(), ToolError> {
        tools::run(
            MDEL,
            "deleting from the ESP",
            ["-i", &self.image, &self.on(path)],
        )
        .map(drop)
    }

    /// Renames `path` to `name` in the same directory, replacing what has that name.
    pub fn rename(&self, path: &str, name: &str) -> Result<(), ToolError> {
        tools::run(
            MREN,
            "renaming on the ESP",
            ["-D", "o", "-i", &self.image, &self.on(path), name],
        )
        .map(drop)
    }

    /// Writes `path` so it appears whole or not at all: under another name first (one no
    /// loader reads), then renamed over it.
    pub fn write(&self, path: &str, text: &str) -> Result<(), UpgradeError> {
        let mut src = tempfile::NamedTempFile::new().map_err(io_err("making a staging file"))?;
        use std::io::Write;
        src.write_all(text.as_bytes())
            .and_then(|()| src.flush())
            .map_err(io_err("writing a staging file"))?;
        let tmp = format!("{path}.new");
        self.copy(src.path(), &tmp)?;
        let name = path.rsplit('/').next().unwrap_or(path);
        self.rename(&tmp, name)?;
        Ok(())
    }
}

/// The boot menu of an installed node, whichever loader reads it: systemd-boot's entry files
/// (UEFI) or kiln's `grubenv` and per-slot menu files (GRUB, BIOS). Both hold the same
/// [`BootEntryName`]s and follow the same rules.
#[derive(Debug, Clone)]
pub enum BootMenu {
    SystemdBoot(Esp),
    Grub(Esp),
}

impl BootMenu {
    /// The menu on `esp`; refuses an ESP without boot counting (a GRUB install made before
    /// kiln counted GRUB boots).
    pub fn on(esp: Esp) -> Result<BootMenu, UpgradeError> {
        if esp.exists(boot::ENTRY_DIR) {
            Ok(BootMenu::SystemdBoot(esp))
        } else if esp.exists(boot::GRUBENV) {
            Ok(BootMenu::Grub(esp))
        } else {
            Err(UpgradeError::NoBootCounting)
        }
    }

    fn grubenv(esp: &Esp) -> Result<std::collections::BTreeMap<String, String>, ToolError> {
        Ok(boot::parse_grubenv(&esp.read(boot::GRUBENV)?))
    }

    /// The kiln entries, newest generation first.
    pub fn entries(&self) -> Result<Vec<BootEntryName>, ToolError> {
        match self {
            BootMenu::SystemdBoot(esp) => {
                let names = esp.list(boot::ENTRY_DIR)?;
                Ok(boot::entries(names.iter().map(String::as_str)))
            }
            BootMenu::Grub(esp) => Ok(boot::grubenv_entries(&Self::grubenv(esp)?)),
        }
    }

    fn set_grub(esp: &Esp, slot: Slot, entry: Option<&BootEntryName>) -> Result<(), UpgradeError> {
        let mut vars = Self::grubenv(esp)?;
        boot::set_grubenv_entry(&mut vars, slot, entry);
        esp.write(boot::GRUBENV, &boot::render_grubenv(&vars))
    }

    /// Adds `entry`, booting `entry.slot` with `options`.
    pub fn add(
        &self,
        entry: &BootEntryName,
        title: &str,
        options: &str,
    ) -> Result<(), UpgradeError> {
        match self {
            BootMenu::SystemdBoot(esp) => {
                esp.write(&entry.path(), &boot::entry_conf(title, entry.slot, options))
            }
            BootMenu::Grub(esp) => {
                esp.write(
                    &boot::grub_entry_path(entry.slot),
                    &boot::grub_entry(title, entry.slot, options),
                )?;
                Self::set_grub(esp, entry.slot, Some(entry))
            }
        }
    }

    /// Replaces `from` by `to` (blessed, marked bad, a new generation).
    pub fn set(&self, from: &BootEntryName, to: &BootEntryName) -> Result<(), UpgradeError> {
        if from == to {
            return Ok(());
        }
        match self {
            BootMenu::SystemdBoot(esp) => Ok(esp.rename(&from.path(), &to.file_name())?),
            BootMenu::Grub(esp) => Self::set_grub(esp, to.slot, Some(to)),
        }
    }

    /// Removes `entry`: nothing boots its slot any more.
    pub fn remove(&self, entry: &BootEntryName) -> Result<(), UpgradeError> {
        match self {
            BootMenu::SystemdBoot(esp) => Ok(esp.delete(&entry.path())?),
            BootMenu::Grub(esp) => Self::set_grub(esp, entry.slot, None),
        }
    }

    pub fn esp(&self) -> &Esp {
        match self {
            BootMenu::SystemdBoot(esp) | BootMenu::Grub(esp) => esp,
        }
    }
}

/// Where the new image comes from: a build's output directory, or its URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    Dir(PathBuf),
    Url(String),
}

impl ImageRef {
    pub fn parse(s: &str) -> ImageRef {
        if s.starts_with("http://") || s.starts_with("https://") {
            ImageRef::Url(s.trim_end_matches('/').to_string())
        } else {
            ImageRef::Dir(PathBuf::from(s))
        }
    }

    pub fn describe(&self) -> String {
        match self {
            ImageRef::Dir(d) => d.display().to_string(),
            ImageRef::Url(u) => u.clone(),
        }
    }
}

/// The trusted public keys in `dir` (`*.pub`), with their fingerprints.
pub fn trusted_keys(dir: &Path) -> Result<Vec<PublicKey>, UpgradeError> {
    let none = || UpgradeError::NoTrustedKeys(dir.display().to_string());
    let Ok(read) = std::fs::read_dir(dir) else {
        return Err(none());
    };
    let mut keys = Vec::new();
    for e in read.flatten() {
        let path = e.path();
        if path.extension().is_some_and(|x| x == "pub")
            && let Ok(text) = std::fs::read_to_string(&path)
            && let Ok(key) = PublicKey::from_pem(&text)
        {
            keys.push(key);
        }
    }
    if keys.is_empty() {
        return Err(none());
    }
    Ok(keys)
}

/// A bundle whose manifest verified, with its kernel, initrd and root image at hand.
#[derive(Debug, Clone)]
pub struct VerifiedImage {
    pub source: ImageRef,
    pub manifest: Manifest,
    pub signed_by: String,
    pub rootfs: PathBuf,
    pub rootfs_sha256: String,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// What a bundle's manifest must show before anything in it is believed.
#[derive(Debug, Clone)]
pub struct Trust {
    /// A signature by one of these keys.
    pub keys: Vec<PublicKey>,
    /// Or no signature at all (the running image's spec allows unsigned builds and the
    /// operator asked for one). A signature that is there must still verify.
    pub unsigned_ok: bool,
}

impl Trust {
    /// Signed by one of `keys`, nothing else.
    pub fn signed_by(keys: Vec<PublicKey>) -> Trust {
        Trust {
            keys,
            unsigned_ok: false,
        }
    }
}

/// The signer named for a build taken without a signature.
pub const UNSIGNED: &str = "nobody (unsigned, allowed by the node's spec)";

/// A manifest whose signature verified, and the fingerprint of the key that signed it.
#[derive(Debug, Clone)]
pub struct SignedManifest {
    pub manifest: Manifest,
    pub signed_by: String,
}

/// Reads (or downloads) a bundle's manifest and its signature and checks them against
/// `trust`. Nothing in the manifest is believed before that.
pub fn fetch_manifest(
    source: &ImageRef,
    trust: &Trust,
    patience: Duration,
) -> Result<SignedManifest, UpgradeError> {
    let bundle = |reason: String| UpgradeError::Bundle {
        image: source.describe(),
        reason,
    };
    let (json, signature) = match source {
        ImageRef::Dir(dir) => {
            let read = |name: &str| {
                std::fs::read(dir.join(name)).map_err(|e| bundle(format!("reading {name}: {e}")))
            };
            (read("manifest.json")?, read(SIGNATURE_FILE))
        }
        ImageRef::Url(url) => {
            let get = |name: &str| {
                crate::source::fetch_bytes(&format!("{url}/{name}"), None, patience)
                    .map_err(UpgradeError::from)
            };
            (get("manifest.json")?, get(SIGNATURE_FILE))
        }
    };
    let signed_by = match signature {
        Ok(signature) => trust
            .keys
            .iter()
            .find(|k| k.verify(&json, &signature).is_ok())
            .ok_or_else(|| UpgradeError::Untrusted {
                image: source.describe(),
                keys: trust
                    .keys
                    .iter()
                    .map(PublicKey::fingerprint)
                    .collect::<Vec<_>>()
                    .join(", "),
            })?
            .fingerprint(),
        Err(_) if trust.unsigned_ok => UNSIGNED.to_string(),
        Err(e) => return Err(e),
    };
    let manifest: Manifest =
        serde_json::from_slice(&json).map_err(|e| bundle(format!("manifest.json: {e}")))?;
    Ok(SignedManifest {
        manifest,
        signed_by,
    })
}

/// Reads (or downloads into `staging`) the manifest and its signature, checks them against
/// `trust`, then gets the kernel, initrd and root image, each checked against the manifest.
/// Nothing is believed before the signature checks; nothing is written to the node's disk.
pub fn fetch_and_verify(
    source: &ImageRef,
    trust: &Trust,
    staging: &Path,
    patience: Duration,
) -> Result<VerifiedImage, UpgradeError> {
    let bundle = |reason: String| UpgradeError::Bundle {
        image: source.describe(),
        reason,
    };
    let SignedManifest {
        manifest,
        signed_by,
    } = fetch_manifest(source, trust, patience)?;
    let sha = |path: &str| {
        manifest
            .sha256_of(path)
            .map(str::to_string)
            .ok_or_else(|| bundle(format!("the manifest lists no {path}")))
    };
    let (rootfs_sha, kernel_sha, initrd_sha) = (sha(ROOTFS)?, sha(KERNEL)?, sha(INITRD)?);
    let local = |rel: &str, want: &str, check: bool| -> Result<PathBuf, UpgradeError> {
        match source {
            ImageRef::Dir(dir) => {
                let path = dir.join(rel);
                if check {
                    let got = file_sha256(&path).map_err(|e| bundle(e.to_string()))?;
                    if got != want {
                        return Err(bundle(format!(
                            "{rel}: sha256 {got}, the manifest says {want}"
                        )));
                    }
                }
                Ok(path)
            }
            ImageRef::Url(url) => {
                let dest = staging.join(rel.rsplit('/').next().unwrap_or(rel));
                crate::source::fetch_verified(&format!("{url}/{rel}"), want, &dest, patience)?;
                Ok(dest)
            }
        }
    };
    Ok(VerifiedImage {
        source: source.clone(),
        signed_by,
        kernel: local(KERNEL, &kernel_sha, true)?,
        initrd: local(INITRD, &initrd_sha, true)?,
        // The slot write hashes the root image as it goes and refuses a mismatch.
        rootfs: local(ROOTFS, &rootfs_sha, false)?,
        rootfs_sha256: rootfs_sha,
        manifest,
    })
}

fn file_sha256(path: &Path) -> Result<String, UpgradeError> {
    let f = std::fs::File::open(path).map_err(io_err(format!("opening {}", path.display())))?;
    let (_, sha256) = kiln_spec::manifest::sha256_stream(f)
        .map_err(io_err(format!("reading {}", path.display())))?;
    Ok(sha256)
}

/// What an upgrade will do, decided before anything is written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpgradePlan {
    pub booted: Slot,
    pub target: Slot,
    /// Entries of the target slot that go first (its old image is overwritten).
    pub removes: Vec<BootEntryName>,
    pub entry: BootEntryName,
    pub options: String,
    pub steps: Vec<String>,
}

/// Whether the other slot may be written: not while the booted slot is itself on trial, as
/// its fallback is the other slot, which the upgrade would overwrite.
pub fn check_booted(booted: Slot, entries: &[BootEntryName]) -> Result<(), UpgradeError> {
    let current =
        boot::slot_entry(entries, booted).ok_or(UpgradeError::NoBootedEntry(booted.letter()))?;
    if let (EntryState::OnTrial, Some(t)) = (current.state(), current.tries) {
        return Err(UpgradeError::BootedOnTrial {
            slot: booted.letter(),
            other: booted.other().letter(),
            generation: current.generation,
            left: t.left,
        });
    }
    let fallback = boot::slot_entry(entries, booted.other());
    if current.state() == EntryState::Bad && fallback.is_some_and(|e| e.state() == EntryState::Good)
    {
        return Err(UpgradeError::BootedBad {
            slot: booted.letter(),
            other: booted.other().letter(),
            generation: current.generation,
        });
    }
    Ok(())
}

/// Plans writing an image into the slot the node did not boot ([`check_booted`] first).
pub fn plan(
    booted: Slot,
    entries: &[BootEntryName],
    disk_guid: &uuid::Uuid,
    kernel_args: &[String],
    rootfs_sha256: &str,
) -> Result<UpgradePlan, UpgradeError> {
    check_booted(booted, entries)?;
    let target = booted.other();
    let generation = boot::next_generation(entries);
    let entry = BootEntryName::on_trial(generation, target);
    let removes: Vec<BootEntryName> = entries
        .iter()
        .filter(|e| e.slot == target)
        .copied()
        .collect();
    let options =
        boot::slot_kernel_args(target, &disk_guid.hyphenated().to_string(), kernel_args).join(" ");
    let mut steps = Vec::new();
    if !removes.is_empty() {
        steps.push(format!(
            "remove slot {}'s boot entries ({}) so nothing boots it while it is written",
            target.letter(),
            removes
                .iter()
                .map(BootEntryName::file_name)
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    steps.push(format!(
        "write the root image (sha256 {rootfs_sha256}) into {} and verify it by reading it back",
        target.gpt_name()
    ));
    steps.push(format!(
        "copy the kernel and initrd to {} on the ESP",
        target.esp_dir()
    ));
    steps.push(format!(
        "add slot {}'s boot entry (generation {generation}, {} tries): the next boot tries slot {}, \
         and slot {} stays the fallback until the agent blesses the new one",
        target.letter(),
        boot::BOOT_TRIES,
        target.letter(),
        booted.letter(),
    ));
    Ok(UpgradePlan {
        booted,
        target,
        removes,
        entry,
        options,
        steps,
    })
}

/// Progress of an upgrade being applied.
#[derive(Debug, Clone, PartialEq)]
pub enum UpgradeProgress {
    Step(String),
    Bytes { done: u64, total: u64 },
}

/// Applies `plan` with `image`; the record of what the target slot now holds.
pub fn apply(
    plan: &UpgradePlan,
    image: &VerifiedImage,
    disk: &NodeDisk,
    menu: &BootMenu,
    title: &str,
    progress: &mut dyn FnMut(UpgradeProgress),
) -> Result<SlotImage, UpgradeError> {
    let mut step = 0;
    let mut say = |progress: &mut dyn FnMut(UpgradeProgress)| {
        if let Some(s) = plan.steps.get(step) {
            progress(UpgradeProgress::Step(s.clone()));
        }
        step += 1;
    };
    if !plan.removes.is_empty() {
        say(progress);
        for e in &plan.removes {
            menu.remove(e)?;
        }
    }
    say(progress);
    let part = disk.slot(plan.target);
    let target = Target::open(part)?;
    let written = target.write_image_verified(
        &image.rootfs,
        0,
        target.size(),
        Some(&image.rootfs_sha256),
        |done, total| progress(UpgradeProgress::Bytes { done, total }),
    )?;
    say(progress);
    let esp = menu.esp();
    let dir = plan.target.esp_dir();
    esp.make_dir(&dir)?;
    esp.copy(&image.kernel, &format!("{dir}/vmlinuz"))?;
    esp.copy(&image.initrd, &format!("{dir}/initrd.img"))?;
    say(progress);
    menu.add(&plan.entry, title, &plan.options)?;
    Ok(SlotImage {
        rootfs_sha256: written.sha256,
        source: image.source.describe(),
        written: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
    })
}

/// Makes the other slot the default: its good entry gets the next generation. Refuses when
/// the other slot has no good entry (never booted healthy, or overwritten).
pub fn rollback(booted: Slot, menu: &BootMenu) -> Result<BootEntryName, UpgradeError> {
    let entries = menu.entries()?;
    let other = booted.other();
    let Some(entry) = boot::slot_entry(&entries, other) else {
        return Err(UpgradeError::NothingToRollBackTo {
            slot: other.letter(),
            why: "it has no boot entry".into(),
        });
    };
    if entry.state() != EntryState::Good {
        return Err(UpgradeError::NothingToRollBackTo {
            slot: other.letter(),
            why: format!("its entry {} is {:?}", entry.file_name(), entry.state()),
        });
    }
    let to = BootEntryName {
        generation: boot::next_generation(&entries),
        ..*entry
    };
    menu.set(entry, &to)?;
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(files: &[&str]) -> Vec<BootEntryName> {
        boot::entries(files.iter().copied())
    }

    const GUID: &str = "6b696c6e-0000-4000-8000-000000000001";

    #[test]
    fn the_booted_slot_comes_from_the_command_line() {
        let (slot, disk) = booted(&format!("kiln.slot=B kiln.disk={GUID} quiet")).unwrap();
        assert_eq!((slot, disk.to_string()), (Slot::B, GUID.to_string()));
        assert!(matches!(
            booted("kiln.root=live:KILN"),
            Err(UpgradeError::NotInstalled)
        ));
        assert!(matches!(
            booted("kiln.slot=A kiln.disk=x"),
            Err(UpgradeError::BadDisk(_))
        ));
    }

    #[test]
    fn an_upgrade_goes_into_the_other_slot_with_the_next_generation() {
        let guid: uuid::Uuid = GUID.parse().unwrap();
        let p = plan(
            Slot::A,
            &names(&["kiln-1-a.conf"]),
            &guid,
            &["console=ttyS0".into()],
            "ab",
        )
        .unwrap();
        assert_eq!(p.target, Slot::B);
        assert_eq!(p.entry.file_name(), "kiln-2-b+3.conf");
        assert!(p.removes.is_empty());
        assert_eq!(
            p.options,
            format!("kiln.slot=B kiln.disk={GUID} panic=10 console=ttyS0")
        );
        assert_eq!(p.steps.len(), 3);
        // Back into A from a good B: A's old entry goes first.
        let p = plan(
            Slot::B,
            &names(&["kiln-1-a.conf", "kiln-2-b.conf"]),
            &guid,
            &[],
            "cd",
        )
        .unwrap();
        assert_eq!(p.entry.file_name(), "kiln-3-a+3.conf");
        assert_eq!(p.removes, names(&["kiln-1-a.conf"]));
        assert!(p.steps[0].starts_with("remove slot A's boot entries"));
        // A bad B is overwritten the same way.
        let p = plan(
            Slot::A,
            &names(&["kiln-1-a.conf", "kiln-2-b+0-3.conf"]),
            &guid,
            &[],
            "x",
        )
        .unwrap();
        assert_eq!(p.entry.file_name(), "kiln-3-b+3.conf");
    }

    #[test]
    fn no_upgrade_while_the_booted_slot_is_on_trial() {
        let guid: uuid::Uuid = GUID.parse().unwrap();
        let e = plan(
            Slot::B,
            &names(&["kiln-1-a.conf", "kiln-2-b+2-1.conf"]),
            &guid,
            &[],
            "x",
        )
        .unwrap_err();
        assert!(
            matches!(e, UpgradeError::BootedOnTrial { left: 2, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("would destroy the last good system"));
    }

    #[test]
    fn no_upgrade_over_the_last_good_slot_from_a_bad_one() {
        let guid: uuid::Uuid = GUID.parse().unwrap();
        let e = plan(
            Slot::A,
            &names(&["kiln-2-b.conf", "kiln-3-a+0-3.conf"]),
            &guid,
            &[],
            "x",
        )
        .unwrap_err();
        assert!(
            matches!(e, UpgradeError::BootedBad { generation: 3, .. }),
            "{e}"
        );
        // Without a good slot to go back to, writing the other one is the way out.
        let p = plan(
            Slot::A,
            &names(&["kiln-2-b+0-3.conf", "kiln-3-a+0-3.conf"]),
            &guid,
            &[],
            "x",
        )
        .unwrap();
        assert_eq!(p.target, Slot::B);
    }

    #[test]
    fn image_refs_are_urls_or_directories() {
        assert_eq!(
            ImageRef::parse("http://10.0.2.2:8080/v2/"),
            ImageRef::Url("http://10.0.2.2:8080/v2".into())
        );
        assert_eq!(ImageRef::parse("/srv/v2"), ImageRef::Dir("/srv/v2".into()));
    }
}
