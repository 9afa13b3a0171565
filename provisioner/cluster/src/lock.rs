//! The lock of pinned upstream manifests (`overlays/upstream.lock.yaml`): per addon, the files
//! to apply, each with the URL it comes from and its sha256.

use serde::{Deserialize, Serialize};

use crate::Error;

/// The lock file shipped with kiln.
pub const EMBEDDED: &str = kiln_overlays::UPSTREAM_LOCK;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lock {
    pub version: u32,
    pub addons: Vec<Addon>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Addon {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Namespace for namespaced objects that do not name one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub files: Vec<PinnedFile>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinnedFile {
    /// Path inside a mirror directory (`<project>/<tag>/<path in the upstream repository>`).
    pub path: String,
    pub url: String,
    pub sha256: String,
}

impl Lock {
    /// Parses and validates a lock; `origin` names it in errors. Reports every problem at once.
    pub fn parse(text: &str, origin: &str) -> Result<Lock, Error> {
        let lock: Lock = serde_saphyr::from_str(text).map_err(|e| Error::Lock {
            path: origin.to_string(),
            problems: vec![e.to_string()],
        })?;
        let problems = lock.problems();
        if problems.is_empty() {
            Ok(lock)
        } else {
            Err(Error::Lock {
                path: origin.to_string(),
                problems,
            })
        }
    }

    /// Only the addons named (in the lock's order): those an appliance spec's features
    /// select. A name the lock does not pin is an error naming it.
    pub fn select(&self, names: &[String], origin: &str) -> Result<Lock, Error> {
        let missing: Vec<String> = names
            .iter()
            .filter(|n| !self.addons.iter().any(|a| &a.name == *n))
            .map(|n| format!("addon {n:?} is selected by the spec but not pinned in the lock"))
            .collect();
        if !missing.is_empty() {
            return Err(Error::Lock {
                path: origin.to_string(),
                problems: missing,
            });
        }
        Ok(Lock {
            version: self.version,
            addons: self
                .addons
                .iter()
                .filter(|a| names.contains(&a.name))
                .cloned()
                .collect(),
        })
    }

    /// The lock compiled into kiln.
    pub fn embedded() -> Result<Lock, Error> {
        Lock::parse(EMBEDDED, "overlays/upstream.lock.yaml (embedded)")
    }

    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.version != 1 {
            problems.push(format!(
                "version: {} is not supported (expected 1)",
                self.version
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        let mut paths = std::collections::BTreeSet::new();
        for (i, addon) in self.addons.iter().enumerate() {
            let at = format!("addons[{i}]");
            if !names.insert(addon.name.as_str()) {
                problems.push(format!("{at}.name: duplicate addon {:?}", addon.name));
            }
            if addon.files.is_empty() {
                problems.push(format!("{at}.files: empty"));
            }
            for (j, file) in addon.files.iter().enumerate() {
                let at = format!("{at}.files[{j}]");
                if file.path.is_empty()
                    || file.path.starts_with('/')
                    || file.path.split('/').any(|c| c == ".." || c.is_empty())
                {
                    problems.push(format!(
                        "{at}.path: {:?} must be a relative path without ..",
                        file.path
                    ));
                }
                if !paths.insert(file.path.as_str()) {
                    problems.push(format!("{at}.path: {:?} listed twice", file.path));
                }
                if !file.url.starts_with("https://") {
                    problems.push(format!("{at}.url: {:?} must be an https URL", file.url));
                }
                if file.sha256.len() != 64
                    || !file
                        .sha256
                        .bytes()
                        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
                {
                    problems.push(format!(
                        "{at}.sha256: {:?} is not 64 lower-case hex digits",
                        file.sha256
                    ));
                }
            }
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn select_keeps_the_lock_order_and_names_unpinned_addons() {
        let lock = Lock::embedded().unwrap();
        let all: Vec<String> = lock.addons.iter().map(|a| a.name.clone()).collect();
        let picked = lock
            .select(&[all[2].clone(), all[0].clone()], "lock")
            .unwrap();
        assert_eq!(
            picked.addons.iter().map(|a| &a.name).collect::<Vec<_>>(),
            [&all[0], &all[2]]
        );
        let e = lock.select(&["nope".into()], "lock").unwrap_err();
        assert!(
            e.to_string()
                .contains("addon \"nope\" is selected by the spec but not pinned"),
            "{e}"
        );
    }

    #[test]
    fn embedded_lock_is_valid() {
        let lock = Lock::embedded().unwrap();
        let names: Vec<_> = lock.addons.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(
            names,
            ["volume-snapshots", "multus", "kubevirt", "rook-ceph"]
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_field_path() {
        let text = r#"
version: 2
addons:
  - name: a
    files:
      - path: ../x.yaml
        url: http://example.org/x.yaml
        sha256: ABC
  - name: a
    files: []
"#;
        let err = Lock::parse(text, "lock.yaml").unwrap_err().to_string();
        assert_eq!(
            err,
            "lock file lock.yaml:\n  version: 2 is not supported (expected 1)\n  \
             addons[0].files[0].path: \"../x.yaml\" must be a relative path without ..\n  \
             addons[0].files[0].url: \"http://example.org/x.yaml\" must be an https URL\n  \
             addons[0].files[0].sha256: \"ABC\" is not 64 lower-case hex digits\n  \
             addons[1].name: duplicate addon \"a\"\n  addons[1].files: empty"
        );
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = Lock::parse("version: 1\naddons: []\nextra: 1\n", "l").unwrap_err();
        assert!(err.to_string().contains("extra"), "{err}");
    }
}
