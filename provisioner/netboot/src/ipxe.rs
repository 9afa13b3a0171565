//! The per-MAC iPXE script: kiln-spec's one boot script ([`kiln_spec::ipxe`]) with this
//! server's URLs, and the machine's node and token.

use kiln_spec::bootargs::BootDigests;
use kiln_spec::inventory::format_mac;
use kiln_spec::ipxe::{BootScript, NodeEndpoints, Purpose};

/// The machine a script is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Machine<'a> {
    /// An inventory node: it installs, fetching its spec and reporting with `token`; without
    /// one it boots from its disk.
    Node {
        name: &'a str,
        token: Option<String>,
    },
    /// Unknown, answered under the discovery policy.
    Unknown,
}

/// `52-54-00-12-34-56`: the MAC as it appears in this server's URLs.
pub fn mac_path(mac: &[u8; 6]) -> String {
    format_mac(mac).replace(':', "-")
}

/// The script data for `mac`; `base_url` is how clients reach this server
/// (`http://10.0.0.1:8080`).
pub fn script(
    base_url: &str,
    mac: &[u8; 6],
    machine: Machine<'_>,
    digests: &BootDigests,
    kernel_args: &str,
) -> BootScript {
    let path = mac_path(mac);
    let (node, purpose) = match machine {
        Machine::Node {
            name,
            token: Some(token),
        } => (
            Some(name.to_string()),
            Purpose::Install(Some(NodeEndpoints {
                config_url: format!("{base_url}/config/{path}"),
                phone_home_url: format!("{base_url}/phone-home/{path}"),
                token,
            })),
        ),
        Machine::Node { name, token: None } => (Some(name.to_string()), Purpose::LocalDisk),
        Machine::Unknown => (None, Purpose::Discovery),
    };
    BootScript {
        base_url: Some(format!("{base_url}/boot/{path}")),
        mac: Some(format_mac(mac)),
        node,
        digests: digests.clone(),
        purpose,
        kernel_args: kernel_args.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_spec::ipxe::DEFAULT_TEMPLATE;

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

    fn render(machine: Machine<'_>) -> String {
        let digests = BootDigests {
            rootfs: "a".repeat(64),
            kernel: "b".repeat(64),
            initrd: "c".repeat(64),
        };
        script(
            "http://10.0.0.1:8080",
            &[0x52, 0x54, 0, 0x12, 0x34, 0x56],
            machine,
            &digests,
            "console=ttyS0,115200",
        )
        .render(DEFAULT_TEMPLATE)
        .unwrap()
    }

    #[test]
    fn renders_the_node_script() {
        check_golden(
            "boot-node.ipxe",
            &render(Machine::Node {
                name: "node-01",
                token: Some("0123456789abcdef".repeat(4)),
            }),
        );
    }

    #[test]
    fn renders_the_discovery_script() {
        check_golden("boot-discovery.ipxe", &render(Machine::Unknown));
    }
}
