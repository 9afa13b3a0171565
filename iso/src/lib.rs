//! kiln-image: turns resolved build inputs into a bootable OS image.
//!
//! The pipeline ([`pipeline::build`]) runs these steps, each a function of its own module:
//! base rootfs from Debian packages ([`rootfs`], cached by content in [`cache`]) → trim
//! ([`trim`]) → overlays and the `kiln` binary ([`overlay`]) → squashfs ([`squashfs`]) →
//! kiln's initramfs ([`initramfs`]) → hybrid BIOS/UEFI ISO ([`iso`]) → PXE bundle ([`pxe`]) →
//! manifest ([`manifest`]). The pure parts (command lines, file lists, templates, parsers) have
//! golden tests under `tests/golden/` (regenerate with `KILN_BLESS=1`).

pub mod cache;
pub mod error;
#[cfg(test)]
mod golden;
pub mod initramfs;
pub mod inputs;
pub mod iso;
pub mod kubernetes;
pub mod manifest;
pub mod oci;
pub mod overlay;
pub mod pipeline;
pub mod progress;
pub mod pxe;
pub mod rootfs;
pub mod squashfs;
pub mod trim;

pub use cache::Cache;
pub use error::BuildError;
pub use inputs::{BuildInputs, OverlayFile};
pub use pipeline::{BuildReport, build};

/// Volume label of kiln's live ISO; stage-1 finds the medium by it (`kiln.root=live:LABEL`).
pub const LIVE_LABEL: &str = "KILN_LIVE";
