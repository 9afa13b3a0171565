//! A kube client from a kubeconfig file.

use std::path::Path;

pub use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::Error;

/// Connects with the current context of the kubeconfig at `path`.
pub async fn from_kubeconfig(path: &Path) -> Result<kube::Client, Error> {
    let bad = |reason: String| Error::Kubeconfig {
        path: path.to_path_buf(),
        reason,
    };
    let kubeconfig = Kubeconfig::read_from(path).map_err(|e| bad(e.to_string()))?;
    let mut config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .map_err(|e| bad(e.to_string()))?;
    // kube retries 429 with exponential backoff for minutes; maintenance retries evictions
    // itself, against its own deadline, and says which PodDisruptionBudget refused.
    config.default_retry = false;
    kube::Client::try_from(config).map_err(|e| bad(e.to_string()))
}
