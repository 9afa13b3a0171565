//! The PXE bundle's iPXE script: kiln-spec's one boot script, for no machine in particular.
//! `${base}` is the URL of the bundle directory: set by whoever chains the script, else the
//! directory the script was fetched from (`${cwduri}`), so the bundle can be served from any
//! HTTP path unchanged.

use kiln_spec::bootargs::BootDigests;
use kiln_spec::ipxe::{BootScript, DEFAULT_TEMPLATE, Purpose};

/// Where the script sits in a build's output directory.
pub const SCRIPT_PATH: &str = "pxe/boot.ipxe";

/// The network boot: root from HTTP with the digests of the boot files from the build,
/// unattended install.
pub fn boot_ipxe(extra_args: &[String], digests: &BootDigests) -> String {
    BootScript {
        base_url: None,
        mac: None,
        node: None,
        digests: digests.clone(),
        purpose: Purpose::Install(None),
        kernel_args: crate::iso::boot_args(extra_args),
    }
    .render(DEFAULT_TEMPLATE)
    .expect("the built-in template renders (tested)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_script_matches_golden() {
        let digests = BootDigests {
            rootfs: "a".repeat(64),
            kernel: "b".repeat(64),
            initrd: "c".repeat(64),
        };
        crate::golden::check("boot.ipxe", &boot_ipxe(&["quiet".to_string()], &digests));
    }
}
