//! The Ceph admin path maintenance uses to keep Ceph calm while a node's OSDs go away:
//! `noout` per OSD, so Ceph does not start rebalancing data for a planned absence.

use tokio::process::Command;

use crate::Error;

/// Sets and clears per-OSD `noout`. Calls must be idempotent (maintenance resumes by
/// repeating them).
#[async_trait::async_trait]
pub trait CephAdmin: Send + Sync {
    async fn add_noout(&self, osds: &[u32]) -> Result<(), Error>;
    async fn rm_noout(&self, osds: &[u32]) -> Result<(), Error>;
}

/// Runs the `ceph` CLI through a configurable command prefix, e.g. `ceph` on a host with an
/// admin keyring, or `kubectl -n rook-ceph exec deploy/rook-ceph-tools -- ceph`.
#[derive(Debug, Clone)]
pub struct CephCli {
    prefix: Vec<String>,
}

impl CephCli {
    /// `prefix` is split on whitespace; it must end with the `ceph` executable.
    pub fn new(prefix: &str) -> Result<CephCli, Error> {
        let prefix: Vec<String> = prefix.split_whitespace().map(str::to_string).collect();
        if prefix.is_empty() {
            return Err(Error::Ceph {
                command: String::new(),
                reason: "empty ceph command".into(),
            });
        }
        Ok(CephCli { prefix })
    }

    /// The full command line for `ceph osd <verb> osd.N…`.
    pub fn command_line(&self, verb: &str, osds: &[u32]) -> Vec<String> {
        let mut argv = self.prefix.clone();
        argv.extend(["osd".to_string(), verb.to_string()]);
        argv.extend(osds.iter().map(|id| format!("osd.{id}")));
        argv
    }

    /// Async: maintenance runs it on its runtime, and a `ceph` call can take seconds.
    async fn run(&self, verb: &str, osds: &[u32]) -> Result<(), Error> {
        if osds.is_empty() {
            return Ok(());
        }
        let argv = self.command_line(verb, osds);
        let command = argv.join(" ");
        let output = Command::new(&argv[0])
            .args(&argv[1..])
            .output()
            .await
            .map_err(|e| Error::Ceph {
                command: command.clone(),
                reason: e.to_string(),
            })?;
        if !output.status.success() {
            return Err(Error::Ceph {
                command,
                reason: format!(
                    "{}: {}",
                    output.status,
                    String::from_utf8_lossy(&output.stderr).trim()
                ),
            });
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl CephAdmin for CephCli {
    async fn add_noout(&self, osds: &[u32]) -> Result<(), Error> {
        self.run("add-noout", osds).await
    }

    async fn rm_noout(&self, osds: &[u32]) -> Result<(), Error> {
        self.run("rm-noout", osds).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn command_lines_and_failures() {
        let cli = CephCli::new("kubectl -n rook-ceph exec deploy/rook-ceph-tools -- ceph").unwrap();
        assert_eq!(
            cli.command_line("add-noout", &[3, 7]).join(" "),
            "kubectl -n rook-ceph exec deploy/rook-ceph-tools -- ceph osd add-noout osd.3 osd.7"
        );
        // A real process: `false` stands in for a ceph that refuses.
        let err = CephCli::new("false")
            .unwrap()
            .add_noout(&[1])
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("ceph admin command `false osd add-noout osd.1`: exit status: 1"),
            "{err}"
        );
        // Nothing to do runs nothing.
        CephCli::new("/nonexistent/ceph")
            .unwrap()
            .rm_noout(&[])
            .await
            .unwrap();
        assert!(CephCli::new(" ").is_err());
    }
}
