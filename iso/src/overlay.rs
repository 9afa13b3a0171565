//! Applying the rendered overlays and the `kiln` binary to the rootfs tree.

use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use crate::error::{BuildError, Result};
use crate::inputs::OverlayFile;
use crate::progress::{STRIP, SYSTEMCTL};

/// Where `path` (absolute inside the image) lands under `root`; `None` if it would leave it.
pub fn target_path(root: &Path, path: &str) -> Option<PathBuf> {
    let rel = Path::new(path.trim_start_matches('/'));
    let safe = rel.components().all(|c| matches!(c, Component::Normal(_)));
    (safe && !rel.as_os_str().is_empty()).then(|| root.join(rel))
}

/// Writes every overlay file (replacing what the packages put there) and enables `units`.
pub fn apply(root: &Path, files: &[OverlayFile], units: &[String]) -> Result<()> {
    for f in files {
        let dest = target_path(root, &f.path).ok_or_else(|| {
            BuildError::Rootfs(format!("an overlay path outside the image: {:?}", f.path))
        })?;
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)
                .map_err(BuildError::io(format!("creating {}", parent.display())))?;
        }
        // A package may have installed a symlink here: replace it, never write through it.
        if dest.symlink_metadata().is_ok() {
            std::fs::remove_file(&dest)
                .map_err(BuildError::io(format!("replacing {}", dest.display())))?;
        }
        std::fs::write(&dest, &f.contents)
            .map_err(BuildError::io(format!("writing {}", dest.display())))?;
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(f.mode)).map_err(
            BuildError::io(format!("setting the mode of {}", dest.display())),
        )?;
    }
    if !units.is_empty() {
        let mut cmd = SYSTEMCTL.command();
        cmd.arg("--root").arg(root).arg("enable").args(units);
        SYSTEMCTL.output(cmd, "enabling the overlay's systemd units")?;
    }
    Ok(())
}

/// Copies a kiln binary to `dest` without symbols: the image carries no debugger, and the
/// initramfs's init is loaded on every boot.
pub fn install_stripped(binary: &Path, dest: &Path) -> Result<()> {
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent)
            .map_err(BuildError::io(format!("creating {}", parent.display())))?;
    }
    let mut cmd = STRIP.command();
    cmd.arg("--strip-all").arg("-o").arg(dest).arg(binary);
    STRIP.output(
        cmd,
        &format!("copying {} without symbols", binary.display()),
    )?;
    std::fs::set_permissions(dest, std::fs::Permissions::from_mode(0o755)).map_err(BuildError::io(
        format!("setting the mode of {}", dest.display()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_paths_stay_inside_the_image() {
        let r = Path::new("/r");
        assert_eq!(
            target_path(r, "/etc/hostname"),
            Some(PathBuf::from("/r/etc/hostname"))
        );
        assert_eq!(target_path(r, "etc/x"), Some(PathBuf::from("/r/etc/x")));
        assert_eq!(target_path(r, "/etc/../../x"), None);
        assert_eq!(target_path(r, "/"), None);
    }

    #[test]
    fn apply_writes_modes_and_replaces_symlinks() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("etc")).unwrap();
        std::os::unix::fs::symlink("/proc/self/mounts", d.path().join("etc/mtab")).unwrap();
        let files = vec![
            OverlayFile {
                path: "/etc/mtab".into(),
                contents: b"x".to_vec(),
                mode: 0o644,
            },
            OverlayFile {
                path: "/usr/local/bin/t".into(),
                contents: b"#!/bin/sh\n".to_vec(),
                mode: 0o755,
            },
        ];
        apply(d.path(), &files, &[]).unwrap();
        let m = std::fs::symlink_metadata(d.path().join("etc/mtab")).unwrap();
        assert!(m.is_file());
        let t = std::fs::metadata(d.path().join("usr/local/bin/t")).unwrap();
        assert_eq!(t.permissions().mode() & 0o7777, 0o755);
        let bad = vec![OverlayFile {
            path: "/../x".into(),
            contents: vec![],
            mode: 0o644,
        }];
        assert!(apply(d.path(), &bad, &[]).is_err());
    }
}
