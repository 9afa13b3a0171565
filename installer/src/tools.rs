//! The filesystem tools the installer runs (mkfs.vfat, mtools, mke2fs, grub-mkimage), through
//! kiln's one tool runner: errors say which tool failed, what it printed and which package
//! provides it.

use std::path::Path;

pub use kiln_exec::{Tool, ToolError};

pub const MKFS_VFAT: Tool = Tool::new("mkfs.vfat", "dosfstools");
pub const MMD: Tool = Tool::new("mmd", "mtools");
pub const MCOPY: Tool = Tool::new("mcopy", "mtools");
pub const MKE2FS: Tool = Tool::new("mke2fs", "e2fsprogs");
pub const GRUB_MKIMAGE: Tool = Tool::new("grub-mkimage", "grub-common and grub-pc-bin");

/// Runs `tool args…` to completion for `what`; returns its stdout.
pub fn run<I, S>(tool: Tool, what: &str, args: I) -> Result<String, ToolError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut cmd = tool.command();
    cmd.args(args)
        // mtools otherwise rejects FAT geometries that do not match a floppy-era disk.
        .env("MTOOLS_SKIP_CHECK", "1");
    tool.output(cmd, what)
}

/// mtools' image syntax for a filesystem at a byte offset inside a disk or image.
pub fn mtools_image(target: &Path, offset: u64) -> String {
    format!("{}@@{offset}", target.display())
}
