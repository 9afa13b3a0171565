//! The airgap bundle into containerd: each OCI archive is imported unless containerd already
//! holds its image under the same name and manifest digest. Importing a large archive costs
//! minutes on a slow node, and every bring-up after the first (a retry, an agent restart, a
//! changed spec) would otherwise pay it again while the control plane needs the CPU.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Output;

use super::bringup::{BringupError, io};

/// The annotation kiln (and containerd's import) names an archive's image by.
const NAME_ANNOTATION: &str = "io.containerd.image.name";

/// The OCI archives of the bundle in `dir`, sorted; none when the directory does not exist.
fn bundle(dir: &Path) -> Result<Vec<PathBuf>, BringupError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(format!("reading {}", dir.display()))(e)),
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "tar"))
        .collect();
    out.sort();
    Ok(out)
}

/// The images (name, manifest digest) an OCI image-layout `index.json` names.
fn indexed_images(index: &[u8]) -> BTreeSet<(String, String)> {
    let Ok(index) = serde_json::from_slice::<serde_json::Value>(index) else {
        return BTreeSet::new();
    };
    let manifests = index["manifests"].as_array().cloned().unwrap_or_default();
    manifests
        .iter()
        .filter_map(|m| {
            let name = m["annotations"][NAME_ANNOTATION].as_str()?;
            let digest = m["digest"].as_str()?;
            Some((name.to_string(), digest.to_string()))
        })
        .collect()
}

/// The images (reference, target digest) in `ctr images ls` output.
fn listed_images(ctr_ls: &str) -> BTreeSet<(String, String)> {
    ctr_ls
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let reference = fields.next()?;
            let digest = fields.nth(1)?;
            Some((reference.to_string(), digest.to_string()))
        })
        .collect()
}

/// The images an archive holds, read from its `index.json` (seeking past the blobs).
fn archive_images(archive: &Path) -> std::io::Result<BTreeSet<(String, String)>> {
    use std::io::Read;
    let mut tar = tar::Archive::new(std::fs::File::open(archive)?);
    for entry in tar.entries_with_seek()? {
        let mut entry = entry?;
        if entry.path()?.as_os_str() == "index.json" {
            let mut index = Vec::new();
            entry.read_to_end(&mut index)?;
            return Ok(indexed_images(&index));
        }
    }
    Ok(BTreeSet::new())
}

/// Imports each archive of `images` whose images containerd does not hold yet; `ctr` runs
/// containerd's client with the given arguments.
pub(super) fn import_bundle(
    images: &Path,
    ctr: &dyn Fn(&[&str]) -> std::io::Result<Output>,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<(), BringupError> {
    let archives = bundle(images)?;
    if archives.is_empty() {
        return Ok(());
    }
    let failed = |archive: &Path, reason: String| BringupError::Import {
        archive: archive.display().to_string(),
        reason,
    };
    let held = ctr(&["images", "ls"])
        .ok()
        .filter(|o| o.status.success())
        .map(|o| listed_images(&String::from_utf8_lossy(&o.stdout)))
        .unwrap_or_default();
    for archive in archives {
        let inside = archive_images(&archive)
            .map_err(|e| failed(&archive, format!("reading its index: {e}")))?;
        if !inside.is_empty() && inside.is_subset(&held) {
            continue;
        }
        progress(&format!("importing {}", archive.display()));
        let out = ctr(&["images", "import", &archive.display().to_string()])
            .map_err(|e| failed(&archive, e.to_string()))?;
        if !out.status.success() {
            return Err(failed(
                &archive,
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_archive_is_held_when_containerd_lists_its_name_at_its_digest() {
        let index = br#"{"schemaVersion":2,"manifests":[{"digest":"sha256:aa","size":1,
            "annotations":{"io.containerd.image.name":"kiln.local/pause:1",
            "org.opencontainers.image.ref.name":"1"}}]}"#;
        let inside = indexed_images(index);
        assert_eq!(
            inside,
            BTreeSet::from([("kiln.local/pause:1".to_string(), "sha256:aa".to_string())])
        );
        let ls = "REF                TYPE                                      DIGEST    SIZE     PLATFORMS   LABELS\n\
                  kiln.local/pause:1 application/vnd.oci.image.manifest.v1+json sha256:aa 1.0 KiB linux/amd64 -\n";
        assert!(inside.is_subset(&listed_images(ls)));
        let rebuilt = ls.replace("sha256:aa", "sha256:bb");
        assert!(!inside.is_subset(&listed_images(&rebuilt)));
        assert!(listed_images("REF TYPE DIGEST SIZE PLATFORMS LABELS\n").is_empty());
        assert!(indexed_images(b"not json").is_empty());
    }
}
