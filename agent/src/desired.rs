//! A merged NodeSpec rendered into the host resources the agent owns (pure).
//!
//! Everything that can be a file becomes one (sysctl.d, modules-load.d, systemd-networkd, …),
//! so the settings survive a reboot; the runtime side (sysctl values, loaded modules, unit
//! state, the live host name) is listed beside the files.

use std::collections::BTreeMap;

use kiln_spec::ValidationErrors;
use kiln_spec::host::render_networkd;
use kiln_spec::nodeconfig::{NodeSpec, parse_mode};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Desired {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    pub users: BTreeMap<String, DesiredUser>,
    pub dirs: BTreeMap<String, DesiredDir>,
    pub files: BTreeMap<String, DesiredFile>,
    pub units: BTreeMap<String, DesiredUnit>,
    pub sysctls: BTreeMap<String, String>,
    /// Modules to load now (they are also listed in modules-load.d).
    pub modules: Vec<String>,
    /// Arguments the next boot's kernel command line must carry.
    pub kernel_args: Vec<String>,
    pub kvm: bool,
    pub data_disks: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredUser {
    pub uid: Option<u32>,
    pub shell: Option<String>,
    pub groups: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredDir {
    pub mode: u32,
    /// `user[:group]`
    pub owner: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredFile {
    pub content: String,
    pub mode: u32,
    pub owner: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredUnit {
    pub enabled: Option<bool>,
    pub started: Option<bool>,
    /// Files whose change restarts the unit (its own file, drop-ins, its config).
    pub files: Vec<String>,
}

pub const SYSCTL_FILE: &str = "/etc/sysctl.d/90-kiln.conf";
pub const MODULES_LOAD_FILE: &str = "/etc/modules-load.d/kiln.conf";
pub const MODPROBE_FILE: &str = "/etc/modprobe.d/kiln.conf";
pub const TIMESYNCD_FILE: &str = "/etc/systemd/timesyncd.conf.d/kiln.conf";
/// The kernel arguments the boot entry writer adds at the next boot-entry update.
const NETWORK_DIR: &str = "/etc/systemd/network";
const UNIT_DIR: &str = "/etc/systemd/system";

/// Renders a valid spec. Fails, with field paths, only when a file the spec lists collides
/// with one kiln generates.
pub fn render(spec: &NodeSpec) -> Result<Desired, ValidationErrors> {
    let mut d = Desired::default();
    // path → who generated it, to report collisions with spec.files.
    let mut generated: BTreeMap<String, String> = BTreeMap::new();
    let mut gen_file =
        |d: &mut Desired, path: String, content: String, mode: u32, owner: &str, from: &str| {
            generated.insert(path.clone(), from.to_string());
            d.files.insert(
                path,
                DesiredFile {
                    content,
                    mode,
                    owner: owner.to_string(),
                },
            );
        };

    if let Some(h) = &spec.hostname {
        d.hostname = Some(h.clone());
        gen_file(
            &mut d,
            "/etc/hostname".into(),
            format!("{h}\n"),
            0o644,
            "root:root",
            "spec.hostname",
        );
    }
    for (i, u) in spec.users.iter().enumerate() {
        d.users.insert(
            u.name.clone(),
            DesiredUser {
                uid: u.uid,
                shell: u.shell.clone(),
                groups: {
                    let mut g = u.groups.clone();
                    g.sort();
                    g.dedup();
                    g
                },
            },
        );
        if !u.ssh_authorized_keys.is_empty() {
            let ssh = format!("/home/{}/.ssh", u.name);
            d.dirs.insert(
                ssh.clone(),
                DesiredDir {
                    mode: 0o700,
                    owner: u.name.clone(),
                },
            );
            let keys: String = u
                .ssh_authorized_keys
                .iter()
                .map(|k| format!("{}\n", k.trim()))
                .collect();
            gen_file(
                &mut d,
                format!("{ssh}/authorized_keys"),
                keys,
                0o600,
                &u.name,
                &format!("spec.users[{i}].sshAuthorizedKeys"),
            );
        }
    }
    for (i, u) in spec.units.iter().enumerate() {
        let mut files = Vec::new();
        if let Some(content) = &u.content {
            let path = format!("{UNIT_DIR}/{}", u.name);
            gen_file(
                &mut d,
                path.clone(),
                content.clone(),
                0o644,
                "root:root",
                &format!("spec.units[{i}]"),
            );
            files.push(path);
        }
        for (j, di) in u.drop_ins.iter().enumerate() {
            let path = format!("{UNIT_DIR}/{}.d/{}", u.name, di.name);
            gen_file(
                &mut d,
                path.clone(),
                di.content.clone(),
                0o644,
                "root:root",
                &format!("spec.units[{i}].dropIns[{j}]"),
            );
            files.push(path);
        }
        d.units.insert(
            u.name.clone(),
            DesiredUnit {
                enabled: u.enabled,
                started: u.started,
                files,
            },
        );
    }

    d.sysctls = spec.sysctls.clone();
    let mut modules: Vec<(String, Vec<String>)> = spec
        .kernel_modules
        .iter()
        .map(|m| (m.name.clone(), m.options.clone()))
        .collect();
    let mut kernel_args = spec.kernel_args.clone();
    if let Some(v) = &spec.virtualization {
        if v.hugepages_2m > 0 {
            d.sysctls
                .insert("vm.nr_hugepages".into(), v.hugepages_2m.to_string());
        }
        if v.hugepages_1g > 0 {
            kernel_args.push("hugepagesz=1G".into());
            kernel_args.push(format!("hugepages={}", v.hugepages_1g));
        }
        if v.kvm {
            d.kvm = true;
            if !modules.iter().any(|(n, _)| n == "kvm") {
                modules.push(("kvm".into(), vec![]));
            }
        }
    }
    if !d.sysctls.is_empty() {
        let text: String = d
            .sysctls
            .iter()
            .map(|(k, v)| format!("{k} = {v}\n"))
            .collect();
        gen_file(
            &mut d,
            SYSCTL_FILE.into(),
            text,
            0o644,
            "root:root",
            "spec.sysctls",
        );
    }
    if !modules.is_empty() {
        let names: String = modules.iter().map(|(n, _)| format!("{n}\n")).collect();
        gen_file(
            &mut d,
            MODULES_LOAD_FILE.into(),
            names,
            0o644,
            "root:root",
            "spec.kernelModules",
        );
    }
    let mut options: Vec<String> = modules
        .iter()
        .filter(|(_, o)| !o.is_empty())
        .map(|(n, o)| format!("options {n} {}\n", o.join(" ")))
        .collect();
    if spec
        .virtualization
        .as_ref()
        .is_some_and(|v| v.kvm && v.nested)
    {
        // The vendor module udev loads decides which line applies.
        options.push("options kvm_intel nested=1\n".into());
        options.push("options kvm_amd nested=1\n".into());
    }
    if !options.is_empty() {
        gen_file(
            &mut d,
            MODPROBE_FILE.into(),
            options.concat(),
            0o644,
            "root:root",
            "spec.kernelModules",
        );
    }
    d.modules = modules.into_iter().map(|(n, _)| n).collect();

    if let Some(n) = &spec.network {
        let mut files = Vec::new();
        for f in render_networkd(n) {
            let path = format!("{NETWORK_DIR}/{}", f.name);
            gen_file(
                &mut d,
                path.clone(),
                f.content,
                0o644,
                "root:root",
                "spec.network",
            );
            files.push(path);
        }
        d.units.insert(
            "systemd-networkd.service".into(),
            DesiredUnit {
                enabled: Some(true),
                started: Some(true),
                files,
            },
        );
    }
    if let Some(t) = &spec.time {
        let text = format!("[Time]\nNTP={}\n", t.servers.join(" "));
        gen_file(
            &mut d,
            TIMESYNCD_FILE.into(),
            text,
            0o644,
            "root:root",
            "spec.time",
        );
        d.units.insert(
            "systemd-timesyncd.service".into(),
            DesiredUnit {
                enabled: Some(true),
                started: Some(true),
                files: vec![TIMESYNCD_FILE.into()],
            },
        );
    }
    kernel_args.dedup();
    // Compared with /proc/cmdline (PendingReboot); the boot entries take them with an upgrade.
    d.kernel_args = kernel_args;
    if !spec.data_disks.is_empty() {
        d.data_disks = spec
            .data_disks
            .iter()
            .map(|x| x.part_label.clone())
            .collect();
    }

    let mut errs = ValidationErrors::default();
    for (i, f) in spec.files.iter().enumerate() {
        if let Some(from) = generated.get(&f.path) {
            errs.push(
                format!("spec.files[{i}].path"),
                format!("{} is generated from {from}", f.path),
            );
            continue;
        }
        d.files.insert(
            f.path.clone(),
            DesiredFile {
                content: f.content.clone(),
                mode: parse_mode(&f.mode).unwrap_or(0o644),
                owner: f.owner.clone().unwrap_or_else(|| "root:root".into()),
            },
        );
    }
    for (i, dir) in spec.directories.iter().enumerate() {
        if generated.contains_key(&dir.path) || d.dirs.contains_key(&dir.path) {
            errs.push(
                format!("spec.directories[{i}].path"),
                format!("{} is generated by kiln", dir.path),
            );
            continue;
        }
        d.dirs.insert(
            dir.path.clone(),
            DesiredDir {
                mode: parse_mode(&dir.mode).unwrap_or(0o755),
                owner: dir.owner.clone().unwrap_or_else(|| "root:root".into()),
            },
        );
    }
    for (i, f) in spec.files.iter().enumerate() {
        if d.dirs.contains_key(&f.path) {
            errs.push(
                format!("spec.files[{i}].path"),
                format!("{} is also a directory", f.path),
            );
        }
    }
    errs.into_result().map(|()| d)
}

/// A short content hash, for unit restarts and the config generation.
pub fn digest(parts: &[&[u8]]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    hex::encode(&h.finalize()[..12])
}

impl Desired {
    /// Identifies this desired state; drift is a difference found while it stays the same.
    pub fn generation(&self) -> String {
        digest(&[serde_json::to_string(self).unwrap_or_default().as_bytes()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_spec::NodeConfig;

    const FULL: &str = include_str!("../tests/golden/node-full.yaml");

    /// Golden test: `KILN_BLESS=1 cargo test -p kiln-agent render` rewrites the expected file.
    #[test]
    fn render_matches_golden() {
        let spec = NodeConfig::from_yaml(FULL).unwrap().spec;
        let d = render(&spec).unwrap();
        let got = serde_json::to_string_pretty(&d).unwrap() + "\n";
        let golden = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/render-full.json");
        if std::env::var_os("KILN_BLESS").is_some() {
            std::fs::write(golden, &got).unwrap();
        }
        let want = std::fs::read_to_string(golden).unwrap();
        assert_eq!(got, want, "rerun with KILN_BLESS=1 to accept");
    }

    #[test]
    fn a_listed_file_may_not_replace_a_generated_one() {
        let yaml = format!(
            "{FULL}  files:\n    - {{path: /etc/hostname, content: x}}\n    - {{path: /etc/sysctl.d/90-kiln.conf, content: \"y\"}}\n"
        );
        let spec = NodeConfig::from_yaml(&yaml).unwrap().spec;
        let errs = render(&spec).unwrap_err();
        let paths: Vec<_> = errs.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["spec.files[0].path", "spec.files[1].path"]);
    }
}
