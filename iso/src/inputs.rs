//! What a build needs, resolved from the appliance spec and its rendered overlays.

use std::path::PathBuf;

use serde::Serialize;

/// Packages every kiln image carries: a bootable systemd system plus the tools `kiln install`
/// runs in the live system (mkfs for the ESP and state partition, boot loaders to install).
pub const BASE_PACKAGES: &[&str] = &[
    "systemd-sysv",
    "linux-image-amd64",
    "udev",
    "kmod",
    "e2fsprogs",
    "dosfstools",
    "mtools",
    "systemd-boot-efi",
    "grub-pc-bin",
    "util-linux",
    "iproute2",
];

/// One file the overlays put into the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OverlayFile {
    /// Absolute path inside the image.
    pub path: String,
    pub contents: Vec<u8>,
    pub mode: u32,
}

/// Everything the pipeline reads. Built by the CLI from a spec; tests build it directly.
#[derive(Debug, Clone)]
pub struct BuildInputs {
    /// Debian suite, e.g. `bookworm`.
    pub suite: String,
    pub mirror: String,
    /// Packages beyond [`BASE_PACKAGES`] (the spec's `os.packages`).
    pub packages: Vec<String>,
    /// Kernel arguments from the spec and the overlays, appended to every boot entry.
    pub kernel_args: Vec<String>,
    /// Keep only the kernel modules a virtual machine needs (the small `test` profile).
    pub minimal_modules: bool,
    /// The spec as given, embedded on the ISO at `/kiln/spec.yaml` for the installer.
    pub spec_yaml: String,
    /// Rendered overlay files.
    pub files: Vec<OverlayFile>,
    /// systemd units to enable in the image.
    pub units_enabled: Vec<String>,
    /// The `kiln` binary for `/usr/bin/kiln`.
    pub kiln_binary: PathBuf,
    /// kiln's stage-1 (`kiln-init`) for the initramfs `/init`.
    pub init_binary: PathBuf,
    /// kiln's Kubernetes build, for images with the `kubernetes` feature.
    pub kubernetes: Option<crate::kubernetes::KubeBinaries>,
    /// Signs `manifest.json`; its public half goes into the image as a trusted key.
    pub signing_key: Option<kiln_spec::signing::SigningKey>,
}

impl BuildInputs {
    /// The full package list for mmdebstrap: base packages then the spec's, sorted, once each.
    pub fn package_list(&self) -> Vec<String> {
        let mut all: Vec<String> = BASE_PACKAGES
            .iter()
            .map(|p| p.to_string())
            .chain(self.packages.iter().cloned())
            .collect();
        all.sort();
        all.dedup();
        all
    }
}
