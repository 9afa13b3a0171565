//! Resolving a client-supplied file name inside a read-only root, shared by TFTP and HTTP.

use std::path::{Component, Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JailError {
    #[error("empty file name")]
    Empty,
    #[error("file name contains a NUL byte")]
    Nul,
    #[error("file name {0:?} leaves the served directory")]
    Escapes(String),
    #[error("{0:?} does not exist or is not a regular file")]
    NotFound(String),
}

/// Maps `name` to a regular file under `root`. A leading `/` means the root itself (PXE
/// clients often ask for `/ipxe.efi`); `..` components are refused, so a client can only name
/// paths below the root. Symlinks inside the root are the operator's and are followed (Debian's
/// `/usr/lib/ipxe/ipxe.efi` points to `/boot`). Backslashes count as separators, as
/// Windows-born clients send them.
pub fn resolve(root: &Path, name: &str) -> Result<PathBuf, JailError> {
    if name.contains('\0') {
        return Err(JailError::Nul);
    }
    let normalized = name.replace('\\', "/");
    let relative = normalized.trim_start_matches('/');
    if relative.is_empty() {
        return Err(JailError::Empty);
    }
    let mut path = PathBuf::new();
    for component in Path::new(relative).components() {
        match component {
            Component::Normal(part) => path.push(part),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(JailError::Escapes(name.to_string()));
            }
        }
    }
    let full = root.join(&path);
    if !full.is_file() {
        return Err(JailError::NotFound(name.to_string()));
    }
    Ok(full)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_files_and_refuses_everything_that_leaves_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/file"), b"x").unwrap();
        std::fs::write(dir.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("link")).unwrap();

        let want = root.join("sub/file");
        assert_eq!(resolve(&root, "sub/file").unwrap(), want);
        assert_eq!(resolve(&root, "/sub/file").unwrap(), want);
        assert_eq!(resolve(&root, "./sub\\file").unwrap(), want);

        for bad in ["../secret", "sub/../../secret", "..\\secret", "/../secret"] {
            assert!(
                matches!(resolve(&root, bad), Err(JailError::Escapes(_))),
                "{bad}"
            );
        }
        assert_eq!(
            resolve(&root, "link").unwrap(),
            root.join("link"),
            "operator's symlink"
        );
        assert!(matches!(
            resolve(&root, "/etc/passwd"),
            Err(JailError::NotFound(_))
        ));
        assert!(matches!(resolve(&root, "sub"), Err(JailError::NotFound(_))));
        assert_eq!(resolve(&root, "/"), Err(JailError::Empty));
        assert_eq!(resolve(&root, "a\0b"), Err(JailError::Nul));
    }
}
