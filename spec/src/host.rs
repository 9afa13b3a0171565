//! Host settings that both the Appliance spec and a NodeConfig describe: users and
//! networking. One set of types, one validation and one systemd-networkd renderer, so the
//! image's overlay and the agent produce the same files from the same settings.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::errors::ValidationErrors;
use crate::inventory::{is_dns_label, parse_mac};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct User {
    pub name: String,
    /// Fixed user id; the next free one when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// Login shell, an absolute path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_authorized_keys: Vec<String>,
    /// crypt(3) hash (`$y$…`, `$6$…`); without one the account has no password login.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_hash: Option<String>,
}

/// Checks a user list; paths start with `at` (`spec.users`).
pub(crate) fn validate_users(at: &str, users: &[User], errs: &mut ValidationErrors) {
    let mut seen = BTreeSet::new();
    for (i, u) in users.iter().enumerate() {
        let p = format!("{at}[{i}]");
        if !is_unix_name(&u.name) {
            errs.push(
                format!("{p}.name"),
                format!("{:?} is not a valid user name", u.name),
            );
        } else if !seen.insert(u.name.as_str()) {
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
            if !is_unix_name(g) {
                errs.push(
                    format!("{p}.groups[{j}]"),
                    format!("{g:?} is not a valid group name"),
                );
            }
        }
        for (j, k) in u.ssh_authorized_keys.iter().enumerate() {
            if let Err(reason) = check_ssh_key(k) {
                errs.push(format!("{p}.sshAuthorizedKeys[{j}]"), reason);
            }
        }
        if let Some(h) = &u.password_hash
            && !(h.starts_with('$')
                && h.matches('$').count() >= 3
                && !h.contains(char::is_whitespace))
        {
            errs.push(
                format!("{p}.passwordHash"),
                "must be a crypt(3) hash such as $y$… or $6$… (never a clear-text password)",
            );
        }
    }
}

/// Host networking. Without explicit configuration every Ethernet interface uses DHCP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkSpec {
    /// DHCP on every Ethernet interface that no entry below configures.
    #[serde(default = "yes")]
    pub dhcp: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<InterfaceConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bonds: Vec<BondConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vlans: Vec<VlanConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bridges: Vec<BridgeConfig>,
    /// DNS servers, set on every interface kiln configures.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search_domains: Vec<String>,
}

fn yes() -> bool {
    true
}

impl NetworkSpec {
    /// Every static address's network, with its field path under `at`.
    pub fn static_networks(&self, at: &str) -> Vec<(String, ipnet::IpNet)> {
        let kinds = [
            (
                "interfaces",
                self.interfaces
                    .iter()
                    .map(|c| &c.addresses)
                    .collect::<Vec<_>>(),
            ),
            ("bonds", self.bonds.iter().map(|c| &c.addresses).collect()),
            ("vlans", self.vlans.iter().map(|c| &c.addresses).collect()),
            (
                "bridges",
                self.bridges.iter().map(|c| &c.addresses).collect(),
            ),
        ];
        let mut out = Vec::new();
        for (kind, lists) in kinds {
            for (i, addresses) in lists.into_iter().enumerate() {
                for (j, a) in addresses.iter().enumerate() {
                    if let Ok(net) = a.parse::<ipnet::IpNet>() {
                        out.push((format!("{at}.{kind}[{i}].addresses[{j}]"), net.trunc()));
                    }
                }
            }
        }
        out
    }
}

impl Default for NetworkSpec {
    fn default() -> Self {
        NetworkSpec {
            dhcp: true,
            interfaces: Vec::new(),
            bonds: Vec::new(),
            vlans: Vec::new(),
            bridges: Vec::new(),
            nameservers: Vec::new(),
            search_domains: Vec::new(),
        }
    }
}

/// A physical interface, by name or by MAC address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InterfaceConfig {
    /// Interface name (`eno1`) or a glob (`en*`).
    pub name: String,
    /// Match the interface by MAC address instead of name; a plain (not glob) `name` then
    /// becomes the interface's name, so bonds, bridges and VLANs can refer to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default)]
    pub dhcp: bool,
    /// Static addresses in CIDR notation, `10.0.0.5/24`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum BondMode {
    #[default]
    ActiveBackup,
    #[serde(rename = "802.3ad")]
    Lacp,
    BalanceRr,
    BalanceXor,
    BalanceTlb,
    BalanceAlb,
    Broadcast,
}

impl BondMode {
    /// The name systemd-networkd and the kernel use.
    pub fn as_str(self) -> &'static str {
        match self {
            BondMode::ActiveBackup => "active-backup",
            BondMode::Lacp => "802.3ad",
            BondMode::BalanceRr => "balance-rr",
            BondMode::BalanceXor => "balance-xor",
            BondMode::BalanceTlb => "balance-tlb",
            BondMode::BalanceAlb => "balance-alb",
            BondMode::Broadcast => "broadcast",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BondConfig {
    pub name: String,
    #[serde(default)]
    pub mode: BondMode,
    /// Member interfaces.
    pub interfaces: Vec<String>,
    #[serde(default)]
    pub dhcp: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VlanConfig {
    pub name: String,
    /// 802.1Q VLAN id, 1–4094.
    pub id: u16,
    /// The interface, bond or bridge the VLAN rides on.
    pub link: String,
    #[serde(default)]
    pub dhcp: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BridgeConfig {
    pub name: String,
    /// Ports of the bridge: interfaces, bonds or VLANs.
    #[serde(default)]
    pub interfaces: Vec<String>,
    #[serde(default)]
    pub stp: bool,
    #[serde(default)]
    pub dhcp: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

impl NetworkSpec {
    /// Every problem, with paths under `at` (`spec.network`).
    pub fn validate_into(&self, at: &str, errs: &mut ValidationErrors) {
        let mut names: BTreeSet<String> = BTreeSet::new();
        let mut check_name = |name: &str, p: &str, errs: &mut ValidationErrors, glob_ok: bool| {
            let ok = !name.is_empty()
                && name.len() <= 15
                && name.chars().all(|c| {
                    c.is_ascii_alphanumeric() || "-_.".contains(c) || (glob_ok && "*?".contains(c))
                });
            if !ok {
                errs.push(
                    format!("{p}.name"),
                    format!(
                        "{name:?} is not an interface name (at most 15 letters, digits, '-', '_', '.')"
                    ),
                );
            } else if !names.insert(name.to_string()) {
                errs.push(format!("{p}.name"), format!("{name:?} is configured twice"));
            }
        };
        for (i, c) in self.interfaces.iter().enumerate() {
            let p = format!("{at}.interfaces[{i}]");
            check_name(&c.name, &p, errs, true);
            if let Some(mac) = &c.mac
                && parse_mac(mac).is_none()
            {
                errs.push(
                    format!("{p}.mac"),
                    format!("{mac:?} is not a MAC address like aa:bb:cc:dd:ee:ff"),
                );
            }
            check_addressing(&p, c.dhcp, &c.addresses, c.gateway.as_deref(), c.mtu, errs);
        }
        // A port belongs to one bond or bridge at most.
        let mut member_of: BTreeMap<String, String> = BTreeMap::new();
        let mut check_member = |m: &str, p: String, errs: &mut ValidationErrors| {
            if let Some(first) = member_of.get(m) {
                errs.push(p, format!("{m} is already a member at {first}"));
            } else {
                member_of.insert(m.to_string(), p);
            }
        };
        for (i, b) in self.bonds.iter().enumerate() {
            let p = format!("{at}.bonds[{i}]");
            check_name(&b.name, &p, errs, false);
            if b.interfaces.is_empty() {
                errs.push(
                    format!("{p}.interfaces"),
                    "a bond needs at least one member interface",
                );
            }
            for (j, m) in b.interfaces.iter().enumerate() {
                check_member(m, format!("{p}.interfaces[{j}]"), errs);
            }
            check_addressing(&p, b.dhcp, &b.addresses, b.gateway.as_deref(), b.mtu, errs);
        }
        for (i, v) in self.vlans.iter().enumerate() {
            let p = format!("{at}.vlans[{i}]");
            check_name(&v.name, &p, errs, false);
            if !(1..=4094).contains(&v.id) {
                errs.push(
                    format!("{p}.id"),
                    format!("{} is not a VLAN id (1–4094)", v.id),
                );
            }
            if v.link.is_empty() {
                errs.push(
                    format!("{p}.link"),
                    "must name the interface the VLAN rides on",
                );
            }
            check_addressing(&p, v.dhcp, &v.addresses, v.gateway.as_deref(), v.mtu, errs);
        }
        for (i, b) in self.bridges.iter().enumerate() {
            let p = format!("{at}.bridges[{i}]");
            check_name(&b.name, &p, errs, false);
            for (j, m) in b.interfaces.iter().enumerate() {
                check_member(m, format!("{p}.interfaces[{j}]"), errs);
            }
            check_addressing(&p, b.dhcp, &b.addresses, b.gateway.as_deref(), b.mtu, errs);
        }
        for (i, s) in self.nameservers.iter().enumerate() {
            if s.parse::<IpAddr>().is_err() {
                errs.push(
                    format!("{at}.nameservers[{i}]"),
                    format!("{s:?} is not an IP address"),
                );
            }
        }
        for (i, d) in self.search_domains.iter().enumerate() {
            if d.is_empty() || !d.split('.').all(|l| is_dns_label(&l.to_ascii_lowercase())) {
                errs.push(
                    format!("{at}.searchDomains[{i}]"),
                    format!("{d:?} is not a domain name"),
                );
            }
        }
    }
}

fn check_addressing(
    at: &str,
    dhcp: bool,
    addresses: &[String],
    gateway: Option<&str>,
    mtu: Option<u32>,
    errs: &mut ValidationErrors,
) {
    for (i, a) in addresses.iter().enumerate() {
        if a.parse::<ipnet::IpNet>().is_err() {
            errs.push(
                format!("{at}.addresses[{i}]"),
                format!("{a:?} is not an address with prefix length, like 10.0.0.5/24"),
            );
        }
    }
    if let Some(g) = gateway {
        if g.parse::<IpAddr>().is_err() {
            errs.push(
                format!("{at}.gateway"),
                format!("{g:?} is not an IP address"),
            );
        } else if addresses.is_empty() && !dhcp {
            errs.push(
                format!("{at}.gateway"),
                "a gateway needs a static address on the same link",
            );
        }
    }
    if let Some(m) = mtu
        && !(68..=65535).contains(&m)
    {
        errs.push(format!("{at}.mtu"), format!("{m} is not an MTU (68–65535)"));
    }
}

/// Kernel command line arguments, one word each; paths start with `at`.
pub(crate) fn check_kernel_args(at: &str, args: &[String], errs: &mut ValidationErrors) {
    for (i, a) in args.iter().enumerate() {
        if a.is_empty() || a.contains(char::is_whitespace) {
            errs.push(
                format!("{at}[{i}]"),
                format!("{a:?} must be one argument without spaces"),
            );
        }
    }
}

/// A user or group name as useradd accepts it.
pub(crate) fn is_unix_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 32
        && n.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && n.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

fn check_ssh_key(key: &str) -> Result<(), String> {
    const TYPES: &[&str] = &[
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    ];
    if key.contains('\n') {
        return Err("must be one line".into());
    }
    let mut parts = key.split_whitespace();
    let kind = parts.next().unwrap_or("");
    let blob = parts.next().unwrap_or("");
    if !TYPES.contains(&kind) {
        return Err(format!(
            "must start with a key type such as ssh-ed25519, found {:?}",
            kind.chars().take(30).collect::<String>()
        ));
    }
    let base64 = |c: char| c.is_ascii_alphanumeric() || "+/=".contains(c);
    if blob.len() < 16 || !blob.chars().all(base64) {
        return Err("the key data after the type is missing or not base64".into());
    }
    Ok(())
}

/// One systemd-networkd file: its name in `/etc/systemd/network` and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkdFile {
    pub name: String,
    pub content: String,
}

/// The systemd-networkd files for `n`: one .network per configured interface, bond, VLAN
/// and bridge, the .netdev files that create the virtual ones, and (with `dhcp`) the
/// catch-all DHCP file that comes after them, so configured links never fall to it.
pub fn render_networkd(n: &NetworkSpec) -> Vec<NetworkdFile> {
    let mut out = Vec::new();
    let mut file = |name: String, content: String| out.push(NetworkdFile { name, content });
    // Lines every [Network] section kiln writes ends with: DNS, domains and VLANs on top.
    let tail = |name: &str| {
        let mut t = String::new();
        for ns in &n.nameservers {
            t.push_str(&format!("DNS={ns}\n"));
        }
        if !n.search_domains.is_empty() {
            t.push_str(&format!("Domains={}\n", n.search_domains.join(" ")));
        }
        for v in n.vlans.iter().filter(|v| v.link == name) {
            t.push_str(&format!("VLAN={}\n", v.name));
        }
        t
    };
    let network = |matches: String,
                   name: &str,
                   dhcp: bool,
                   addresses: &[String],
                   gateway: Option<&str>,
                   mtu: Option<u32>| {
        let mut t = format!("[Match]\n{matches}\n");
        if let Some(m) = mtu {
            t.push_str(&format!("\n[Link]\nMTUBytes={m}\n"));
        }
        t.push_str("\n[Network]\n");
        if dhcp {
            t.push_str("DHCP=yes\n");
        }
        for a in addresses {
            t.push_str(&format!("Address={a}\n"));
        }
        if let Some(g) = gateway {
            t.push_str(&format!("Gateway={g}\n"));
        }
        t.push_str(&tail(name));
        t.push('\n');
        t
    };
    for i in &n.interfaces {
        let matches = match &i.mac {
            Some(mac) => format!("MACAddress={mac}"),
            None => format!("Name={}", i.name),
        };
        if let Some(mac) = &i.mac
            && !i.name.contains(['*', '?'])
        {
            file(
                format!("10-kiln-{}.link", i.name),
                format!("[Match]\nMACAddress={mac}\n\n[Link]\nName={}\n", i.name),
            );
        }
        file(
            format!("10-kiln-{}.network", file_safe(&i.name)),
            network(
                matches,
                &i.name,
                i.dhcp,
                &i.addresses,
                i.gateway.as_deref(),
                i.mtu,
            ),
        );
    }
    for b in &n.bonds {
        let f = file_safe(&b.name);
        file(
            format!("20-kiln-{f}.netdev"),
            format!(
                "[NetDev]\nName={}\nKind=bond\n\n[Bond]\nMode={}\nMIIMonitorSec=100ms\n",
                b.name,
                b.mode.as_str()
            ),
        );
        file(
            format!("20-kiln-{f}.network"),
            network(
                format!("Name={}", b.name),
                &b.name,
                b.dhcp,
                &b.addresses,
                b.gateway.as_deref(),
                b.mtu,
            ),
        );
        file(
            format!("21-kiln-{f}-members.network"),
            format!(
                "[Match]\nName={}\n\n[Network]\nBond={}\n",
                b.interfaces.join(" "),
                b.name
            ),
        );
    }
    for v in &n.vlans {
        let f = file_safe(&v.name);
        file(
            format!("30-kiln-{f}.netdev"),
            format!(
                "[NetDev]\nName={}\nKind=vlan\n\n[VLAN]\nId={}\n",
                v.name, v.id
            ),
        );
        file(
            format!("30-kiln-{f}.network"),
            network(
                format!("Name={}", v.name),
                &v.name,
                v.dhcp,
                &v.addresses,
                v.gateway.as_deref(),
                v.mtu,
            ),
        );
    }
    // Links that carry VLANs but have no configuration of their own still need a .network
    // file: systemd-networkd attaches a VLAN through its parent's file.
    let configured: BTreeSet<&str> = n
        .interfaces
        .iter()
        .map(|i| i.name.as_str())
        .chain(n.bonds.iter().map(|b| b.name.as_str()))
        .chain(n.bridges.iter().map(|b| b.name.as_str()))
        .collect();
    let mut parents: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for v in &n.vlans {
        if !configured.contains(v.link.as_str()) {
            parents.entry(&v.link).or_default().push(&v.name);
        }
    }
    for (link, vlans) in parents {
        let mut t = format!(
            "# {link} has no addresses of its own; it only carries VLANs.\n[Match]\nName={link}\n\n[Network]\nLinkLocalAddressing=no\n"
        );
        for v in vlans {
            t.push_str(&format!("VLAN={v}\n"));
        }
        t.push('\n');
        file(format!("31-kiln-{}-vlans.network", file_safe(link)), t);
    }
    for b in &n.bridges {
        let f = file_safe(&b.name);
        file(
            format!("40-kiln-{f}.netdev"),
            format!(
                "[NetDev]\nName={}\nKind=bridge\n\n[Bridge]\nSTP={}\n",
                b.name,
                if b.stp { "yes" } else { "no" }
            ),
        );
        file(
            format!("40-kiln-{f}.network"),
            network(
                format!("Name={}", b.name),
                &b.name,
                b.dhcp,
                &b.addresses,
                b.gateway.as_deref(),
                b.mtu,
            ),
        );
        if !b.interfaces.is_empty() {
            file(
                format!("41-kiln-{f}-ports.network"),
                format!(
                    "[Match]\nName={}\n\n[Network]\nBridge={}\n\n",
                    b.interfaces.join(" "),
                    b.name
                ),
            );
        }
    }
    if n.dhcp {
        let mut t = String::from(
            "# DHCP on every Ethernet interface no other .network file claims first.\n[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n",
        );
        for ns in &n.nameservers {
            t.push_str(&format!("DNS={ns}\n"));
        }
        if !n.search_domains.is_empty() {
            t.push_str(&format!("Domains={}\n", n.search_domains.join(" ")));
        }
        t.push_str("\n[DHCPv4]\nUseDomains=yes\n");
        file("80-kiln-dhcp.network".into(), t);
    }
    out
}

/// A name as a plain file name: interface names may be globs (`en*`).
pub fn file_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}
