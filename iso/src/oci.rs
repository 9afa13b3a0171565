//! Container images as OCI image-layout archives: what a node imports into containerd before
//! its kubelet starts, since no registry is reachable (the airgap case). One layer, written
//! deterministically (sorted entries, zero times and owners), so the same inputs give the
//! same digests on every build.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::error::BuildError;

/// The annotation containerd names an imported image by.
const NAME_ANNOTATION: &str = "io.containerd.image.name";

/// An image to write: its reference, its files and how it starts.
#[derive(Debug, Clone, Default)]
pub struct OciImage {
    /// `kiln.local/pause:1`: the reference pods name.
    pub name: String,
    /// Path inside the image (no leading `/`) → content and mode.
    pub files: BTreeMap<String, (Vec<u8>, u32)>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
}

/// What [`write_archive`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciArchive {
    pub name: String,
    /// `sha256:<hex>` of the image manifest: the image's identity in containerd.
    pub manifest_digest: String,
    pub size: u64,
}

fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn header(path: &str, size: u64, mode: u32, kind: tar::EntryType) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    // Paths here are short and plain; set_path only fails on over-long ones.
    h.set_path(path).expect("image paths fit a ustar header");
    h.set_cksum();
    h
}

/// A tar of `files` with every parent directory before its children.
fn tar_of(files: &BTreeMap<String, (Vec<u8>, u32)>) -> std::io::Result<Vec<u8>> {
    let mut dirs = std::collections::BTreeSet::new();
    for path in files.keys() {
        let mut p = Path::new(path).parent();
        while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
            dirs.insert(format!("{}/", d.display()));
            p = d.parent();
        }
    }
    let mut b = tar::Builder::new(Vec::new());
    for d in &dirs {
        b.append(
            &header(d, 0, 0o755, tar::EntryType::Directory),
            std::io::empty(),
        )?;
    }
    for (path, (content, mode)) in files {
        b.append(
            &header(path, content.len() as u64, *mode, tar::EntryType::Regular),
            content.as_slice(),
        )?;
    }
    b.into_inner()
}

/// Writes `image` as an OCI image-layout tar to `out` (through a temporary file, so a
/// failed write leaves nothing behind).
pub fn write_archive(image: &OciImage, out: &Path) -> Result<OciArchive, BuildError> {
    let io = |what: &str| {
        let what = format!("{what} {}", out.display());
        move |source| BuildError::Io { what, source }
    };
    let layer = tar_of(&image.files).map_err(io("building the layer of"))?;
    let layer_digest = digest(&layer);
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": image.entrypoint,
            "Cmd": image.cmd,
            "Env": image.env,
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }))
    .expect("JSON of plain values");
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": digest(&config),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer.len(),
        }],
    }))
    .expect("JSON of plain values");
    let manifest_digest = digest(&manifest);
    let tag = image.name.rsplit_once(':').map_or("latest", |(_, t)| t);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {
                NAME_ANNOTATION: image.name,
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    }))
    .expect("JSON of plain values");

    let mut entries = BTreeMap::new();
    entries.insert(
        "oci-layout".to_string(),
        (br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(), 0o644),
    );
    entries.insert("index.json".to_string(), (index, 0o644));
    for blob in [config, manifest, layer] {
        let name = format!("blobs/sha256/{}", &digest(&blob)["sha256:".len()..]);
        entries.insert(name, (blob, 0o644));
    }
    let archive = tar_of(&entries).map_err(io("building"))?;
    let dir = out.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io("creating a file next to"))?;
    tmp.write_all(&archive).map_err(io("writing"))?;
    tmp.persist(out)
        .map_err(|e| e.error)
        .map_err(io("writing"))?;
    Ok(OciArchive {
        name: image.name.clone(),
        manifest_digest,
        size: archive.len() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> OciImage {
        OciImage {
            name: "kiln.local/hello:1".into(),
            files: BTreeMap::from([
                (
                    "bin/hello".to_string(),
                    (b"#!/bin/sh\necho hi\n".to_vec(), 0o755),
                ),
                ("www/index.html".to_string(), (b"hi\n".to_vec(), 0o644)),
            ]),
            entrypoint: vec!["/bin/hello".into()],
            ..OciImage::default()
        }
    }

    #[test]
    fn same_inputs_same_bytes_and_a_valid_layout() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.tar"), dir.path().join("b.tar"));
        let first = write_archive(&hello(), &a).unwrap();
        let second = write_archive(&hello(), &b).unwrap();
        assert_eq!(first, second);
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());

        // Every blob the index reaches is present under its own digest.
        let mut files = BTreeMap::new();
        let mut ar = tar::Archive::new(std::fs::File::open(&a).unwrap());
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let mut body = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut body).unwrap();
            files.insert(e.path().unwrap().display().to_string(), body);
        }
        let blob = |d: &str| {
            let body = &files[&format!("blobs/sha256/{}", &d[7..])];
            assert_eq!(digest(body), d);
            body.clone()
        };
        let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
        let m = &index["manifests"][0];
        assert_eq!(m["annotations"][NAME_ANNOTATION], "kiln.local/hello:1");
        assert_eq!(m["digest"], first.manifest_digest.as_str());
        let manifest: serde_json::Value =
            serde_json::from_slice(&blob(m["digest"].as_str().unwrap())).unwrap();
        let config: serde_json::Value =
            serde_json::from_slice(&blob(manifest["config"]["digest"].as_str().unwrap())).unwrap();
        let layer = blob(manifest["layers"][0]["digest"].as_str().unwrap());
        assert_eq!(config["rootfs"]["diff_ids"][0], digest(&layer).as_str());
        assert_eq!(config["config"]["Entrypoint"][0], "/bin/hello");
        let names: Vec<String> = tar::Archive::new(layer.as_slice())
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["bin/", "www/", "bin/hello", "www/index.html"]);
    }
}
