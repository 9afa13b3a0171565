//! Desired state vs. the host: observe what is there, then compute the ordered actions that
//! bring it in line ([`plan`] is pure; [`observe`] only reads).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::desired::{Desired, digest};
use crate::host::{Host, UnitStatus};
use crate::sysroot::{AccountDb, Meta};

/// What kiln created or took over, kept on disk so that removing something from the config
/// removes exactly what kiln made and restores what it replaced.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub paths: BTreeMap<String, ManagedPath>,
    pub users: BTreeMap<String, ManagedUser>,
    pub units: BTreeMap<String, ManagedUnit>,
    /// Sysctls kiln set, with the value found before.
    pub sysctls: BTreeMap<String, Option<String>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManagedPath {
    pub dir: bool,
    /// A parent directory kiln had to create for something it manages.
    #[serde(default)]
    pub implicit: bool,
    /// It existed before kiln managed it: a directory stays, a file gets its old content back.
    #[serde(default)]
    pub adopted: bool,
    /// Backup of an adopted file's old content, in the state directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManagedUser {
    /// Kiln ran useradd (else it only adjusted an existing account).
    pub created: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManagedUnit {
    pub enabled_by_kiln: bool,
    /// Digest of the unit's files when it was last (re)started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_hash: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathState {
    File {
        digest: String,
        meta: Meta,
    },
    Dir {
        meta: Meta,
    },
    /// A symlink, socket, … : never a thing kiln writes through.
    Other,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnitState {
    pub enabled: bool,
    /// `None` where no service manager runs (offline tree).
    pub active: Option<bool>,
    /// Its main process started after each of its desired files last changed.
    pub started_after_its_files: bool,
}

/// The host as far as the desired state and the record are concerned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Actual {
    pub live: bool,
    pub accounts: AccountDb,
    pub paths: BTreeMap<String, PathState>,
    pub units: BTreeMap<String, UnitState>,
    pub sysctls: BTreeMap<String, Option<String>>,
    /// Loaded modules (runtime only).
    pub modules: BTreeMap<String, bool>,
    pub hostname: Option<String>,
    pub cmdline: String,
    pub kvm_device: bool,
    /// Each data disk's path and whether it exists.
    pub data_disks: BTreeMap<String, bool>,
}

/// One step of an apply. File contents come from the desired state at apply time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Action {
    CreateUser { name: String },
    ModifyUser { name: String },
    CreateDir { path: String },
    WriteFile { path: String, reason: WriteReason },
    SetMeta { path: String },
    DisableUnit { unit: String },
    RemoveFile { path: String },
    RemoveDir { path: String },
    DaemonReload,
    EnableUnit { unit: String },
    SetSysctl { key: String, value: String },
    RestoreSysctl { key: String, value: String },
    LoadModule { name: String },
    SetHostname { name: String },
    StartUnit { unit: String, hash: String },
    RestartUnit { unit: String, hash: String },
    AdoptRunningUnit { unit: String, hash: String },
    StopUnit { unit: String },
    RemoveUser { name: String, remove_home: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WriteReason {
    Create,
    Content,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::CreateUser { name } => write!(f, "create user {name}"),
            Action::ModifyUser { name } => write!(f, "update user {name} (groups, shell)"),
            Action::CreateDir { path } => write!(f, "create directory {path}"),
            Action::WriteFile {
                path,
                reason: WriteReason::Create,
            } => write!(f, "create file {path}"),
            Action::WriteFile {
                path,
                reason: WriteReason::Content,
            } => write!(f, "rewrite file {path}"),
            Action::SetMeta { path } => write!(f, "fix owner/mode of {path}"),
            Action::DisableUnit { unit } => write!(f, "disable {unit}"),
            Action::RemoveFile { path } => write!(f, "remove file {path}"),
            Action::RemoveDir { path } => write!(f, "remove directory {path}"),
            Action::DaemonReload => write!(f, "reload systemd units"),
            Action::EnableUnit { unit } => write!(f, "enable {unit}"),
            Action::SetSysctl { key, value } => write!(f, "set sysctl {key} = {value}"),
            Action::RestoreSysctl { key, value } => write!(f, "restore sysctl {key} = {value}"),
            Action::LoadModule { name } => write!(f, "load module {name}"),
            Action::SetHostname { name } => write!(f, "set host name {name}"),
            Action::StartUnit { unit, .. } => write!(f, "start {unit}"),
            Action::RestartUnit { unit, .. } => write!(f, "restart {unit} (its files changed)"),
            Action::AdoptRunningUnit { unit, .. } => {
                write!(
                    f,
                    "adopt running {unit} (it started after its files last changed)"
                )
            }
            Action::StopUnit { unit } => write!(f, "stop {unit}"),
            Action::RemoveUser { name, .. } => write!(f, "remove user {name}"),
        }
    }
}

impl Action {
    /// Whether this action changes the file or directory at `path`.
    fn changes_path(&self, path: &str) -> bool {
        match self {
            Action::CreateDir { path: p }
            | Action::WriteFile { path: p, .. }
            | Action::SetMeta { path: p }
            | Action::RemoveFile { path: p }
            | Action::RemoveDir { path: p } => p == path,
            _ => false,
        }
    }

    /// The resource this action converges, as `kind:id`.
    pub fn resource(&self) -> String {
        match self {
            Action::CreateUser { name }
            | Action::ModifyUser { name }
            | Action::RemoveUser { name, .. } => {
                format!("user:{name}")
            }
            Action::CreateDir { path } | Action::RemoveDir { path } => format!("dir:{path}"),
            Action::WriteFile { path, .. } | Action::RemoveFile { path } => format!("file:{path}"),
            Action::SetMeta { path } => format!("path:{path}"),
            Action::DaemonReload => "systemd".into(),
            Action::DisableUnit { unit }
            | Action::EnableUnit { unit }
            | Action::StartUnit { unit, .. }
            | Action::RestartUnit { unit, .. }
            | Action::AdoptRunningUnit { unit, .. }
            | Action::StopUnit { unit } => format!("unit:{unit}"),
            Action::SetSysctl { key, .. } | Action::RestoreSysctl { key, .. } => {
                format!("sysctl:{key}")
            }
            Action::LoadModule { name } => format!("module:{name}"),
            Action::SetHostname { .. } => "hostname".into(),
        }
    }
}

/// Content digests of files by inode, size and change time, so an observation reads only
/// files that changed since the last one. Any write, rename or chmod moves the ctime, which
/// user space cannot set back.
#[derive(Debug, Default)]
pub struct DigestCache(BTreeMap<String, (FileStamp, String)>);

impl DigestCache {
    /// Notes the digest of `content`, just written to `path` and found there unchanged with
    /// `placed` (see [`crate::sysroot::Staged::commit`]), so the next observation need not
    /// read it back.
    pub fn remember(&mut self, path: &str, placed: &std::fs::Metadata, content: &[u8]) {
        self.0.insert(
            path.to_string(),
            (FileStamp::of(placed), digest(&[content])),
        );
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStamp {
    /// When the file last changed: its ctime, which user space cannot set back.
    fn changed(&self) -> Option<std::time::SystemTime> {
        let (secs, nanos) = self.ctime;
        let since_epoch = std::time::Duration::new(secs.try_into().ok()?, nanos.try_into().ok()?);
        std::time::UNIX_EPOCH.checked_add(since_epoch)
    }

    fn of(m: &std::fs::Metadata) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

/// Reads the parts of the host that `desired` and `record` mention.
pub fn observe(host: &Host, desired: &Desired, record: &Record) -> std::io::Result<Actual> {
    observe_cached(host, desired, record, &mut DigestCache::default())
}

/// [`observe`], reusing digests of files unchanged since the cache saw them.
pub fn observe_cached(
    host: &Host,
    desired: &Desired,
    record: &Record,
    cache: &mut DigestCache,
) -> std::io::Result<Actual> {
    let root = &host.sysroot;
    let mut a = Actual {
        live: root.is_live(),
        accounts: root.accounts()?,
        hostname: host.hostname(),
        ..Actual::default()
    };
    let paths: BTreeSet<&String> = desired
        .files
        .keys()
        .chain(desired.dirs.keys())
        .chain(record.paths.keys())
        .collect();
    // When each unit's file last changed, noted from the same stat (units have a few files;
    // the observation may cover thousands).
    let unit_files: BTreeSet<&str> = desired
        .units
        .values()
        .flat_map(|u| u.files.iter().map(String::as_str))
        .collect();
    let mut changed: BTreeMap<&str, std::time::SystemTime> = BTreeMap::new();
    for p in paths {
        let Some(m) = root.stat(p)? else { continue };
        let state = if m.is_file() {
            let stamp = FileStamp::of(&m);
            if unit_files.contains(p.as_str())
                && let Some(t) = stamp.changed()
            {
                changed.insert(p, t);
            }
            let digest = match cache.0.get(p.as_str()) {
                Some((s, d)) if *s == stamp => d.clone(),
                _ => {
                    let content = root.read(p)?.unwrap_or_default();
                    let d = digest(&[&content]);
                    cache.0.insert(p.clone(), (stamp, d.clone()));
                    d
                }
            };
            PathState::File {
                digest,
                meta: Meta::of(&m),
            }
        } else if m.is_dir() {
            PathState::Dir { meta: Meta::of(&m) }
        } else {
            PathState::Other
        };
        a.paths.insert(p.clone(), state);
    }
    let units: Vec<&str> = desired
        .units
        .keys()
        .chain(record.units.keys())
        .map(String::as_str)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let states = host.services.states(&units).unwrap_or_else(|e| {
        // Planned as not enabled and not running: the actions that follow say what fails.
        tracing::warn!("{e}");
        let unknown = UnitStatus {
            active: host.services.runtime().then_some(false),
            ..UnitStatus::default()
        };
        vec![unknown; units.len()]
    });
    for (u, status) in units.into_iter().zip(states) {
        let files = desired
            .units
            .get(u)
            .map(|d| d.files.as_slice())
            .unwrap_or_default();
        let started_after_its_files = status.main_started.is_some_and(|started| {
            files
                .iter()
                .all(|f| changed.get(f.as_str()).is_some_and(|&t| t < started))
        });
        a.units.insert(
            u.to_string(),
            UnitState {
                enabled: status.enabled,
                active: status.active,
                started_after_its_files,
            },
        );
    }
    for k in desired.sysctls.keys().chain(record.sysctls.keys()) {
        a.sysctls
            .insert(k.clone(), host.sysctls.read(k).ok().flatten());
    }
    if host.modules.runtime() {
        for m in &desired.modules {
            a.modules.insert(m.clone(), host.modules.is_loaded(m));
        }
    }
    a.cmdline = root
        .read("/proc/cmdline")?
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    a.kvm_device = root.stat("/dev/kvm")?.is_some();
    for path in &desired.data_disks {
        a.data_disks
            .insert(path.clone(), root.stat(path)?.is_some());
    }
    Ok(a)
}

/// Digest of a unit's files as desired: a change restarts it.
pub fn unit_hash(desired: &Desired, unit: &str) -> String {
    let Some(u) = desired.units.get(unit) else {
        return String::new();
    };
    let parts: Vec<&[u8]> = u
        .files
        .iter()
        .flat_map(|p| {
            let content = desired
                .files
                .get(p)
                .map(|f| f.content.as_bytes())
                .unwrap_or_default();
            [p.as_bytes(), content]
        })
        .collect();
    digest(&parts)
}

/// Every desired path and every directory above one.
pub(crate) fn needed_paths(desired: &Desired) -> BTreeSet<&str> {
    desired
        .files
        .keys()
        .chain(desired.dirs.keys())
        .flat_map(|p| ancestors(p).chain(std::iter::once(p.as_str())))
        .collect()
}

/// The directories above host path `path`, nearest first (`/` not included).
pub(crate) fn ancestors(path: &str) -> impl Iterator<Item = &str> {
    let mut cur = path;
    std::iter::from_fn(move || {
        let i = cur.rfind('/')?;
        cur = &cur[..i];
        (!cur.is_empty()).then_some(cur)
    })
}

/// The ordered actions that make `actual` match `desired`; empty when converged.
///
/// Order: accounts (owners must exist) → directories, parents first → files → disabling
/// units that leave (their file is still there) → removals, deepest first → daemon-reload →
/// enablement → sysctls → modules → host name → unit start/restart → removed accounts.
pub fn plan(desired: &Desired, actual: &Actual, record: &Record) -> Vec<Action> {
    let mut out = Vec::new();
    let db = &actual.accounts;
    for (name, u) in &desired.users {
        match db.users.get(name) {
            None => out.push(Action::CreateUser { name: name.clone() }),
            Some(_) => {
                let shell_differs = u
                    .shell
                    .as_ref()
                    .is_some_and(|s| db.shells.get(name) != Some(s));
                if shell_differs || db.groups_of(name) != u.groups {
                    out.push(Action::ModifyUser { name: name.clone() });
                }
            }
        }
    }
    // Managed paths that leave the config or change type (file ↔ directory). Those standing
    // where a desired path must go, and everything kiln manages below them, go first.
    let needed = needed_paths(desired);
    let type_change = |p: &str, m: &ManagedPath| {
        if m.dir {
            desired.files.contains_key(p)
        } else {
            desired.dirs.contains_key(p) || needed.contains(p) && !desired.files.contains_key(p)
        }
    };
    let blockers: Vec<&str> = record
        .paths
        .iter()
        .filter(|(p, m)| type_change(p, m))
        .map(|(p, _)| p.as_str())
        .collect();
    let blocked = |p: &str| {
        blockers
            .iter()
            .any(|b| p == *b || p.starts_with(&format!("{b}/")))
    };
    let mut removals: Vec<(&String, &ManagedPath, bool)> = record
        .paths
        .iter()
        .filter(|(p, _)| actual.paths.contains_key(*p))
        .filter_map(|(p, m)| {
            if blocked(p) {
                Some((p, m, true))
            } else if !(needed.contains(p.as_str()) || m.dir && m.adopted) {
                Some((p, m, false))
            } else {
                None
            }
        })
        .collect();
    removals.sort_by_key(|(p, _, _)| std::cmp::Reverse(p.matches('/').count()));
    let removal = |path: &String, m: &ManagedPath| {
        if m.dir {
            Action::RemoveDir { path: path.clone() }
        } else {
            Action::RemoveFile { path: path.clone() }
        }
    };
    let mut unit_files_changed = false;
    for (path, m, _) in removals.iter().filter(|r| r.2) {
        unit_files_changed |= path.starts_with("/etc/systemd/system/");
        out.push(removal(path, m));
    }
    let wanted_meta = |mode: u32, owner: &str| {
        db.resolve_owner(owner)
            .map(|(uid, gid)| Meta { mode, uid, gid })
    };
    for (path, d) in &desired.dirs {
        match actual.paths.get(path) {
            None => out.push(Action::CreateDir { path: path.clone() }),
            Some(PathState::Dir { meta }) if wanted_meta(d.mode, &d.owner) == Some(*meta) => {}
            Some(PathState::Dir { .. }) => out.push(Action::SetMeta { path: path.clone() }),
            // Not a directory: the apply reports why it cannot create one there.
            Some(_) => out.push(Action::CreateDir { path: path.clone() }),
        }
    }
    for (path, f) in &desired.files {
        let action = match actual.paths.get(path) {
            None => Some(Action::WriteFile {
                path: path.clone(),
                reason: WriteReason::Create,
            }),
            Some(PathState::File { digest: d, meta }) => {
                if *d != digest(&[f.content.as_bytes()]) {
                    Some(Action::WriteFile {
                        path: path.clone(),
                        reason: WriteReason::Content,
                    })
                } else if wanted_meta(f.mode, &f.owner) != Some(*meta) {
                    Some(Action::SetMeta { path: path.clone() })
                } else {
                    None
                }
            }
            Some(_) => Some(Action::WriteFile {
                path: path.clone(),
                reason: WriteReason::Content,
            }),
        };
        if let Some(a) = action {
            unit_files_changed |=
                matches!(a, Action::WriteFile { .. }) && path.starts_with("/etc/systemd/system/");
            out.push(a);
        }
    }
    for (unit, m) in &record.units {
        if !desired.units.contains_key(unit)
            && m.enabled_by_kiln
            && actual.units.get(unit).is_some_and(|u| u.enabled)
        {
            out.push(Action::DisableUnit { unit: unit.clone() });
        }
    }
    // Removals, deepest path first so directories are empty when their turn comes.
    for (path, m, _) in removals.iter().filter(|r| !r.2) {
        unit_files_changed |= path.starts_with("/etc/systemd/system/");
        out.push(removal(path, m));
    }
    if unit_files_changed {
        out.push(Action::DaemonReload);
    }
    for (unit, u) in &desired.units {
        let enabled = actual.units.get(unit).is_some_and(|s| s.enabled);
        match u.enabled {
            Some(true) if !enabled => out.push(Action::EnableUnit { unit: unit.clone() }),
            Some(false) if enabled => out.push(Action::DisableUnit { unit: unit.clone() }),
            _ => {}
        }
    }
    for (key, value) in &desired.sysctls {
        if actual.sysctls.get(key).cloned().flatten().as_deref() != Some(normalise(value).as_str())
        {
            out.push(Action::SetSysctl {
                key: key.clone(),
                value: value.clone(),
            });
        }
    }
    for (key, original) in &record.sysctls {
        if !desired.sysctls.contains_key(key)
            && let Some(orig) = original
            && actual.sysctls.get(key).cloned().flatten().as_deref()
                != Some(normalise(orig).as_str())
        {
            out.push(Action::RestoreSysctl {
                key: key.clone(),
                value: orig.clone(),
            });
        }
    }
    for (name, loaded) in &actual.modules {
        if !loaded {
            out.push(Action::LoadModule { name: name.clone() });
        }
    }
    if actual.live
        && let Some(h) = &desired.hostname
        && actual.hostname.as_ref() != Some(h)
    {
        out.push(Action::SetHostname { name: h.clone() });
    }
    for (unit, u) in &desired.units {
        let Some(active) = actual.units.get(unit).and_then(|s| s.active) else {
            continue; // no service manager (offline tree)
        };
        let hash = unit_hash(desired, unit);
        match u.started {
            Some(true) if !active => out.push(Action::StartUnit {
                unit: unit.clone(),
                hash,
            }),
            Some(true)
                if record.units.get(unit).and_then(|m| m.started_hash.as_ref()) != Some(&hash) =>
            {
                // Kiln has no record of starting it with these files, but it started after
                // they last changed (a node's first boot, the image's config in place): it
                // runs them already, so kiln records them rather than restart it.
                let runs_them = actual
                    .units
                    .get(unit)
                    .is_some_and(|s| s.started_after_its_files)
                    && !out
                        .iter()
                        .any(|a| u.files.iter().any(|f| a.changes_path(f)));
                out.push(if runs_them {
                    Action::AdoptRunningUnit {
                        unit: unit.clone(),
                        hash,
                    }
                } else {
                    Action::RestartUnit {
                        unit: unit.clone(),
                        hash,
                    }
                })
            }
            Some(false) if active => out.push(Action::StopUnit { unit: unit.clone() }),
            _ => {}
        }
    }
    for (name, m) in &record.users {
        if !desired.users.contains_key(name) && m.created && db.users.contains_key(name) {
            out.push(Action::RemoveUser {
                name: name.clone(),
                remove_home: true,
            });
        }
    }
    out
}

fn normalise(v: &str) -> String {
    v.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::DesiredFile;

    fn file(content: &str) -> DesiredFile {
        DesiredFile {
            content: content.into(),
            mode: 0o644,
            owner: "root:root".into(),
        }
    }

    fn root_db() -> AccountDb {
        AccountDb::parse("root:x:0:0:root:/root:/bin/bash\n", "root:x:0:\n")
    }

    #[test]
    fn creates_missing_and_rewrites_changed_files_then_removes_what_left() {
        let mut desired = Desired::default();
        desired.files.insert("/etc/a".into(), file("A"));
        desired.files.insert("/etc/b".into(), file("B"));
        let meta = Meta {
            mode: 0o644,
            uid: 0,
            gid: 0,
        };
        let mut actual = Actual {
            accounts: root_db(),
            ..Actual::default()
        };
        actual.paths.insert(
            "/etc/b".into(),
            PathState::File {
                digest: digest(&[b"old"]),
                meta,
            },
        );
        actual.paths.insert(
            "/etc/gone".into(),
            PathState::File {
                digest: digest(&[b"x"]),
                meta,
            },
        );
        actual.paths.insert(
            "/etc/unmanaged".into(),
            PathState::File {
                digest: digest(&[b"x"]),
                meta,
            },
        );
        let mut record = Record::default();
        record
            .paths
            .insert("/etc/gone".into(), ManagedPath::default());
        let actions: Vec<String> = plan(&desired, &actual, &record)
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(
            actions,
            [
                "create file /etc/a",
                "rewrite file /etc/b",
                "remove file /etc/gone"
            ]
        );
    }

    #[test]
    fn running_units_restart_when_their_files_change() {
        use crate::desired::DesiredUnit;
        let mut desired = Desired::default();
        desired.files.insert(
            "/etc/systemd/system/web.service".into(),
            file("[Service]\n"),
        );
        desired.units.insert(
            "web.service".into(),
            DesiredUnit {
                enabled: Some(true),
                started: Some(true),
                files: vec!["/etc/systemd/system/web.service".into()],
            },
        );
        let mut actual = Actual {
            live: true,
            accounts: root_db(),
            ..Actual::default()
        };
        actual.paths.insert(
            "/etc/systemd/system/web.service".into(),
            PathState::File {
                digest: digest(&[b"[Service]\n"]),
                meta: Meta {
                    mode: 0o644,
                    uid: 0,
                    gid: 0,
                },
            },
        );
        let unit = |enabled, active| UnitState {
            enabled,
            active: Some(active),
            started_after_its_files: false,
        };
        actual
            .units
            .insert("web.service".into(), unit(false, false));
        let mut record = Record::default();
        let shown = |a: &Actual, r: &Record| {
            plan(&desired, a, r)
                .iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            shown(&actual, &record),
            ["enable web.service", "start web.service"]
        );

        actual.units.insert("web.service".into(), unit(true, true));
        assert_eq!(
            shown(&actual, &record),
            ["restart web.service (its files changed)"]
        );
        // Started after its file last changed (the image's config at first boot): it runs
        // that file already, unless this plan rewrites it.
        let started_after = UnitState {
            started_after_its_files: true,
            ..unit(true, true)
        };
        actual.units.insert("web.service".into(), started_after);
        assert_eq!(
            shown(&actual, &record),
            ["adopt running web.service (it started after its files last changed)"]
        );
        let mut stale = actual.clone();
        stale.paths.insert(
            "/etc/systemd/system/web.service".into(),
            PathState::File {
                digest: digest(&[b"[Service]\nOld=1\n"]),
                meta: Meta {
                    mode: 0o644,
                    uid: 0,
                    gid: 0,
                },
            },
        );
        assert_eq!(
            shown(&stale, &record),
            [
                "rewrite file /etc/systemd/system/web.service",
                "reload systemd units",
                "restart web.service (its files changed)"
            ]
        );
        record.units.insert(
            "web.service".into(),
            ManagedUnit {
                enabled_by_kiln: true,
                started_hash: Some(unit_hash(&desired, "web.service")),
            },
        );
        assert!(shown(&actual, &record).is_empty());
        // Offline trees have no service manager: only enablement is planned.
        actual.units.insert(
            "web.service".into(),
            UnitState {
                enabled: false,
                active: None,
                started_after_its_files: false,
            },
        );
        assert_eq!(shown(&actual, &record), ["enable web.service"]);
    }

    #[test]
    fn nothing_to_do_when_converged() {
        let mut desired = Desired::default();
        desired.files.insert("/etc/a".into(), file("A"));
        desired.sysctls.insert("vm.swappiness".into(), "10".into());
        let mut actual = Actual {
            accounts: root_db(),
            ..Actual::default()
        };
        actual.paths.insert(
            "/etc/a".into(),
            PathState::File {
                digest: digest(&[b"A"]),
                meta: Meta {
                    mode: 0o644,
                    uid: 0,
                    gid: 0,
                },
            },
        );
        actual
            .sysctls
            .insert("vm.swappiness".into(), Some("10".into()));
        assert!(plan(&desired, &actual, &Record::default()).is_empty());
    }
}
