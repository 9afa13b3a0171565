//! Content-addressed build cache (`$KILN_CACHE`, default `~/.cache/kiln`).
//!
//! Entries are immutable files named by the sha256 of everything that produced them. They are
//! written to a temporary name in the same directory and renamed into place, so an interrupted
//! build leaves at most a stray temporary file, never a truncated entry under a valid key.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{BuildError, Result};

#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

impl Cache {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// `dir`, else `$KILN_CACHE`, else `~/.cache/kiln`.
    pub fn locate(dir: Option<PathBuf>) -> Self {
        Self::new(dir.unwrap_or_else(kiln_spec::paths::cache_dir))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Path of the entry `kind/key` (whether or not it exists).
    pub fn path(&self, kind: &str, key: &str) -> PathBuf {
        self.root.join(kind).join(key)
    }

    /// The entry if it is complete.
    pub fn get(&self, kind: &str, key: &str) -> Option<PathBuf> {
        let p = self.path(kind, key);
        p.is_file().then_some(p)
    }

    /// Runs `produce` on a temporary path beside the entry and renames the result into place.
    pub fn put_with(
        &self,
        kind: &str,
        key: &str,
        produce: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<PathBuf> {
        let dir = self.root.join(kind);
        std::fs::create_dir_all(&dir).map_err(BuildError::io(format!(
            "creating cache directory {}",
            dir.display()
        )))?;
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{key}."))
            .tempfile_in(&dir)
            .map_err(BuildError::io(format!(
                "creating a temporary file in {}",
                dir.display()
            )))?
            .into_temp_path();
        produce(&tmp)?;
        let dest = dir.join(key);
        tmp.persist(&dest).map_err(|e| BuildError::Io {
            what: format!("storing cache entry {}", dest.display()),
            source: e.error,
        })?;
        Ok(dest)
    }
}

/// Cache key of a base rootfs: sha256 over every input mmdebstrap sees, one per line.
pub fn rootfs_key(suite: &str, mirror: &str, packages: &[String], args: &[String]) -> String {
    let mut h = Sha256::new();
    h.update(b"kiln-rootfs-v1\n");
    for part in [suite, mirror] {
        h.update(part.as_bytes());
        h.update(b"\n");
    }
    for p in packages {
        h.update(b"pkg ");
        h.update(p.as_bytes());
        h.update(b"\n");
    }
    for a in args {
        h.update(b"arg ");
        h.update(a.as_bytes());
        h.update(b"\n");
    }
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_changes_with_every_input() {
        let pk = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let base = rootfs_key(
            "bookworm",
            "http://m/debian",
            &pk(&["a", "b"]),
            &pk(&["--x"]),
        );
        assert_eq!(base.len(), 64);
        assert_eq!(
            base,
            rootfs_key(
                "bookworm",
                "http://m/debian",
                &pk(&["a", "b"]),
                &pk(&["--x"])
            )
        );
        for other in [
            rootfs_key("trixie", "http://m/debian", &pk(&["a", "b"]), &pk(&["--x"])),
            rootfs_key(
                "bookworm",
                "http://n/debian",
                &pk(&["a", "b"]),
                &pk(&["--x"]),
            ),
            rootfs_key("bookworm", "http://m/debian", &pk(&["a"]), &pk(&["--x"])),
            rootfs_key("bookworm", "http://m/debian", &pk(&["a", "b"]), &pk(&[])),
            // A package name must not be confused with an argument.
            rootfs_key(
                "bookworm",
                "http://m/debian",
                &pk(&["a", "b", "--x"]),
                &pk(&[]),
            ),
        ] {
            assert_ne!(base, other);
        }
    }

    #[test]
    fn failed_producer_leaves_no_entry() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path());
        let err = cache.put_with("rootfs", "k1", |tmp| {
            std::fs::write(tmp, b"half").unwrap();
            Err(BuildError::Rootfs("a simulated failure".into()))
        });
        assert!(err.is_err());
        assert!(cache.get("rootfs", "k1").is_none());
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("rootfs"))
            .unwrap()
            .collect();
        assert!(
            leftovers.is_empty(),
            "temporary file removed: {leftovers:?}"
        );

        let p = cache
            .put_with("rootfs", "k1", |tmp| {
                std::fs::write(tmp, b"whole").map_err(BuildError::io("writing"))
            })
            .unwrap();
        assert_eq!(cache.get("rootfs", "k1"), Some(p.clone()));
        assert_eq!(std::fs::read(p).unwrap(), b"whole");
    }
}
