use std::path::PathBuf;
use std::time::Duration;

/// Errors of the cluster layer; callers branch on integrity, timeouts and blocked maintenance.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("lock file {path}:\n  {}", .problems.join("\n  "))]
    Lock { path: String, problems: Vec<String> },
    #[error("manifest integrity check failed, nothing applied:\n  {}",
        .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  "))]
    Integrity(Vec<ChecksumMismatch>),
    #[error("fetching {url}: {source}")]
    Fetch {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{source_path}: {reason}")]
    Manifest { source_path: String, reason: String },
    /// The API server's message only (kube's Display repeats the whole Status).
    #[error("{context}: {}", kube_message(.error))]
    Kube { context: String, error: kube::Error },
    #[error("kubeconfig {path}: {reason}")]
    Kubeconfig { path: PathBuf, reason: String },
    #[error("timed out after {}: {condition}", humantime::format_duration(*.after))]
    Timeout { after: Duration, condition: String },
    #[error("maintenance of node {node} is blocked:\n{report}")]
    Blocked { node: String, report: String },
    #[error("migration {migration} of VirtualMachineInstance {vmi} failed: {reason}")]
    MigrationFailed {
        migration: String,
        vmi: String,
        reason: String,
    },
    #[error("ceph admin command `{command}`: {reason}")]
    Ceph { command: String, reason: String },
    /// A node service that would not start or stopped (boxed: bring-up errors hold these).
    #[error(transparent)]
    Service(Box<crate::node::bringup::BringupError>),
}

/// One file whose content does not match the sha256 the lock file pins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChecksumMismatch {
    pub path: String,
    pub expected: String,
    pub actual: String,
}

impl std::fmt::Display for ChecksumMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: sha256 {} does not match the pinned {}",
            self.path, self.actual, self.expected
        )
    }
}

impl From<crate::node::bringup::BringupError> for Error {
    fn from(e: crate::node::bringup::BringupError) -> Error {
        Error::Service(Box::new(e))
    }
}

impl Error {
    pub(crate) fn kube(context: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
        let context = context.into();
        move |error| Error::Kube { context, error }
    }
}

/// The HTTP status of an API error, if the server answered with one.
pub(crate) fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

fn kube_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(status) => format!("{} (HTTP {})", status.message, status.code),
        other => other.to_string(),
    }
}
