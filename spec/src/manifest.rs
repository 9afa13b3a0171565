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
