//! inotify on the directories holding managed paths: any change to a managed path wakes the
//! host controller, which repairs it. Directories are watched rather than files because an
//! atomic replace (by kiln or an editor) swaps the inode a file watch would follow.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;

use inotify::{Inotify, WatchDescriptor, WatchMask, Watches};

use crate::controllers::Shared;
use crate::engine::Trigger;
use crate::sysroot::Sysroot;

fn mask() -> WatchMask {
    WatchMask::MODIFY
        | WatchMask::CLOSE_WRITE
        | WatchMask::ATTRIB
        | WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::DELETE_SELF
        | WatchMask::ONLYDIR
}

/// Starts the watcher threads. `shared.managed` says what to watch; it is re-read whenever
/// the host controller signals a change.
pub fn spawn(
    root: Sysroot,
    shared: Arc<Shared>,
    trigger: Trigger,
    controller: &'static str,
) -> std::io::Result<()> {
    let inotify = Inotify::init()?;
    let watches = inotify.watches();
    let dirs: WatchedDirs = Arc::default();
    let (tx, rx) = mpsc::channel();
    let root_for_events = root.clone();
    *shared
        .watch_changed
        .lock()
        .map_err(|_| std::io::Error::other("lock poisoned"))? = Some(tx.clone());
    let _ = tx.send(());
    {
        let dirs = dirs.clone();
        let shared = shared.clone();
        let trigger = trigger.clone();
        std::thread::Builder::new()
            .name("kiln-watch-set".into())
            .spawn(move || update_loop(root, watches, dirs, shared, rx, trigger, controller))?;
    }
    std::thread::Builder::new()
        .name("kiln-watch".into())
        .spawn(move || event_loop(root_for_events, inotify, dirs, shared, trigger, controller))?;
    Ok(())
}

/// The nearest existing directory for every managed path's parent. Each parent is looked at
/// once: a thousand files in a few directories cost a few stats.
fn wanted_dirs(root: &Sysroot, managed: &BTreeSet<String>) -> BTreeSet<PathBuf> {
    let parents: BTreeSet<&str> = managed
        .iter()
        .filter_map(|p| p.rsplit_once('/').map(|(parent, _)| parent))
        .collect();
    let mut out = BTreeSet::new();
    for parent in parents {
        let mut dir = root.path(parent);
        loop {
            if dir.is_dir() {
                out.insert(dir);
                break;
            }
            if !dir.pop() {
                break;
            }
        }
    }
    out
}

type WatchedDirs = Arc<std::sync::Mutex<BTreeMap<WatchDescriptor, PathBuf>>>;

/// Keeps the watches on the wanted directories. A directory watched only now may have changed
/// before its watch existed (one the controller just made, edited straight away): each new
/// watch wakes the controller once more, so it looks again with the watch in place.
fn update_loop(
    root: Sysroot,
    mut watches: Watches,
    dirs: WatchedDirs,
    shared: Arc<Shared>,
    rx: mpsc::Receiver<()>,
    trigger: Trigger,
    controller: &'static str,
) {
    let mut current: BTreeMap<PathBuf, WatchDescriptor> = BTreeMap::new();
    while rx.recv().is_ok() {
        while rx.try_recv().is_ok() {}
        let managed = match shared.managed.read() {
            Ok(m) => m.clone(),
            Err(_) => return,
        };
        match sync_watches(&root, &mut watches, &mut current, &dirs, &managed) {
            Some(true) => trigger.wake(controller),
            Some(false) => {}
            None => return,
        }
    }
}

/// Watches the directories `managed` wants and drops the others: whether a watch was added
/// (`None` when the shared map is poisoned).
fn sync_watches(
    root: &Sysroot,
    watches: &mut Watches,
    current: &mut BTreeMap<PathBuf, WatchDescriptor>,
    dirs: &WatchedDirs,
    managed: &BTreeSet<String>,
) -> Option<bool> {
    let wanted = wanted_dirs(root, managed);
    let mut map = dirs.lock().ok()?;
    current.retain(|dir, wd| {
        let keep = wanted.contains(dir) && dir.is_dir();
        if !keep {
            let _ = watches.remove(wd.clone());
            map.remove(wd);
        }
        keep
    });
    let mut added = false;
    for dir in wanted {
        if current.contains_key(&dir) {
            continue;
        }
        match watches.add(&dir, mask()) {
            Ok(wd) => {
                map.insert(wd.clone(), dir.clone());
                current.insert(dir, wd);
                added = true;
            }
            Err(e) => tracing::warn!("watching {}: {e}", dir.display()),
        }
    }
    Some(added)
}

fn event_loop(
    root: Sysroot,
    mut inotify: Inotify,
    dirs: WatchedDirs,
    shared: Arc<Shared>,
    trigger: Trigger,
    controller: &'static str,
) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let events = match inotify.read_events_blocking(&mut buf) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!("reading inotify events: {e}");
                return;
            }
        };
        let mut wake = false;
        let mut rewatch = false;
        {
            let Ok(map) = dirs.lock() else { return };
            let Ok(managed) = shared.managed.read() else {
                return;
            };
            for ev in events {
                let Some(dir) = map.get(&ev.wd) else { continue };
                if ev.mask.contains(inotify::EventMask::DELETE_SELF)
                    || ev.mask.contains(inotify::EventMask::ISDIR)
                {
                    rewatch = true;
                }
                let name = ev.name.unwrap_or(OsStr::new(""));
                if is_managed(&root, dir, name, &managed) {
                    wake = true;
                }
            }
        }
        if rewatch
            && let Ok(tx) = shared.watch_changed.lock()
            && let Some(tx) = tx.as_ref()
        {
            let _ = tx.send(());
        }
        if wake {
            trigger.wake(controller);
        }
    }
}

/// Whether `dir/name` (under the root) is a managed path or an ancestor of one.
fn is_managed(root: &Sysroot, dir: &Path, name: &OsStr, managed: &BTreeSet<String>) -> bool {
    let changed = dir.join(name);
    let Ok(rel) = changed.strip_prefix(root.root()) else {
        return false;
    };
    let host = format!("/{}", rel.to_string_lossy().trim_end_matches('/'));
    managed.contains(&host)
        || managed
            .range(format!("{host}/")..)
            .next()
            .is_some_and(|m| m.starts_with(&format!("{host}/")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watches_the_nearest_existing_directory_of_each_parent_once() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("etc/app")).unwrap();
        let root = Sysroot::new(t.path());
        let managed: BTreeSet<String> = [
            "/etc/app/a.conf",
            "/etc/app/b.conf",
            "/etc/new/deep/c.conf",
            "/etc/hostname",
            "/srv/data/file",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        let wanted = wanted_dirs(&root, &managed);
        let expected: BTreeSet<PathBuf> = [
            t.path().to_path_buf(),
            t.path().join("etc"),
            t.path().join("etc/app"),
        ]
        .into_iter()
        .collect();
        assert_eq!(wanted, expected);
    }

    #[test]
    fn says_when_a_directory_is_watched_anew() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("etc/app")).unwrap();
        let root = Sysroot::new(t.path());
        let inotify = Inotify::init().unwrap();
        let mut watches = inotify.watches();
        let mut current = BTreeMap::new();
        let dirs = WatchedDirs::default();
        let mut managed: BTreeSet<String> = ["/etc/app/a.conf".to_string()].into();
        let mut sync = |managed: &BTreeSet<String>| {
            sync_watches(&root, &mut watches, &mut current, &dirs, managed).unwrap()
        };
        assert!(sync(&managed), "the first watch");
        assert!(!sync(&managed), "nothing new");
        // The controller made a directory for a new path: it is watched, and said so.
        managed.insert("/etc/new/b.conf".into());
        assert!(sync(&managed), "/etc, the nearest existing directory");
        std::fs::create_dir(t.path().join("etc/new")).unwrap();
        assert!(sync(&managed), "/etc/new, once it exists");
        assert!(!sync(&managed));
        let watched: BTreeSet<PathBuf> = dirs.lock().unwrap().values().cloned().collect();
        assert_eq!(
            watched,
            [t.path().join("etc/app"), t.path().join("etc/new")].into()
        );
    }
}
