//! One node's desired host state (`kind: NodeConfig`): the input of `kiln agent`. Users and
//! network use the Appliance spec's types ([`crate::host`]); [`node_config_for`] renders the
//! config an installed node starts from.
//!
//! A node reads several NodeConfig documents, from the lowest priority to the highest: the one
//! the installer seeded (`/var/lib/kiln/node.yaml`), a local override
//! (`/etc/kiln/node.override.yaml`) and, later, the cluster's. [`merge`] folds them into one
//! spec: a later source replaces scalars, replaces list entries with the same key (path or
//! name) and adds new ones, and merges maps key by key.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::Appliance;
use crate::errors::{SpecError, ValidationErrors};
pub use crate::host::{NetworkSpec, User};
use crate::host::{check_kernel_args, is_unix_name, validate_users};
use crate::inventory::{InventoryNode, is_dns_label};
pub use crate::kubernetes::KubernetesNode;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeConfig {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: crate::inventory::Metadata,
    #[serde(default)]
    pub spec: NodeSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<User>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileEntry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub directories: Vec<DirectoryEntry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub units: Vec<Unit>,
    /// `net.ipv4.ip_forward: "1"`; applied now and persisted in /etc/sysctl.d.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sysctls: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kernel_modules: Vec<KernelModule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<TimeSync>,
    /// Kernel command line arguments; they take effect at the next boot.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kernel_args: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtualization: Option<Virtualization>,
    /// Partitions (by GPT name) or whole disks kept for data: Ceph OSDs or VM disks; nothing
    /// else may use them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data_disks: Vec<DataDisk>,
    /// The node's part in the Kubernetes cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesNode>,
    /// The node's part in the Ceph cluster: its data disks of usage `ceph-osd` become OSDs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ceph: Option<crate::ceph::CephNode>,
    /// The agent's network API for administrators on other hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_api: Option<crate::remote::RemoteApi>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileEntry {
    /// Absolute path on the node.
    pub path: String,
    pub content: String,
    /// Octal permission bits as a string, `"0644"` (YAML would read a bare 0644 as a number).
    #[serde(default = "default_file_mode")]
    pub mode: String,
    /// `user:group` (names or numeric ids); `root:root` when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DirectoryEntry {
    pub path: String,
    #[serde(default = "default_dir_mode")]
    pub mode: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

fn default_file_mode() -> String {
    "0644".into()
}

fn default_dir_mode() -> String {
    "0755".into()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Unit {
    /// `name.service`, `name.timer`, … A unit without `content` is one the OS ships.
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drop_ins: Vec<DropIn>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Keep it running; it is restarted when its file or drop-ins change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DropIn {
    /// File name in `<unit>.d/`, ending in `.conf`.
    pub name: String,
    pub content: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KernelModule {
    pub name: String,
    /// `nested=1`, …
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TimeSync {
    /// NTP servers for systemd-timesyncd.
    pub servers: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Virtualization {
    /// Load KVM and report whether /dev/kvm is usable.
    #[serde(default)]
    pub kvm: bool,
    /// Nested virtualization for kvm_intel / kvm_amd.
    #[serde(default)]
    pub nested: bool,
    /// Number of 2 MiB huge pages reserved now (vm.nr_hugepages).
    #[serde(default)]
    pub hugepages_2m: u32,
    /// Number of 1 GiB huge pages; reserved at boot through the kernel command line.
    #[serde(default, rename = "hugepages1G")]
    pub hugepages_1g: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DataDisk {
    /// GPT partition name, e.g. `KILN_DATA`; or
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part_label: Option<String>,
    /// a whole disk by a stable path (`/dev/disk/by-id/…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(default)]
    pub usage: DataUsage,
}

impl DataDisk {
    /// The block device's path on the node.
    pub fn path(&self) -> String {
        match (&self.part_label, &self.device) {
            (Some(l), _) => format!("/dev/disk/by-partlabel/{l}"),
            (None, Some(d)) => d.clone(),
            (None, None) => String::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum DataUsage {
    #[default]
    CephOsd,
    VmDisks,
}

/// Parses an octal mode string such as `"0644"` or `"755"`.
pub fn parse_mode(text: &str) -> Option<u32> {
    if text.is_empty() || text.len() > 5 {
        return None;
    }
    u32::from_str_radix(text, 8).ok().filter(|m| *m <= 0o7777)
}

impl NodeConfig {
    pub const KIND: &'static str = "NodeConfig";

    /// Parses and validates one NodeConfig document.
    pub fn from_yaml(text: &str) -> Result<NodeConfig, SpecError> {
        let value = crate::check::yaml_value("node config", text)?;
        // Shape errors (unknown fields, wrong types) and value errors together, all at once.
        crate::check::parse_document("node config", value, NodeConfig::validate)
    }

    /// The config as YAML, as the installer seeds it.
    pub fn to_yaml(&self) -> String {
        serde_saphyr::to_string(self).expect("a node config always serializes")
    }

    pub fn load(path: &Path) -> Result<NodeConfig, SpecError> {
        NodeConfig::from_yaml(&crate::check::read(path)?)
    }

    /// Every problem in the document, each with its field path.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errs = ValidationErrors::default();
        crate::check::check_header(&self.api_version, &self.kind, Self::KIND, &mut errs);
        self.spec.validate_into("spec", &mut errs);
        errs.into_result()
    }
}

impl NodeSpec {
    /// Validates a (possibly merged) spec; paths start with `at`.
    pub fn validate_into(&self, at: &str, errs: &mut ValidationErrors) {
        if let Some(h) = &self.hostname
            && !is_dns_label(h)
        {
            errs.push(
                format!("{at}.hostname"),
                format!("{h:?} is not a valid host name (lower-case letters, digits and '-', at most 63)"),
            );
        }
        validate_users(&format!("{at}.users"), &self.users, errs);
        for (i, u) in self.users.iter().enumerate() {
            if u.name == "root" {
                errs.push(
                    format!("{at}.users[{i}].name"),
                    "root is not managed; pick another user",
                );
            }
            if u.password_hash.is_some() {
                // node.yaml is readable by every local user; the image sets passwords.
                errs.push(
                    format!("{at}.users[{i}].passwordHash"),
                    "not accepted in a node config; set it in the Appliance spec",
                );
            }
        }
        // A config may list thousands of files: field paths are formatted for problems only.
        let mut declared: BTreeMap<&str, (&str, usize)> = BTreeMap::new();
        let entries = self
            .files
            .iter()
            .enumerate()
            .map(|(i, f)| ("files", i, &f.path, &f.mode, &f.owner))
            .chain(
                self.directories
                    .iter()
                    .enumerate()
                    .map(|(i, d)| ("directories", i, &d.path, &d.mode, &d.owner)),
            );
        for (list, i, path, mode, owner) in entries {
            let field = |name: &str| format!("{at}.{list}[{i}].{name}");
            if let Some(why) = path_problem(path) {
                errs.push(field("path"), why);
            }
            if parse_mode(mode).is_none() {
                errs.push(
                    field("mode"),
                    format!("{mode:?} is not an octal mode like \"0644\""),
                );
            }
            if let Some(why) = owner.as_deref().and_then(owner_problem) {
                errs.push(field("owner"), why);
            }
            if let Some((first, j)) = declared.insert(path, (list, i)) {
                errs.push(
                    field("path"),
                    format!("{path} is already declared by {at}.{first}[{j}]"),
                );
            }
        }
        let mut units = BTreeSet::new();
        for (i, u) in self.units.iter().enumerate() {
            let p = format!("{at}.units[{i}]");
            if !is_unit_name(&u.name) {
                errs.push(
                    format!("{p}.name"),
                    format!("{:?} is not a unit name like foo.service", u.name),
                );
            }
            if !units.insert(&u.name) {
                errs.push(
                    format!("{p}.name"),
                    format!("unit {:?} is listed twice", u.name),
                );
            }
            let mut names = BTreeSet::new();
            for (j, d) in u.drop_ins.iter().enumerate() {
                if !d.name.ends_with(".conf") || !is_file_name(&d.name) {
                    errs.push(
                        format!("{p}.dropIns[{j}].name"),
                        "must be a plain file name ending in .conf",
                    );
                }
                if !names.insert(&d.name) {
                    errs.push(format!("{p}.dropIns[{j}].name"), "listed twice");
                }
            }
        }
        for (key, value) in &self.sysctls {
            let p = format!("{at}.sysctls.{key}");
            if !is_sysctl_key(key) {
                errs.push(p.clone(), "not a sysctl key like net.ipv4.ip_forward");
            }
            if value.contains('\n') || value.trim().is_empty() {
                errs.push(p, "value must be one non-empty line");
            }
        }
        let mut mods = BTreeSet::new();
        for (i, m) in self.kernel_modules.iter().enumerate() {
            let p = format!("{at}.kernelModules[{i}]");
            if !is_module_name(&m.name) {
                errs.push(
                    format!("{p}.name"),
                    format!("{:?} is not a kernel module name", m.name),
                );
            }
            if !mods.insert(&m.name) {
                errs.push(format!("{p}.name"), "listed twice");
            }
            for (j, o) in m.options.iter().enumerate() {
                if o.is_empty() || o.contains(char::is_whitespace) {
                    errs.push(format!("{p}.options[{j}]"), "must be one `key=value` word");
                }
            }
        }
        if let Some(n) = &self.network {
            n.validate_into(&format!("{at}.network"), errs);
        }
        if let Some(t) = &self.time {
            if t.servers.is_empty() {
                errs.push(format!("{at}.time.servers"), "at least one server");
            }
            for (i, s) in t.servers.iter().enumerate() {
                if s.is_empty() || s.contains(char::is_whitespace) {
                    errs.push(
                        format!("{at}.time.servers[{i}]"),
                        "must be a host name or address",
                    );
                }
            }
        }
        check_kernel_args(&format!("{at}.kernelArgs"), &self.kernel_args, errs);
        if let Some(k) = &self.kubernetes {
            let own = self
                .network
                .as_ref()
                .map(|n| n.static_networks(&format!("{at}.network")))
                .unwrap_or_default();
            k.validate_into(&format!("{at}.kubernetes"), &own, errs);
        }
        if let Some(r) = &self.remote_api {
            r.validate_into(&format!("{at}.remoteApi"), errs);
        }
        let mut paths = BTreeSet::new();
        for (i, d) in self.data_disks.iter().enumerate() {
            let at_disk = format!("{at}.dataDisks[{i}]");
            match (&d.part_label, &d.device) {
                (Some(l), None) => {
                    let p = format!("{at_disk}.partLabel");
                    if l.is_empty() || l.len() > 36 || !is_file_name(l) {
                        errs.push(
                            p,
                            "must be a GPT partition name (1 to 36 characters, no '/')",
                        );
                    } else if l.starts_with("KILN_") && l != "KILN_DATA" {
                        errs.push(
                            p,
                            "the system partitions (KILN_A, KILN_B, KILN_STATE) cannot hold data",
                        );
                    }
                }
                (None, Some(dev)) => {
                    if !dev.starts_with("/dev/")
                        || dev.contains("..")
                        || dev.contains(char::is_whitespace)
                    {
                        errs.push(format!("{at_disk}.device"), "must be a path below /dev/");
                    }
                }
                _ => errs.push(at_disk.clone(), "give exactly one of partLabel and device"),
            }
            if !paths.insert(d.path()) {
                errs.push(at_disk, "listed twice");
            }
        }
        if let Some(c) = &self.ceph {
            let osds = self
                .data_disks
                .iter()
                .filter(|d| d.usage == DataUsage::CephOsd)
                .count();
            c.validate_into(&format!("{at}.ceph"), osds, errs);
        }
    }
}

/// The NodeConfig an installed node starts from: the appliance spec with the inventory
/// node's `overrides` applied, carrying what both documents describe (host name, users,
/// network, kernel arguments, the node's part in the cluster, its network API). Root and password hashes stay
/// out: the agent does not manage root, node.yaml is world-readable unless it holds cluster
/// credentials, and the image already sets both. So do the boot-specific kernel arguments
/// (`kiln.slot=…`).
pub fn node_config_for(
    appliance: &Appliance,
    node: Option<&InventoryNode>,
    hostname: &str,
) -> NodeConfig {
    let a = match node.and_then(|n| n.overrides.as_ref()) {
        Some(o) => appliance.with_overrides(o),
        None => appliance.clone(),
    };
    NodeConfig {
        api_version: crate::API_VERSION.to_string(),
        kind: NodeConfig::KIND.to_string(),
        metadata: crate::inventory::Metadata {
            name: node.map_or(hostname, |n| n.name.as_str()).to_string(),
        },
        spec: NodeSpec {
            hostname: Some(hostname.to_string()),
            users: a
                .spec
                .users
                .iter()
                .filter(|u| u.name != "root")
                .map(|u| User {
                    password_hash: None,
                    ..u.clone()
                })
                .collect(),
            network: Some(a.spec.network.clone()),
            kernel_args: a.kernel_args(),
            kubernetes: a.spec.cluster.node.clone(),
            ceph: a.spec.cluster.ceph_node.clone(),
            remote_api: a.spec.remote_api.clone(),
            ..NodeSpec::default()
        },
    }
}

/// Folds sources, lowest priority first, into one spec (see the module documentation).
/// Network entries merge by name and nameservers and search domains add up; `network.dhcp`
/// comes from the last source with a `network` (where it defaults to true).
pub fn merge<'a>(sources: impl IntoIterator<Item = &'a NodeSpec>) -> NodeSpec {
    let mut out = NodeSpec::default();
    for s in sources {
        if s.hostname.is_some() {
            out.hostname.clone_from(&s.hostname);
        }
        merge_keyed(&mut out.users, &s.users, |u| u.name.clone());
        merge_keyed(&mut out.files, &s.files, |f| f.path.clone());
        merge_keyed(&mut out.directories, &s.directories, |d| d.path.clone());
        merge_keyed(&mut out.units, &s.units, |u| u.name.clone());
        out.sysctls
            .extend(s.sysctls.iter().map(|(k, v)| (k.clone(), v.clone())));
        merge_keyed(&mut out.kernel_modules, &s.kernel_modules, |m| {
            m.name.clone()
        });
        if let Some(n) = &s.network {
            let o = out.network.get_or_insert_with(NetworkSpec::default);
            o.dhcp = n.dhcp;
            merge_keyed(&mut o.interfaces, &n.interfaces, |l| l.name.clone());
            merge_keyed(&mut o.bonds, &n.bonds, |l| l.name.clone());
            merge_keyed(&mut o.vlans, &n.vlans, |l| l.name.clone());
            merge_keyed(&mut o.bridges, &n.bridges, |l| l.name.clone());
            for ns in &n.nameservers {
                if !o.nameservers.contains(ns) {
                    o.nameservers.push(ns.clone());
                }
            }
            for d in &n.search_domains {
                if !o.search_domains.contains(d) {
                    o.search_domains.push(d.clone());
                }
            }
        }
        if s.time.is_some() {
            out.time.clone_from(&s.time);
        }
        for a in &s.kernel_args {
            if !out.kernel_args.contains(a) {
                out.kernel_args.push(a.clone());
            }
        }
        if s.virtualization.is_some() {
            out.virtualization.clone_from(&s.virtualization);
        }
        merge_keyed(&mut out.data_disks, &s.data_disks, DataDisk::path);
        if s.kubernetes.is_some() {
            out.kubernetes.clone_from(&s.kubernetes);
        }
        if s.ceph.is_some() {
            out.ceph.clone_from(&s.ceph);
        }
        if s.remote_api.is_some() {
            out.remote_api.clone_from(&s.remote_api);
        }
    }
    out
}

fn merge_keyed<T: Clone>(into: &mut Vec<T>, from: &[T], key: impl Fn(&T) -> String) {
    // Positions by key: a search of `into` per item is quadratic in a config of many files.
    let mut at: HashMap<String, usize> = HashMap::new();
    for (i, x) in into.iter().enumerate() {
        at.entry(key(x)).or_insert(i);
    }
    for item in from {
        match at.entry(key(item)) {
            Entry::Occupied(e) => into[*e.get()] = item.clone(),
            Entry::Vacant(e) => {
                e.insert(into.len());
                into.push(item.clone());
            }
        }
    }
}

/// Why `path` cannot be a managed file or directory, if it cannot.
fn path_problem(path: &str) -> Option<String> {
    if !path.starts_with('/') || path == "/" {
        Some(format!("{path:?} must be an absolute path below /"))
    } else if path.split('/').any(|c| c == ".." || c == ".")
        || path.contains("//")
        || path.ends_with('/')
    {
        Some(format!(
            "{path:?} must be a normalised path (no ., .., // or trailing /)"
        ))
    } else if ["/proc", "/sys", "/dev", "/run/kiln", "/var/lib/kiln/agent"]
        .iter()
        .any(|p| {
            path.strip_prefix(p)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        })
    {
        Some(format!("{path} is in a tree kiln does not manage as files"))
    } else {
        None
    }
}

/// Why `owner` is not `user[:group]`, if it is not.
fn owner_problem(owner: &str) -> Option<String> {
    let ok = match owner.split_once(':') {
        Some((u, g)) => is_user_or_id(u) && is_user_or_id(g),
        None => is_user_or_id(owner),
    };
    (!ok).then(|| format!("{owner:?} is not `user:group` (names or numeric ids)"))
}

fn is_user_or_id(s: &str) -> bool {
    is_unix_name(s) || (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
}

fn is_unit_name(s: &str) -> bool {
    const SUFFIXES: &[&str] = &[
        ".service",
        ".socket",
        ".timer",
        ".target",
        ".mount",
        ".path",
        ".slice",
        ".automount",
    ];
    SUFFIXES.iter().any(|x| s.len() > x.len() && s.ends_with(x))
        && s.len() <= 255
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b":-_.\\@".contains(&b))
}

fn is_file_name(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && !s.contains('/') && !s.contains('\0')
}

fn is_sysctl_key(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('.')
        && !s.ends_with('.')
        && !s.contains("..")
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn is_module_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 55
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: kiln.dev/v1alpha1
kind: NodeConfig
metadata: {name: node-01}
spec:
  hostname: node-01
  users:
    - name: ops
      groups: [sudo]
      sshAuthorizedKeys: ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl ops@lab"]
  files:
    - {path: /etc/motd, content: "hello\n", mode: "0644"}
  directories:
    - {path: /srv/data, mode: "0750", owner: "ops:ops"}
  units:
    - name: hello.service
      content: "[Service]\nExecStart=/bin/true\n"
      enabled: true
      dropIns: [{name: 10-env.conf, content: "[Service]\nEnvironment=A=1\n"}]
  sysctls: {net.ipv4.ip_forward: "1"}
  kernelModules: [{name: br_netfilter}]
  network:
    dhcp: false
    interfaces: [{name: lan0, mac: "52:54:00:00:00:01"}]
    bonds: [{name: bond0, interfaces: [lan0]}]
    vlans: [{name: vlan10, link: bond0, id: 10, addresses: [10.0.10.5/24], gateway: 10.0.10.1}]
  time: {servers: [ntp.example.org]}
  kernelArgs: [intel_iommu=on]
  virtualization: {kvm: true, nested: true, hugepages2m: 64}
  dataDisks: [{partLabel: KILN_DATA}]
"#;

    #[test]
    fn parses_a_full_document() {
        let c = NodeConfig::from_yaml(GOOD).unwrap();
        assert_eq!(c.spec.hostname.as_deref(), Some("node-01"));
        assert_eq!(c.spec.units[0].drop_ins.len(), 1);
        assert_eq!(c.spec.virtualization.as_ref().unwrap().hugepages_2m, 64);
    }

    #[test]
    fn reports_every_error_with_its_path() {
        let bad = GOOD
            .replace("hostname: node-01", "hostname: Node_01")
            .replace("mode: \"0644\"", "mode: \"0999\"")
            .replace("hello.service", "hello")
            .replace("id: 10,", "id: 5000,")
            .replace("10.0.10.5/24", "10.0.10.5/40")
            .replace("ssh-ed25519 AAAA", "rsa AAAA");
        let Err(SpecError::Invalid { errors, .. }) = NodeConfig::from_yaml(&bad) else {
            panic!("expected validation errors")
        };
        let paths: Vec<&str> = errors.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "spec.hostname",
                "spec.users[0].sshAuthorizedKeys[0]",
                "spec.files[0].mode",
                "spec.units[0].name",
                "spec.network.vlans[0].id",
                "spec.network.vlans[0].addresses[0]",
            ]
        );
    }

    #[test]
    fn every_file_and_directory_problem_names_its_entry() {
        let bad = GOOD.replace(
            "    - {path: /etc/motd, content: \"hello\\n\", mode: \"0644\"}\n",
            "    - {path: etc/motd, content: \"\"}
    - {path: /proc/sys/x, content: \"\", owner: \"a:b:c\"}
    - {path: /process/ok, content: \"\"}
    - {path: /srv/a/../b, content: \"\", mode: \"rw\"}
    - {path: /srv/data, content: \"\"}
",
        );
        let Err(SpecError::Invalid { errors, .. }) = NodeConfig::from_yaml(&bad) else {
            panic!("expected validation errors")
        };
        let got: Vec<(&str, &str)> = errors
            .0
            .iter()
            .map(|e| (e.path.as_str(), e.reason.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "spec.files[0].path",
                    "\"etc/motd\" must be an absolute path below /"
                ),
                (
                    "spec.files[1].path",
                    "/proc/sys/x is in a tree kiln does not manage as files"
                ),
                (
                    "spec.files[1].owner",
                    "\"a:b:c\" is not `user:group` (names or numeric ids)"
                ),
                (
                    "spec.files[3].path",
                    "\"/srv/a/../b\" must be a normalised path (no ., .., // or trailing /)"
                ),
                (
                    "spec.files[3].mode",
                    "\"rw\" is not an octal mode like \"0644\""
                ),
                (
                    "spec.directories[0].path",
                    "/srv/data is already declared by spec.files[4]"
                ),
            ]
        );
    }

    const CEPH: &str = "  ceph:
    monitorAddress: 10.0.10.5
    publicNetwork: 10.0.10.0/24
    pools: [{name: rbd, size: 1, pgNum: 8}]
";

    #[test]
    fn a_ceph_node_and_its_warnings() {
        let c = NodeConfig::from_yaml(&format!("{GOOD}{CEPH}")).unwrap();
        let ceph = c.spec.ceph.unwrap();
        assert_eq!(ceph.pools[0].application, "rbd");
        assert_eq!(ceph.warnings().len(), 1, "a pool of one copy is said so");
        let default = NodeConfig::from_yaml(&format!(
            "{GOOD}  ceph: {{monitorAddress: 10.0.10.5, publicNetwork: 10.0.10.0/24}}\n"
        ));
        // The default pool keeps 3 copies: one data disk cannot hold them.
        let Err(SpecError::Invalid { errors, .. }) = default else {
            panic!("expected validation errors")
        };
        assert_eq!(errors.0[0].path, "spec.ceph.pools[0].size");
    }

    #[test]
    fn ceph_and_data_disk_errors_are_all_reported() {
        let bad = format!("{GOOD}{CEPH}")
            .replace(
                "dataDisks: [{partLabel: KILN_DATA}]",
                "dataDisks: [{partLabel: KILN_DATA, device: /dev/sdb}, {device: sdc}, {}]",
            )
            .replace(
                "monitorAddress: 10.0.10.5",
                "monitorAddress: 10.9.9.9\n    fsid: nope",
            )
            .replace(
                "{name: rbd, size: 1, pgNum: 8}",
                "{name: .rbd, size: 0, pgNum: 12, application: nfs}",
            );
        let Err(SpecError::Invalid { errors, .. }) = NodeConfig::from_yaml(&bad) else {
            panic!("expected validation errors")
        };
        let found: Vec<(&str, &str)> = errors
            .0
            .iter()
            .map(|e| (e.path.as_str(), e.reason.as_str()))
            .collect();
        assert_eq!(
            found,
            [
                (
                    "spec.dataDisks[0]",
                    "give exactly one of partLabel and device"
                ),
                ("spec.dataDisks[1].device", "must be a path below /dev/"),
                (
                    "spec.dataDisks[2]",
                    "give exactly one of partLabel and device"
                ),
                ("spec.ceph.fsid", "\"nope\" is not a UUID"),
                (
                    "spec.ceph.monitorAddress",
                    "10.9.9.9 is outside publicNetwork 10.0.10.0/24"
                ),
                (
                    "spec.ceph.pools[0].name",
                    "must be 1 to 64 letters, digits, '-', '_' or '.', not starting with '.'"
                ),
                ("spec.ceph.pools[0].size", "must be 1 to 10"),
                (
                    "spec.ceph.pools[0].pgNum",
                    "must be a power of two up to 32768"
                ),
                (
                    "spec.ceph.pools[0].application",
                    "\"nfs\" is not one of rbd, cephfs, rgw"
                ),
            ]
        );
    }

    #[test]
    fn a_joining_ceph_node_is_told_each_thing_it_lacks() {
        let joining = |role: &str, extra: &str| {
            let text = format!(
                "{GOOD}  ceph:\n    role: {role}\n    publicNetwork: 10.0.10.0/24\n{extra}"
            );
            match NodeConfig::from_yaml(&text) {
                Err(SpecError::Invalid { errors, .. }) => errors
                    .0
                    .iter()
                    .map(|e| format!("{}: {}", e.path, e.reason))
                    .collect::<Vec<_>>(),
                other => panic!("expected validation errors: {other:?}"),
            }
        };
        assert_eq!(
            joining("monitor", ""),
            [
                "spec.ceph.monitorAddress: a monitor needs the address it listens on",
                "spec.ceph.monitors: a joining node needs the cluster's monitors",
                "spec.ceph.keys: a joining node needs the cluster's keys (the fleet makes them)",
            ]
        );
        let key = "AQBPTQFnAAAAABAAAAECAwQFBgcICQoLDA0ODw==";
        assert_eq!(
            joining(
                "osd",
                &format!(
                    "    monitorAddress: 10.0.10.6\n    monitors: [10.0.10.5, 10.1.1.1]\n    keys: {{monitor: {key}, admin: nope, bootstrapOsd: {key}}}\n    pools: [{{name: rbd, size: 1}}]\n"
                )
            ),
            [
                "spec.ceph.monitorAddress: an osd node runs no monitor; name the cluster's monitors in monitors",
                "spec.ceph.monitors[1]: 10.1.1.1 is outside publicNetwork 10.0.10.0/24",
                "spec.ceph.fsid: a cluster of several nodes needs its fsid given with its keys",
                "spec.ceph.keys.monitor: an osd node is not given the monitors' key",
                "spec.ceph.keys.admin: is not a cephx key (base64 of 28 bytes, as ceph-authtool makes)",
                "spec.ceph.pools[0].size: one copy is allowed only in a cluster of one node: in a cluster of several, a node in maintenance would take the pool down",
            ]
        );
    }

    const WORKER: &str = "  kubernetes:
    role: worker
    nodeIp: 10.0.10.6
    apiServer: https://10.0.10.5:6443
    join: {token: abcdef.0123456789abcdef, caCertHash: \"sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"}
    podCidr: 10.42.3.0/24
    labels: {kiln.dev/rack: r1}
    taints: [\"dedicated=storage:NoSchedule\"]
";

    #[test]
    fn a_worker_with_its_credentials_is_valid() {
        let c = NodeConfig::from_yaml(&format!("{GOOD}{WORKER}")).unwrap();
        let k = c.spec.kubernetes.unwrap();
        assert_eq!(k.role, crate::kubernetes::KubeRole::Worker);
        assert_eq!(k.service_cidr, "10.43.0.0/16");
        assert_eq!(k.max_pods, 110);
    }

    #[test]
    fn kubernetes_errors_are_all_reported_before_anything_starts() {
        // No join credentials, networks that overlap each other and the node's own network,
        // a pod slice outside the pod network, a taint without an effect.
        let bad = format!("{GOOD}{WORKER}")
            .replace("    apiServer: https://10.0.10.5:6443\n", "")
            .replace("    join: {token: abcdef.0123456789abcdef, caCertHash: \"sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"}\n", "")
            .replace("    podCidr: 10.42.3.0/24\n", "    podCidr: 10.99.0.0/24\n    clusterCidr: 10.0.0.0/16\n    serviceCidr: 10.0.128.0/20\n")
            .replace("dedicated=storage:NoSchedule", "dedicated=storage");
        let Err(SpecError::Invalid { errors, .. }) = NodeConfig::from_yaml(&bad) else {
            panic!("expected validation errors")
        };
        let found: Vec<(&str, &str)> = errors
            .0
            .iter()
            .map(|e| (e.path.as_str(), e.reason.as_str()))
            .collect();
        assert_eq!(
            found,
            [
                (
                    "spec.kubernetes.serviceCidr",
                    "10.0.128.0/20 overlaps the pod network clusterCidr 10.0.0.0/16"
                ),
                (
                    "spec.kubernetes.podCidr",
                    "10.99.0.0/24 is not inside clusterCidr 10.0.0.0/16"
                ),
                (
                    "spec.kubernetes.nodeIp",
                    "10.0.10.6/32 overlaps the cluster's clusterCidr 10.0.0.0/16"
                ),
                (
                    "spec.network.vlans[0].addresses[0]",
                    "10.0.10.0/24 overlaps the cluster's clusterCidr 10.0.0.0/16"
                ),
                (
                    "spec.kubernetes.apiServer",
                    "a joining node needs the API server of the first control plane"
                ),
                (
                    "spec.kubernetes.join",
                    "a joining node needs join credentials (token and caCertHash) from the first control plane"
                ),
                (
                    "spec.kubernetes.taints[0]",
                    "\"dedicated=storage\" is not key[=value]:NoSchedule|PreferNoSchedule|NoExecute"
                ),
            ]
        );
    }

    #[test]
    fn refuses_paths_outside_the_managed_tree() {
        let bad = GOOD.replace("/etc/motd", "/etc/../proc/x");
        let Err(SpecError::Invalid { errors, .. }) = NodeConfig::from_yaml(&bad) else {
            panic!("expected validation errors")
        };
        assert_eq!(errors.0[0].path, "spec.files[0].path");
    }

    #[test]
    fn root_and_password_hashes_stay_out_of_a_node_config() {
        let bad = GOOD.replace(
            "    - name: ops\n",
            "    - name: root\n    - name: ops\n      passwordHash: \"$6$salt$hash\"\n",
        );
        let Err(SpecError::Invalid { errors, .. }) = NodeConfig::from_yaml(&bad) else {
            panic!("expected validation errors")
        };
        let paths: Vec<&str> = errors.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["spec.users[0].name", "spec.users[1].passwordHash"]);
    }

    #[test]
    fn network_entries_merge_by_name_and_nameservers_add_up() {
        let base = NodeConfig::from_yaml(GOOD).unwrap().spec;
        let over = NodeConfig::from_yaml(
            "apiVersion: kiln.dev/v1alpha1\nkind: NodeConfig\nspec:\n  network:\n    dhcp: false\n    \
             vlans: [{name: vlan10, link: bond0, id: 10, dhcp: true}, {name: vlan20, link: bond0, id: 20}]\n    \
             nameservers: [10.0.0.53]\n",
        )
        .unwrap()
        .spec;
        let n = merge([&base, &over]).network.unwrap();
        let vlans: Vec<(&str, bool)> = n.vlans.iter().map(|v| (v.name.as_str(), v.dhcp)).collect();
        assert_eq!(vlans, [("vlan10", true), ("vlan20", false)]);
        assert_eq!(n.bonds.len(), 1, "kept from the base");
        assert_eq!(n.nameservers, ["10.0.0.53"]);
    }

    #[test]
    fn later_sources_win_by_key() {
        let base = NodeConfig::from_yaml(GOOD).unwrap().spec;
        let over = NodeSpec {
            hostname: Some("node-01b".into()),
            files: vec![
                FileEntry {
                    path: "/etc/motd".into(),
                    content: "override\n".into(),
                    mode: "0600".into(),
                    owner: None,
                },
                FileEntry {
                    path: "/etc/extra".into(),
                    content: "x".into(),
                    mode: "0644".into(),
                    owner: None,
                },
            ],
            sysctls: [("vm.swappiness".to_string(), "10".to_string())].into(),
            ..NodeSpec::default()
        };
        let m = merge([&base, &over]);
        assert_eq!(m.hostname.as_deref(), Some("node-01b"));
        assert_eq!(m.files.len(), 2);
        assert_eq!(m.files[0].content, "override\n");
        assert_eq!(m.sysctls.len(), 2);
        assert_eq!(m.units, base.units);
    }
}
