//! Getting the pinned manifests: from an offline mirror directory, or over HTTPS into a cache
//! keyed by sha256. Every file is verified before any is parsed, so a tampered mirror applies
//! nothing.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::lock::{Lock, PinnedFile};
use crate::{ChecksumMismatch, Error};

/// Where the pinned files come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// An offline mirror: each file at `DIR/<path>` (airgap installs, tests).
    Mirror(PathBuf),
    /// Download each `url` once into `DIR/<sha256>`.
    Cache(PathBuf),
}

/// One verified manifest file.
#[derive(Debug, Clone)]
pub struct FetchedFile {
    pub addon: String,
    pub path: String,
    /// The addon's namespace for objects that do not name one.
    pub namespace: Option<String>,
    pub text: String,
}

/// Fetches and verifies every file of `lock`. All mismatches are reported together.
pub async fn fetch_all(lock: &Lock, source: &Source) -> Result<Vec<FetchedFile>, Error> {
    let http = match source {
        Source::Cache(_) => Some(
            reqwest::Client::builder()
                .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
                .build()
                .map_err(|e| Error::Fetch {
                    url: String::new(),
                    source: e,
                })?,
        ),
        Source::Mirror(_) => None,
    };
    let mut files = Vec::new();
    let mut mismatches = Vec::new();
    for addon in &lock.addons {
        for file in &addon.files {
            let bytes = match source {
                Source::Mirror(dir) => read(&dir.join(&file.path)).await?,
                Source::Cache(dir) => {
                    cached(http.as_ref().expect("cache source has a client"), dir, file).await?
                }
            };
            match verify(file, &bytes) {
                Ok(()) => {}
                Err(m) => {
                    mismatches.push(m);
                    continue;
                }
            }
            let text = String::from_utf8(bytes).map_err(|_| Error::Manifest {
                source_path: file.path.clone(),
                reason: "not UTF-8 text".into(),
            })?;
            files.push(FetchedFile {
                addon: addon.name.clone(),
                path: file.path.clone(),
                namespace: addon.namespace.clone(),
                text,
            });
        }
    }
    if mismatches.is_empty() {
        Ok(files)
    } else {
        Err(Error::Integrity(mismatches))
    }
}

/// Checks `bytes` against the pinned sha256.
pub fn verify(file: &PinnedFile, bytes: &[u8]) -> Result<(), ChecksumMismatch> {
    let actual = hex::encode(Sha256::digest(bytes));
    if actual == file.sha256 {
        Ok(())
    } else {
        Err(ChecksumMismatch {
            path: file.path.clone(),
            expected: file.sha256.clone(),
            actual,
        })
    }
}

async fn read(path: &Path) -> Result<Vec<u8>, Error> {
    tokio::fs::read(path).await.map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The cached copy when it verifies, else a fresh download stored atomically.
async fn cached(http: &reqwest::Client, dir: &Path, file: &PinnedFile) -> Result<Vec<u8>, Error> {
    let path = dir.join(&file.sha256);
    if let Ok(bytes) = tokio::fs::read(&path).await
        && verify(file, &bytes).is_ok()
    {
        return Ok(bytes);
    }
    tracing::info!("downloading {}", file.url);
    let fetch = |source| Error::Fetch {
        url: file.url.clone(),
        source,
    };
    let bytes = http
        .get(&file.url)
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(fetch)?
        .bytes()
        .await
        .map_err(fetch)?;
    if verify(file, &bytes).is_ok() {
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };
        tokio::fs::create_dir_all(dir).await.map_err(io)?;
        let tmp = dir.join(format!(".{}.{}", file.sha256, std::process::id()));
        tokio::fs::write(&tmp, &bytes).await.map_err(io)?;
        tokio::fs::rename(&tmp, &path).await.map_err(io)?;
    }
    Ok(bytes.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lock::Addon;

    fn lock_for(files: &[(&str, &[u8])]) -> Lock {
        Lock {
            version: 1,
            addons: vec![Addon {
                name: "a".into(),
                description: String::new(),
                namespace: None,
                files: files
                    .iter()
                    .map(|(p, content)| PinnedFile {
                        path: p.to_string(),
                        url: format!("https://example.org/{p}"),
                        sha256: hex::encode(Sha256::digest(content)),
                    })
                    .collect(),
            }],
        }
    }

    #[tokio::test]
    async fn mirror_files_are_verified_and_every_mismatch_reported() {
        let dir = tempfile::tempdir().unwrap();
        let lock = lock_for(&[
            ("x/one.yaml", b"a: 1\n"),
            ("two.yaml", b"b: 2\n"),
            ("three.yaml", b"c: 3\n"),
        ]);
        std::fs::create_dir_all(dir.path().join("x")).unwrap();
        std::fs::write(dir.path().join("x/one.yaml"), "a: 1\n").unwrap();
        std::fs::write(dir.path().join("two.yaml"), "b: 666\n").unwrap();
        std::fs::write(dir.path().join("three.yaml"), "c: 4\n").unwrap();
        let err = fetch_all(&lock, &Source::Mirror(dir.path().into()))
            .await
            .unwrap_err();
        let Error::Integrity(m) = &err else {
            panic!("{err}")
        };
        assert_eq!(
            m.iter().map(|m| m.path.as_str()).collect::<Vec<_>>(),
            ["two.yaml", "three.yaml"]
        );
        assert!(err.to_string().contains("nothing applied"), "{err}");

        std::fs::write(dir.path().join("two.yaml"), "b: 2\n").unwrap();
        std::fs::write(dir.path().join("three.yaml"), "c: 3\n").unwrap();
        let files = fetch_all(&lock, &Source::Mirror(dir.path().into()))
            .await
            .unwrap();
        assert_eq!(files[0].text, "a: 1\n");
    }

    #[tokio::test]
    async fn a_valid_cache_entry_is_used_without_the_network() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let lock = lock_for(&[("one.yaml", b"a: 1\n")]);
        std::fs::write(dir.path().join(&lock.addons[0].files[0].sha256), "a: 1\n").unwrap();
        // example.org is never contacted: the cached copy verifies.
        let files = fetch_all(&lock, &Source::Cache(dir.path().into()))
            .await
            .unwrap();
        assert_eq!(files[0].text, "a: 1\n");
    }
}
