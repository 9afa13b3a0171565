//! The node's services as systemd units: what runs them on the appliance. Units live under
//! `/run/systemd/system`, so a reboot forgets them and the agent, which brings the node up on
//! every boot, writes them again from the node config of that boot.

use std::path::PathBuf;
use std::process::Command;

use super::Service;
use super::bringup::{BringupError, Supervisor};

/// The unit name of a node service.
pub fn unit_name(service: &str) -> String {
    format!("kiln-{service}.service")
}

/// A unit running `service`: restarted when it stops, its output in the journal.
/// containerd's shims and containers outlive containerd restarts, as with Debian's own unit.
pub fn unit_file(service: &Service) -> String {
    let exec: Vec<String> = service.argv.iter().map(|a| quote(a)).collect();
    let extra = match service.name.as_str() {
        "containerd" => {
            "Delegate=yes\nKillMode=process\nOOMScoreAdjust=-999\nLimitNOFILE=infinity\nLimitNPROC=infinity\nLimitCORE=infinity\n"
        }
        _ => "",
    };
    format!(
        "# Written by the kiln agent from the node config; rewritten on every boot.\n\
         [Unit]\n\
         Description=kiln node service {name}\n\
         StartLimitIntervalSec=0\n\
         \n\
         [Service]\n\
         ExecStart={exec}\n\
         Restart=always\n\
         RestartSec=2\n\
         {extra}",
        name = service.name,
        exec = exec.join(" "),
    )
}

/// One `ExecStart=` word: double-quoted, with the characters systemd expands escaped.
fn quote(arg: &str) -> String {
    let mut out = String::from("\"");
    for c in arg.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '%' => out.push_str("%%"),
            '$' => out.push_str("$$"),
            _ => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Services as units under `unit_dir`, started through `systemctl`.
#[derive(Debug)]
pub struct Systemd {
    unit_dir: PathBuf,
    started: Vec<String>,
}

impl Systemd {
    pub fn new() -> Systemd {
        Systemd {
            unit_dir: PathBuf::from("/run/systemd/system"),
            started: Vec::new(),
        }
    }

    /// Whether systemd runs this host (its own test, as `sd_booted` does).
    pub fn booted() -> bool {
        std::path::Path::new("/run/systemd/system").is_dir()
    }
}

impl Default for Systemd {
    fn default() -> Self {
        Self::new()
    }
}

fn systemctl(args: &[&str]) -> Result<String, String> {
    let out = Command::new("systemctl")
        .args(args)
        .output()
        .map_err(|e| format!("systemctl: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!(
            "systemctl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A unit's `ActiveState` and `SubState` (`active`/`running`, `activating`/`auto-restart`, …);
/// empty when systemd does not answer.
fn unit_state(unit: &str) -> (String, String) {
    let text =
        systemctl(&["show", unit, "-p", "ActiveState", "-p", "SubState"]).unwrap_or_default();
    let value = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .unwrap_or_default()
            .to_string()
    };
    (value("ActiveState"), value("SubState"))
}

impl Supervisor for Systemd {
    /// Writes the unit; (re)starts it when it changed or is not running, so an agent restart
    /// leaves running services alone.
    fn start(&mut self, service: &Service) -> Result<(), BringupError> {
        let unit = unit_name(&service.name);
        let path = self.unit_dir.join(&unit);
        let content = unit_file(service);
        let err = |reason: String| BringupError::Start {
            service: service.name.to_string(),
            reason,
        };
        let changed = std::fs::read_to_string(&path).ok().as_deref() != Some(content.as_str());
        if changed {
            std::fs::create_dir_all(&self.unit_dir)
                .and_then(|()| std::fs::write(&path, &content))
                .map_err(|e| err(format!("writing {}: {e}", path.display())))?;
            systemctl(&["daemon-reload"]).map_err(err)?;
        }
        let active = unit_state(&unit).0 == "active";
        if changed || !active {
            systemctl(&["restart", &unit]).map_err(err)?;
        }
        if !self.started.contains(&unit) {
            self.started.push(unit);
        }
        Ok(())
    }

    /// A unit that failed, or stopped and waits for systemd to restart it, is down.
    fn check(&mut self, only: Option<&str>) -> Result<(), BringupError> {
        for unit in &self.started {
            if only.is_some_and(|name| unit_name(name) != *unit) {
                continue;
            }
            let (state, sub) = unit_state(unit);
            if state == "failed" || sub == "auto-restart" {
                let service = unit
                    .trim_start_matches("kiln-")
                    .trim_end_matches(".service");
                return Err(BringupError::Exited {
                    service: service.to_string(),
                    status: format!("{state} ({sub})"),
                    log: self.log_tail(service),
                });
            }
        }
        Ok(())
    }

    fn log_tail(&self, service: &str) -> String {
        Command::new("journalctl")
            .args(["--no-pager", "-o", "cat", "-n", "30", "-u"])
            .arg(unit_name(service))
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_else(|e| format!("(journalctl: {e})"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_quote_every_word_and_escape_what_systemd_expands() {
        let s = Service {
            name: "containerd".into(),
            argv: vec![
                "/usr/bin/containerd".into(),
                "--config=/etc/containerd/kiln.toml".into(),
                r#"a "b" 100% $HOME\n"#.into(),
            ],
        };
        let unit = unit_file(&s);
        assert!(
            unit.contains(
                r#"ExecStart="/usr/bin/containerd" "--config=/etc/containerd/kiln.toml" "a \"b\" 100%% $$HOME\\n""#
            ),
            "{unit}"
        );
        assert!(unit.contains("KillMode=process\n"), "{unit}");
        assert!(unit.contains("Restart=always\n"), "{unit}");
        let kubelet = unit_file(&Service {
            name: "kubelet".into(),
            argv: vec!["/usr/lib/kiln/kubernetes/kubelet".into()],
        });
        assert!(!kubelet.contains("KillMode"), "{kubelet}");
        assert_eq!(unit_name("kubelet"), "kiln-kubelet.service");
    }
}
