//! Running the external filesystem tools (mkfs.vfat, mtools, mke2fs, grub-mkimage) with
//! errors that say which tool failed, what it printed and which package provides it.

use std::path::Path;
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("{tool} is not installed (Debian package {package})")]
    Missing { tool: String, package: &'static str },
    #[error("running {tool}: {source}")]
    Spawn {
        tool: String,
        source: std::io::Error,
    },
    #[error("{command} failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// The Debian package each external tool comes from, for error messages.
fn package_of(tool: &str) -> &'static str {
    match tool {
        "mkfs.vfat" => "dosfstools",
        "mcopy" | "mmd" | "mdir" => "mtools",
        "mke2fs" | "debugfs" => "e2fsprogs",
        "grub-mkimage" => "grub-common and grub-pc-bin",
        _ => "(unknown)",
    }
}

/// Runs `tool args…` to completion; a non-zero exit is an error carrying its stderr.
pub fn run<I, S>(tool: &str, args: I) -> Result<String, ToolError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let args: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().into()).collect();
    let command = std::iter::once(tool.to_string())
        .chain(args.iter().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ");
    tracing::debug!(%command, "running");
    let out = Command::new(tool)
        .args(&args)
        // mtools otherwise rejects FAT geometries that do not match a floppy-era disk.
        .env("MTOOLS_SKIP_CHECK", "1")
        .stdin(Stdio::null())
        .output()
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                ToolError::Missing {
                    tool: tool.to_string(),
                    package: package_of(tool),
                }
            } else {
                ToolError::Spawn {
                    tool: tool.to_string(),
                    source,
                }
            }
        })?;
    if !out.status.success() {
        return Err(ToolError::Failed {
            command,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// mtools' image syntax for a filesystem at a byte offset inside a disk or image.
pub fn mtools_image(target: &Path, offset: u64) -> String {
    format!("{}@@{offset}", target.display())
}
