//! `manifest.json`: what a build produced (size and sha256 of every artifact), from which spec,
//! and which Debian packages (name, version) the image carries.

use std::path::{Path, PathBuf};

use kiln_spec::signing::{PublicKey, SIGNATURE_FILE};
use sha2::{Digest, Sha256};

use crate::error::{BuildError, Result};
use crate::pipeline::SPEC_FILE;

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
    let f = std::fs::File::open(&path)
        .map_err(BuildError::io(format!("opening {}", path.display())))?;
    let (size, sha256) = kiln_spec::manifest::sha256_stream(f)
        .map_err(BuildError::io(format!("reading {}", path.display())))?;
    Ok(Artifact {
        path: rel.to_string(),
        size,
        sha256,
    })
}

/// A build's output directory that is not what its signed manifest says, with every
/// problem found.
#[derive(Debug, thiserror::Error)]
#[error("{}: {}", dir.display(), problems.join("; "))]
pub struct BundleError {
    pub dir: PathBuf,
    pub problems: Vec<String>,
}

/// Checks a build's output directory before trusting it: `manifest.json`'s signature by
/// `key` first (nothing in an unsigned or wrongly signed manifest is believed), then the
/// size and sha256 of every artifact it lists and the spec's digest. Every problem at once.
pub fn verify_bundle(dir: &Path, key: &PublicKey) -> std::result::Result<Manifest, BundleError> {
    let fail = |problems: Vec<String>| BundleError {
        dir: dir.to_path_buf(),
        problems,
    };
    let read = |name: &str| {
        std::fs::read(dir.join(name)).map_err(|e| fail(vec![format!("reading {name}: {e}")]))
    };
    let json = read("manifest.json")?;
    let signature = std::fs::read(dir.join(SIGNATURE_FILE)).map_err(|e| {
        fail(vec![format!(
            "reading {SIGNATURE_FILE}: {e} (was the build made with --sign-key?)"
        )])
    })?;
    key.verify(&json, &signature)
        .map_err(|e| fail(vec![format!("manifest.json: {e}")]))?;
    let manifest: Manifest =
        serde_json::from_slice(&json).map_err(|e| fail(vec![format!("manifest.json: {e}")]))?;
    let mut problems = Vec::new();
    for want in &manifest.artifacts {
        match artifact(dir, &want.path) {
            Err(e) => problems.push(e.to_string()),
            Ok(got) if got.size != want.size || got.sha256 != want.sha256 => {
                problems.push(format!(
                    "{}: {} bytes with sha256 {}, the manifest says {} bytes with sha256 {}",
                    want.path, got.size, got.sha256, want.size, want.sha256
                ))
            }
            Ok(_) => {}
        }
    }
    match std::fs::read(dir.join(SPEC_FILE)).map(|spec| sha256_hex(&spec)) {
        Err(e) => problems.push(format!("reading {SPEC_FILE}: {e}")),
        Ok(sha256) if sha256 != manifest.spec_sha256 => problems.push(format!(
            "{SPEC_FILE}: sha256 {sha256}, the manifest says {}",
            manifest.spec_sha256
        )),
        Ok(_) => {}
    }
    if problems.is_empty() {
        Ok(manifest)
    } else {
        Err(fail(problems))
    }
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

    /// A signed output directory: two artifacts and the spec.
    fn signed_bundle(key: &kiln_spec::signing::SigningKey) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("pxe")).unwrap();
        std::fs::write(d.path().join("kiln.iso"), b"iso").unwrap();
        std::fs::write(d.path().join("pxe/vmlinuz"), b"kernel").unwrap();
        std::fs::write(d.path().join(SPEC_FILE), b"spec").unwrap();
        let manifest = Manifest {
            kiln_version: "0".into(),
            spec_sha256: sha256_hex(b"spec"),
            suite: "bookworm".into(),
            mirror: String::new(),
            kernel: "6.1".into(),
            kernel_args: vec![],
            rootfs_cache_key: String::new(),
            artifacts: vec![
                artifact(d.path(), "kiln.iso").unwrap(),
                artifact(d.path(), "pxe/vmlinuz").unwrap(),
            ],
            packages: vec![],
            kubernetes: None,
        };
        let json = serde_json::to_vec_pretty(&manifest).unwrap();
        std::fs::write(d.path().join("manifest.json"), &json).unwrap();
        std::fs::write(d.path().join(SIGNATURE_FILE), key.sign(&json)).unwrap();
        d
    }

    #[test]
    fn a_signed_bundle_verifies_and_every_changed_file_is_named() {
        let key = kiln_spec::signing::SigningKey::generate().unwrap();
        let d = signed_bundle(&key);
        let manifest = verify_bundle(d.path(), &key.public()).unwrap();
        assert_eq!(manifest.artifacts.len(), 2);

        std::fs::write(d.path().join("pxe/vmlinuz"), b"kernel!").unwrap();
        std::fs::write(d.path().join(SPEC_FILE), b"other").unwrap();
        std::fs::remove_file(d.path().join("kiln.iso")).unwrap();
        let err = verify_bundle(d.path(), &key.public()).unwrap_err();
        assert_eq!(err.problems.len(), 3, "{err}");
        assert!(err.problems[0].contains("kiln.iso"), "{err}");
        assert!(err.problems[1].starts_with("pxe/vmlinuz: 7 bytes"), "{err}");
        assert!(err.problems[2].starts_with("spec.yaml: sha256"), "{err}");
    }

    #[test]
    fn nothing_is_believed_without_the_right_signature() {
        let key = kiln_spec::signing::SigningKey::generate().unwrap();
        let d = signed_bundle(&key);
        let other = kiln_spec::signing::SigningKey::generate().unwrap();
        let err = verify_bundle(d.path(), &other.public()).unwrap_err();
        assert_eq!(
            err.problems,
            [format!(
                "manifest.json: the signature does not verify with key {}",
                other.public().fingerprint()
            )]
        );
        // A manifest edited to match a changed artifact fails its signature.
        let json = std::fs::read_to_string(d.path().join("manifest.json")).unwrap();
        std::fs::write(d.path().join("manifest.json"), json.replace("6.1", "6.2")).unwrap();
        let err = verify_bundle(d.path(), &key.public()).unwrap_err();
        assert!(err.problems[0].contains("does not verify"), "{err}");
        std::fs::remove_file(d.path().join(SIGNATURE_FILE)).unwrap();
        let err = verify_bundle(d.path(), &key.public()).unwrap_err();
        assert!(err.to_string().contains("--sign-key"), "{err}");
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
