//! `KILN_STATE`: an ext4 file system made at its byte offset with `mke2fs -d`, so it is
//! filled from a seed directory without mounting. kiln's initramfs mounts it and uses
//! `root/upper` and `root/work` as the writable overlay over the read-only slot: a file the
//! installed system sees at `/etc/x` is seeded as `root/upper/etc/x`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::tools::{self, ToolError};

pub const STATE_LABEL: &str = "KILN_STATE";
/// Where the installed root's writable layer lives on `KILN_STATE`.
pub const OVERLAY_UPPER: &str = "root/upper";
pub const OVERLAY_WORK: &str = "root/work";

/// A file seeded onto `KILN_STATE`, by its path on that file system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateFile {
    pub path: String,
    pub mode: u32,
    pub content: String,
}

/// Writes the seed tree under `dir`, with the overlay's (empty) work directory.
pub fn write_seed(files: &[StateFile], dir: &Path) -> Result<(), StateError> {
    let io = |path: PathBuf| move |source| StateError::Seed { path, source };
    for f in files {
        let p = dir.join(f.path.trim_start_matches('/'));
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent.to_path_buf()))?;
        }
        std::fs::write(&p, &f.content).map_err(io(p.clone()))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(f.mode))
            .map_err(io(p.clone()))?;
    }
    for d in [OVERLAY_UPPER, OVERLAY_WORK] {
        let p = dir.join(d);
        std::fs::create_dir_all(&p).map_err(io(p.clone()))?;
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error("preparing {path}: {source}")]
    Seed {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Makes the ext4 file system of `size` bytes at byte `offset` of `target`, filled from `seed`.
pub fn make_ext4(target: &Path, offset: u64, size: u64, seed: &Path) -> Result<(), StateError> {
    tools::run(
        tools::MKE2FS,
        "creating KILN_STATE",
        [
            "-q".to_string(),
            "-F".into(),
            "-t".into(),
            "ext4".into(),
            "-L".into(),
            STATE_LABEL.into(),
            // No discard: on a whole device it must not touch anything outside the partition.
            "-E".into(),
            format!("offset={offset},nodiscard"),
            "-d".into(),
            seed.display().to_string(),
            target.display().to_string(),
            format!("{}k", size / 1024),
        ],
    )?;
    Ok(())
}
