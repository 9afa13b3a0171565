//! Carrying out a plan, crash-safely.
//!
//! 1. The journal (the list of actions) is written before anything changes.
//! 2. Every path, account and unit kiln is about to create or take over is added to the
//!    record, and adopted files are backed up, before the first change: after a crash the
//!    record already owns whatever may exist, so nothing kiln made is left unmanaged.
//! 3. Actions run in order; each is idempotent (files by write-to-temp + fsync + rename).
//! 4. Touched directories are synced, the record drops what was removed, the journal goes.
//!
//! A restart after a crash finds the journal, reports the interrupted apply and simply plans
//! again: the level-triggered loop converges from whatever state the crash left.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::desired::{Desired, digest};
use crate::host::Host;
use crate::plan::{Action, ManagedPath, ManagedUser, Record};
use crate::sysroot::{self, Meta, Sysroot};

/// `KILN_AGENT_FAILPOINT=apply-abort-after:N` aborts the process after the N-th action of an
/// apply: the crash tests' hook.
pub const FAILPOINT_ENV: &str = "KILN_AGENT_FAILPOINT";

const RECORD: &str = "record.json";
const JOURNAL: &str = "journal.json";
const BACKUPS: &str = "backups";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{path} is corrupt: {message}")]
    Corrupt { path: PathBuf, message: String },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StateError + use<> {
    let path = path.to_path_buf();
    move |source| StateError::Io { op, path, source }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    pub started: String,
    pub actions: Vec<Action>,
}

/// The agent's files under `/var/lib/kiln/agent`.
#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    pub fn new(root: &Sysroot) -> StateStore {
        StateStore {
            dir: root.state_path(""),
        }
    }

    fn read_json<T: for<'de> Deserialize<'de>>(&self, name: &str) -> Result<Option<T>, StateError> {
        let path = self.dir.join(name);
        match fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| StateError::Corrupt {
                    path,
                    message: e.to_string(),
                }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("reading", &path)(e)),
        }
    }

    fn write_json<T: Serialize>(&self, name: &str, value: &T) -> Result<(), StateError> {
        fs::create_dir_all(&self.dir).map_err(io_err("creating", &self.dir))?;
        let path = self.dir.join(name);
        let bytes = serde_json::to_vec_pretty(value).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            message: e.to_string(),
        })?;
        sysroot::write_atomic(
            &path,
            &bytes,
            Meta {
                mode: 0o600,
                uid: 0,
                gid: 0,
            },
        )
        .map_err(io_err("writing", &path))?;
        sysroot::sync_dir(&self.dir).map_err(io_err("syncing", &self.dir))
    }

    pub fn record(&self) -> Result<Record, StateError> {
        Ok(self.read_json(RECORD)?.unwrap_or_default())
    }

    pub fn save_record(&self, r: &Record) -> Result<(), StateError> {
        self.write_json(RECORD, r)
    }

    pub fn journal(&self) -> Result<Option<Journal>, StateError> {
        self.read_json(JOURNAL)
    }

    fn clear_journal(&self) -> Result<(), StateError> {
        let path = self.dir.join(JOURNAL);
        match fs::remove_file(&path) {
            Ok(()) => sysroot::sync_dir(&self.dir).map_err(io_err("syncing", &self.dir)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("removing", &path)(e)),
        }
    }

    /// Finishes an interrupted apply: returns its journal (for the status) and clears it.
    pub fn recover(&self) -> Result<Option<Journal>, StateError> {
        let j = self.journal()?;
        if j.is_some() {
            self.clear_journal()?;
        }
        Ok(j)
    }

    fn backup_path(&self, host_path: &str) -> PathBuf {
        self.dir.join(BACKUPS).join(digest(&[host_path.as_bytes()]))
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub done: Vec<Action>,
    pub failed: Vec<(Action, String)>,
}

fn failpoint() -> Option<usize> {
    let v = std::env::var(FAILPOINT_ENV).ok()?;
    v.strip_prefix("apply-abort-after:")?.parse().ok()
}

fn missing_ancestors(root: &Sysroot, path: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = path;
    while let Some(i) = cur.rfind('/') {
        cur = &cur[..i];
        if cur.is_empty() || root.path(cur).exists() {
            break;
        }
        out.push(cur.to_string());
    }
    out.reverse();
    out
}

/// Runs `actions` (from [`crate::plan::plan`]) against the host. Individual failures are
/// collected in the outcome; an error is returned only when kiln's own state cannot be kept.
pub fn apply(
    host: &Host,
    store: &StateStore,
    desired: &Desired,
    actions: &[Action],
) -> Result<Outcome, StateError> {
    let stored = store.record()?;
    let mut record = stored.clone();
    prune(host, desired, &mut record);
    if actions.is_empty() {
        if record != stored {
            store.save_record(&record)?;
        }
        return Ok(Outcome::default());
    }
    store.write_json(
        JOURNAL,
        &Journal {
            started: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            actions: actions.to_vec(),
        },
    )?;
    claim(host, store, &mut record, actions)?;
    // A repair of paths kiln already owns claims nothing new: no record write needed.
    if record != stored {
        store.save_record(&record)?;
    }
    let claimed = record.clone();

    let abort_after = failpoint();
    let mut outcome = Outcome::default();
    let mut dirs: BTreeSet<PathBuf> = BTreeSet::new();
    for (n, action) in actions.iter().enumerate() {
        match run(host, store, desired, &mut record, action, &mut dirs) {
            Ok(()) => outcome.done.push(action.clone()),
            Err(e) => {
                tracing::warn!("{action}: {e}");
                outcome.failed.push((action.clone(), e.to_string()));
            }
        }
        if abort_after == Some(n + 1) {
            tracing::error!(
                "failpoint {FAILPOINT_ENV}: aborting after {} action(s)",
                n + 1
            );
            std::process::abort();
        }
    }
    for d in &dirs {
        if d.exists() {
            sysroot::sync_dir(d).map_err(io_err("syncing", d))?;
        }
    }
    if record != claimed {
        store.save_record(&record)?;
    }
    store.clear_journal()?;
    Ok(outcome)
}

/// Drops record entries for things that are neither desired nor there any more, and adopted
/// directories that left the config (they stay on disk, unmanaged again).
fn prune(host: &Host, desired: &Desired, record: &mut Record) {
    let needed = crate::plan::needed_paths(desired);
    record.paths.retain(|p, m| {
        needed.contains(p.as_str())
            || (host.sysroot.stat(p).ok().flatten().is_some() && !(m.dir && m.adopted))
    });
    record.sysctls.retain(|key, original| {
        desired.sysctls.contains_key(key)
            || original
                .as_ref()
                .is_some_and(|o| host.sysctls.read(key).ok().flatten().as_deref() != Some(o.trim()))
    });
}

/// Step 2 of the protocol: own everything about to be created before creating it.
fn claim(
    host: &Host,
    store: &StateStore,
    record: &mut Record,
    actions: &[Action],
) -> Result<(), StateError> {
    for a in actions {
        match a {
            Action::WriteFile { path, .. } | Action::CreateDir { path } => {
                for dir in missing_ancestors(&host.sysroot, path) {
                    record.paths.entry(dir).or_insert(ManagedPath {
                        dir: true,
                        implicit: true,
                        ..ManagedPath::default()
                    });
                }
                let is_dir = matches!(a, Action::CreateDir { .. });
                match record.paths.get_mut(path) {
                    Some(m) if m.dir == is_dir => continue,
                    // Kiln's own path changes type: the plan removes the old one first.
                    Some(m) => {
                        *m = ManagedPath {
                            dir: is_dir,
                            ..ManagedPath::default()
                        };
                        continue;
                    }
                    None => {}
                }
                let mut m = ManagedPath {
                    dir: is_dir,
                    ..ManagedPath::default()
                };
                let full = host.sysroot.path(path);
                if let Ok(existing) = fs::symlink_metadata(&full) {
                    m.adopted = true;
                    if existing.is_file() {
                        let backup = store.backup_path(path);
                        let dir = backup.parent().unwrap_or(Path::new("/"));
                        fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
                        let content = fs::read(&full).map_err(io_err("reading", &full))?;
                        sysroot::write_atomic(&backup, &content, Meta::of(&existing))
                            .map_err(io_err("backing up", &backup))?;
                        m.backup = Some(
                            backup
                                .file_name()
                                .unwrap_or_default()
                                .to_string_lossy()
                                .into_owned(),
                        );
                    }
                }
                record.paths.insert(path.clone(), m);
            }
            Action::CreateUser { name } => {
                record
                    .users
                    .insert(name.clone(), ManagedUser { created: true });
            }
            Action::ModifyUser { name } => {
                record.users.entry(name.clone()).or_default();
            }
            Action::EnableUnit { unit } => {
                record
                    .units
                    .entry(unit.clone())
                    .or_default()
                    .enabled_by_kiln = true;
            }
            Action::SetSysctl { key, .. } if !record.sysctls.contains_key(key) => {
                let before = host.sysctls.read(key).ok().flatten();
                record.sysctls.insert(key.clone(), before);
            }
            _ => {}
        }
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
enum ActionError {
    #[error(transparent)]
    Host(#[from] crate::host::HostError),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Other(String),
}

fn meta_for(host: &Host, mode: u32, owner: &str) -> Result<Meta, ActionError> {
    let db = host.sysroot.accounts()?;
    let (uid, gid) = db
        .resolve_owner(owner)
        .ok_or_else(|| ActionError::Other(format!("owner {owner} does not exist on this host")))?;
    Ok(Meta { mode, uid, gid })
}

fn create_parents(host: &Host, path: &str, dirs: &mut BTreeSet<PathBuf>) -> io::Result<()> {
    for d in missing_ancestors(&host.sysroot, path) {
        let full = host.sysroot.path(&d);
        fs::create_dir(&full)?;
        if let Some(p) = full.parent() {
            dirs.insert(p.to_path_buf());
        }
    }
    Ok(())
}

/// Drops a removed path from the record unless the entry already stands for its replacement
/// of the other type.
fn forget(record: &mut Record, path: &str, dir: bool) {
    if record.paths.get(path).is_some_and(|m| m.dir == dir) {
        record.paths.remove(path);
    }
}

fn run(
    host: &Host,
    store: &StateStore,
    desired: &Desired,
    record: &mut Record,
    action: &Action,
    dirs: &mut BTreeSet<PathBuf>,
) -> Result<(), ActionError> {
    let root = &host.sysroot;
    match action {
        Action::CreateUser { name } | Action::ModifyUser { name } => {
            let u = desired
                .users
                .get(name)
                .ok_or_else(|| ActionError::Other(format!("user {name} is no longer desired")))?;
            if matches!(action, Action::CreateUser { .. }) {
                host.accounts.create(name, u)?;
            } else {
                host.accounts.modify(name, u)?;
            }
        }
        Action::RemoveUser { name, remove_home } => {
            host.accounts.remove(name, *remove_home)?;
            record.users.remove(name);
        }
        Action::CreateDir { path } => {
            let d = desired
                .dirs
                .get(path)
                .ok_or_else(|| ActionError::Other(format!("{path} is no longer desired")))?;
            let meta = meta_for(host, d.mode, &d.owner)?;
            create_parents(host, path, dirs)?;
            let full = root.path(path);
            match fs::create_dir(&full) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && full.is_dir() => {}
                Err(e) => return Err(e.into()),
            }
            sysroot::set_meta(&full, meta)?;
            if let Some(p) = full.parent() {
                dirs.insert(p.to_path_buf());
            }
        }
        Action::WriteFile { path, .. } => {
            let f = desired
                .files
                .get(path)
                .ok_or_else(|| ActionError::Other(format!("{path} is no longer desired")))?;
            let meta = meta_for(host, f.mode, &f.owner)?;
            create_parents(host, path, dirs)?;
            let full = root.path(path);
            if full.is_dir() {
                return Err(ActionError::Other(format!("{path} is a directory")));
            }
            sysroot::write_atomic(&full, f.content.as_bytes(), meta)?;
            if let Some(p) = full.parent() {
                dirs.insert(p.to_path_buf());
            }
        }
        Action::SetMeta { path } => {
            let (mode, owner) = match (desired.files.get(path), desired.dirs.get(path)) {
                (Some(f), _) => (f.mode, f.owner.as_str()),
                (_, Some(d)) => (d.mode, d.owner.as_str()),
                _ => return Err(ActionError::Other(format!("{path} is no longer desired"))),
            };
            sysroot::set_meta(&root.path(path), meta_for(host, mode, owner)?)?;
        }
        Action::RemoveFile { path } => {
            let full = root.path(path);
            let m = record.paths.get(path).cloned().unwrap_or_default();
            match m.backup.as_ref().map(|b| store.dir.join(BACKUPS).join(b)) {
                Some(backup) if backup.exists() => {
                    let content = fs::read(&backup)?;
                    let meta = Meta::of(&fs::metadata(&backup)?);
                    sysroot::write_atomic(&full, &content, meta)?;
                    fs::remove_file(&backup)?;
                }
                _ => match fs::remove_file(&full) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e.into()),
                },
            }
            if let Some(p) = full.parent() {
                dirs.insert(p.to_path_buf());
            }
            forget(record, path, false);
        }
        Action::RemoveDir { path } => {
            let full = root.path(path);
            match fs::remove_dir(&full) {
                Ok(()) => forget(record, path, true),
                Err(e) if e.kind() == io::ErrorKind::NotFound => forget(record, path, true),
                // Something kiln does not manage lives in it: keep it, unmanaged.
                Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty => {
                    tracing::info!("keeping {path}: it holds files kiln does not manage");
                    forget(record, path, true);
                }
                Err(e) => return Err(e.into()),
            }
            if let Some(p) = full.parent() {
                dirs.insert(p.to_path_buf());
            }
        }
        Action::DaemonReload => host.services.daemon_reload()?,
        Action::EnableUnit { unit } => host.services.set_enabled(unit, true)?,
        Action::DisableUnit { unit } => {
            host.services.set_enabled(unit, false)?;
            if !desired.units.contains_key(unit) {
                record.units.remove(unit);
            } else if let Some(m) = record.units.get_mut(unit) {
                m.enabled_by_kiln = false;
            }
        }
        Action::SetSysctl { key, value } => host.sysctls.write(key, value)?,
        Action::RestoreSysctl { key, value } => {
            host.sysctls.write(key, value)?;
            record.sysctls.remove(key);
        }
        Action::LoadModule { name } => host.modules.load(name)?,
        Action::SetHostname { name } => host.set_hostname(name)?,
        Action::StartUnit { unit, hash } | Action::RestartUnit { unit, hash } => {
            let verb = if matches!(action, Action::StartUnit { .. }) {
                "start"
            } else {
                "restart"
            };
            host.services.control(verb, unit)?;
            record.units.entry(unit.clone()).or_default().started_hash = Some(hash.clone());
        }
        Action::StopUnit { unit } => host.services.control("stop", unit)?,
    }
    Ok(())
}
