//! `manifest.json`: what a build produced (size and sha256 of every artifact), from which spec,
//! and which Debian packages (name, version) the image carries.

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::{BuildError, Result};

pub use kiln_spec::manifest::{Artifact, KubernetesManifest, Manifest, NodeImage, Package};

/// Installed packages from a dpkg `status` file, sorted by name.
pub fn parse_dpkg_status(status: &str) -> Vec<Package> {
    let mut out = Vec::new();
    for stanza in status.split("\n\n") {
        let field = |name: &str| {
            stanza.lines().find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|r| r.strip_prefix(':'))
                    .map(str::trim)
            })
        };
        if field("Status").is_some_and(|s| s.ends_with(" installed"))
            && let (Some(name), Some(version)) = (field("Package"), field("Version"))
        {
            out.push(Package {
                name: name.to_string(),
                version: version.to_string(),
                architecture: field("Architecture").unwrap_or("").to_string(),
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Size and sha256 of `dir/rel`, read in one streaming pass.
pub fn artifact(dir: &Path, rel: &str) -> Result<Artifact> {
    let path = dir.join(rel);
    let mut f = std::fs::File::open(&path)
        .map_err(BuildError::io(format!("opening {}", path.display())))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .map_err(BuildError::io(format!("reading {}", path.display())))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok(Artifact {
        path: rel.to_string(),
        size,
        sha256: hex::encode(h.finalize()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_status_golden() {
        let status = "Package: zlib1g\nStatus: install ok installed\nPriority: optional\nArchitecture: amd64\n\
                      Version: 1:1.2.13.dfsg-1\nDescription: compression library\n multi-line\n\n\
                      Package: removed-pkg\nStatus: deinstall ok config-files\nArchitecture: amd64\nVersion: 1.0\n\n\
                      Package: bash\nEssential: yes\nStatus: install ok installed\nArchitecture: amd64\nVersion: 5.2.15-2+b7\n";
        let pkgs = parse_dpkg_status(status);
        crate::golden::check(
            "dpkg-packages.json",
            &(serde_json::to_string_pretty(&pkgs).unwrap() + "\n"),
        );
    }

    #[test]
    fn artifact_digest() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a"), b"abc").unwrap();
        let a = artifact(d.path(), "a").unwrap();
        assert_eq!(a.size, 3);
        assert_eq!(
            a.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
