//! The base root file system: Debian packages installed by mmdebstrap into a tarball.

use std::path::{Path, PathBuf};

use indicatif::ProgressBar;

use kiln_exec::ToolError;

use crate::error::{BuildError, Result};
use crate::progress::{MMDEBSTRAP, TAR};

/// mmdebstrap options that shape the result (part of the cache key). `root` mode: the build
/// runs as root, and it is the fastest mode.
pub fn mmdebstrap_options(packages: &[String]) -> Vec<String> {
    vec![
        "--variant=minbase".into(),
        "--mode=root".into(),
        "--format=tar".into(),
        format!("--include={}", packages.join(",")),
    ]
}

/// The Debian archive among apt source files (`(path, content)`, one-line `.list` or deb822
/// `.sources`): the first enabled `deb` entry whose URI path ends in `/debian`. This is how a
/// build without `spec.os.mirror` uses the build host's own apt sources while still building
/// the spec's suite, which may differ from the host's.
pub fn mirror_from_sources(files: &[(String, String)]) -> Option<String> {
    let is_archive = |uri: &str| uri.trim_end_matches('/').ends_with("/debian");
    for (path, text) in files {
        if path.ends_with(".sources") {
            for stanza in text.split("\n\n") {
                let field = |name: &str| {
                    stanza.lines().find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        (k.trim().eq_ignore_ascii_case(name)).then(|| v.trim().to_string())
                    })
                };
                let enabled = field("Enabled").is_none_or(|v| v != "no");
                let deb = field("Types").is_some_and(|t| t.split_whitespace().any(|t| t == "deb"));
                if enabled
                    && deb
                    && let Some(uri) = field("URIs").and_then(|u| {
                        u.split_whitespace()
                            .find(|u| is_archive(u))
                            .map(str::to_string)
                    })
                {
                    return Some(uri);
                }
            }
        } else {
            for line in text.lines() {
                let mut words = line.split_whitespace();
                if words.next() != Some("deb") {
                    continue;
                }
                // Skip `[option=value …]`.
                let uri = words.find(|w| w.contains("://"));
                if let Some(uri) = uri.filter(|u| is_archive(u)) {
                    return Some(uri.to_string());
                }
            }
        }
    }
    None
}

/// The build host's apt source files, in apt's order.
pub fn host_apt_sources() -> Vec<(String, String)> {
    let mut files = vec![std::path::PathBuf::from("/etc/apt/sources.list")];
    if let Ok(rd) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<_> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "list" || x == "sources"))
            .collect();
        more.sort();
        files.extend(more);
    }
    files
        .into_iter()
        .filter_map(|p| Some((p.display().to_string(), std::fs::read_to_string(&p).ok()?)))
        .collect()
}

/// The whole mmdebstrap command line writing `out`.
pub fn mmdebstrap_args(options: &[String], suite: &str, out: &Path, mirror: &str) -> Vec<String> {
    let mut args = options.to_vec();
    args.extend([
        suite.to_string(),
        out.display().to_string(),
        mirror.to_string(),
    ]);
    args
}

/// Runs mmdebstrap, showing its log lines on `pb`.
pub fn bootstrap(
    options: &[String],
    suite: &str,
    mirror: &str,
    out: &Path,
    pb: &ProgressBar,
) -> Result<()> {
    let mut cmd = MMDEBSTRAP.command();
    cmd.args(mmdebstrap_args(options, suite, out, mirror));
    let what = format!("building the base rootfs for {suite} from {mirror}");
    MMDEBSTRAP
        .run(cmd, &what, |line| {
            // The bar shows the latest line on a terminal; `-v` logs every line anywhere.
            tracing::debug!("mmdebstrap: {line}");
            pb.set_message(line.to_string());
        })
        .map_err(|e| explain_mirror_failure(e.into(), mirror))
        .map(drop)
}

/// apt's messages for an unreachable mirror are buried in mmdebstrap's log: say it plainly.
fn explain_mirror_failure(e: BuildError, mirror: &str) -> BuildError {
    match e {
        BuildError::Tool(ToolError::Failed {
            what,
            command,
            status,
            log,
        }) if [
            "Failed to fetch",
            "Could not connect",
            "Could not resolve",
            "Temporary failure",
            "Unable to connect",
        ]
        .iter()
        .any(|m| log.contains(m)) =>
        {
            BuildError::Tool(ToolError::Failed {
                what: format!("{what}: the mirror {mirror} is unreachable"),
                command,
                status,
                log,
            })
        }
        other => other,
    }
}

/// Unpacks the base tarball into `dir`, keeping owners, modes and extended attributes.
pub fn extract(tarball: &Path, dir: &Path, pb: &ProgressBar) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(BuildError::io(format!("creating {}", dir.display())))?;
    pb.set_message(format!("unpacking {}", tarball.display()));
    let mut cmd = TAR.command();
    cmd.arg("-C")
        .arg(dir)
        .args(["--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf"])
        .arg(tarball);
    TAR.output(cmd, "unpacking the base rootfs")?;
    Ok(())
}

/// The one kernel in the rootfs: its release and the paths of its image and modules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    pub release: String,
    pub vmlinuz: PathBuf,
    pub modules: PathBuf,
}

pub fn find_kernel(root: &Path) -> Result<Kernel> {
    let modroot = root.join("usr/lib/modules");
    let mut releases: Vec<String> = std::fs::read_dir(&modroot)
        .map_err(BuildError::io(format!("listing {}", modroot.display())))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    releases.sort();
    match releases.as_slice() {
        [release] => {
            let vmlinuz = root.join("boot").join(format!("vmlinuz-{release}"));
            if !vmlinuz.is_file() {
                return Err(BuildError::Rootfs(format!(
                    "kernel modules for {release} but no /boot/vmlinuz-{release}"
                )));
            }
            Ok(Kernel {
                release: release.clone(),
                modules: modroot.join(release),
                vmlinuz,
            })
        }
        [] => Err(BuildError::Rootfs(
            "no kernel (is linux-image-amd64 in the package list?)".into(),
        )),
        many => Err(BuildError::Rootfs(format!(
            "more than one kernel: {}",
            many.join(", ")
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mmdebstrap_command_line() {
        let opts = mmdebstrap_options(&["kmod".into(), "udev".into()]);
        let args = mmdebstrap_args(
            &opts,
            "bookworm",
            Path::new("/c/x.tar"),
            "http://mirror.example/debian",
        );
        assert_eq!(
            args.join(" "),
            "--variant=minbase --mode=root --format=tar --include=kmod,udev bookworm /c/x.tar http://mirror.example/debian"
        );
    }

    #[test]
    fn the_debian_mirror_comes_from_the_hosts_apt_sources() {
        let deb822 = "Types: deb\n# a snapshot note\nURIs: http://mirror.example/debian\n\
                      Suites: bookworm bookworm-updates\nComponents: main\n\n\
                      Types: deb\nURIs: http://mirror.example/debian-security\n\
                      Suites: bookworm-security\nComponents: main\n";
        let third_party = "deb [signed-by=/k.gpg] https://repo.example/apt stable main\n";
        let files = [
            (
                "/etc/apt/sources.list.d/other.list".to_string(),
                third_party.to_string(),
            ),
            (
                "/etc/apt/sources.list.d/debian.sources".to_string(),
                deb822.to_string(),
            ),
        ];
        assert_eq!(
            mirror_from_sources(&files).as_deref(),
            Some("http://mirror.example/debian")
        );
        let one_line = [(
            "/etc/apt/sources.list".to_string(),
            "# comment\ndeb-src http://src.example/debian bookworm main\n\
             deb [arch=amd64] http://mirror.example/debian/ bookworm main\n"
                .to_string(),
        )];
        assert_eq!(
            mirror_from_sources(&one_line).as_deref(),
            Some("http://mirror.example/debian/")
        );
        let disabled = [(
            "/etc/apt/sources.list.d/debian.sources".to_string(),
            deb822.replace("Types: deb\n# a", "Enabled: no\nTypes: deb\n# a"),
        )];
        assert_eq!(mirror_from_sources(&disabled), None);
        assert_eq!(
            mirror_from_sources(&files[..1]),
            None,
            "not a Debian archive"
        );
    }

    #[test]
    fn unreachable_mirror_is_named() {
        let e = explain_mirror_failure(
            BuildError::Tool(ToolError::Failed {
                what: "building".into(),
                command: "mmdebstrap".into(),
                status: "exit status: 1".into(),
                log: "W: Failed to fetch http://127.0.0.1:9/debian/dists/bookworm/InRelease".into(),
            }),
            "http://127.0.0.1:9/debian",
        );
        assert!(
            e.to_string()
                .contains("the mirror http://127.0.0.1:9/debian is unreachable"),
            "{e}"
        );
    }

    #[test]
    fn kernel_is_found_once() {
        let d = tempfile::tempdir().unwrap();
        assert!(find_kernel(d.path()).is_err());
        std::fs::create_dir_all(d.path().join("usr/lib/modules/6.1.0-9-amd64")).unwrap();
        assert!(
            find_kernel(d.path())
                .unwrap_err()
                .to_string()
                .contains("no /boot/vmlinuz")
        );
        std::fs::create_dir_all(d.path().join("boot")).unwrap();
        std::fs::write(d.path().join("boot/vmlinuz-6.1.0-9-amd64"), b"k").unwrap();
        let k = find_kernel(d.path()).unwrap();
        assert_eq!(k.release, "6.1.0-9-amd64");
        std::fs::create_dir_all(d.path().join("usr/lib/modules/6.1.0-10-amd64")).unwrap();
        assert!(
            find_kernel(d.path())
                .unwrap_err()
                .to_string()
                .contains("more than one")
        );
    }
}
