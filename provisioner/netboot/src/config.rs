//! `kiln pxe serve` settings: one struct for the command line and the YAML config file (keys
//! are the long option names), merged (command line wins), then checked all at once.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use kiln_spec::bootargs::BootDigests;
use kiln_spec::inventory::NetbootMode;
use kiln_spec::manifest::Manifest;
use kiln_spec::{Appliance, Inventory};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::backend::UnknownMacs;
use crate::dhcp::AddressSettings;
use crate::server::{Settings, interface_ipv4};
use crate::tftp::session::Limits;

/// The spec a build leaves beside its manifest.
const BUILD_SPEC: &str = "spec.yaml";

fn parse_mode(s: &str) -> Result<NetbootMode, String> {
    match s {
        "proxy" => Ok(NetbootMode::Proxy),
        "dhcp" => Ok(NetbootMode::Dhcp),
        other => Err(format!("{other:?} is not one of: proxy, dhcp")),
    }
}

#[derive(Debug, Clone, Default, PartialEq, clap::Args, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ServeConfig {
    /// Interface to serve on (its first IPv4 address is the server address)
    #[arg(long, value_name = "IF")]
    pub interface: Option<String>,
    /// proxy: boot information only, next to an existing DHCP server; dhcp: also addresses
    #[arg(long, value_name = "proxy|dhcp", value_parser = parse_mode)]
    pub mode: Option<NetbootMode>,
    /// PXE bundle directory (vmlinuz, initrd.img, rootfs.squashfs)
    #[arg(long, value_name = "DIR")]
    pub artifacts: Option<PathBuf>,
    /// Build manifest whose sha256 digests nodes check the PXE files against
    /// [default: manifest.json in or next to --artifacts]
    #[arg(long, value_name = "FILE")]
    pub manifest: Option<PathBuf>,
    /// Fleet inventory (kind: Inventory): which MACs boot what
    #[arg(long, value_name = "FILE")]
    pub inventory: Option<PathBuf>,
    /// Appliance spec each node's config is rendered from (served at /config/MAC)
    /// [default: spec.yaml in or next to --artifacts, which the build writes]
    #[arg(long, value_name = "FILE")]
    pub spec: Option<PathBuf>,
    /// HTTP listen address [default: SERVER_IP:8080]
    #[arg(long, value_name = "ADDR")]
    pub http: Option<SocketAddr>,
    /// State directory: leases and boot traces [default: /var/lib/kiln/pxe]
    #[arg(long, value_name = "DIR")]
    pub state: Option<PathBuf>,
    /// Directory with the iPXE binaries, served over TFTP [default: /usr/lib/ipxe]
    #[arg(long, value_name = "DIR")]
    pub ipxe_dir: Option<PathBuf>,
    /// iPXE build for x86-64 UEFI, e.g. snponly.efi [default: ipxe.efi]
    #[arg(long, value_name = "FILE")]
    pub efi_binary: Option<String>,
    /// iPXE build for BIOS PXE [default: undionly.kpxe]
    #[arg(long, value_name = "FILE")]
    pub bios_binary: Option<String>,
    /// First address of the pool (dhcp mode)
    #[arg(long, value_name = "IP")]
    pub pool_start: Option<Ipv4Addr>,
    /// Last address of the pool (dhcp mode)
    #[arg(long, value_name = "IP")]
    pub pool_end: Option<Ipv4Addr>,
    /// Lease time in seconds (dhcp mode) [default: 3600]
    #[arg(long, value_name = "SECS")]
    pub lease_time: Option<u64>,
    /// Default gateway handed out (dhcp mode)
    #[arg(long, value_name = "IP")]
    pub router: Option<Ipv4Addr>,
    /// DNS server handed out (dhcp mode); repeatable
    #[arg(long, value_name = "IP")]
    #[serde(default)]
    pub dns: Vec<Ipv4Addr>,
    /// What machines missing from the inventory get: ignore or discovery [default: ignore]
    #[arg(long, value_name = "POLICY")]
    pub unknown_macs: Option<UnknownMacs>,
    /// Extra kernel arguments in the iPXE script [default: console=tty0 console=ttyS0,115200]
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    pub kernel_args: Option<String>,
    /// tera template for the iPXE script instead of the built-in one (it sees base_url, mac,
    /// node, kiln_args and kernel_args)
    #[arg(long, value_name = "FILE")]
    pub script_template: Option<PathBuf>,
    /// TFTP port [default: 69]
    #[arg(long, value_name = "PORT")]
    pub tftp_port: Option<u16>,
    /// Largest TFTP block size agreed to [default: 65464]
    #[arg(long, value_name = "BYTES")]
    pub tftp_max_blksize: Option<usize>,
    /// Largest TFTP window agreed to [default: 64]
    #[arg(long, value_name = "BLOCKS")]
    pub tftp_max_windowsize: Option<u16>,
}

/// `name` in the artifacts directory or its parent: a build's output directory holds `pxe/`,
/// the manifest and the spec side by side.
fn beside_artifacts(artifacts: &Path, name: &str) -> Option<PathBuf> {
    [artifacts.join(name), artifacts.join("..").join(name)]
        .into_iter()
        .find(|p| p.is_file())
}

/// The build manifest and where it is: `manifest`, else `manifest.json` beside the artifacts.
/// Nodes refuse files they cannot verify, so there is no going without.
fn load_manifest(manifest: Option<&Path>, artifacts: &Path) -> Result<(PathBuf, Manifest), String> {
    let path = match manifest {
        Some(p) => p.to_path_buf(),
        None => beside_artifacts(artifacts, "manifest.json").ok_or_else(|| {
            format!(
                "no manifest.json in or next to {} (the build writes one); name it with \
                 --manifest",
                artifacts.display()
            )
        })?,
    };
    let text =
        std::fs::read_to_string(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let manifest = serde_json::from_str(&text)
        .map_err(|e| format!("{} is not a build manifest: {e}", path.display()))?;
    Ok((path, manifest))
}

/// The appliance spec: `spec`, else the build's `spec.yaml` beside the artifacts, which must
/// be the one the manifest was built from.
fn load_spec(
    spec: Option<&Path>,
    artifacts: &Path,
    manifest: Option<&Manifest>,
) -> Result<Appliance, String> {
    let path = match spec {
        Some(p) => p.to_path_buf(),
        None => {
            let found = beside_artifacts(artifacts, BUILD_SPEC).ok_or_else(|| {
                format!(
                    "no {BUILD_SPEC} in or next to {} (the build writes one); name the spec \
                     with --spec",
                    artifacts.display()
                )
            })?;
            let bytes =
                std::fs::read(&found).map_err(|e| format!("reading {}: {e}", found.display()))?;
            if let Some(m) = manifest.filter(|m| !m.spec_sha256.is_empty())
                && hex::encode(Sha256::digest(&bytes)) != m.spec_sha256
            {
                return Err(format!(
                    "{} is not the spec the build manifest was made from; name the spec to \
                     serve with --spec",
                    found.display()
                ));
            }
            found
        }
    };
    Appliance::load(&path).map_err(|e| e.to_string())
}

/// Everything the services need, loaded and checked.
#[derive(Debug)]
pub struct Resolved {
    pub settings: Settings,
    pub inventory: Inventory,
    pub appliance: Appliance,
}

impl ServeConfig {
    /// Values from `self` (the command line) where given, else from `file`.
    pub fn merged_over(self, file: ServeConfig) -> ServeConfig {
        ServeConfig {
            interface: self.interface.or(file.interface),
            mode: self.mode.or(file.mode),
            artifacts: self.artifacts.or(file.artifacts),
            manifest: self.manifest.or(file.manifest),
            inventory: self.inventory.or(file.inventory),
            spec: self.spec.or(file.spec),
            http: self.http.or(file.http),
            state: self.state.or(file.state),
            ipxe_dir: self.ipxe_dir.or(file.ipxe_dir),
            efi_binary: self.efi_binary.or(file.efi_binary),
            bios_binary: self.bios_binary.or(file.bios_binary),
            pool_start: self.pool_start.or(file.pool_start),
            pool_end: self.pool_end.or(file.pool_end),
            lease_time: self.lease_time.or(file.lease_time),
            router: self.router.or(file.router),
            dns: if self.dns.is_empty() {
                file.dns
            } else {
                self.dns
            },
            unknown_macs: self.unknown_macs.or(file.unknown_macs),
            kernel_args: self.kernel_args.or(file.kernel_args),
            script_template: self.script_template.or(file.script_template),
            tftp_port: self.tftp_port.or(file.tftp_port),
            tftp_max_blksize: self.tftp_max_blksize.or(file.tftp_max_blksize),
            tftp_max_windowsize: self.tftp_max_windowsize.or(file.tftp_max_windowsize),
        }
    }

    pub fn from_yaml(text: &str) -> Result<ServeConfig, String> {
        serde_saphyr::from_str(text).map_err(|e| e.to_string())
    }

    /// Checks everything, loads the inventory and the spec and resolves the interface
    /// address. Every problem is reported, each with the option it concerns.
    pub fn resolve(&self) -> Result<Resolved, Vec<String>> {
        let mut errors = Vec::new();
        let mut need = |name: &str, present: bool| {
            if !present {
                errors.push(format!("--{name} is required"));
            }
        };
        need("interface", self.interface.is_some());
        need("mode", self.mode.is_some());
        need("artifacts", self.artifacts.is_some());
        need("inventory", self.inventory.is_some());
        let check_dir = |errors: &mut Vec<String>, name: &str, dir: Option<&Path>| {
            if let Some(d) = dir
                && !d.is_dir()
            {
                errors.push(format!("--{name}: {} is not a directory", d.display()));
            }
        };
        check_dir(&mut errors, "artifacts", self.artifacts.as_deref());
        let ipxe_dir = self
            .ipxe_dir
            .clone()
            .unwrap_or_else(|| "/usr/lib/ipxe".into());
        check_dir(&mut errors, "ipxe-dir", Some(&ipxe_dir));
        let efi_file = self.efi_binary.clone().unwrap_or_else(|| "ipxe.efi".into());
        let bios_file = self
            .bios_binary
            .clone()
            .unwrap_or_else(|| "undionly.kpxe".into());
        for (name, file) in [("efi-binary", &efi_file), ("bios-binary", &bios_file)] {
            if ipxe_dir.is_dir() && crate::jail::resolve(&ipxe_dir, file).is_err() {
                errors.push(format!(
                    "--{name}: {file} is not a file in {}",
                    ipxe_dir.display()
                ));
            }
        }
        let mut addr = None;
        if let Some(interface) = &self.interface {
            match interface_ipv4(interface) {
                Ok(a) => addr = Some(a),
                Err(e) => errors.push(format!("--interface: {e}")),
            }
        }
        let pool = match (self.mode, self.pool_start, self.pool_end) {
            (Some(NetbootMode::Dhcp), Some(start), Some(end)) => {
                if u32::from(start) > u32::from(end) {
                    errors.push(format!("--pool-start: {start} is after --pool-end {end}"));
                }
                Some((start, end))
            }
            (Some(NetbootMode::Dhcp), _, _) => {
                errors.push("--pool-start and --pool-end are required in dhcp mode".into());
                None
            }
            (_, None, None) => None,
            _ => {
                errors.push("--pool-start and --pool-end apply to dhcp mode only".into());
                None
            }
        };
        let template = match &self.script_template {
            Some(path) => match std::fs::read_to_string(path) {
                Ok(t) => t,
                Err(e) => {
                    errors.push(format!(
                        "--script-template: reading {}: {e}",
                        path.display()
                    ));
                    String::new()
                }
            },
            None => kiln_spec::ipxe::DEFAULT_TEMPLATE.to_string(),
        };
        let artifacts = self.artifacts.as_deref().filter(|d| d.is_dir());
        let manifest = match artifacts.map(|dir| load_manifest(self.manifest.as_deref(), dir)) {
            Some(Ok(m)) => Some(m),
            Some(Err(e)) => {
                errors.push(format!("--manifest: {e}"));
                None
            }
            None => None,
        };
        let boot_digests = match &manifest {
            Some((path, m)) => match BootDigests::from_manifest(m) {
                Ok(d) => Some(d),
                Err(e) => {
                    errors.push(format!("--manifest: {}: {e}", path.display()));
                    None
                }
            },
            None => None,
        };
        let manifest = manifest.map(|(_, m)| m);
        let appliance =
            match artifacts.map(|dir| load_spec(self.spec.as_deref(), dir, manifest.as_ref())) {
                Some(Ok(a)) => Some(a),
                Some(Err(e)) => {
                    errors.push(format!("--spec: {e}"));
                    None
                }
                None => None,
            };
        let inventory = match &self.inventory {
            Some(path) => match Inventory::load(path) {
                Ok(i) => Some(i),
                Err(e) => {
                    errors.push(format!("--inventory: {e}"));
                    None
                }
            },
            None => None,
        };
        if self.lease_time == Some(0) {
            errors.push("--lease-time must be at least 1 second".into());
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let (server_ip, prefix) = addr.unwrap_or((Ipv4Addr::UNSPECIFIED, 24));
        let http_listen = self.http.unwrap_or(SocketAddr::from((server_ip, 8080)));
        let http_host = if http_listen.ip().is_unspecified() {
            server_ip.into()
        } else {
            http_listen.ip()
        };
        let limits = Limits::default();
        let settings = Settings {
            interface: self.interface.clone().unwrap_or_default(),
            server_ip,
            mode: self.mode.unwrap_or_default(),
            unknown_macs: self.unknown_macs.unwrap_or_default(),
            artifacts: self.artifacts.clone().unwrap_or_default(),
            ipxe_dir,
            state_dir: self
                .state
                .clone()
                .unwrap_or_else(|| "/var/lib/kiln/pxe".into()),
            http_listen,
            http_base: format!("http://{http_host}:{}", http_listen.port()),
            bios_file,
            efi_file,
            pool,
            lease_secs: self.lease_time.unwrap_or(3600),
            addressing: AddressSettings {
                subnet_mask: Ipv4Addr::from(
                    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0),
                ),
                router: self.router,
                dns: self.dns.clone(),
            },
            kernel_args: self
                .kernel_args
                .clone()
                .unwrap_or_else(|| "console=tty0 console=ttyS0,115200".into()),
            boot_digests: boot_digests.expect("checked above"),
            template,
            tftp_port: self.tftp_port.unwrap_or(69),
            tftp_limits: Limits {
                max_blksize: self.tftp_max_blksize.unwrap_or(limits.max_blksize),
                max_windowsize: self.tftp_max_windowsize.unwrap_or(limits.max_windowsize),
                default_timeout: limits.default_timeout,
            },
        };
        Ok(Resolved {
            settings,
            inventory: inventory.expect("checked above"),
            appliance: appliance.expect("checked above"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_keys_are_the_option_names_and_unknown_keys_fail() {
        let c = ServeConfig::from_yaml(
            "interface: br0\nmode: dhcp\nartifacts: /srv/pxe\ninventory: fleet.yaml\npool-start: 10.0.0.100\npool-end: 10.0.0.200\ndns: [10.0.0.1]\nunknown-macs: discovery\n",
        )
        .unwrap();
        assert_eq!(c.mode, Some(NetbootMode::Dhcp));
        assert_eq!(c.pool_start, Some(Ipv4Addr::new(10, 0, 0, 100)));
        assert_eq!(c.unknown_macs, Some(UnknownMacs::Discovery));
        assert!(
            ServeConfig::from_yaml("interfaces: br0\n")
                .unwrap_err()
                .contains("interfaces")
        );
    }

    #[test]
    fn command_line_overrides_the_file() {
        let file = ServeConfig {
            interface: Some("br0".into()),
            mode: Some(NetbootMode::Proxy),
            dns: vec![Ipv4Addr::new(1, 1, 1, 1)],
            ..Default::default()
        };
        let cli = ServeConfig {
            mode: Some(NetbootMode::Dhcp),
            ..Default::default()
        };
        let m = cli.merged_over(file);
        assert_eq!(m.interface.as_deref(), Some("br0"));
        assert_eq!(m.mode, Some(NetbootMode::Dhcp));
        assert_eq!(m.dns, vec![Ipv4Addr::new(1, 1, 1, 1)]);
    }

    #[test]
    fn the_spec_defaults_to_the_one_the_build_left_beside_its_manifest() {
        let out = tempfile::tempdir().unwrap();
        let pxe = out.path().join("pxe");
        std::fs::create_dir(&pxe).unwrap();
        let spec = Appliance::default_spec().to_yaml();
        let manifest = format!(
            r#"{{"kiln_version":"t","spec_sha256":"{}","suite":"","mirror":"","kernel":"",
            "kernel_args":[],"rootfs_cache_key":"","packages":[],"artifacts":[]}}"#,
            hex::encode(Sha256::digest(spec.as_bytes()))
        );
        std::fs::write(out.path().join("manifest.json"), manifest).unwrap();
        let (_, manifest) = load_manifest(None, &pxe).unwrap();
        let err = load_spec(None, &pxe, Some(&manifest)).unwrap_err();
        assert!(err.starts_with("no spec.yaml in or next to"), "{err}");

        std::fs::write(out.path().join(BUILD_SPEC), &spec).unwrap();
        let found = load_spec(None, &pxe, Some(&manifest)).unwrap();
        assert_eq!(found, Appliance::default_spec());

        let edited = spec.replace("kiln-{mac}", "n-{mac}");
        std::fs::write(out.path().join(BUILD_SPEC), &edited).unwrap();
        let err = load_spec(None, &pxe, Some(&manifest)).unwrap_err();
        assert!(
            err.contains("is not the spec the build manifest was made from"),
            "{err}"
        );
        let named = out.path().join(BUILD_SPEC);
        let chosen = load_spec(Some(&named), &pxe, Some(&manifest)).unwrap();
        assert_eq!(
            chosen.spec.hostname, "n-{mac}",
            "a named spec is the operator's choice"
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let c = ServeConfig {
            mode: Some(NetbootMode::Dhcp),
            artifacts: Some("/nonexistent/kiln".into()),
            ipxe_dir: Some("/nonexistent/ipxe".into()),
            lease_time: Some(0),
            ..Default::default()
        };
        let errors = c.resolve().unwrap_err();
        assert_eq!(
            errors,
            [
                "--interface is required",
                "--inventory is required",
                "--artifacts: /nonexistent/kiln is not a directory",
                "--ipxe-dir: /nonexistent/ipxe is not a directory",
                "--pool-start and --pool-end are required in dhcp mode",
                "--lease-time must be at least 1 second",
            ]
        );
    }
}
