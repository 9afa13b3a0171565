//! Every host path the agent touches, resolved under one root directory (`/` in production, a
//! temporary tree in tests), and the crash-safe file primitives on top of it.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Sysroot {
    root: PathBuf,
}

/// The agent's own state directory (record of managed resources, journal, backups), as a
/// host path.
pub const STATE_DIR: &str = "/var/lib/kiln/agent";

impl Sysroot {
    pub fn new(root: impl Into<PathBuf>) -> Sysroot {
        Sysroot { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// True when this is the running system, not an offline tree.
    pub fn is_live(&self) -> bool {
        self.root == Path::new("/")
    }

    /// `/etc/motd` → `<root>/etc/motd`. Host paths are absolute and normalised (validated by
    /// the NodeConfig), so joining the components cannot leave the root.
    pub fn path(&self, host_path: &str) -> PathBuf {
        self.root.join(host_path.trim_start_matches('/'))
    }

    pub fn state_path(&self, name: &str) -> PathBuf {
        self.path(STATE_DIR).join(name)
    }

    pub fn read(&self, host_path: &str) -> io::Result<Option<Vec<u8>>> {
        match fs::read(self.path(host_path)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if absent(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Metadata without following a final symlink; `None` when nothing is there.
    pub fn stat(&self, host_path: &str) -> io::Result<Option<fs::Metadata>> {
        match fs::symlink_metadata(self.path(host_path)) {
            Ok(m) => Ok(Some(m)),
            Err(e) if absent(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Users and groups of the tree's /etc/passwd and /etc/group, for owner names.
    pub fn accounts(&self) -> io::Result<AccountDb> {
        let read = |p: &str| -> io::Result<String> {
            Ok(self
                .read(p)?
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default())
        };
        Ok(AccountDb::parse(
            &read("/etc/passwd")?,
            &read("/etc/group")?,
        ))
    }
}

/// Nothing there: not found, or a parent is not a directory.
fn absent(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}

/// Owner and mode of a file or directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl Meta {
    pub fn of(m: &fs::Metadata) -> Meta {
        Meta {
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
        }
    }
}

/// A file written under a temporary name beside its target and not yet in place. Dropped
/// without [`Staged::commit`], it removes the temporary file.
#[derive(Debug)]
pub struct Staged {
    temp: PathBuf,
    target: PathBuf,
    /// Written inside a [`StagedTree`]: the tree's rename, not the file's, puts it in place.
    in_tree: bool,
    /// [`written_stamp`] of the file once written: commit tells whether anything wrote to
    /// it since.
    written: Option<WrittenStamp>,
    committed: bool,
}

impl Staged {
    /// Writes `content` to `target`'s temporary name with its owner and mode already set.
    /// Nothing is flushed: the caller makes the content durable (through the returned handle,
    /// or with [`sync_filesystems`] for many files at once) before it commits.
    pub fn write(target: &Path, content: &[u8], meta: Meta) -> io::Result<(Staged, File)> {
        let temp = temp_path(target).ok_or_else(|| io::Error::other("path has no parent"))?;
        Staged::write_at(temp, target, false, content, meta)
    }

    /// Writes `content` for `target` at `temp`: beside it ([`Staged::write`]), or inside a
    /// [`StagedTree`] (`in_tree`) whose rename puts it in place.
    pub fn write_at(
        temp: PathBuf,
        target: &Path,
        in_tree: bool,
        content: &[u8],
        meta: Meta,
    ) -> io::Result<(Staged, File)> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)?;
        let mut staged = Staged {
            temp,
            target: target.to_path_buf(),
            in_tree,
            written: None,
            committed: false,
        };
        f.write_all(content)?;
        std::os::unix::fs::fchown(&f, Some(meta.uid), Some(meta.gid))?;
        f.set_permissions(fs::Permissions::from_mode(meta.mode))?;
        staged.written = Some(written_stamp(&f.metadata()?));
        Ok((staged, f))
    }

    pub fn temp(&self) -> &Path {
        &self.temp
    }

    /// Renames the file into place (a file in a tree is there once its [`StagedTree`] is
    /// committed). Its directory still needs a sync for the rename to last. Returns the
    /// file's metadata as placed (the rename moved its change time) when it is still the file
    /// kiln wrote, unmodified since: same inode, size and modification time.
    pub fn commit(mut self) -> io::Result<Option<fs::Metadata>> {
        if !self.in_tree {
            fs::rename(&self.temp, &self.target)?;
        }
        self.committed = true;
        let placed = fs::symlink_metadata(&self.target)?;
        Ok((self.written == Some(written_stamp(&placed))).then_some(placed))
    }
}

/// Inode, size and modification time: what a rename keeps and a write changes.
type WrittenStamp = (u64, u64, i64, i64);

fn written_stamp(m: &fs::Metadata) -> WrittenStamp {
    (m.ino(), m.size(), m.mtime(), m.mtime_nsec())
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.temp);
        }
    }
}

/// A directory that does not exist yet, built under its temporary name (see [`temp_path`])
/// with everything a batch writes inside it: those files need no temporary names of their
/// own, and the whole tree appears at once with one rename. Dropped without
/// [`StagedTree::commit`], it removes the tree.
#[derive(Debug)]
pub struct StagedTree {
    temp: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl StagedTree {
    /// Creates the empty tree for directory `target`, replacing a tree left by a crash.
    pub fn create(target: &Path) -> io::Result<StagedTree> {
        let temp = temp_path(target).ok_or_else(|| io::Error::other("path has no parent"))?;
        remove_staged_tree(&temp)?;
        fs::create_dir(&temp)?;
        Ok(StagedTree {
            temp,
            target: target.to_path_buf(),
            committed: false,
        })
    }

    /// Where `host_rel` (a path relative to the tree's target) is written inside the tree.
    pub fn inside(&self, rel: &str) -> PathBuf {
        self.temp.join(rel.trim_start_matches('/'))
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Renames the tree into place, never over anything that appeared there since the plan.
    /// Its parent directory still needs a sync for the rename to last.
    pub fn commit(&mut self) -> io::Result<()> {
        nix::fcntl::renameat2(
            nix::fcntl::AT_FDCWD,
            &self.temp,
            nix::fcntl::AT_FDCWD,
            &self.target,
            nix::fcntl::RenameFlags::RENAME_NOREPLACE,
        )?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for StagedTree {
    fn drop(&mut self) {
        if !self.committed {
            let _ = remove_staged_tree(&self.temp);
        }
    }
}

/// Removes the [`StagedTree`] at `temp` if there is one (never following a symlink there).
pub fn remove_staged_tree(temp: &Path) -> io::Result<()> {
    match fs::symlink_metadata(temp) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(temp),
        Ok(_) => Ok(()),
        Err(e) if absent(&e) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Where [`Staged::write`] puts `target`'s content before the rename: in the same directory,
/// so the rename cannot cross filesystems.
pub fn temp_path(target: &Path) -> Option<PathBuf> {
    let name = target.file_name()?.to_string_lossy();
    Some(target.parent()?.join(format!(".{name}.kiln-tmp")))
}

/// Replaces `path` atomically: the content goes to a temporary file in the same directory,
/// is flushed to disk with its owner and mode already set, then renamed over the target. A
/// crash leaves either the old file or the new one, never a mix. The caller syncs the
/// directory (see [`sync_dir`]) before it records the write as durable. Returns what
/// [`Staged::commit`] does.
pub fn write_atomic(path: &Path, content: &[u8], meta: Meta) -> io::Result<Option<fs::Metadata>> {
    let (staged, f) = Staged::write(path, content, meta)?;
    f.sync_all()?;
    staged.commit()
}

/// Makes renames and unlinks in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Makes everything written on the filesystems of `dirs` durable with one syncfs(2) each: for
/// many files, one writeback and one device flush instead of one per file. It also flushes
/// whatever else is dirty on those filesystems.
pub fn sync_filesystems<'a>(dirs: impl IntoIterator<Item = &'a Path>) -> io::Result<()> {
    let mut synced = BTreeSet::new();
    for d in dirs {
        if synced.insert(fs::metadata(d)?.dev()) {
            nix::unistd::syncfs(File::open(d)?)?;
        }
    }
    Ok(())
}

pub fn set_meta(path: &Path, meta: Meta) -> io::Result<()> {
    std::os::unix::fs::lchown(path, Some(meta.uid), Some(meta.gid))?;
    fs::set_permissions(path, fs::Permissions::from_mode(meta.mode))
}

/// Names and ids from passwd/group files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccountDb {
    /// user → (uid, primary gid)
    pub users: BTreeMap<String, (u32, u32)>,
    pub shells: BTreeMap<String, String>,
    /// group → (gid, members)
    pub groups: BTreeMap<String, (u32, Vec<String>)>,
}

impl AccountDb {
    pub fn parse(passwd: &str, group: &str) -> AccountDb {
        let mut db = AccountDb::default();
        for line in passwd.lines() {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() >= 7
                && let (Ok(uid), Ok(gid)) = (f[2].parse(), f[3].parse())
            {
                db.users.insert(f[0].to_string(), (uid, gid));
                db.shells.insert(f[0].to_string(), f[6].to_string());
            }
        }
        for line in group.lines() {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() >= 4
                && let Ok(gid) = f[2].parse()
            {
                let members = f[3]
                    .split(',')
                    .filter(|m| !m.is_empty())
                    .map(String::from)
                    .collect();
                db.groups.insert(f[0].to_string(), (gid, members));
            }
        }
        db
    }

    /// `user[:group]` (names or ids) → uid, gid. A missing group means the user's primary one.
    pub fn resolve_owner(&self, owner: &str) -> Option<(u32, u32)> {
        let (u, g) = match owner.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (owner, None),
        };
        let (uid, primary) = match u.parse::<u32>() {
            Ok(id) => (id, id),
            Err(_) => *self.users.get(u)?,
        };
        let gid = match g {
            None => primary,
            Some(g) => match g.parse::<u32>() {
                Ok(id) => id,
                Err(_) => self.groups.get(g)?.0,
            },
        };
        Some((uid, gid))
    }

    /// Supplementary groups of `user`, sorted.
    pub fn groups_of(&self, user: &str) -> Vec<String> {
        self.groups
            .iter()
            .filter(|(_, (_, members))| members.iter().any(|m| m == user))
            .map(|(g, _)| g.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_staged_tree_appears_whole_and_never_over_what_appeared_meanwhile() {
        let t = tempfile::tempdir().unwrap();
        let meta = Meta {
            mode: 0o640,
            uid: 0,
            gid: 0,
        };
        let target = t.path().join("srv");
        let mut tree = StagedTree::create(&target).unwrap();
        fs::create_dir(tree.inside("/bench")).unwrap();
        let file = target.join("bench/f");
        let (staged, _) =
            Staged::write_at(tree.inside("/bench/f"), &file, true, b"F\n", meta).unwrap();
        assert!(!target.exists(), "nothing shows before the commit");
        tree.commit().unwrap();
        assert!(staged.commit().unwrap().is_some(), "placed as written");
        assert_eq!(fs::read_to_string(&file).unwrap(), "F\n");
        assert_eq!(fs::metadata(&file).unwrap().mode() & 0o7777, 0o640);
        assert!(!t.path().join(".srv.kiln-tmp").exists());

        // Something made the directory after the plan: the tree goes, the directory stays.
        let other = t.path().join("opt");
        let mut tree = StagedTree::create(&other).unwrap();
        fs::write(tree.inside("/x"), "x").unwrap();
        fs::create_dir(&other).unwrap();
        let err = tree.commit().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists, "{err}");
        drop(tree);
        assert!(!t.path().join(".opt.kiln-tmp").exists());
        assert_eq!(fs::read_dir(&other).unwrap().count(), 0);
    }

    #[test]
    fn resolves_owners_by_name_and_id() {
        let db = AccountDb::parse(
            "root:x:0:0:root:/root:/bin/bash\nops:x:1000:1000::/home/ops:/bin/sh\n",
            "root:x:0:\nops:x:1000:\nsudo:x:27:ops,other\n",
        );
        assert_eq!(db.resolve_owner("ops"), Some((1000, 1000)));
        assert_eq!(db.resolve_owner("ops:sudo"), Some((1000, 27)));
        assert_eq!(db.resolve_owner("5:6"), Some((5, 6)));
        assert_eq!(db.resolve_owner("nobody"), None);
        assert_eq!(db.groups_of("ops"), ["sudo"]);
    }

    #[test]
    fn a_commit_vouches_only_for_the_file_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let meta = Meta {
            mode: 0o644,
            uid: 0,
            gid: 0,
        };
        let kept = dir.path().join("kept");
        let (staged, _) = Staged::write(&kept, b"as written", meta).unwrap();
        let placed = staged
            .commit()
            .unwrap()
            .expect("an untouched file is vouched for");
        let now = fs::symlink_metadata(&kept).unwrap();
        assert_eq!(
            (placed.ino(), placed.size(), placed.ctime_nsec()),
            (now.ino(), now.size(), now.ctime_nsec())
        );

        let edited = dir.path().join("edited");
        let (staged, mut f) = Staged::write(&edited, b"as written", meta).unwrap();
        f.write_all(b", then more by someone else").unwrap();
        assert!(staged.commit().unwrap().is_none());
        assert_eq!(
            fs::read_to_string(&edited).unwrap(),
            "as written, then more by someone else"
        );
    }

    #[test]
    fn atomic_write_replaces_content_and_sets_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        fs::write(&p, "old").unwrap();
        let me = Meta::of(&fs::metadata(&p).unwrap());
        write_atomic(&p, b"new", Meta { mode: 0o640, ..me }).unwrap();
        assert_eq!(fs::read_to_string(&p).unwrap(), "new");
        assert_eq!(Meta::of(&fs::metadata(&p).unwrap()).mode, 0o640);
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary file left"
        );
    }
}
