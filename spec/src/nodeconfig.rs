//! One node's desired host state (`kind: NodeConfig`): the input of `kiln agent`.
//!
//! A node reads several NodeConfig documents, from the lowest priority to the highest: the one
//! the installer seeded (`/var/lib/kiln/node.yaml`), a local override
//! (`/etc/kiln/node.override.yaml`) and, later, the cluster's. [`merge`] folds them into one
//! spec: a later source replaces scalars, replaces list entries with the same key (path or
//! name) and adds new ones, and merges maps key by key.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::errors::{SpecError, ValidationErrors};
use crate::inventory::is_dns_label;

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
    pub network: Option<Network>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<TimeSync>,
    /// Kernel command line arguments; they take effect at the next boot.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kernel_args: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtualization: Option<Virtualization>,
    /// Partitions (by GPT name) kept for data: Ceph OSDs or VM disks; nothing else may use them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data_disks: Vec<DataDisk>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct User {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_authorized_keys: Vec<String>,
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
pub struct Network {
    /// Physical links renamed by MAC address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<Link>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bonds: Vec<Bond>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vlans: Vec<Vlan>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bridges: Vec<Bridge>,
    /// Layer-3 settings per interface (physical, bond, VLAN or bridge).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Link {
    pub name: String,
    pub mac: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Bond {
    pub name: String,
    /// systemd-networkd bond mode: `802.3ad`, `active-backup`, `balance-rr`, …
    #[serde(default = "default_bond_mode")]
    pub mode: String,
    pub interfaces: Vec<String>,
}

fn default_bond_mode() -> String {
    "802.3ad".into()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Vlan {
    pub name: String,
    pub parent: String,
    pub id: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Bridge {
    pub name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Interface {
    pub name: String,
    #[serde(default)]
    pub dhcp: bool,
    /// `10.0.0.5/24`, `fd00::5/64`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<String>,
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
    /// GPT partition name, e.g. `KILN_DATA`.
    pub part_label: String,
    #[serde(default)]
    pub usage: DataUsage,
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
        let doc: NodeConfig = serde_saphyr::from_str(text).map_err(|e| SpecError::Parse {
            what: "node config".into(),
            message: e.to_string(),
        })?;
        doc.validate().map_err(|errors| SpecError::Invalid {
            what: "node config".into(),
            errors,
        })?;
        Ok(doc)
    }

    pub fn load(path: &Path) -> Result<NodeConfig, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|source| SpecError::Read {
            path: path.display().to_string(),
            source,
        })?;
        NodeConfig::from_yaml(&text)
    }

    /// Every problem in the document, each with its field path.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errs = ValidationErrors::default();
        if self.api_version != crate::API_VERSION {
            errs.push(
                "apiVersion",
                format!(
                    "must be {:?}, found {:?}",
                    crate::API_VERSION,
                    self.api_version
                ),
            );
        }
        if self.kind != Self::KIND {
            errs.push(
                "kind",
                format!("must be \"NodeConfig\", found {:?}", self.kind),
            );
        }
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
        let mut seen = BTreeSet::new();
        for (i, u) in self.users.iter().enumerate() {
            let p = format!("{at}.users[{i}]");
            if !is_user_name(&u.name) {
                errs.push(
                    format!("{p}.name"),
                    format!("{:?} is not a valid user name", u.name),
                );
            } else if u.name == "root" {
                errs.push(
                    format!("{p}.name"),
                    "root is not managed; pick another user",
                );
            }
            if !seen.insert(&u.name) {
                errs.push(
                    format!("{p}.name"),
                    format!("user {:?} is listed twice", u.name),
                );
            }
            if let Some(shell) = &u.shell
                && !shell.starts_with('/')
            {
                errs.push(format!("{p}.shell"), "must be an absolute path");
            }
            for (j, g) in u.groups.iter().enumerate() {
                if !is_user_name(g) {
                    errs.push(
                        format!("{p}.groups[{j}]"),
                        format!("{g:?} is not a valid group name"),
                    );
                }
            }
            for (j, k) in u.ssh_authorized_keys.iter().enumerate() {
                if !is_ssh_key(k) {
                    errs.push(
                        format!("{p}.sshAuthorizedKeys[{j}]"),
                        "not an OpenSSH public key (`ssh-ed25519 AAAA… comment`, one line)",
                    );
                }
            }
        }
        let mut paths = BTreeMap::new();
        for (i, f) in self.files.iter().enumerate() {
            let p = format!("{at}.files[{i}]");
            check_path(&f.path, &format!("{p}.path"), errs);
            check_mode(&f.mode, &format!("{p}.mode"), errs);
            check_owner(f.owner.as_deref(), &format!("{p}.owner"), errs);
            if let Some(first) = paths.insert(f.path.as_str(), p.clone()) {
                errs.push(
                    format!("{p}.path"),
                    format!("{} is already declared by {first}", f.path),
                );
            }
        }
        for (i, d) in self.directories.iter().enumerate() {
            let p = format!("{at}.directories[{i}]");
            check_path(&d.path, &format!("{p}.path"), errs);
            check_mode(&d.mode, &format!("{p}.mode"), errs);
            check_owner(d.owner.as_deref(), &format!("{p}.owner"), errs);
            if let Some(first) = paths.insert(d.path.as_str(), p.clone()) {
                errs.push(
                    format!("{p}.path"),
                    format!("{} is already declared by {first}", d.path),
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
        for (i, a) in self.kernel_args.iter().enumerate() {
            if a.is_empty() || a.contains(char::is_whitespace) {
                errs.push(
                    format!("{at}.kernelArgs[{i}]"),
                    "must be one word without spaces",
                );
            }
        }
        let mut labels = BTreeSet::new();
        for (i, d) in self.data_disks.iter().enumerate() {
            let p = format!("{at}.dataDisks[{i}].partLabel");
            if d.part_label.is_empty() || d.part_label.len() > 36 || !is_file_name(&d.part_label) {
                errs.push(
                    p.clone(),
                    "must be a GPT partition name (1 to 36 characters, no '/')",
                );
            } else if d.part_label.starts_with("KILN_") && d.part_label != "KILN_DATA" {
                errs.push(
                    p.clone(),
                    "the system partitions (KILN_A, KILN_B, KILN_STATE) cannot hold data",
                );
            }
            if !labels.insert(&d.part_label) {
                errs.push(p, "listed twice");
            }
        }
    }
}

impl Network {
    fn validate_into(&self, at: &str, errs: &mut ValidationErrors) {
        let mut names: BTreeMap<String, String> = BTreeMap::new();
        let mut declare = |name: &str, p: String, errs: &mut ValidationErrors| {
            if !is_ifname(name) {
                errs.push(
                    p.clone(),
                    format!("{name:?} is not an interface name (1-15 characters)"),
                );
            }
            if let Some(first) = names.insert(name.to_string(), p.clone()) {
                errs.push(p, format!("{name} is already declared by {first}"));
            }
        };
        for (i, l) in self.links.iter().enumerate() {
            declare(&l.name, format!("{at}.links[{i}].name"), errs);
            if crate::inventory::parse_mac(&l.mac).is_none() {
                errs.push(
                    format!("{at}.links[{i}].mac"),
                    format!("{:?} is not a MAC address", l.mac),
                );
            }
            if let Some(mtu) = l.mtu
                && !(68..=65535).contains(&mtu)
            {
                errs.push(
                    format!("{at}.links[{i}].mtu"),
                    "must be between 68 and 65535",
                );
            }
        }
        for (i, b) in self.bonds.iter().enumerate() {
            declare(&b.name, format!("{at}.bonds[{i}].name"), errs);
            const MODES: &[&str] = &[
                "balance-rr",
                "active-backup",
                "balance-xor",
                "broadcast",
                "802.3ad",
                "balance-tlb",
                "balance-alb",
            ];
            if !MODES.contains(&b.mode.as_str()) {
                errs.push(
                    format!("{at}.bonds[{i}].mode"),
                    format!("must be one of {}", MODES.join(", ")),
                );
            }
            if b.interfaces.is_empty() {
                errs.push(format!("{at}.bonds[{i}].interfaces"), "at least one member");
            }
        }
        for (i, v) in self.vlans.iter().enumerate() {
            declare(&v.name, format!("{at}.vlans[{i}].name"), errs);
            if !(1..=4094).contains(&v.id) {
                errs.push(format!("{at}.vlans[{i}].id"), "must be between 1 and 4094");
            }
            if !is_ifname(&v.parent) {
                errs.push(format!("{at}.vlans[{i}].parent"), "not an interface name");
            }
        }
        for (i, b) in self.bridges.iter().enumerate() {
            declare(&b.name, format!("{at}.bridges[{i}].name"), errs);
        }
        let mut member_of: BTreeMap<&str, String> = BTreeMap::new();
        for (i, b) in self.bonds.iter().enumerate() {
            for (j, m) in b.interfaces.iter().enumerate() {
                let p = format!("{at}.bonds[{i}].interfaces[{j}]");
                if let Some(first) = member_of.insert(m, p.clone()) {
                    errs.push(p, format!("{m} is already a member at {first}"));
                }
            }
        }
        for (i, b) in self.bridges.iter().enumerate() {
            for (j, m) in b.interfaces.iter().enumerate() {
                let p = format!("{at}.bridges[{i}].interfaces[{j}]");
                if let Some(first) = member_of.insert(m, p.clone()) {
                    errs.push(p, format!("{m} is already a member at {first}"));
                }
            }
        }
        let mut seen = BTreeSet::new();
        for (i, n) in self.interfaces.iter().enumerate() {
            let p = format!("{at}.interfaces[{i}]");
            if !is_ifname(&n.name) {
                errs.push(format!("{p}.name"), "not an interface name");
            }
            if !seen.insert(&n.name) {
                errs.push(format!("{p}.name"), format!("{} is listed twice", n.name));
            }
            if let Some(owner) = member_of.get(n.name.as_str()) {
                errs.push(
                    format!("{p}.name"),
                    format!(
                        "{} is enslaved at {owner}; address the bond or bridge",
                        n.name
                    ),
                );
            }
            for (j, a) in n.addresses.iter().enumerate() {
                if !is_cidr(a) {
                    errs.push(
                        format!("{p}.addresses[{j}]"),
                        format!("{a:?} is not an address/prefix"),
                    );
                }
            }
            if let Some(g) = &n.gateway
                && g.parse::<IpAddr>().is_err()
            {
                errs.push(
                    format!("{p}.gateway"),
                    format!("{g:?} is not an IP address"),
                );
            }
            for (j, d) in n.dns.iter().enumerate() {
                if d.parse::<IpAddr>().is_err() {
                    errs.push(
                        format!("{p}.dns[{j}]"),
                        format!("{d:?} is not an IP address"),
                    );
                }
            }
            if n.dhcp && n.addresses.is_empty() && n.gateway.is_some() {
                errs.push(format!("{p}.gateway"), "a gateway needs a static address");
            }
        }
    }
}

/// Folds sources, lowest priority first, into one spec (see the module documentation).
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
            let o = out.network.get_or_insert_with(Network::default);
            merge_keyed(&mut o.links, &n.links, |l| l.name.clone());
            merge_keyed(&mut o.bonds, &n.bonds, |l| l.name.clone());
            merge_keyed(&mut o.vlans, &n.vlans, |l| l.name.clone());
            merge_keyed(&mut o.bridges, &n.bridges, |l| l.name.clone());
            merge_keyed(&mut o.interfaces, &n.interfaces, |l| l.name.clone());
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
        merge_keyed(&mut out.data_disks, &s.data_disks, |d| d.part_label.clone());
    }
    out
}

fn merge_keyed<T: Clone>(into: &mut Vec<T>, from: &[T], key: impl Fn(&T) -> String) {
    for item in from {
        let k = key(item);
        match into.iter_mut().find(|x| key(x) == k) {
            Some(slot) => *slot = item.clone(),
            None => into.push(item.clone()),
        }
    }
}

fn check_path(path: &str, at: &str, errs: &mut ValidationErrors) {
    if !path.starts_with('/') || path == "/" {
        errs.push(at, format!("{path:?} must be an absolute path below /"));
    } else if path.split('/').any(|c| c == ".." || c == ".")
        || path.contains("//")
        || path.ends_with('/')
    {
        errs.push(
            at,
            format!("{path:?} must be a normalised path (no ., .., // or trailing /)"),
        );
    } else if ["/proc", "/sys", "/dev", "/run/kiln", "/var/lib/kiln/agent"]
        .iter()
        .any(|p| path == *p || path.starts_with(&format!("{p}/")))
    {
        errs.push(
            at,
            format!("{path} is in a tree kiln does not manage as files"),
        );
    }
}

fn check_mode(mode: &str, at: &str, errs: &mut ValidationErrors) {
    if parse_mode(mode).is_none() {
        errs.push(at, format!("{mode:?} is not an octal mode like \"0644\""));
    }
}

fn check_owner(owner: Option<&str>, at: &str, errs: &mut ValidationErrors) {
    let Some(o) = owner else { return };
    let ok = match o.split_once(':') {
        Some((u, g)) => is_user_or_id(u) && is_user_or_id(g),
        None => is_user_or_id(o),
    };
    if !ok {
        errs.push(
            at,
            format!("{o:?} is not `user:group` (names or numeric ids)"),
        );
    }
}

fn is_user_or_id(s: &str) -> bool {
    is_user_name(s) || (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
}

fn is_user_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && (s.as_bytes()[0].is_ascii_lowercase() || s.as_bytes()[0] == b'_')
}

fn is_ssh_key(k: &str) -> bool {
    let mut words = k.split_whitespace();
    let kind = words.next().unwrap_or("");
    let blob = words.next().unwrap_or("");
    !k.contains('\n')
        && (kind.starts_with("ssh-") || kind.starts_with("ecdsa-sha2-") || kind.starts_with("sk-"))
        && blob.len() >= 16
        && blob
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b))
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

fn is_ifname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

fn is_cidr(s: &str) -> bool {
    let Some((addr, prefix)) = s.split_once('/') else {
        return false;
    };
    let Ok(ip) = addr.parse::<IpAddr>() else {
        return false;
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    prefix.parse::<u8>().is_ok_and(|p| p <= max)
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
    links: [{name: lan0, mac: "52:54:00:00:00:01"}]
    bonds: [{name: bond0, interfaces: [lan0]}]
    vlans: [{name: vlan10, parent: bond0, id: 10}]
    interfaces: [{name: vlan10, addresses: [10.0.10.5/24], gateway: 10.0.10.1}]
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
            .replace("id: 10}", "id: 5000}")
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
                "spec.network.interfaces[0].addresses[0]",
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
