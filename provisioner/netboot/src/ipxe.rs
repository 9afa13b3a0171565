//! The per-MAC iPXE script, rendered with tera from the built-in template or a user's.

use serde::Serialize;

/// Kernel from `vmlinuz`, initramfs named `initrd.img` (UEFI iPXE needs the name on the
/// kernel line), rootfs and node config URLs and the phone-home URL on the command line.
pub const DEFAULT_TEMPLATE: &str = include_str!("../templates/boot.ipxe.tera");

/// The variables a script template sees.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ScriptContext {
    /// `http://10.0.0.1:8080`
    pub base_url: String,
    /// `52:54:00:12:34:56`
    pub mac: String,
    /// The MAC as it appears in URLs: `52-54-00-12-34-56`.
    pub mac_path: String,
    /// Inventory node name; absent for discovery boots.
    pub node: Option<String>,
    /// Extra kernel arguments (console, …).
    pub kernel_args: String,
    /// `kiln.root.sha256=… kiln.kernel.sha256=… kiln.initrd.sha256=…` from the build
    /// manifest: the node checks what it fetches against them.
    pub digest_args: String,
}

pub fn render(template: &str, ctx: &ScriptContext) -> Result<String, tera::Error> {
    let context = tera::Context::from_serialize(ctx)?;
    tera::Tera::one_off(template, &context, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_golden(name: &str, actual: &str) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden")
            .join(name);
        if std::env::var_os("KILN_BLESS").is_some() {
            std::fs::write(&path, actual).unwrap();
        }
        let expected = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (KILN_BLESS=1 writes it)", path.display()));
        assert_eq!(
            actual, expected,
            "{name} differs (KILN_BLESS=1 rewrites it)"
        );
    }

    fn ctx(node: Option<&str>) -> ScriptContext {
        ScriptContext {
            base_url: "http://10.0.0.1:8080".into(),
            mac: "52:54:00:12:34:56".into(),
            mac_path: "52-54-00-12-34-56".into(),
            node: node.map(str::to_string),
            kernel_args: "console=ttyS0,115200".into(),
            digest_args: kiln_spec::bootargs::BootDigests {
                rootfs: "a".repeat(64),
                kernel: "b".repeat(64),
                initrd: "c".repeat(64),
            }
            .kernel_args(),
        }
    }

    #[test]
    fn renders_the_node_script() {
        check_golden(
            "boot-node.ipxe",
            &render(DEFAULT_TEMPLATE, &ctx(Some("node-01"))).unwrap(),
        );
    }

    #[test]
    fn renders_the_discovery_script() {
        check_golden(
            "boot-discovery.ipxe",
            &render(DEFAULT_TEMPLATE, &ctx(None)).unwrap(),
        );
    }

    #[test]
    fn template_errors_are_reported() {
        assert!(render("{{ nope", &ctx(None)).is_err());
    }
}
