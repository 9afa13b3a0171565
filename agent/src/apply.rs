//! Carrying out a plan, crash-safely.
//!
//! 1. The journal (the list of actions) is written before anything changes.
//! 2. Every path, account and unit kiln is about to create or take over is added to the
//!    record, and adopted files are backed up, before the first change: after a crash the
//!    record already owns whatever may exist, so nothing kiln made is left unmanaged. Two
//!    flushes make the journal and the record durable together: their content, then names.
//! 3. Actions run in order; each is idempotent. A run of file writes goes as one batch:
//!    every file is written under a temporary name (in a directory that does not exist yet,
//!    at its own name inside that directory built under a temporary name), all of them are
//!    made durable together, and only then are the new directories and each file renamed
//!    into place. A lone file is written to a temporary name, fsynced and renamed.
//! 4. One flush per file system makes the renames durable; then the record drops what was
//!    removed and the journal goes, both durable with the next flush (so four flushes in all
//!    for a batch, where the file system holds both the state and the files).
//!
//! A restart after a crash finds the journal, removes the temporary files and directories its
//! writes may have left, reports the interrupted apply and simply plans again: the
//! level-triggered loop converges from whatever state the crash left.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::{Deserialize, Serialize};

use crate::desired::{Desired, digest};
use crate::host::Host;
use crate::plan::{Action, DigestCache, ManagedPath, ManagedUser, Record, ancestors};
use crate::sysroot::{self, AccountDb, Meta, Staged, Sysroot};

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

/// Owner and mode of the agent's own state files: root's alone.
const STATE_FILE_META: Meta = Meta {
    mode: 0o600,
    uid: 0,
    gid: 0,
};

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
    root: Sysroot,
}

impl StateStore {
    pub fn new(root: &Sysroot) -> StateStore {
        StateStore {
            dir: root.state_path(""),
            root: root.clone(),
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
        let (path, bytes) = self.json(name, value)?;
        sysroot::write_atomic(&path, &bytes, STATE_FILE_META).map_err(io_err("writing", &path))?;
        sysroot::sync_dir(&self.dir).map_err(io_err("syncing", &self.dir))
    }

    /// Writes `value` for `name` under its temporary name, flushing nothing: its content is
    /// durable after the next [`StateStore::sync`], and only then is it committed, so a power
    /// loss never leaves a renamed file whose content did not reach the disk.
    fn stage_json<T: Serialize>(
        &self,
        name: &str,
        value: &T,
    ) -> Result<sysroot::Staged, StateError> {
        let (path, bytes) = self.json(name, value)?;
        sysroot::Staged::write(&path, &bytes, STATE_FILE_META)
            .map(|(staged, _)| staged)
            .map_err(io_err("writing", &path))
    }

    /// The path and bytes of state file `name` holding `value`.
    fn json<T: Serialize>(&self, name: &str, value: &T) -> Result<(PathBuf, Vec<u8>), StateError> {
        fs::create_dir_all(&self.dir).map_err(io_err("creating", &self.dir))?;
        let path = self.dir.join(name);
        match serde_json::to_vec_pretty(value) {
            Ok(bytes) => Ok((path, bytes)),
            Err(e) => Err(StateError::Corrupt {
                path,
                message: e.to_string(),
            }),
        }
    }

    /// Puts files staged by [`StateStore::stage_json`] in place.
    fn commit(&self, staged: impl IntoIterator<Item = sysroot::Staged>) -> Result<(), StateError> {
        for s in staged {
            let path = s.temp().to_path_buf();
            s.commit().map_err(io_err("renaming", &path))?;
        }
        Ok(())
    }

    /// Makes everything written under the state directory durable: one syncfs(2), one device
    /// flush.
    fn sync(&self) -> Result<(), StateError> {
        sysroot::sync_filesystems([self.dir.as_path()]).map_err(io_err("syncing", &self.dir))
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

    /// Removes the journal; durable at the next sync of the state directory's file system.
    fn remove_journal(&self) -> Result<(), StateError> {
        let path = self.dir.join(JOURNAL);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("removing", &path)(e)),
        }
    }

    /// Finishes an interrupted apply: removes the temporary files of its writes (a batch
    /// interrupted between its renames leaves the rest), returns its journal (for the status)
    /// and clears it.
    pub fn recover(&self) -> Result<Option<Journal>, StateError> {
        let Some(j) = self.journal()? else {
            return Ok(None);
        };
        let mut trees = BTreeSet::new();
        for a in &j.actions {
            if let Action::WriteFile { path, .. } | Action::RemoveFile { path } = a
                && let Some(temp) = sysroot::temp_path(&self.root.path(path))
            {
                match fs::remove_file(&temp) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    // A stray temporary file is only clutter: not worth refusing to start.
                    Err(e) => tracing::warn!("removing {}: {e}", temp.display()),
                }
                // A new directory above a write may have been staged as a tree.
                for dir in ancestors(path) {
                    if !trees.insert(dir) {
                        break;
                    }
                }
            }
        }
        for dir in trees {
            if let Some(temp) = sysroot::temp_path(&self.root.path(dir))
                && let Err(e) = sysroot::remove_staged_tree(&temp)
            {
                tracing::warn!("removing {}: {e}", temp.display());
            }
        }
        self.remove_journal()?;
        self.sync()?;
        Ok(Some(j))
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

/// The crash tests' hook ([`FAILPOINT_ENV`]): counts finished actions, also across the
/// threads that put a batch in place, and aborts after the chosen one.
struct Failpoint {
    abort_after: Option<usize>,
    finished: AtomicUsize,
}

impl Failpoint {
    fn from_env() -> Failpoint {
        let abort_after = std::env::var(FAILPOINT_ENV).ok().and_then(|v| {
            v.strip_prefix("apply-abort-after:")
                .and_then(|n| n.parse().ok())
        });
        Failpoint {
            abort_after,
            finished: AtomicUsize::new(0),
        }
    }

    fn finished_one(&self) {
        let n = self.finished.fetch_add(1, Ordering::SeqCst) + 1;
        if self.abort_after == Some(n) {
            tracing::error!("failpoint {FAILPOINT_ENV}: aborting after {n} action(s)");
            std::process::abort();
        }
    }
}

/// The directories above `path` that do not exist, outermost first. The walk up stops at one
/// that exists or that an earlier walk of the same pass went through (`examined`): a pass
/// over many files in a few directories looks at each directory once.
fn missing_ancestors(root: &Sysroot, path: &str, examined: &mut BTreeSet<String>) -> Vec<String> {
    let mut out: Vec<String> = ancestors(path)
        .take_while(|d| examined.insert(d.to_string()) && !root.path(d).exists())
        .map(String::from)
        .collect();
    out.reverse();
    out
}

/// Runs `actions` (from [`crate::plan::plan`]) against the host. Individual failures are
/// collected in the outcome; an error is returned only when kiln's own state cannot be kept.
/// `digests` learns the content of every file written, so the verifying observation after
/// the apply does not read them back.
pub fn apply(
    host: &Host,
    store: &StateStore,
    desired: &Desired,
    actions: &[Action],
    digests: &mut DigestCache,
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
    let journal = store.stage_json(
        JOURNAL,
        &Journal {
            started: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            actions: actions.to_vec(),
        },
    )?;
    claim(host, store, &mut record, actions)?;
    // A repair of paths kiln already owns claims nothing new: no record write needed.
    let claiming = (record != stored)
        .then(|| store.stage_json(RECORD, &record))
        .transpose()?;
    // Two flushes in all make the journal and the claimed record durable, content then names,
    // before the first temporary file or change exists.
    store.sync()?;
    store.commit([Some(journal), claiming].into_iter().flatten())?;
    store.sync()?;
    let claimed = record.clone();

    let failpoint = Failpoint::from_env();
    let mut outcome = Outcome::default();
    let mut finish = |action: &Action, result: Result<(), ActionError>| match result {
        Ok(()) => outcome.done.push(action.clone()),
        Err(e) => {
            tracing::warn!("{action}: {e}");
            outcome.failed.push((action.clone(), e.to_string()));
        }
    };
    let mut dirs: BTreeSet<PathBuf> = BTreeSet::new();
    for chunk in actions.chunk_by(|a, b| written(a).is_some() && written(b).is_some()) {
        if let [action] = chunk {
            let result = run(
                host,
                store,
                desired,
                &mut record,
                action,
                &mut dirs,
                digests,
            );
            failpoint.finished_one();
            finish(action, result);
            continue;
        }
        let paths: Vec<&str> = chunk.iter().filter_map(written).collect();
        let staged = stage_files(host, desired, &paths, &mut dirs);
        // The renames are independent of each other: the cores share them as the writes.
        let committed = in_parallel(paths.iter().zip(staged).collect(), |(path, staged)| {
            let result = staged.and_then(|s| placed(path, s.commit()));
            failpoint.finished_one();
            result
        });
        for ((action, path), result) in chunk.iter().zip(&paths).zip(committed) {
            finish(action, result.map(|p| remember(digests, desired, path, p)));
        }
    }
    // The record that drops what was removed has its content made durable with the renames
    // and unlinks, and goes in place after them; it and the journal's removal become durable
    // with the next flush. A power loss leaves this record or the claimed one (which still
    // owns paths that are gone: the next plan prunes them), and at worst a journal that makes
    // the restart plan again for nothing.
    let pruned = (record != claimed)
        .then(|| store.stage_json(RECORD, &record))
        .transpose()?;
    let dirs: Vec<&Path> = dirs
        .iter()
        .map(PathBuf::as_path)
        .filter(|d| d.exists())
        .chain([store.dir.as_path()])
        .collect();
    sysroot::sync_filesystems(dirs).map_err(io_err(
        "syncing the changed directories in",
        host.sysroot.root(),
    ))?;
    store.commit(pruned)?;
    store.remove_journal()?;
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
    let mut examined = BTreeSet::new();
    for a in actions {
        match a {
            Action::WriteFile { path, .. } | Action::CreateDir { path } => {
                for dir in missing_ancestors(&host.sysroot, path, &mut examined) {
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

fn meta_for(db: &AccountDb, mode: u32, owner: &str) -> Result<Meta, ActionError> {
    let (uid, gid) = db
        .resolve_owner(owner)
        .ok_or_else(|| ActionError::Other(format!("owner {owner} does not exist on this host")))?;
    Ok(Meta { mode, uid, gid })
}

/// Creates the missing directories above `path`; `examined` as for [`missing_ancestors`].
fn create_parents(
    host: &Host,
    path: &str,
    examined: &mut BTreeSet<String>,
    dirs: &mut BTreeSet<PathBuf>,
) -> io::Result<()> {
    for d in missing_ancestors(&host.sysroot, path, examined) {
        let full = host.sysroot.path(&d);
        fs::create_dir(&full)?;
        if let Some(p) = full.parent() {
            dirs.insert(p.to_path_buf());
        }
    }
    Ok(())
}

/// The path a file write puts in place.
fn written(action: &Action) -> Option<&str> {
    match action {
        Action::WriteFile { path, .. } => Some(path),
        _ => None,
    }
}

/// Where desired file `path` goes, its content and metadata.
fn prepare_write<'d>(
    host: &Host,
    db: &AccountDb,
    desired: &'d Desired,
    path: &str,
) -> Result<(PathBuf, &'d [u8], Meta), ActionError> {
    let f = desired
        .files
        .get(path)
        .ok_or_else(|| ActionError::Other(format!("{path} is no longer desired")))?;
    let meta = meta_for(db, f.mode, &f.owner)?;
    Ok((host.sysroot.path(path), f.content.as_bytes(), meta))
}

/// The new directory trees of one batch of writes (see [`sysroot::StagedTree`]).
#[derive(Default)]
struct Trees {
    staged: Vec<sysroot::StagedTree>,
    /// Host path of each tree's top directory → its index in `staged`.
    by_top: BTreeMap<String, usize>,
    /// Whether a host directory exists, as found before the batch.
    exists: BTreeMap<String, bool>,
    /// Directories made inside the trees.
    made: BTreeSet<PathBuf>,
}

impl Trees {
    /// Where a batch writes `path` (`full` on the host) before it is in place: beside it
    /// under a temporary name when its directory exists, else at its own name inside the
    /// tree of its topmost missing directory (made here, with the directories between), and
    /// that tree's index. `dirs` gets the directory whose entry changes when it is placed.
    fn location(
        &mut self,
        root: &Sysroot,
        path: &str,
        full: &Path,
        dirs: &mut BTreeSet<PathBuf>,
    ) -> io::Result<(PathBuf, Option<usize>)> {
        let exists = &mut self.exists;
        let top = ancestors(path)
            .take_while(|d| {
                !*exists
                    .entry(d.to_string())
                    .or_insert_with(|| root.path(d).exists())
            })
            .last();
        let Some(top) = top else {
            if let Some(p) = full.parent() {
                dirs.insert(p.to_path_buf());
            }
            let temp =
                sysroot::temp_path(full).ok_or_else(|| io::Error::other("path has no parent"))?;
            return Ok((temp, None));
        };
        let index = match self.by_top.get(top) {
            Some(&i) => i,
            None => {
                let tree = sysroot::StagedTree::create(&root.path(top))?;
                if let Some(p) = tree.target().parent() {
                    dirs.insert(p.to_path_buf());
                }
                self.staged.push(tree);
                self.by_top.insert(top.to_string(), self.staged.len() - 1);
                self.staged.len() - 1
            }
        };
        let inside = self.staged[index].inside(&path[top.len()..]);
        if let Some(parent) = inside.parent()
            && !self.made.contains(parent)
        {
            fs::create_dir_all(parent)?;
            self.made.insert(parent.to_path_buf());
        }
        Ok((inside, Some(index)))
    }
}

/// Writes the files of a run of writes where they wait to be placed (see [`Trees::location`]),
/// makes them all durable at once (see [`sysroot::sync_filesystems`]) and puts the new
/// directory trees in place, so each rename that follows puts a complete file in place. One
/// result per path, in order.
fn stage_files(
    host: &Host,
    desired: &Desired,
    paths: &[&str],
    dirs: &mut BTreeSet<PathBuf>,
) -> Vec<Result<Staged, ActionError>> {
    // Accounts change only in user actions, and directories go only in removals: neither
    // sits inside a run of writes.
    let db = host.sysroot.accounts();
    let mut trees = Trees::default();
    let prepared: Vec<_> = paths
        .iter()
        .map(|path| {
            let db = db
                .as_ref()
                .map_err(|e| ActionError::Other(format!("reading the accounts: {e}")))?;
            let (full, content, meta) = prepare_write(host, db, desired, path)?;
            let (temp, tree) = trees.location(&host.sysroot, path, &full, dirs)?;
            Ok::<_, ActionError>((temp, full, tree, content, meta))
        })
        .collect();
    let staged: Vec<Result<(Staged, Option<usize>), ActionError>> = in_parallel(prepared, |p| {
        let (temp, full, tree, content, meta) = p?;
        Ok((
            Staged::write_at(temp, &full, tree.is_some(), content, meta)?.0,
            tree,
        ))
    });
    let parents: BTreeSet<&Path> = staged
        .iter()
        .flatten()
        .filter_map(|(s, _)| s.temp().parent())
        .collect();
    let failed = match sysroot::sync_filesystems(parents) {
        // Not durable, so none may replace its target: dropping them removes the temps.
        Err(e) => Err(format!("syncing the new files: {e}")),
        Ok(()) => Ok(trees
            .staged
            .iter_mut()
            .enumerate()
            .filter_map(|(i, t)| {
                let e = t.commit().err()?;
                Some((i, format!("placing {}: {e}", t.target().display())))
            })
            .collect::<BTreeMap<usize, String>>()),
    };
    staged
        .into_iter()
        .map(|s| {
            let (s, tree) = s?;
            let why = match &failed {
                Err(why) => Some(why),
                Ok(failed) => tree.and_then(|t| failed.get(&t)),
            };
            match why {
                Some(why) => Err(ActionError::Other(why.clone())),
                None => Ok(s),
            }
        })
        .collect()
}

/// Fewest items worth a thread of their own in [`in_parallel`].
const ITEMS_PER_THREAD: usize = 64;

/// `f` over `items` on up to one thread per core, results in order. Creating many small files
/// is mostly time in the kernel, which the other cores can share.
fn in_parallel<T: Send, R: Send>(items: Vec<T>, f: impl Fn(T) -> R + Sync) -> Vec<R> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (items.len() / ITEMS_PER_THREAD).clamp(1, cores);
    if threads == 1 {
        return items.into_iter().map(f).collect();
    }
    let per_thread = items.len().div_ceil(threads);
    let mut items = items.into_iter();
    let chunks = std::iter::from_fn(|| {
        let chunk: Vec<T> = items.by_ref().take(per_thread).collect();
        (!chunk.is_empty()).then_some(chunk)
    });
    let f = &f;
    std::thread::scope(|s| {
        let workers: Vec<_> = chunks
            .map(|chunk| s.spawn(move || chunk.into_iter().map(f).collect::<Vec<R>>()))
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    })
}

/// Notes the content of desired file `path` for the next observation, when the file was
/// found as kiln wrote it (see [`Staged::commit`]).
fn remember(digests: &mut DigestCache, desired: &Desired, path: &str, placed: Placed) {
    if let (Some(meta), Some(f)) = (placed, desired.files.get(path)) {
        digests.remember(path, &meta, f.content.as_bytes());
    }
}

/// A file's metadata as put in place, when still as kiln wrote it.
type Placed = Option<fs::Metadata>;

/// The result of putting `path` in place, saying so when a directory stands there.
fn placed(path: &str, renamed: io::Result<Placed>) -> Result<Placed, ActionError> {
    renamed.map_err(|e| match e.kind() {
        io::ErrorKind::IsADirectory => ActionError::Other(format!("{path} is a directory")),
        _ => e.into(),
    })
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
    digests: &mut DigestCache,
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
            let meta = meta_for(&root.accounts()?, d.mode, &d.owner)?;
            create_parents(host, path, &mut BTreeSet::new(), dirs)?;
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
            let (full, content, meta) = prepare_write(host, &root.accounts()?, desired, path)?;
            create_parents(host, path, &mut BTreeSet::new(), dirs)?;
            if let Some(p) = full.parent() {
                dirs.insert(p.to_path_buf());
            }
            let file = placed(path, sysroot::write_atomic(&full, content, meta))?;
            remember(digests, desired, path, file);
        }
        Action::SetMeta { path } => {
            let (mode, owner) = match (desired.files.get(path), desired.dirs.get(path)) {
                (Some(f), _) => (f.mode, f.owner.as_str()),
                (_, Some(d)) => (d.mode, d.owner.as_str()),
                _ => return Err(ActionError::Other(format!("{path} is no longer desired"))),
            };
            sysroot::set_meta(&root.path(path), meta_for(&root.accounts()?, mode, owner)?)?;
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
        Action::AdoptRunningUnit { unit, hash } => {
            record.units.entry(unit.clone()).or_default().started_hash = Some(hash.clone());
        }
        Action::StopUnit { unit } => host.services.control("stop", unit)?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use crate::desired::DesiredFile;

    fn host_tree() -> (tempfile::TempDir, Host) {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir_all(t.path().join("etc")).unwrap();
        fs::write(
            t.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/bash\napp:x:1000:1000::/home/app:/bin/sh\n",
        )
        .unwrap();
        fs::write(t.path().join("etc/group"), "root:x:0:\napp:x:1000:\n").unwrap();
        let host = Host::real(t.path());
        (t, host)
    }

    fn file(content: &str, mode: u32, owner: &str) -> DesiredFile {
        DesiredFile {
            content: content.into(),
            mode,
            owner: owner.into(),
        }
    }

    fn temp_files(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.to_string_lossy().ends_with(".kiln-tmp") {
                out.push(p);
            } else if p.is_dir() {
                out.extend(temp_files(&p));
            }
        }
        out
    }

    #[test]
    fn a_batch_of_writes_lands_whole_and_a_failed_file_names_itself_and_leaves_no_trace() {
        let (t, host) = host_tree();
        // A directory where a file is wanted: its write fails at the rename, after every
        // file of the batch was staged and synced.
        fs::create_dir_all(t.path().join("srv/b")).unwrap();
        fs::write(t.path().join("srv/b/keep"), "mine").unwrap();
        let mut desired = Desired::default();
        desired
            .files
            .insert("/srv/a".into(), file("A\n", 0o640, "app:app"));
        desired
            .files
            .insert("/srv/b".into(), file("B\n", 0o644, "root:root"));
        desired
            .files
            .insert("/srv/new/c".into(), file("C\n", 0o600, "root"));
        desired
            .files
            .insert("/srv/new/d".into(), file("D\n", 0o644, "ghost"));
        let store = StateStore::new(&host.sysroot);
        let actual = crate::plan::observe(&host, &desired, &Record::default()).unwrap();
        let actions = crate::plan::plan(&desired, &actual, &Record::default());
        assert_eq!(actions.len(), 4, "{actions:?}");

        let mut digests = DigestCache::default();
        let outcome = apply(&host, &store, &desired, &actions, &mut digests).unwrap();

        let failed: Vec<(String, &str)> = outcome
            .failed
            .iter()
            .map(|(a, why)| (a.resource(), why.as_str()))
            .collect();
        assert_eq!(
            failed,
            [
                ("file:/srv/b".to_string(), "/srv/b is a directory"),
                (
                    "file:/srv/new/d".to_string(),
                    "owner ghost does not exist on this host"
                ),
            ]
        );
        assert_eq!(outcome.done.len(), 2);
        let check = |path: &str, content: &str, mode: u32, uid: u32| {
            let full = t.path().join(path);
            assert_eq!(fs::read_to_string(&full).unwrap(), content, "{path}");
            let m = fs::metadata(&full).unwrap();
            assert_eq!(
                (m.mode() & 0o7777, m.uid(), m.gid()),
                (mode, uid, uid),
                "{path}"
            );
        };
        check("srv/a", "A\n", 0o640, 1000);
        check("srv/new/c", "C\n", 0o600, 0);
        assert_eq!(
            fs::read_to_string(t.path().join("srv/b/keep")).unwrap(),
            "mine"
        );
        assert!(!t.path().join("srv/new/d").exists());
        assert_eq!(temp_files(t.path()), Vec::<PathBuf>::new());
        assert_eq!(store.journal().unwrap(), None);
        // The observation after the apply, from what the apply remembered, finds the written
        // files as desired: only the two failures remain.
        let record = store.record().unwrap();
        let actual = crate::plan::observe_cached(&host, &desired, &record, &mut digests).unwrap();
        let remaining: Vec<String> = crate::plan::plan(&desired, &actual, &record)
            .iter()
            .map(Action::resource)
            .collect();
        assert_eq!(remaining, ["file:/srv/b", "file:/srv/new/d"]);
    }

    #[test]
    fn recovery_removes_the_temporary_files_of_an_interrupted_batch() {
        let (t, host) = host_tree();
        let store = StateStore::new(&host.sysroot);
        let actions: Vec<Action> = ["/srv/a", "/srv/b", "/srv/new/deep/c"]
            .into_iter()
            .map(|p| Action::WriteFile {
                path: p.into(),
                reason: crate::plan::WriteReason::Create,
            })
            .collect();
        let journal = Journal {
            started: "then".into(),
            actions,
        };
        store.write_json(JOURNAL, &journal).unwrap();
        fs::create_dir_all(t.path().join("srv")).unwrap();
        let meta = Meta {
            mode: 0o644,
            uid: 0,
            gid: 0,
        };
        // A crash between the batch's sync and its renames: the staged files and the new
        // directory's tree stay behind.
        for p in ["srv/a", "srv/b"] {
            std::mem::forget(Staged::write(&t.path().join(p), b"new", meta).unwrap());
        }
        let tree = sysroot::StagedTree::create(&t.path().join("srv/new")).unwrap();
        fs::create_dir(tree.inside("/deep")).unwrap();
        let c = t.path().join("srv/new/deep/c");
        std::mem::forget(Staged::write_at(tree.inside("/deep/c"), &c, true, b"new", meta).unwrap());
        std::mem::forget(tree);
        assert_eq!(temp_files(t.path()).len(), 3);

        assert_eq!(store.recover().unwrap(), Some(journal));
        assert_eq!(temp_files(t.path()), Vec::<PathBuf>::new());
        assert_eq!(store.journal().unwrap(), None);
    }
}
