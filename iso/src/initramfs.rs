//! kiln's initramfs: `kiln-init` as `/init` (stage-1), the shared libraries it links, and
//! the kernel modules stage-1 loads, as a zstd-compressed newc cpio archive.
//!
//! The binary is the host's build, dynamically linked against glibc: the host and the image are
//! both Debian 12, so copying its libraries (found with `ldd`) is exact and avoids a static
//! build. It is a binary of its own, not the whole CLI: every boot loads and unpacks the
//! initramfs, and under emulation each 10 MB of it costs about a second.

use std::collections::BTreeSet;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use kiln_exec::ToolError;
use kiln_spec::kmod::{module_name, softdep_line};

use crate::error::{BuildError, Result};
use crate::progress::{LDD, ZSTD};

/// Modules stage-1 needs to reach its root on QEMU and common hardware: disk and CD
/// controllers, USB storage, NICs for a network root, and the file systems it mounts.
pub const STAGE1_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "virtio_net",
    "sd_mod",
    "sr_mod",
    "ahci",
    "ata_piix",
    "ata_generic",
    "nvme",
    "usb_storage",
    "uas",
    "xhci_pci",
    "ehci_pci",
    "uhci_hcd",
    "ohci_pci",
    "e1000",
    "e1000e",
    "isofs",
    "squashfs",
    "overlay",
    "loop",
    "ext4",
    "crc32c_generic",
];

/// Libraries named in `ldd` output (absolute paths only; the vDSO has none).
pub fn parse_ldd(output: &str) -> Vec<PathBuf> {
    let mut libs = BTreeSet::new();
    for line in output.lines() {
        let line = line.trim();
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.trim(),
            None => line,
        };
        let path = path.split(" (").next().unwrap_or("").trim();
        if path.starts_with('/') {
            libs.insert(PathBuf::from(path));
        }
    }
    libs.into_iter().collect()
}

/// The shared libraries `binary` needs; empty for a static binary.
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let mut cmd = LDD.command();
    cmd.arg(binary);
    match LDD.output(
        cmd,
        &format!("listing the libraries of {}", binary.display()),
    ) {
        Ok(out) => Ok(parse_ldd(&out)),
        Err(ToolError::Failed { log, .. }) if log.contains("not a dynamic executable") => {
            Ok(Vec::new())
        }
        Err(e) => Err(e.into()),
    }
}

/// The lines of a full `modules.dep` that describe `keep` (which is dependency-closed).
pub fn subset_modules_dep(full: &str, keep: &BTreeSet<String>) -> String {
    let mut out = String::new();
    for line in full.lines() {
        if let Some((path, _)) = line.split_once(':')
            && keep.contains(path.trim())
        {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The lines of a `modules.softdep` for modules named in `keep` (paths, as in `modules.dep`).
pub fn subset_softdep(full: &str, keep: &BTreeSet<String>) -> String {
    let names: BTreeSet<String> = keep.iter().map(|p| module_name(p)).collect();
    let mut out = String::new();
    for line in full.lines() {
        if let Some((name, _)) = softdep_line(line)
            && names.contains(&module_name(name))
        {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// What an archive entry is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Dir,
    File(PathBuf),
    Data(Vec<u8>),
    CharDevice { major: u32, minor: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Path inside the archive, without a leading `/`.
    pub path: String,
    pub mode: u32,
    pub source: Source,
}

/// Every entry of the initramfs, parents before children. `modules` are paths relative to
/// `module_dir` (the rootfs's `/usr/lib/modules/<release>`); `indexes` are the module index
/// files written beside them (file name, content).
pub fn plan(
    init: &Path,
    libs: &[PathBuf],
    release: &str,
    module_dir: &Path,
    modules: &BTreeSet<String>,
    indexes: &[(&str, &str)],
) -> Vec<Entry> {
    let mut files: Vec<Entry> = vec![
        Entry {
            path: "init".into(),
            mode: 0o755,
            source: Source::File(init.to_path_buf()),
        },
        Entry {
            path: "dev/console".into(),
            mode: 0o600,
            source: Source::CharDevice { major: 5, minor: 1 },
        },
    ];
    for lib in libs {
        files.push(Entry {
            path: lib.to_string_lossy().trim_start_matches('/').to_string(),
            mode: 0o755,
            source: Source::File(lib.clone()),
        });
    }
    let mdir = format!("lib/modules/{release}");
    for m in modules {
        files.push(Entry {
            path: format!("{mdir}/{m}"),
            mode: 0o644,
            source: Source::File(module_dir.join(m)),
        });
    }
    for (name, content) in indexes {
        files.push(Entry {
            path: format!("{mdir}/{name}"),
            mode: 0o644,
            source: Source::Data(content.as_bytes().to_vec()),
        });
    }
    // Mount points stage-1 uses, and every parent directory of a file.
    let mut dirs: BTreeSet<String> = ["proc", "sys", "dev", "run", "newroot"]
        .map(String::from)
        .into();
    for f in &files {
        let mut p = Path::new(&f.path).parent();
        while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
            dirs.insert(d.to_string_lossy().into_owned());
            p = d.parent();
        }
    }
    let mut entries: Vec<Entry> = dirs
        .into_iter()
        .map(|path| Entry {
            path,
            mode: 0o755,
            source: Source::Dir,
        })
        .collect();
    files.sort_by(|a, b| a.path.cmp(&b.path));
    entries.extend(files);
    entries
}

/// One line per entry (`mode type path [<- source]`), for golden tests and `--verbose`.
pub fn listing(entries: &[Entry]) -> String {
    let mut out = String::new();
    for e in entries {
        let (kind, from) = match &e.source {
            Source::Dir => ("d", String::new()),
            Source::File(p) => ("f", format!(" <- {}", p.display())),
            Source::Data(d) => ("f", format!(" <- {} bytes generated", d.len())),
            Source::CharDevice { major, minor } => ("c", format!(" {major}:{minor}")),
        };
        out.push_str(&format!("{:04o} {kind} /{}{from}\n", e.mode, e.path));
    }
    out
}

/// Writes the archive as newc cpio (owner root, time 0), compressed with zstd.
pub fn write(entries: &[Entry], out: &Path) -> Result<()> {
    use cpio::newc::{Builder, ModeFileType};
    let raw = out.with_extension("cpio");
    {
        let file = std::fs::File::create(&raw)
            .map_err(BuildError::io(format!("creating {}", raw.display())))?;
        let mut w = BufWriter::new(file);
        for (ino, e) in entries.iter().enumerate() {
            let b = Builder::new(&e.path)
                .ino(ino as u32 + 1)
                .uid(0)
                .gid(0)
                .mtime(0);
            let data: Vec<u8> = match &e.source {
                Source::File(p) => {
                    std::fs::read(p).map_err(BuildError::io(format!("reading {}", p.display())))?
                }
                Source::Data(d) => d.clone(),
                Source::Dir | Source::CharDevice { .. } => Vec::new(),
            };
            let b = match &e.source {
                Source::Dir => b.mode(0o040000 | e.mode).nlink(2),
                Source::CharDevice { major, minor } => b
                    .set_mode_file_type(ModeFileType::Char)
                    .mode(0o020000 | e.mode)
                    .rdev_major(*major)
                    .rdev_minor(*minor)
                    .nlink(1),
                Source::File(_) | Source::Data(_) => b.mode(0o100000 | e.mode).nlink(1),
            };
            let mut writer = b.write(&mut w, data.len() as u32);
            writer
                .write_all(&data)
                .map_err(BuildError::io("writing the initramfs"))?;
            writer
                .finish()
                .map_err(BuildError::io("writing the initramfs"))?;
        }
        let w = cpio::newc::trailer(w).map_err(BuildError::io("writing the initramfs"))?;
        w.into_inner()
            .map_err(|e| BuildError::Io {
                what: "writing the initramfs".into(),
                source: e.into_error(),
            })?
            .sync_all()
            .map_err(BuildError::io("writing the initramfs"))?;
    }
    let mut cmd = ZSTD.command();
    cmd.args(["-q", "-f", "-T0", "-9", "--rm"])
        .arg(&raw)
        .arg("-o")
        .arg(out);
    ZSTD.output(cmd, "compressing the initramfs")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd5a1f2000)\n\
                   \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f0c2c5a0000)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f0c2c200000)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f0c2c8c0000)\n";
        assert_eq!(
            parse_ldd(out),
            [
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
        assert!(parse_ldd("\tstatically linked\n").is_empty());
    }

    #[test]
    fn modules_dep_subset() {
        let full = "kernel/a.ko: kernel/b.ko\nkernel/b.ko:\nkernel/c.ko:\n";
        let keep: BTreeSet<String> = ["kernel/a.ko", "kernel/b.ko"].map(String::from).into();
        assert_eq!(
            subset_modules_dep(full, &keep),
            "kernel/a.ko: kernel/b.ko\nkernel/b.ko:\n"
        );
    }

    #[test]
    fn softdep_subset() {
        let full = "# Soft dependencies extracted from modules themselves.\n\
                    softdep ohci_pci pre: ehci_pci\n\
                    softdep ext4 pre: crypto-crc32c\n\
                    softdep cifs gcm\n";
        let keep: BTreeSet<String> = [
            "kernel/drivers/usb/host/ohci-pci.ko",
            "kernel/fs/ext4/ext4.ko",
        ]
        .map(String::from)
        .into();
        assert_eq!(
            subset_softdep(full, &keep),
            "softdep ohci_pci pre: ehci_pci\nsoftdep ext4 pre: crypto-crc32c\n"
        );
    }

    #[test]
    fn plan_matches_golden() {
        let modules: BTreeSet<String> =
            ["kernel/drivers/cdrom/cdrom.ko", "kernel/fs/isofs/isofs.ko"]
                .map(String::from)
                .into();
        let entries = plan(
            Path::new("/build/kiln-init"),
            &parse_ldd(
                "\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x1)\n\t/lib64/ld-linux-x86-64.so.2 (0x2)\n",
            ),
            "6.1.0-9-amd64",
            Path::new("/rootfs/usr/lib/modules/6.1.0-9-amd64"),
            &modules,
            &[
                (
                    "modules.dep",
                    "kernel/fs/isofs/isofs.ko: kernel/drivers/cdrom/cdrom.ko\nkernel/drivers/cdrom/cdrom.ko:\n",
                ),
                ("modules.softdep", "softdep isofs pre: cdrom\n"),
            ],
        );
        crate::golden::check("initramfs.txt", &listing(&entries));
    }

    #[test]
    fn archive_round_trips_through_cpio() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("payload");
        std::fs::write(&f, b"#!init").unwrap();
        let entries = plan(
            &f,
            &[],
            "r",
            d.path(),
            &BTreeSet::new(),
            &[("modules.dep", "")],
        );
        let out = d.path().join("initrd.img");
        write(&entries, &out).unwrap();
        let raw = std::process::Command::new("zstd")
            .args(["-dc"])
            .arg(&out)
            .output()
            .unwrap();
        assert!(raw.status.success());
        let mut names = Vec::new();
        let mut rest = std::io::Cursor::new(raw.stdout);
        loop {
            let r = cpio::newc::Reader::new(rest).unwrap();
            if r.entry().is_trailer() {
                break;
            }
            names.push((
                r.entry().name().to_string(),
                r.entry().mode(),
                r.entry().rdev_major(),
            ));
            rest = r.finish().unwrap();
        }
        assert!(names.contains(&("init".to_string(), 0o100755, 0)));
        assert!(names.contains(&("dev/console".to_string(), 0o020600, 5)));
        assert!(names.contains(&("lib/modules/r/modules.dep".to_string(), 0o100644, 0)));
    }
}
