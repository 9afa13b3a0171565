//! The iPXE boot script, one template for every writer: the image build's generic
//! `pxe/boot.ipxe` and the netboot server's per-machine scripts differ only in the data
//! given to [`BootScript::render`].
//!
//! It lives in kiln-spec, beside the boot arguments it writes, so the image build and the
//! netboot server share it without either depending on the other.
//!
//! Kernel from `vmlinuz`, initramfs named `initrd.img` (UEFI iPXE needs the name on the
//! kernel line), the root image and the digests of all three on the command line; then
//! either an unattended install (with the node's config, phone-home URL and token when the
//! server knows the node) or a discovery boot.

use serde::Serialize;

use crate::bootargs::BootDigests;
use crate::enrol::{CONFIG_ARG, INSTALL_ARG, PHONE_HOME_ARG, TOKEN_ARG};

/// The built-in template. Templates see `base_url`, `mac`, `node` (each possibly null),
/// `kiln_args`, `kernel_args` and `local_disk` (true: boot the next device, not kiln).
pub const DEFAULT_TEMPLATE: &str = include_str!("boot.ipxe.tera");

/// `kiln.discovery=1`: an unknown machine boots the live system only to be registered.
pub const DISCOVERY_ARG: &str = "kiln.discovery";

/// What a boot script is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Purpose {
    /// An unattended install; with the node's endpoints when the server knows the node.
    Install(Option<NodeEndpoints>),
    /// A machine missing from the inventory: no install, no config.
    Discovery,
    /// A known node that is not to install now: iPXE exits and the firmware boots the next
    /// device, its disk.
    LocalDisk,
}

/// Where a known node fetches its spec and reports, and the token it presents to both.
#[derive(Clone, PartialEq, Eq)]
pub struct NodeEndpoints {
    pub config_url: String,
    pub phone_home_url: String,
    pub token: String,
}

impl std::fmt::Debug for NodeEndpoints {
    // The token stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeEndpoints")
            .field("config_url", &self.config_url)
            .field("phone_home_url", &self.phone_home_url)
            .field("token", &"…")
            .finish()
    }
}

/// One boot script's data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootScript {
    /// The URL of the directory holding the boot files; `None`: the `${base}` of whoever
    /// chains the script, else the directory the script was fetched from (`${cwduri}`), so a
    /// bundle can be served from any HTTP path unchanged.
    pub base_url: Option<String>,
    /// The machine, `aa:bb:cc:dd:ee:ff`, when the script is for one.
    pub mac: Option<String>,
    /// Its inventory node name.
    pub node: Option<String>,
    pub digests: BootDigests,
    pub purpose: Purpose,
    /// Console and other kernel arguments, after kiln's own.
    pub kernel_args: String,
}

/// What a template sees.
#[derive(Serialize)]
struct TemplateContext<'a> {
    base_url: Option<&'a str>,
    mac: Option<&'a str>,
    node: Option<&'a str>,
    kiln_args: String,
    kernel_args: &'a str,
    local_disk: bool,
}

impl BootScript {
    /// kiln's arguments: the digests, then what the purpose needs.
    pub fn kiln_args(&self) -> String {
        let mut args = vec![self.digests.kernel_args()];
        match &self.purpose {
            Purpose::Install(node) => {
                args.push(format!("{INSTALL_ARG}=auto"));
                if let Some(n) = node {
                    args.push(format!("{CONFIG_ARG}={}", n.config_url));
                    args.push(format!("{PHONE_HOME_ARG}={}", n.phone_home_url));
                    args.push(format!("{TOKEN_ARG}={}", n.token));
                }
            }
            Purpose::Discovery => args.push(format!("{DISCOVERY_ARG}=1")),
            Purpose::LocalDisk => {}
        }
        args.join(" ")
    }

    /// The script from `template` ([`DEFAULT_TEMPLATE`] or a user's).
    pub fn render(&self, template: &str) -> Result<String, tera::Error> {
        let context = tera::Context::from_serialize(&TemplateContext {
            base_url: self.base_url.as_deref(),
            mac: self.mac.as_deref(),
            node: self.node.as_deref(),
            kiln_args: self.kiln_args(),
            kernel_args: &self.kernel_args,
            local_disk: self.purpose == Purpose::LocalDisk,
        })?;
        tera::Tera::one_off(template, &context, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(purpose: Purpose) -> BootScript {
        BootScript {
            base_url: None,
            mac: None,
            node: None,
            digests: BootDigests {
                rootfs: "a".into(),
                kernel: "b".into(),
                initrd: "c".into(),
            },
            purpose,
            kernel_args: "console=ttyS0".into(),
        }
    }

    #[test]
    fn the_generic_script_takes_its_base_from_where_it_was_fetched() {
        let text = script(Purpose::Install(None))
            .render(DEFAULT_TEMPLATE)
            .unwrap();
        assert_eq!(
            text,
            "#!ipxe\n\
             # kiln netboot script for any machine\n\
             isset ${base} || set base ${cwduri}\n\
             kernel ${base}/vmlinuz initrd=initrd.img kiln.root=${base}/rootfs.squashfs \
             kiln.root.sha256=a kiln.kernel.sha256=b kiln.initrd.sha256=c kiln.install=auto \
             console=ttyS0\n\
             initrd --name initrd.img ${base}/initrd.img\n\
             boot\n"
        );
    }

    #[test]
    fn a_node_script_carries_its_endpoints_and_token_and_discovery_none() {
        let endpoints = NodeEndpoints {
            config_url: "http://s/config/m".into(),
            phone_home_url: "http://s/phone-home/m".into(),
            token: "t0k".into(),
        };
        let mut s = script(Purpose::Install(Some(endpoints.clone())));
        s.base_url = Some("http://s/boot/m".into());
        s.mac = Some("52:54:00:00:00:01".into());
        s.node = Some("node-01".into());
        let text = s.render(DEFAULT_TEMPLATE).unwrap();
        assert!(text.contains("# kiln netboot script for 52:54:00:00:00:01 (node node-01)\n"));
        assert!(text.contains("\nset base http://s/boot/m\n"));
        assert!(text.contains(
            " kiln.install=auto kiln.config=http://s/config/m \
             kiln.phone-home=http://s/phone-home/m kiln.token=t0k console=ttyS0\n"
        ));
        assert!(!format!("{endpoints:?}").contains("t0k"));

        s.purpose = Purpose::LocalDisk;
        assert_eq!(
            s.render(DEFAULT_TEMPLATE).unwrap(),
            "#!ipxe\n# kiln: node node-01 (52:54:00:00:00:01) boots from its disk\nexit\n"
        );

        s.purpose = Purpose::Discovery;
        s.node = None;
        let text = s.render(DEFAULT_TEMPLATE).unwrap();
        assert!(text.contains("(discovery)"));
        assert!(text.ends_with("kiln.initrd.sha256=c kiln.discovery=1 console=ttyS0\ninitrd --name initrd.img ${base}/initrd.img\nboot\n"));
    }

    #[test]
    fn template_errors_are_reported() {
        assert!(script(Purpose::Discovery).render("{{ nope").is_err());
    }
}
