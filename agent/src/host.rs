//! The host operations the agent needs beyond files, behind small traits. The real
//! implementations run the real tools (`systemctl`, `useradd`, `modprobe`) or write the real
//! `/proc/sys` files, all under the [`Sysroot`]'s root:
//!
//! - on the running system (root `/`) everything applies now;
//! - on an offline tree (an image, a test's temporary root) the persistent half applies exactly
//!   as `systemctl --root` / `useradd --root` do it, and the runtime half (starting units,
//!   loading modules, the live host name) has no running system to act on and is skipped.
//!   Sysctls still land in `<root>/proc/sys/…`, which is where their effect is observable.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use crate::desired::DesiredUser;
use crate::sysroot::Sysroot;

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("{op}: {reason}")]
    Failed { op: String, reason: String },
    #[error("{op}: {source}")]
    Io { op: String, source: std::io::Error },
}

pub type HostResult<T> = Result<T, HostError>;

pub trait Services: Send + Sync {
    /// Whether units can be started here (false on an offline tree).
    fn runtime(&self) -> bool;
    fn daemon_reload(&self) -> HostResult<()>;
    /// What the service manager says of each of `units`, in their order.
    fn states(&self, units: &[&str]) -> HostResult<Vec<UnitStatus>>;
    fn set_enabled(&self, unit: &str, enabled: bool) -> HostResult<()>;
    /// `start`, `restart` or `stop`.
    fn control(&self, verb: &str, unit: &str) -> HostResult<()>;
}

/// A unit as the service manager sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnitStatus {
    pub enabled: bool,
    /// `None` where no service manager runs (offline tree).
    pub active: Option<bool>,
    /// When its main process last started (by the wall clock), if it runs one.
    pub main_started: Option<SystemTime>,
}

pub trait Sysctls: Send + Sync {
    fn read(&self, key: &str) -> HostResult<Option<String>>;
    fn write(&self, key: &str, value: &str) -> HostResult<()>;
}

pub trait Modules: Send + Sync {
    fn runtime(&self) -> bool;
    fn is_loaded(&self, name: &str) -> bool;
    fn load(&self, name: &str) -> HostResult<()>;
}

pub trait Accounts: Send + Sync {
    fn create(&self, name: &str, user: &DesiredUser) -> HostResult<()>;
    fn modify(&self, name: &str, user: &DesiredUser) -> HostResult<()>;
    /// `remove_home` only for accounts kiln created (it made the home too).
    fn remove(&self, name: &str, remove_home: bool) -> HostResult<()>;
}

/// The host: its file tree and its service, kernel and account operations.
pub struct Host {
    pub sysroot: Sysroot,
    pub services: Box<dyn Services>,
    pub sysctls: Box<dyn Sysctls>,
    pub modules: Box<dyn Modules>,
    pub accounts: Box<dyn Accounts>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("root", &self.sysroot.root())
            .finish()
    }
}

impl Host {
    /// The real tools and files, under `root`.
    pub fn real(root: impl Into<PathBuf>) -> Host {
        let sysroot = Sysroot::new(root);
        let root = sysroot.root().to_path_buf();
        Host {
            services: Box::new(Systemctl { root: root.clone() }),
            sysctls: Box::new(ProcSysctl { root: root.clone() }),
            modules: Box::new(Modprobe { root: root.clone() }),
            accounts: Box::new(ShadowTools { root }),
            sysroot,
        }
    }

    /// The running host name: the kernel's on the live system, /etc/hostname in a tree.
    pub fn hostname(&self) -> Option<String> {
        if self.sysroot.is_live() {
            return nix::unistd::gethostname().ok()?.into_string().ok();
        }
        let b = self.sysroot.read("/etc/hostname").ok()??;
        let s = String::from_utf8_lossy(&b).trim().to_string();
        (!s.is_empty()).then_some(s)
    }

    pub fn set_hostname(&self, name: &str) -> HostResult<()> {
        nix::unistd::sethostname(name).map_err(|e| HostError::Failed {
            op: format!("setting host name {name}"),
            reason: e.to_string(),
        })
    }
}

fn run(tool: &str, args: &[&str], package: &str) -> HostResult<std::process::Output> {
    let op = format!("{tool} {}", args.join(" "));
    let out = Command::new(tool).args(args).output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            HostError::Failed {
                op: op.clone(),
                reason: format!("{tool} not found (Debian package {package})"),
            }
        } else {
            HostError::Io {
                op: op.clone(),
                source: e,
            }
        }
    })?;
    Ok(out)
}

fn check(out: std::process::Output, tool: &str, args: &[&str]) -> HostResult<()> {
    if out.status.success() {
        return Ok(());
    }
    Err(HostError::Failed {
        op: format!("{tool} {}", args.join(" ")),
        reason: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

fn root_arg(root: &Path) -> Option<String> {
    (root != Path::new("/")).then(|| format!("--root={}", root.display()))
}

#[derive(Debug)]
pub struct Systemctl {
    root: PathBuf,
}

impl Systemctl {
    fn args<'a>(&'a self, root_flag: &'a Option<String>, rest: &[&'a str]) -> Vec<&'a str> {
        let mut v: Vec<&str> = root_flag.iter().map(String::as_str).collect();
        v.extend_from_slice(rest);
        v
    }
}

impl Services for Systemctl {
    fn runtime(&self) -> bool {
        self.root == Path::new("/")
    }

    fn daemon_reload(&self) -> HostResult<()> {
        if !self.runtime() {
            return Ok(()); // no manager runs in an offline tree; it reads the files at boot
        }
        check(
            run("systemctl", &["daemon-reload"], "systemd")?,
            "systemctl",
            &["daemon-reload"],
        )
    }

    fn states(&self, units: &[&str]) -> HostResult<Vec<UnitStatus>> {
        if units.is_empty() {
            return Ok(Vec::new());
        }
        if !self.runtime() {
            // No manager to ask: the unit files say whether each is enabled.
            let flag = root_arg(&self.root);
            return units
                .iter()
                .map(|unit| {
                    let args = self.args(&flag, &["is-enabled", unit]);
                    let out = run("systemctl", &args, "systemd")?;
                    Ok(UnitStatus {
                        enabled: enabled_state(String::from_utf8_lossy(&out.stdout).trim()),
                        ..UnitStatus::default()
                    })
                })
                .collect();
        }
        // One question for all units: every systemctl run costs a process start, which an
        // observation of a node with a few units would otherwise pay twice per unit.
        let mut args = vec![
            "show",
            "--property=UnitFileState,ActiveState,ExecMainStartTimestampMonotonic",
            "--",
        ];
        args.extend_from_slice(units);
        let out = run("systemctl", &args, "systemd")?;
        let listed = String::from_utf8_lossy(&out.stdout);
        let states = parse_show(&listed, monotonic_to_wall);
        if !out.status.success() || states.len() != units.len() {
            return Err(HostError::Failed {
                op: format!("systemctl {}", args.join(" ")),
                reason: format!(
                    "{} unit(s) asked, {} answered: {}",
                    units.len(),
                    states.len(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
        Ok(states)
    }

    fn set_enabled(&self, unit: &str, enabled: bool) -> HostResult<()> {
        let flag = root_arg(&self.root);
        let args = self.args(&flag, &[if enabled { "enable" } else { "disable" }, unit]);
        check(run("systemctl", &args, "systemd")?, "systemctl", &args)
    }

    fn control(&self, verb: &str, unit: &str) -> HostResult<()> {
        check(
            run("systemctl", &[verb, unit], "systemd")?,
            "systemctl",
            &[verb, unit],
        )
    }
}

fn enabled_state(state: &str) -> bool {
    state == "enabled" || state == "enabled-runtime"
}

/// `systemctl show` of several units: one block of `KEY=value` lines per unit, blank lines
/// between them. `wall` turns a `CLOCK_MONOTONIC` time into the wall clock's.
fn parse_show(listed: &str, wall: impl Fn(Duration) -> Option<SystemTime>) -> Vec<UnitStatus> {
    listed
        .split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .map(|block| {
            let mut status = UnitStatus {
                active: Some(false),
                ..UnitStatus::default()
            };
            for (key, value) in block.lines().filter_map(|l| l.split_once('=')) {
                match key {
                    "UnitFileState" => status.enabled = enabled_state(value),
                    // A unit on its way up counts as running: starting it would only
                    // wait for it.
                    "ActiveState" => {
                        status.active = Some(matches!(value, "active" | "activating" | "reloading"))
                    }
                    "ExecMainStartTimestampMonotonic" => {
                        status.main_started = value
                            .parse()
                            .ok()
                            .filter(|&us| us > 0)
                            .and_then(|us| wall(Duration::from_micros(us)))
                    }
                    _ => {}
                }
            }
            status
        })
        .collect()
}

/// The wall-clock time of `since_boot` on `CLOCK_MONOTONIC` (systemd's timestamps), read
/// against both clocks now.
fn monotonic_to_wall(since_boot: Duration) -> Option<SystemTime> {
    let mono = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).ok()?;
    let now = SystemTime::now();
    let elapsed = Duration::from(mono).checked_sub(since_boot)?;
    now.checked_sub(elapsed)
}

#[derive(Debug)]
pub struct ProcSysctl {
    root: PathBuf,
}

impl ProcSysctl {
    fn file(&self, key: &str) -> PathBuf {
        self.root.join("proc/sys").join(key.replace('.', "/"))
    }
}

impl Sysctls for ProcSysctl {
    fn read(&self, key: &str) -> HostResult<Option<String>> {
        match std::fs::read_to_string(self.file(key)) {
            // The kernel separates multi-value settings with tabs; compare word by word.
            Ok(s) => Ok(Some(s.split_whitespace().collect::<Vec<_>>().join(" "))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(HostError::Io {
                op: format!("reading sysctl {key}"),
                source: e,
            }),
        }
    }

    fn write(&self, key: &str, value: &str) -> HostResult<()> {
        let path = self.file(key);
        let io = |source| HostError::Io {
            op: format!("setting sysctl {key}"),
            source,
        };
        if self.root != Path::new("/")
            && let Some(dir) = path.parent()
        {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        std::fs::write(&path, format!("{value}\n")).map_err(io)
    }
}

#[derive(Debug)]
pub struct Modprobe {
    root: PathBuf,
}

impl Modules for Modprobe {
    fn runtime(&self) -> bool {
        self.root == Path::new("/")
    }

    fn is_loaded(&self, name: &str) -> bool {
        self.root
            .join("sys/module")
            .join(name.replace('-', "_"))
            .exists()
    }

    fn load(&self, name: &str) -> HostResult<()> {
        check(run("modprobe", &[name], "kmod")?, "modprobe", &[name])
    }
}

#[derive(Debug)]
pub struct ShadowTools {
    root: PathBuf,
}

impl ShadowTools {
    fn exec(&self, tool: &str, rest: Vec<String>) -> HostResult<()> {
        let mut args: Vec<String> = Vec::new();
        if self.root != Path::new("/") {
            args.push("--root".into());
            args.push(self.root.display().to_string());
        }
        args.extend(rest);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        check(run(tool, &refs, "passwd")?, tool, &refs)
    }
}

impl Accounts for ShadowTools {
    fn create(&self, name: &str, user: &DesiredUser) -> HostResult<()> {
        let mut a = vec!["--create-home".to_string(), "--user-group".to_string()];
        if let Some(uid) = user.uid {
            a.extend(["--uid".into(), uid.to_string()]);
        }
        if let Some(shell) = &user.shell {
            a.extend(["--shell".into(), shell.clone()]);
        }
        if !user.groups.is_empty() {
            a.extend(["--groups".into(), user.groups.join(",")]);
        }
        a.push(name.into());
        self.exec("useradd", a)
    }

    fn modify(&self, name: &str, user: &DesiredUser) -> HostResult<()> {
        let mut a = vec!["--groups".to_string(), user.groups.join(",")];
        if let Some(shell) = &user.shell {
            a.extend(["--shell".into(), shell.clone()]);
        }
        a.push(name.into());
        self.exec("usermod", a)
    }

    fn remove(&self, name: &str, remove_home: bool) -> HostResult<()> {
        let mut a = Vec::new();
        if remove_home {
            a.push("--remove".to_string());
        }
        a.push(name.into());
        self.exec("userdel", a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_show_answers_for_every_unit_in_order() {
        // As systemd 252 prints it: its own property order, a blank line between units; a
        // unit without a file and one that never ran come out too.
        let listed = "ExecMainStartTimestampMonotonic=11381777\n\
                      ActiveState=active\n\
                      UnitFileState=enabled\n\
                      \n\
                      ExecMainStartTimestampMonotonic=0\n\
                      ActiveState=inactive\n\
                      UnitFileState=\n\
                      \n\
                      ExecMainStartTimestampMonotonic=0\n\
                      ActiveState=activating\n\
                      UnitFileState=enabled-runtime\n";
        let boot = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let states = parse_show(listed, |since_boot| Some(boot + since_boot));
        assert_eq!(
            states,
            [
                UnitStatus {
                    enabled: true,
                    active: Some(true),
                    main_started: Some(boot + Duration::from_micros(11_381_777)),
                },
                UnitStatus {
                    enabled: false,
                    active: Some(false),
                    main_started: None,
                },
                UnitStatus {
                    enabled: true,
                    active: Some(true),
                    main_started: None,
                },
            ]
        );
    }

    #[test]
    fn a_monotonic_time_lands_on_the_wall_clock_of_its_moment() {
        let before = SystemTime::now();
        let mono = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
        let after = SystemTime::now();
        let wall = monotonic_to_wall(Duration::from(mono)).unwrap();
        // Read against the clocks later, it falls between the wall readings around it
        // (give or take the clocks' rounding).
        let rounding = Duration::from_micros(10);
        assert!(
            wall + rounding >= before && wall <= after + rounding,
            "{wall:?}"
        );
        assert_eq!(
            monotonic_to_wall(Duration::from(mono) + Duration::from_secs(3600)),
            None
        );
    }
}
