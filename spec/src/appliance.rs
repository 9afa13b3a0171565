//! The appliance spec (`kind: Appliance`, usually `kiln.yaml`): what to build and how to
//! install it — OS packages, users, host name, network defaults, disk rules, cluster settings.

use std::collections::BTreeSet;
use std::path::Path;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::errors::{SpecError, ValidationErrors};
pub use crate::host::{
    BondConfig, BondMode, BridgeConfig, InterfaceConfig, NetworkSpec, User, VlanConfig,
};
use crate::inventory::{Metadata, format_mac, is_dns_label};
use crate::size::{ByteSize, MIB};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Appliance {
    /// Always `kiln.dev/v1alpha1`.
    pub api_version: String,
    /// Always `Appliance`.
    pub kind: String,
    pub metadata: Metadata,
    pub spec: ApplianceSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApplianceSpec {
    /// A built-in spec this one adds to: objects merge field by field, lists are appended
    /// and single values replaced by the ones written here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<ProfileName>,
    /// Optional parts of the appliance; each adds its overlay layer to the image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<Feature>,
    #[serde(default)]
    pub os: OsSpec,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<User>,
    /// Host name pattern. `{mac}` is the first Ethernet interface's MAC address without
    /// separators, `{name}` the node's name from the inventory.
    #[serde(default = "default_hostname")]
    pub hostname: String,
    #[serde(default)]
    pub network: NetworkSpec,
    #[serde(default)]
    pub install: InstallSpec,
    #[serde(default)]
    pub cluster: ClusterSpec,
    /// The agent's network API (per node: it holds the node's own certificate), usually
    /// filled in by the fleet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_api: Option<RemoteApi>,
    /// How a node running this image takes the next one.
    #[serde(default, skip_serializing_if = "UpgradeSpec::is_default")]
    pub upgrade: UpgradeSpec,
}

/// The image's own rules for upgrades of a node running it: the build carries them, so a new
/// image brings its own health checks and the running one decides what it accepts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpgradeSpec {
    /// Let `kiln node upgrade --allow-unsigned` take a build without a signature. Its files
    /// are still checked against its manifest, and a signature that is present must verify.
    #[serde(default)]
    pub allow_unsigned: bool,
    /// What a newly booted slot must show before it is kept.
    #[serde(default)]
    pub health: HealthSpec,
}

impl UpgradeSpec {
    fn is_default(&self) -> bool {
        self == &Self::default()
    }
}

/// The boot assessment of a slot on trial: besides the agent's own converge with nothing
/// failed, these units must be active within the timeout, or the slot is marked bad and the
/// node reboots into the last good one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HealthSpec {
    /// systemd units (`name.service`, `name.target`, …) that must be active. One that is
    /// not installed or has failed fails the check at once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub required_units: Vec<String>,
    /// Seconds a slot on trial has to become healthy.
    #[serde(default = "default_health_timeout")]
    pub timeout_seconds: u64,
}

fn default_health_timeout() -> u64 {
    600
}

impl Default for HealthSpec {
    fn default() -> Self {
        HealthSpec {
            required_units: Vec::new(),
            timeout_seconds: default_health_timeout(),
        }
    }
}

/// Where the build puts [`UpgradeSpec`] in the image (JSON), out of reach of the node's
/// writable state, so each slot is assessed by its own build's rules.
pub const IMAGE_UPGRADE_RULES_PATH: &str = "/usr/lib/kiln/upgrade.json";

/// The unit types a health check may name.
const UNIT_SUFFIXES: [&str; 7] = [
    ".service", ".target", ".mount", ".socket", ".timer", ".path", ".device",
];

fn validate_upgrade(u: &UpgradeSpec, errs: &mut ValidationErrors) {
    let h = &u.health;
    for (i, unit) in h.required_units.iter().enumerate() {
        let well_formed = UNIT_SUFFIXES
            .iter()
            .any(|s| unit.len() > s.len() && unit.ends_with(s))
            && unit
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ":-_.@\\".contains(c));
        if !well_formed {
            errs.push(
                format!("spec.upgrade.health.requiredUnits[{i}]"),
                format!(
                    "{unit:?} is not a systemd unit name ending in one of {}",
                    UNIT_SUFFIXES.join(", ")
                ),
            );
        }
        if h.required_units[..i].contains(unit) {
            errs.push(
                format!("spec.upgrade.health.requiredUnits[{i}]"),
                format!("{unit:?} is listed twice"),
            );
        }
    }
    if !(10..=86_400).contains(&h.timeout_seconds) {
        errs.push(
            "spec.upgrade.health.timeoutSeconds",
            format!("{} is out of range (10 to 86400)", h.timeout_seconds),
        );
    }
}

fn default_hostname() -> String {
    "kiln-{mac}".into()
}

/// The built-in specs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ProfileName {
    /// A minimal system that boots fast in a virtual machine.
    Test,
    /// The full hyperconverged node: Kubernetes, Ceph and KVM virtualisation.
    Appliance,
}

impl ProfileName {
    pub const ALL: [ProfileName; 2] = [ProfileName::Test, ProfileName::Appliance];

    pub fn as_str(self) -> &'static str {
        match self {
            ProfileName::Test => "test",
            ProfileName::Appliance => "appliance",
        }
    }

    /// The profile's YAML document, as shipped.
    pub fn yaml(self) -> &'static str {
        match self {
            ProfileName::Test => include_str!("../profiles/test.yaml"),
            ProfileName::Appliance => include_str!("../profiles/appliance.yaml"),
        }
    }
}

impl std::str::FromStr for ProfileName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        ProfileName::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("unknown profile {s:?} (known: test, appliance)"))
    }
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Feature {
    /// A Kubernetes node: upstream components from kiln's own build, see `cluster`.
    Kubernetes,
    /// Ceph storage on the node's data disks. Needs `kubernetes`.
    Ceph,
    /// KubeVirt virtual machines. Needs `kubernetes`.
    Kubevirt,
}

impl Feature {
    pub fn as_str(self) -> &'static str {
        match self {
            Feature::Kubernetes => "kubernetes",
            Feature::Ceph => "ceph",
            Feature::Kubevirt => "kubevirt",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OsSpec {
    /// Debian release the root file system is built from.
    #[serde(default = "default_suite")]
    pub suite: String,
    /// Debian mirror (http, https or file URL) [default: the Debian mirror in the build
    /// host's own apt sources].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<String>,
    /// Packages added to the minimal Debian base the image builder always installs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packages: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub apt_repositories: Vec<AptRepository>,
    /// Extra kernel command-line arguments for the live and the installed system.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kernel_args: Vec<String>,
}

fn default_suite() -> String {
    "bookworm".into()
}

impl Default for OsSpec {
    fn default() -> Self {
        OsSpec {
            suite: default_suite(),
            mirror: None,
            packages: Vec::new(),
            apt_repositories: Vec::new(),
            kernel_args: Vec::new(),
        }
    }
}

/// An extra APT source, as a deb822 `.sources` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AptRepository {
    /// File name of the source, `/etc/apt/sources.list.d/<name>.sources`.
    pub name: String,
    pub uri: String,
    pub suite: String,
    #[serde(default = "default_components")]
    pub components: Vec<String>,
    /// ASCII-armoured OpenPGP key that signs the repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

fn default_components() -> Vec<String> {
    vec!["main".into()]
}

/// How the installer lays the appliance onto a disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InstallSpec {
    /// Which disk to install to. The disk holding the boot medium is never chosen.
    #[serde(default)]
    pub disk: DiskRules,
    /// Which other disks the node keeps for data (Ceph OSDs, VM disks): every blank disk
    /// meeting these rules, recorded in the node config. The installer writes nothing to them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_disks: Option<DataDiskRules>,
    /// Whether the installer may erase a disk that already holds data.
    #[serde(default)]
    pub wipe: WipePolicy,
    /// Size of each of the two OS slots (`KILN_A`, `KILN_B`).
    #[serde(default = "default_slot_size")]
    pub slot_size: ByteSize,
    /// Size of the EFI system partition (kernels, initrds, boot entries).
    #[serde(default = "default_esp_size")]
    pub esp_size: ByteSize,
    /// Size of `KILN_STATE` (/etc and /var overlays, node config); the rest stays free.
    #[serde(default = "default_state_size")]
    pub state_size: ByteSize,
    /// Boot loader choice: `auto` follows the machine's firmware.
    #[serde(default)]
    pub firmware: FirmwareChoice,
    /// What the installer does when it is done.
    #[serde(default)]
    pub after_install: AfterInstall,
}

fn default_slot_size() -> ByteSize {
    ByteSize::gib(3)
}

fn default_esp_size() -> ByteSize {
    ByteSize::mib(512)
}

fn default_state_size() -> ByteSize {
    ByteSize::gib(4)
}

impl Default for InstallSpec {
    fn default() -> Self {
        InstallSpec {
            disk: DiskRules::default(),
            data_disks: None,
            wipe: WipePolicy::default(),
            slot_size: default_slot_size(),
            esp_size: default_esp_size(),
            state_size: default_state_size(),
            firmware: FirmwareChoice::default(),
            after_install: AfterInstall::default(),
        }
    }
}

/// The node's data disks: every disk other than the install disk meeting `rules` (`prefer`
/// does not apply) and blank. A disk holding anything is not taken: kiln never erases one
/// (wipe it yourself to have it used).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DataDiskRules {
    #[serde(default)]
    pub rules: DiskRules,
    #[serde(default)]
    pub usage: crate::nodeconfig::DataUsage,
}

/// Rules a disk must meet to be installed to; every rule given must hold.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DiskRules {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_size: Option<ByteSize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_size: Option<ByteSize>,
    /// Glob (`*`, `?`) on the disk model, e.g. `Samsung SSD 9*`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Glob on the disk serial number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// World wide name, `0x5002538e40a1b2c3` (case-insensitive, exact).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wwn: Option<String>,
    /// Glob on the disk's `/dev/disk/by-id/…` links, e.g. `/dev/disk/by-id/nvme-*`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by_id_path: Option<String>,
    /// `false` for SSDs and NVMe, `true` for spinning disks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotational: Option<bool>,
    /// Allowed transports; empty allows any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub transport: Vec<Transport>,
    /// Removable disks (USB sticks, card readers) are skipped unless this is true.
    #[serde(default)]
    pub allow_removable: bool,
    /// Which disk wins when several meet the rules.
    #[serde(default)]
    pub prefer: DiskPreference,
}

/// How the disk is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Nvme,
    Sata,
    Sas,
    Scsi,
    Usb,
    Virtio,
    Mmc,
    Unknown,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Nvme => "nvme",
            Transport::Sata => "sata",
            Transport::Sas => "sas",
            Transport::Scsi => "scsi",
            Transport::Usb => "usb",
            Transport::Virtio => "virtio",
            Transport::Mmc => "mmc",
            Transport::Unknown => "unknown",
        }
    }
}

/// When several disks meet the rules. Ties are broken by device path in natural order
/// (`/dev/sda` < `/dev/sdb` < `/dev/sdaa`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum DiskPreference {
    /// The smallest disk: big disks are usually meant for data.
    #[default]
    Smallest,
    Largest,
    /// Refuse to choose: the rules must single out one disk.
    Only,
}

/// Consent to erase a disk that already holds partitions or a file system. Consent is
/// never implied: without it the installer refuses and writes nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum WipePolicy {
    /// Only blank disks; anything else needs `kiln install --wipe`.
    #[default]
    Never,
    /// Blank disks, and disks that hold only an earlier kiln install (reinstall).
    KilnOnly,
    /// Whatever the disk rules select is erased.
    Always,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FirmwareChoice {
    /// systemd-boot on UEFI machines, GRUB on BIOS machines.
    #[default]
    Auto,
    /// Refuse to install on a machine not booted in UEFI mode.
    Uefi,
    /// Install GRUB even on a UEFI machine.
    Bios,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AfterInstall {
    #[default]
    Reboot,
    Poweroff,
    /// Stay in the live system.
    Stay,
}

/// What kiln ships: upstream Kubernetes built from its pinned modules into one binary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Distribution {
    #[default]
    Kubernetes,
}

/// Kubernetes settings, used when the `kubernetes` feature is on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterSpec {
    #[serde(default)]
    pub distribution: Distribution,
    #[serde(default = "default_cluster_cidr")]
    pub cluster_cidr: String,
    #[serde(default = "default_service_cidr")]
    pub service_cidr: String,
    #[serde(default = "default_cluster_domain")]
    pub cluster_domain: String,
    /// This node's part in the cluster (role, address, pod network, join credentials): per
    /// node, so it comes from an inventory node's `overrides.clusterNode` or from the fleet,
    /// which fills it in from the node's inventory role. Its networks must be the ones above.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<KubernetesNode>,
    /// The Ceph cluster the fleet makes of its nodes (needs the `ceph` feature): its network
    /// and pools. Without it the fleet gives nodes no Ceph part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ceph: Option<CephCluster>,
    /// This node's part in the Ceph cluster (role, monitors, keys): per node, like `node`, so
    /// it comes from an inventory node's `overrides.cephNode` or from the fleet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ceph_node: Option<CephNode>,
}

use crate::ceph::{CephCluster, CephNode};
use crate::remote::RemoteApi;

use crate::kubernetes::{
    KubernetesNode, default_cluster_cidr, default_cluster_domain, default_service_cidr,
};

impl Default for ClusterSpec {
    fn default() -> Self {
        ClusterSpec {
            distribution: Distribution::default(),
            cluster_cidr: default_cluster_cidr(),
            service_cidr: default_service_cidr(),
            cluster_domain: default_cluster_domain(),
            node: None,
            ceph: None,
            ceph_node: None,
        }
    }
}

impl Appliance {
    /// The spec `kiln build` uses when given none: the `test` profile. A new user's first
    /// build and lab install should finish in minutes on a laptop; the `appliance` profile
    /// (Ceph, KVM, Kubernetes) is one `--profile appliance` or `profile: appliance` away.
    pub fn default_spec() -> Appliance {
        Appliance::profile(ProfileName::Test)
    }

    /// A built-in profile, parsed. The profiles are tested to be valid.
    pub fn profile(name: ProfileName) -> Appliance {
        Appliance::from_yaml(name.yaml())
            .unwrap_or_else(|e| panic!("built-in profile {} is invalid: {e}", name.as_str()))
    }

    /// Parses and validates a spec. Reports every problem found, each with its field path:
    /// first the shape (unknown fields, wrong types), then the values.
    pub fn from_yaml(text: &str) -> Result<Appliance, SpecError> {
        Appliance::from_value(crate::check::yaml_value("appliance spec", text)?)
    }

    /// Like [`Appliance::from_yaml`], from an already parsed document (JSON or YAML).
    pub fn from_value(mut value: serde_json::Value) -> Result<Appliance, SpecError> {
        let mut origins = crate::check::ListOrigins::new();
        if let Some(profile) = value
            .pointer("/spec/profile")
            .and_then(|p| p.as_str())
            .and_then(|p| p.parse::<ProfileName>().ok())
        {
            let mut base: serde_json::Value =
                serde_saphyr::from_str(profile.yaml()).expect("built-in profiles are YAML");
            crate::check::merge(&mut base, value, "", &mut origins);
            value = base;
        }
        crate::check::parse_document("appliance spec", value, Appliance::validate).map_err(|e| {
            match e {
                SpecError::Invalid { what, mut errors } => {
                    crate::check::renumber(&mut errors, &origins);
                    SpecError::Invalid { what, errors }
                }
                other => other,
            }
        })
    }

    pub fn load(path: &Path) -> Result<Appliance, SpecError> {
        Appliance::from_yaml(&crate::check::read(path)?)
    }

    /// The spec as YAML, the form `kiln spec default` prints.
    pub fn to_yaml(&self) -> String {
        serde_saphyr::to_string(self).expect("an appliance spec always serializes")
    }

    /// The kernel command line the appliance needs, before the boot-specific arguments
    /// (`kiln.slot=…`): what its features need, then `os.kernelArgs`.
    pub fn kernel_args(&self) -> Vec<String> {
        let mut args: Vec<String> = Vec::new();
        if self.has_feature(Feature::Kubevirt) {
            // Device pass-through to virtual machines (AMD enables its IOMMU by default).
            args.extend(["intel_iommu=on", "iommu=pt"].map(String::from));
        }
        for a in &self.spec.os.kernel_args {
            if !args.contains(a) {
                args.push(a.clone());
            }
        }
        args
    }

    pub fn has_feature(&self, f: Feature) -> bool {
        self.spec.features.contains(&f)
    }

    /// Host name for a node: the pattern with `{name}` and `{mac}` filled in.
    pub fn hostname_for(
        &self,
        name: Option<&str>,
        mac: Option<&[u8; 6]>,
    ) -> Result<String, String> {
        expand_hostname(&self.spec.hostname, name, mac)
    }

    /// Every value problem, each with its field path.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errs = ValidationErrors::default();
        crate::check::check_header(&self.api_version, &self.kind, "Appliance", &mut errs);
        if !is_dns_label(&self.metadata.name) {
            errs.push(
                "metadata.name",
                format!(
                    "{:?} is not a valid name (lower-case letters, digits and '-', at most 63)",
                    self.metadata.name
                ),
            );
        }
        let s = &self.spec;
        for (i, f) in s.features.iter().enumerate() {
            if matches!(f, Feature::Ceph | Feature::Kubevirt)
                && !self.has_feature(Feature::Kubernetes)
            {
                errs.push(
                    format!("spec.features[{i}]"),
                    format!("{} needs the kubernetes feature", f.as_str()),
                );
            }
        }
        validate_os(&s.os, &mut errs);
        crate::host::validate_users("spec.users", &s.users, &mut errs);
        if let Err(reason) = check_hostname_pattern(&s.hostname) {
            errs.push("spec.hostname", reason);
        }
        s.network.validate_into("spec.network", &mut errs);
        validate_install(&s.install, &mut errs);
        validate_cluster(&s.cluster, &mut errs);
        if let Some(node) = &s.cluster.node {
            if !self.has_feature(Feature::Kubernetes) {
                errs.push(
                    "spec.cluster.node",
                    "a cluster node needs the kubernetes feature",
                );
            }
            let own = s.network.static_networks("spec.network");
            node.validate_into("spec.cluster.node", &own, &mut errs);
            for (field, node_value, cluster_value) in [
                ("clusterCidr", &node.cluster_cidr, &s.cluster.cluster_cidr),
                ("serviceCidr", &node.service_cidr, &s.cluster.service_cidr),
                (
                    "clusterDomain",
                    &node.cluster_domain,
                    &s.cluster.cluster_domain,
                ),
            ] {
                if node_value != cluster_value {
                    errs.push(
                        format!("spec.cluster.node.{field}"),
                        format!("{node_value} is not spec.cluster.{field} {cluster_value}"),
                    );
                }
            }
        }
        for (field, given) in [
            ("ceph", s.cluster.ceph.is_some()),
            ("cephNode", s.cluster.ceph_node.is_some()),
        ] {
            if given && !self.has_feature(Feature::Ceph) {
                errs.push(format!("spec.cluster.{field}"), "needs the ceph feature");
            }
        }
        if let Some(c) = &s.cluster.ceph {
            c.validate_into("spec.cluster.ceph", &mut errs);
        }
        if let Some(n) = &s.cluster.ceph_node {
            // The node's data disks are known only at install; its node config checks them.
            n.validate_into("spec.cluster.cephNode", usize::MAX, &mut errs);
        }
        if let Some(r) = &s.remote_api {
            r.validate_into("spec.remoteApi", &mut errs);
        }
        validate_upgrade(&s.upgrade, &mut errs);
        errs.into_result()
    }
}

fn validate_os(os: &OsSpec, errs: &mut ValidationErrors) {
    if !is_suite(&os.suite) {
        errs.push(
            "spec.os.suite",
            format!("{:?} is not a Debian suite name", os.suite),
        );
    }
    if let Some(mirror) = &os.mirror
        && let Err(reason) = check_url(mirror)
    {
        errs.push("spec.os.mirror", reason);
    }
    for (i, p) in os.packages.iter().enumerate() {
        if !is_package_name(p) {
            errs.push(
                format!("spec.os.packages[{i}]"),
                format!("{p:?} is not a Debian package name"),
            );
        }
    }
    let mut names = BTreeSet::new();
    for (i, r) in os.apt_repositories.iter().enumerate() {
        let at = format!("spec.os.aptRepositories[{i}]");
        if !is_file_stem(&r.name) {
            errs.push(
                format!("{at}.name"),
                format!("{:?} is not a usable file name", r.name),
            );
        } else if !names.insert(r.name.as_str()) {
            errs.push(format!("{at}.name"), format!("{:?} is used twice", r.name));
        }
        if let Err(reason) = check_url(&r.uri) {
            errs.push(format!("{at}.uri"), reason);
        }
        if r.suite.is_empty() || r.suite.contains(char::is_whitespace) {
            errs.push(format!("{at}.suite"), "must be one word");
        }
        if r.components.is_empty() {
            errs.push(
                format!("{at}.components"),
                "must list at least one component",
            );
        }
        if let Some(key) = &r.key
            && !key.contains("-----BEGIN PGP PUBLIC KEY BLOCK-----")
        {
            errs.push(
                format!("{at}.key"),
                "must be an ASCII-armoured OpenPGP public key",
            );
        }
    }
    crate::host::check_kernel_args("spec.os.kernelArgs", &os.kernel_args, errs);
}

fn validate_disk_rules(at: &str, d: &DiskRules, errs: &mut ValidationErrors) {
    if let (Some(min), Some(max)) = (d.min_size, d.max_size)
        && min > max
    {
        errs.push(
            format!("{at}.maxSize"),
            format!("{max} is smaller than minSize {min}"),
        );
    }
    for (field, pattern) in [
        ("model", &d.model),
        ("serial", &d.serial),
        ("byIdPath", &d.by_id_path),
    ] {
        if let Some(Err(reason)) = pattern.as_deref().map(crate::glob::check_glob) {
            errs.push(format!("{at}.{field}"), reason);
        }
    }
    if let Some(w) = &d.wwn
        && (w.is_empty() || w.contains(char::is_whitespace))
    {
        errs.push(
            format!("{at}.wwn"),
            "must be a world wide name like 0x5002538e40a1b2c3",
        );
    }
    if let Some(p) = &d.by_id_path
        && !p.starts_with("/dev/disk/by-id/")
    {
        errs.push(
            format!("{at}.byIdPath"),
            format!("{p:?} must start with /dev/disk/by-id/"),
        );
    }
}

fn validate_install(i: &InstallSpec, errs: &mut ValidationErrors) {
    validate_disk_rules("spec.install.disk", &i.disk, errs);
    if let Some(data) = &i.data_disks {
        validate_disk_rules("spec.install.dataDisks.rules", &data.rules, errs);
    }
    for (field, size, min) in [
        ("slotSize", i.slot_size, 64 * MIB),
        ("espSize", i.esp_size, 64 * MIB),
        ("stateSize", i.state_size, 64 * MIB),
    ] {
        if size.0 < min {
            errs.push(
                format!("spec.install.{field}"),
                format!("{size} is too small (at least {})", ByteSize(min)),
            );
        } else if !size.0.is_multiple_of(MIB) {
            errs.push(
                format!("spec.install.{field}"),
                format!("{size} is not a whole number of MiB"),
            );
        }
    }
}

fn validate_cluster(c: &ClusterSpec, errs: &mut ValidationErrors) {
    crate::kubernetes::check_cluster_networks(
        "spec.cluster",
        &c.cluster_cidr,
        &c.service_cidr,
        errs,
    );
    if c.cluster_domain.is_empty() || !c.cluster_domain.split('.').all(is_dns_label) {
        errs.push(
            "spec.cluster.clusterDomain",
            format!("{:?} is not a domain name", c.cluster_domain),
        );
    }
}

/// Fills in a host name pattern. `{mac}` needs `mac`, `{name}` needs `name`.
pub fn expand_hostname(
    pattern: &str,
    name: Option<&str>,
    mac: Option<&[u8; 6]>,
) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = pattern;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = rest[open..]
            .find('}')
            .ok_or_else(|| format!("{pattern:?}: '{{' without '}}'"))?
            + open;
        match &rest[open + 1..close] {
            "mac" => {
                let mac =
                    mac.ok_or("the pattern uses {mac} but the machine has no Ethernet interface")?;
                out.push_str(&format_mac(mac).replace(':', ""));
            }
            "name" => {
                let name = name.ok_or(
                    "the pattern uses {name} but this node has no name (no inventory entry)",
                )?;
                out.push_str(name);
            }
            other => {
                return Err(format!(
                    "unknown placeholder {{{other}}} (known: {{mac}}, {{name}})"
                ));
            }
        }
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    if !is_dns_label(&out) {
        return Err(format!(
            "{out:?} is not a valid host name (lower-case letters, digits and '-', at most 63)"
        ));
    }
    Ok(out)
}

fn check_hostname_pattern(pattern: &str) -> Result<(), String> {
    // A node name is a DNS label itself; "n" stands for any, "x"*63 would hide length limits.
    expand_hostname(pattern, Some("n"), Some(&[0; 6])).map(|_| ())
}

fn check_url(url: &str) -> Result<(), String> {
    match url.split_once("://") {
        Some(("http" | "https", host))
            if !host.is_empty() && !url.contains(char::is_whitespace) =>
        {
            Ok(())
        }
        Some(("file", path)) if path.starts_with('/') => Ok(()),
        _ => Err(format!(
            "{url:?} is not an http://, https:// or file:/// URL"
        )),
    }
}

fn is_suite(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// Debian policy §5.6.1, with an optional `=version` pin.
fn is_package_name(p: &str) -> bool {
    let name = p
        .split_once('=')
        .map_or(p, |(n, v)| if v.is_empty() { "" } else { n });
    name.len() >= 2
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c))
}

fn is_file_stem(n: &str) -> bool {
    !n.is_empty()
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !n.starts_with('.')
}

/// Per-node changes to the appliance spec, as an inventory node's `overrides`. Values given
/// replace the spec's; lists (users, interfaces, bonds, VLANs, bridges, nameservers, kernel
/// arguments) are added to the spec's; `install.disk` replaces the spec's disk rules whole,
/// so a node's rules never mix with the fleet's.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApplianceOverrides {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<User>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kernel_args: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkOverrides>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub install: Option<InstallOverrides>,
    /// The node's part in the cluster (`spec.cluster.node`), as written: the fleet then
    /// derives nothing for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_node: Option<KubernetesNode>,
    /// The node's part in the Ceph cluster (`spec.cluster.cephNode`), as written: the fleet
    /// then derives nothing for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ceph_node: Option<CephNode>,
    /// The node's network API (`spec.remoteApi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_api: Option<RemoteApi>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkOverrides {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp: Option<bool>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<InterfaceConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bonds: Vec<BondConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vlans: Vec<VlanConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bridges: Vec<BridgeConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InstallOverrides {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskRules>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wipe: Option<WipePolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<FirmwareChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_install: Option<AfterInstall>,
}

impl Appliance {
    /// This spec with one node's overrides applied. The result still needs
    /// [`Appliance::validate`]: overrides can make a valid spec invalid (a duplicate user).
    pub fn with_overrides(&self, o: &ApplianceOverrides) -> Appliance {
        let mut a = self.clone();
        let s = &mut a.spec;
        if let Some(h) = &o.hostname {
            s.hostname = h.clone();
        }
        s.users.extend(o.users.iter().cloned());
        s.os.kernel_args.extend(o.kernel_args.iter().cloned());
        if let Some(n) = &o.network {
            if let Some(d) = n.dhcp {
                s.network.dhcp = d;
            }
            s.network.interfaces.extend(n.interfaces.iter().cloned());
            s.network.bonds.extend(n.bonds.iter().cloned());
            s.network.vlans.extend(n.vlans.iter().cloned());
            s.network.bridges.extend(n.bridges.iter().cloned());
            s.network.nameservers.extend(n.nameservers.iter().cloned());
        }
        if let Some(i) = &o.install {
            if let Some(d) = &i.disk {
                s.install.disk = d.clone();
            }
            if let Some(w) = i.wipe {
                s.install.wipe = w;
            }
            if let Some(f) = i.firmware {
                s.install.firmware = f;
            }
            if let Some(x) = i.after_install {
                s.install.after_install = x;
            }
        }
        if let Some(n) = &o.cluster_node {
            s.cluster.node = Some(n.clone());
        }
        if let Some(n) = &o.ceph_node {
            s.cluster.ceph_node = Some(n.clone());
        }
        if let Some(r) = &o.remote_api {
            s.remote_api = Some(r.clone());
        }
        a
    }

    /// The spec one inventory node installs from: its overrides applied and its host name
    /// fixed, so the node needs nothing else to render its own config. The inventory name is
    /// the host name unless the node's overrides give a pattern; `mac` is the MAC it boots from
    /// (for `{mac}` in such a pattern).
    pub fn for_node(
        &self,
        node: &crate::InventoryNode,
        mac: Option<&[u8; 6]>,
    ) -> Result<Appliance, ValidationErrors> {
        let mut a = match &node.overrides {
            Some(o) => self.with_overrides(o),
            None => self.clone(),
        };
        if node.overrides.as_ref().is_none_or(|o| o.hostname.is_none()) {
            a.spec.hostname = node.name.clone();
        }
        match a.hostname_for(Some(&node.name), mac) {
            Ok(h) => a.spec.hostname = h,
            Err(reason) => {
                let mut errs = ValidationErrors::default();
                errs.push("spec.hostname", reason);
                return Err(errs);
            }
        }
        a.validate()?;
        Ok(a)
    }
}

impl ApplianceOverrides {
    /// Problems in the overrides alone, with paths under `at` (e.g.
    /// `spec.nodes[3].overrides`): they are checked as applied to an empty spec.
    pub fn validate_into(&self, at: &str, errs: &mut ValidationErrors) {
        let mut base = Appliance::profile(ProfileName::Test);
        base.spec.users.clear();
        base.spec.os.kernel_args.clear();
        // A clusterNode is checked on its own here: the feature and the cluster's networks
        // are the appliance spec's, checked when the node's spec is rendered.
        if let Some(n) = &self.cluster_node {
            base.spec.features.push(Feature::Kubernetes);
            base.spec.cluster.cluster_cidr.clone_from(&n.cluster_cidr);
            base.spec.cluster.service_cidr.clone_from(&n.service_cidr);
            base.spec
                .cluster
                .cluster_domain
                .clone_from(&n.cluster_domain);
        }
        if self.ceph_node.is_some() {
            for f in [Feature::Kubernetes, Feature::Ceph] {
                if !base.spec.features.contains(&f) {
                    base.spec.features.push(f);
                }
            }
        }
        if let Err(found) = base.with_overrides(self).validate() {
            for e in found.0 {
                let rest = e.path.strip_prefix("spec.").unwrap_or(&e.path);
                let rest = rest.strip_prefix("os.").unwrap_or(rest);
                errs.push(format!("{at}.{rest}"), e.reason);
            }
        }
    }
}
