//! Kernel command line arguments that carry trust from the provisioner to the node: the
//! sha256 of every artifact a netbooted node fetches (from the build manifest), and the
//! disk-specific wipe consent an unattended install accepts. Boot scripts write them; stage-1
//! and the installer read them.

use crate::manifest::Manifest;

/// sha256 (hex) of `rootfs.squashfs`, checked by stage-1 before it mounts the root.
pub const ROOT_SHA256: &str = "kiln.root.sha256";
/// sha256 (hex) of `vmlinuz`, checked by the installer before it writes anything.
pub const KERNEL_SHA256: &str = "kiln.kernel.sha256";
/// sha256 (hex) of `initrd.img`, checked by the installer before it writes anything.
pub const INITRD_SHA256: &str = "kiln.initrd.sha256";
/// Consent to erase one disk in an unattended install: a device path, by-id link, serial or
/// WWN.
pub const WIPE: &str = "kiln.wipe";

/// The PXE bundle's files, by their path in a build's output directory.
pub const PXE_ROOTFS: &str = "pxe/rootfs.squashfs";
pub const PXE_KERNEL: &str = "pxe/vmlinuz";
pub const PXE_INITRD: &str = "pxe/initrd.img";

/// The digests of the three files a netbooted node fetches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootDigests {
    pub rootfs: String,
    pub kernel: String,
    pub initrd: String,
}

impl BootDigests {
    /// The PXE bundle's digests from a build manifest.
    pub fn from_manifest(manifest: &Manifest) -> Result<BootDigests, String> {
        let get = |path: &str| {
            manifest
                .sha256_of(path)
                .map(str::to_string)
                .ok_or_else(|| format!("the build manifest lists no {path}"))
        };
        Ok(BootDigests {
            rootfs: get(PXE_ROOTFS)?,
            kernel: get(PXE_KERNEL)?,
            initrd: get(PXE_INITRD)?,
        })
    }

    /// `kiln.root.sha256=… kiln.kernel.sha256=… kiln.initrd.sha256=…`.
    pub fn kernel_args(&self) -> String {
        format!(
            "{ROOT_SHA256}={} {KERNEL_SHA256}={} {INITRD_SHA256}={}",
            self.rootfs, self.kernel, self.initrd
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_come_from_the_manifest_and_become_kernel_args() {
        let manifest: Manifest = serde_json::from_str(
            r#"{"kiln_version":"0.1.0","spec_sha256":"s","suite":"bookworm","mirror":"",
            "kernel":"6.1.0","kernel_args":[],"rootfs_cache_key":"k","packages":[],
            "artifacts":[{"path":"pxe/vmlinuz","size":1,"sha256":"bb"},
            {"path":"pxe/initrd.img","size":1,"sha256":"cc"},
            {"path":"pxe/rootfs.squashfs","size":1,"sha256":"aa"}]}"#,
        )
        .unwrap();
        let d = BootDigests::from_manifest(&manifest).unwrap();
        assert_eq!(
            d.kernel_args(),
            "kiln.root.sha256=aa kiln.kernel.sha256=bb kiln.initrd.sha256=cc"
        );
        let mut partial = manifest.clone();
        partial.artifacts.retain(|a| a.path != PXE_INITRD);
        assert_eq!(
            BootDigests::from_manifest(&partial),
            Err("the build manifest lists no pxe/initrd.img".to_string())
        );
    }
}
