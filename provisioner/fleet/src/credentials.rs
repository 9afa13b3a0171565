//! The fleet's credentials (the cluster's CAs, bootstrap token and service-account key, the
//! Ceph keys, the admin CA) shared by the controller's replicas through one Secret: whichever
//! replica leads first puts its state directory's there, and every replica after takes them
//! from it, so the nodes of one fleet always join one cluster.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::api::{Api, PostParams};

use crate::cluster::{ClusterError, FleetSecrets, SECRETS_DIR, create_dir_private, write_private};

/// The Secret, in the Rollout's namespace, holding one key per credentials file.
pub const CREDENTIALS_SECRET: &str = "kiln-fleet-credentials";

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("{what}: {source}")]
    Kube {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error(transparent)]
    Local(#[from] ClusterError),
    #[error(
        "{} holds other fleet credentials than Secret {namespace}/{CREDENTIALS_SECRET} ({file} \
         differs): nodes served from it would not join the fleet's cluster; give this replica \
         an empty --state-dir",
        .dir.display()
    )]
    Differ {
        dir: PathBuf,
        namespace: String,
        file: String,
    },
    #[error("Secret {namespace}/{CREDENTIALS_SECRET} has a key {key:?} that is not a file name")]
    BadKey { namespace: String, key: String },
}

/// Where the state directory's credentials came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    /// Taken from the Secret (those already there checked against it).
    FromCluster,
    /// The state directory's (made now if it had none) put into the Secret.
    ToCluster,
}

fn kube_err(what: &str) -> impl FnOnce(kube::Error) -> CredentialsError + '_ {
    move |source| CredentialsError::Kube {
        what: what.into(),
        source,
    }
}

/// The credentials files in `dir`, by name.
fn read_files(dir: &Path) -> Result<BTreeMap<String, Vec<u8>>, ClusterError> {
    let io = |source| ClusterError::Io {
        what: "reading",
        path: dir.to_path_buf(),
        source,
    };
    let mut files = BTreeMap::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(files),
        Err(e) => return Err(io(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        // A temporary file of an interrupted write is not a credential.
        if !entry.file_type().map_err(io)?.is_file() || name.ends_with(".tmp") {
            continue;
        }
        files.insert(name, std::fs::read(entry.path()).map_err(io)?);
    }
    Ok(files)
}

/// Makes `state_dir`'s credentials the fleet's in the cluster: taken from the Secret of
/// `namespace` when it exists (refused when the directory holds others), else made if need be
/// and put there.
pub async fn share(
    client: &Client,
    namespace: &str,
    state_dir: &Path,
) -> Result<Sharing, CredentialsError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let dir = state_dir.join(SECRETS_DIR);
    loop {
        let found = secrets
            .get_opt(CREDENTIALS_SECRET)
            .await
            .map_err(kube_err("reading the fleet's credentials Secret"))?;
        if let Some(secret) = found {
            let local = read_files(&dir)?;
            let shared = secret.data.unwrap_or_default();
            for (key, ByteString(bytes)) in &shared {
                if key.starts_with('.') || key.contains('/') {
                    return Err(CredentialsError::BadKey {
                        namespace: namespace.into(),
                        key: key.clone(),
                    });
                }
                if local.get(key).is_some_and(|mine| mine != bytes) {
                    return Err(CredentialsError::Differ {
                        dir,
                        namespace: namespace.into(),
                        file: key.clone(),
                    });
                }
            }
            create_dir_private(&dir)?;
            for (key, ByteString(bytes)) in &shared {
                if !local.contains_key(key) {
                    write_private(&dir.join(key), bytes)?;
                }
            }
            return Ok(Sharing::FromCluster);
        }
        FleetSecrets::load_or_create(state_dir)?;
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(CREDENTIALS_SECRET.into()),
                namespace: Some(namespace.into()),
                ..ObjectMeta::default()
            },
            data: Some(
                read_files(&dir)?
                    .into_iter()
                    .map(|(name, bytes)| (name, ByteString(bytes)))
                    .collect(),
            ),
            type_: Some("Opaque".into()),
            ..Secret::default()
        };
        match secrets.create(&PostParams::default(), &secret).await {
            Ok(_) => return Ok(Sharing::ToCluster),
            // Made meanwhile by another: compared with it on the next turn.
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(kube_err("putting the fleet's credentials in a Secret")(e)),
        }
    }
}
