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
    /// The data disks' device paths.
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
const NETWORK_DIR: &str = "/etc/systemd/network";
const UNIT_DIR: &str = "/etc/systemd/system";
/// Owner of everything kiln writes unless the spec names another.
const ROOT: &str = "root:root";

/// Renders a valid spec. Fails, with field paths, only when a file the spec lists collides
/// with one kiln generates.
pub fn render(spec: &NodeSpec) -> Result<Desired, ValidationErrors> {
    let mut r = Renderer::default();
    r.hostname(spec);
    r.users(spec);
    r.units(spec);
    r.kernel(spec);
    r.network(spec);
    r.time(spec);
    r.d.data_disks = spec
        .data_disks
        .iter()
        .map(kiln_spec::nodeconfig::DataDisk::path)
        .collect();
    r.listed(spec)
}

/// The state being rendered and, for each generated file, the spec field it came from (to
/// report collisions with `spec.files`).
#[derive(Default)]
struct Renderer {
    d: Desired,
    generated: BTreeMap<String, String>,
}

impl Renderer {
    fn file(&mut self, path: String, content: String, owner: &str, mode: u32, from: &str) {
        self.generated.insert(path.clone(), from.to_string());
        self.d.files.insert(
            path,
            DesiredFile {
                content,
                mode,
                owner: owner.to_string(),
            },
        );
    }

    /// A root-owned 0644 config file.
    fn config(&mut self, path: String, content: String, from: &str) {
        self.file(path, content, ROOT, 0o644, from);
    }

    /// A service kiln enables and starts, restarted when its config files change.
    fn service(&mut self, name: &str, files: Vec<String>) {
        self.d.units.insert(
            name.into(),
            DesiredUnit {
                enabled: Some(true),
                started: Some(true),
                files,
            },
        );
    }

    fn hostname(&mut self, spec: &NodeSpec) {
        if let Some(h) = &spec.hostname {
            self.d.hostname = Some(h.clone());
            self.config("/etc/hostname".into(), format!("{h}\n"), "spec.hostname");
        }
    }

    fn users(&mut self, spec: &NodeSpec) {
        for (i, u) in spec.users.iter().enumerate() {
            let mut groups = u.groups.clone();
            groups.sort();
            groups.dedup();
            self.d.users.insert(
                u.name.clone(),
                DesiredUser {
                    uid: u.uid,
                    shell: u.shell.clone(),
                    groups,
                },
            );
            if u.ssh_authorized_keys.is_empty() {
                continue;
            }
            let ssh = format!("/home/{}/.ssh", u.name);
            self.d.dirs.insert(
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
            self.file(
                format!("{ssh}/authorized_keys"),
                keys,
                &u.name,
                0o600,
                &format!("spec.users[{i}].sshAuthorizedKeys"),
            );
        }
    }

    fn units(&mut self, spec: &NodeSpec) {
        for (i, u) in spec.units.iter().enumerate() {
            let mut files = Vec::new();
            if let Some(content) = &u.content {
                let path = format!("{UNIT_DIR}/{}", u.name);
                self.config(path.clone(), content.clone(), &format!("spec.units[{i}]"));
                files.push(path);
            }
            for (j, di) in u.drop_ins.iter().enumerate() {
                let path = format!("{UNIT_DIR}/{}.d/{}", u.name, di.name);
                let from = format!("spec.units[{i}].dropIns[{j}]");
                self.config(path.clone(), di.content.clone(), &from);
                files.push(path);
            }
            self.d.units.insert(
                u.name.clone(),
                DesiredUnit {
                    enabled: u.enabled,
                    started: u.started,
                    files,
                },
            );
        }
    }

    /// Sysctls, kernel modules and their options, kernel arguments, and what virtualization
    /// adds to each.
    fn kernel(&mut self, spec: &NodeSpec) {
        self.d.sysctls = spec.sysctls.clone();
        let mut modules: Vec<(String, Vec<String>)> = spec
            .kernel_modules
            .iter()
            .map(|m| (m.name.clone(), m.options.clone()))
            .collect();
        let mut kernel_args = spec.kernel_args.clone();
        let mut options = Vec::new();
        if let Some(v) = &spec.virtualization {
            if v.hugepages_2m > 0 {
                self.d
                    .sysctls
                    .insert("vm.nr_hugepages".into(), v.hugepages_2m.to_string());
            }
            if v.hugepages_1g > 0 {
                kernel_args.push("hugepagesz=1G".into());
                kernel_args.push(format!("hugepages={}", v.hugepages_1g));
            }
            if v.kvm {
                self.d.kvm = true;
                if !modules.iter().any(|(n, _)| n == "kvm") {
                    modules.push(("kvm".into(), vec![]));
                }
            }
            if v.kvm && v.nested {
                // The vendor module udev loads decides which line applies.
                options.push("options kvm_intel nested=1\n".to_string());
                options.push("options kvm_amd nested=1\n".to_string());
            }
        }
        if !self.d.sysctls.is_empty() {
            let text: String = self
                .d
                .sysctls
                .iter()
                .map(|(k, v)| format!("{k} = {v}\n"))
                .collect();
            self.config(SYSCTL_FILE.into(), text, "spec.sysctls");
        }
        if !modules.is_empty() {
            let names: String = modules.iter().map(|(n, _)| format!("{n}\n")).collect();
            self.config(MODULES_LOAD_FILE.into(), names, "spec.kernelModules");
        }
        let module_options = modules
            .iter()
            .filter(|(_, o)| !o.is_empty())
            .map(|(n, o)| format!("options {n} {}\n", o.join(" ")));
        let options: Vec<String> = module_options.chain(options).collect();
        if !options.is_empty() {
            self.config(MODPROBE_FILE.into(), options.concat(), "spec.kernelModules");
        }
        self.d.modules = modules.into_iter().map(|(n, _)| n).collect();
        kernel_args.dedup();
        // Compared with /proc/cmdline (PendingReboot); the boot entries take them with an
        // upgrade.
        self.d.kernel_args = kernel_args;
    }

    fn network(&mut self, spec: &NodeSpec) {
        let Some(n) = &spec.network else { return };
        let mut files = Vec::new();
        for f in render_networkd(n) {
            let path = format!("{NETWORK_DIR}/{}", f.name);
            self.config(path.clone(), f.content, "spec.network");
            files.push(path);
        }
        self.service("systemd-networkd.service", files);
    }

    fn time(&mut self, spec: &NodeSpec) {
        let Some(t) = &spec.time else { return };
        let text = format!("[Time]\nNTP={}\n", t.servers.join(" "));
        self.config(TIMESYNCD_FILE.into(), text, "spec.time");
        self.service("systemd-timesyncd.service", vec![TIMESYNCD_FILE.into()]);
    }

    /// The files and directories the spec lists itself; none may replace a generated one,
    /// and no path may be both.
    fn listed(mut self, spec: &NodeSpec) -> Result<Desired, ValidationErrors> {
        let d = &mut self.d;
        let mut errs = ValidationErrors::default();
        for (i, f) in spec.files.iter().enumerate() {
            let problem = if let Some(from) = self.generated.get(&f.path) {
                format!("{} is generated from {from}", f.path)
            } else if d.dirs.contains_key(&f.path)
                || spec.directories.iter().any(|dir| dir.path == f.path)
            {
                format!("{} is also a directory", f.path)
            } else {
                d.files.insert(
                    f.path.clone(),
                    DesiredFile {
                        content: f.content.clone(),
                        mode: parse_mode(&f.mode).unwrap_or(0o644),
                        owner: f.owner.clone().unwrap_or_else(|| ROOT.into()),
                    },
                );
                continue;
            };
            errs.push(format!("spec.files[{i}].path"), problem);
        }
        for (i, dir) in spec.directories.iter().enumerate() {
            if self.generated.contains_key(&dir.path) || d.dirs.contains_key(&dir.path) {
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
                    owner: dir.owner.clone().unwrap_or_else(|| ROOT.into()),
                },
            );
        }
        errs.into_result().map(|()| self.d)
    }
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
