//! `manifest.json`: what a build produced (size and sha256 of every artifact), from which spec,
//! and which Debian packages (name, version) the image carries. The image build writes it;
//! the netboot server and nodes trust the digests in it.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    /// Path relative to the output directory.
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Package {
    pub name: String,
    pub version: String,
    pub architecture: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub kiln_version: String,
    pub spec_sha256: String,
    pub suite: String,
    pub mirror: String,
    pub kernel: String,
    pub kernel_args: Vec<String>,
    pub rootfs_cache_key: String,
    pub artifacts: Vec<Artifact>,
    pub packages: Vec<Package>,
    /// What the `kubernetes` feature put into the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesManifest>,
}

/// kiln's Kubernetes build in an image: pinned versions, digests of the built binaries and
/// the airgap images.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KubernetesManifest {
    pub kubernetes_version: String,
    pub etcd_version: String,
    pub kube_sha256: String,
    pub etcd_sha256: String,
    /// The CoreDNS build in the cluster DNS image (the image's digest is in `images`).
    #[serde(default)]
    pub coredns_version: String,
    pub images: Vec<NodeImage>,
}

/// An OCI archive in the image, imported into containerd before the kubelet starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeImage {
    pub name: String,
    /// `sha256:…` of the image manifest.
    pub digest: String,
    /// Where the archive is in the image.
    pub path: String,
}

/// Size and sha256 (hex) of everything `reader` yields, in one streaming pass: how an
/// artifact's manifest entry is made and checked.
pub fn sha256_stream(mut reader: impl std::io::Read) -> std::io::Result<(u64, String)> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            return Ok((size, hex::encode(h.finalize())));
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
}

impl Manifest {
    /// The sha256 of the artifact at `path` (relative to the build's output directory).
    pub fn sha256_of(&self, path: &str) -> Option<&str> {
        self.artifacts
            .iter()
            .find(|a| a.path == path)
            .map(|a| a.sha256.as_str())
    }
}
