//! The rollout's durable state: an embedded redb database under the state directory. It holds
//! each node's progress, every phone-home report (the node's own history of its installs), and
//! the hashes of the enrolment tokens handed out. Every change is one committed transaction,
//! so a rollout killed at any moment resumes from the last thing each node reported.
//!
//! One process writes (the rollout); `kiln fleet status` opens the same file read-only while it
//! runs (redb's single-writer mode).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kiln_spec::enrol::Report;
use kiln_spec::inventory::NodeRole;
use redb::{
    Builder, ConcurrencyMode, Database, ReadOnlyDatabase, ReadableDatabase, ReadableTable,
    TableDefinition,
};
use serde::{Deserialize, Serialize};

use crate::stage::NodeProgress;
use crate::upgrade::NodeUpgrade;

/// Node name → its progress (JSON).
const NODES: TableDefinition<&str, &str> = TableDefinition::new("nodes");
/// (node, sequence) → a phone-home report with its time (JSON).
const REPORTS: TableDefinition<(&str, u64), &str> = TableDefinition::new("reports");
/// (node, sequence) → sha256 of an enrolment token; all of a node's tokens stay valid until it
/// is ready, so a node that fetched its script before a restart can still report.
const TOKENS: TableDefinition<(&str, u64), &str> = TableDefinition::new("tokens");
/// Node name → its rolling upgrade's progress (JSON).
const UPGRADES: TableDefinition<&str, &str> = TableDefinition::new("upgrades");
/// Settings of the rollout and of the upgrade that wrote the store (JSON under `rollout` and
/// `upgrade`).
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");

pub const FILE_NAME: &str = "fleet.redb";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the fleet state {path} is in use by another rollout (one writer at a time)")]
    Busy { path: PathBuf },
    #[error("fleet state {path}: {source}")]
    Db {
        path: PathBuf,
        #[source]
        source: redb::Error,
    },
    #[error("fleet state {path}: record {key}: {source}")]
    Record {
        path: PathBuf,
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("no fleet state at {0} (run `kiln fleet rollout` first)")]
    Missing(PathBuf),
    #[error("{node} is not a machine of {store}")]
    UnknownNode { node: String, store: String },
    #[error("{what}: {source}")]
    Kube {
        what: String,
        #[source]
        source: kube::Error,
    },
}

/// Where a rollout keeps its state: the embedded [`Store`] when one provisioner serves a rack,
/// the Machine resources of a cluster (`crate::controller::KubeStore`) when replicas share a
/// fleet. The rollout engine is the same over both.
pub trait RolloutStore: Send + Sync {
    /// Where the state is, for messages.
    fn location(&self) -> String;
    fn read(&self) -> Result<Snapshot, StoreError>;
    /// Commits the nodes' progress. After an error the engine takes the same step again, so a
    /// batch written in part is overwritten.
    fn put_nodes(&self, nodes: &[(String, NodeProgress)]) -> Result<(), StoreError>;
    fn set_rollout(&self, info: &RolloutInfo) -> Result<(), StoreError>;
    fn add_report(&self, node: &str, report: &StoredReport) -> Result<(), StoreError>;
    fn add_token_hash(&self, node: &str, hash: &str) -> Result<(), StoreError>;
}

impl RolloutStore for Store {
    fn location(&self) -> String {
        self.path.display().to_string()
    }
    fn read(&self) -> Result<Snapshot, StoreError> {
        Store::read(self)
    }
    fn put_nodes(&self, nodes: &[(String, NodeProgress)]) -> Result<(), StoreError> {
        Store::put_nodes(self, nodes)
    }
    fn set_rollout(&self, info: &RolloutInfo) -> Result<(), StoreError> {
        Store::set_rollout(self, info)
    }
    fn add_report(&self, node: &str, report: &StoredReport) -> Result<(), StoreError> {
        Store::add_report(self, node, report)
    }
    fn add_token_hash(&self, node: &str, hash: &str) -> Result<(), StoreError> {
        Store::add_token_hash(self, node, hash)
    }
}

/// A report as stored: when it came and what it said.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StoredReport {
    pub at_ms: u64,
    pub report: Report,
}

/// What a rolling upgrade was asked to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpgradeInfo {
    pub image: String,
    pub image_sha256: String,
    pub started_ms: u64,
    pub nodes: Vec<String>,
}

/// What a rollout was asked to do, kept so `status` can say it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutInfo {
    pub image_sha256: String,
    pub started_ms: u64,
    pub nodes: Vec<String>,
    /// What the fleet view shows of each node besides its progress (absent in stores written
    /// before it was kept).
    #[serde(default)]
    pub machines: BTreeMap<String, MachineInfo>,
}

/// A node as the inventory described it when the rollout started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MachineInfo {
    pub role: NodeRole,
    /// Boot MACs, canonical form: the keys of the node's netboot trace.
    pub macs: Vec<String>,
}

fn mode() -> Builder {
    let mut b = Builder::new();
    b.set_concurrency_mode(ConcurrencyMode::SingleWriter);
    b
}

/// The writer.
#[derive(Debug)]
pub struct Store {
    db: Database,
    path: PathBuf,
}

/// A read-only view (`kiln fleet status`).
pub struct StoreReader {
    db: ReadOnlyDatabase,
    path: PathBuf,
}

impl std::fmt::Debug for StoreReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreReader")
            .field("path", &self.path)
            .finish()
    }
}

fn db_err(path: &Path) -> impl Fn(redb::Error) -> StoreError + '_ {
    move |source| StoreError::Db {
        path: path.to_path_buf(),
        source,
    }
}

fn decode<T: serde::de::DeserializeOwned>(
    path: &Path,
    key: &str,
    text: &str,
) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|source| StoreError::Record {
        path: path.to_path_buf(),
        key: key.to_string(),
        source,
    })
}

fn encode<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("store records serialize")
}

impl Store {
    /// Opens (or creates) the store in `state_dir`.
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        let path = state_dir.join(FILE_NAME);
        std::fs::create_dir_all(state_dir).map_err(|e| db_err(&path)(redb::Error::Io(e)))?;
        let db = mode().create(&path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Busy { path: path.clone() },
            e => db_err(&path)(e.into()),
        })?;
        let store = Store { db, path };
        // Tables exist from the start, so readers never see a half-made store.
        store.write(|tx| {
            tx.open_table(NODES)?;
            tx.open_table(UPGRADES)?;
            tx.open_table(REPORTS)?;
            tx.open_table(TOKENS)?;
            tx.open_table(META)?;
            Ok(())
        })?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<(), StoreError> {
        let run = || -> Result<(), redb::Error> {
            let tx = self.db.begin_write()?;
            f(&tx)?;
            tx.commit()?;
            Ok(())
        };
        run().map_err(db_err(&self.path))
    }

    /// Adds `value` after the node's last entry in a `(node, sequence)` table.
    fn append(
        &self,
        table: TableDefinition<(&str, u64), &str>,
        node: &str,
        value: &str,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            let mut t = tx.open_table(table)?;
            let next = t
                .range((node, 0)..=(node, u64::MAX))?
                .next_back()
                .transpose()?
                .map_or(0, |(k, _)| k.value().1 + 1);
            t.insert((node, next), value)?;
            Ok(())
        })
    }

    /// Many nodes in one transaction (a rollout's start: one commit, not one per node).
    pub fn put_nodes(&self, nodes: &[(String, NodeProgress)]) -> Result<(), StoreError> {
        self.put_all(NODES, nodes)
    }

    pub fn put_upgrades(&self, nodes: &[(String, NodeUpgrade)]) -> Result<(), StoreError> {
        self.put_all(UPGRADES, nodes)
    }

    fn put_all<T: Serialize>(
        &self,
        table: TableDefinition<&str, &str>,
        rows: &[(String, T)],
    ) -> Result<(), StoreError> {
        let texts: Vec<(&str, String)> =
            rows.iter().map(|(n, p)| (n.as_str(), encode(p))).collect();
        self.write(|tx| {
            let mut t = tx.open_table(table)?;
            for (name, text) in &texts {
                t.insert(*name, text.as_str())?;
            }
            Ok(())
        })
    }

    pub fn set_rollout(&self, info: &RolloutInfo) -> Result<(), StoreError> {
        self.set_meta("rollout", info)
    }

    pub fn set_upgrade(&self, info: &UpgradeInfo) -> Result<(), StoreError> {
        self.set_meta("upgrade", info)
    }

    fn set_meta<T: Serialize>(&self, key: &str, value: &T) -> Result<(), StoreError> {
        let text = encode(value);
        self.write(|tx| {
            tx.open_table(META)?.insert(key, text.as_str())?;
            Ok(())
        })
    }

    /// Appends a report to the node's history.
    pub fn add_report(&self, node: &str, report: &StoredReport) -> Result<(), StoreError> {
        self.append(REPORTS, node, &encode(report))
    }

    pub fn add_token_hash(&self, node: &str, hash: &str) -> Result<(), StoreError> {
        self.append(TOKENS, node, hash)
    }

    pub fn read(&self) -> Result<Snapshot, StoreError> {
        snapshot(&self.db, &self.path)
    }
}

impl StoreReader {
    pub fn open(state_dir: &Path) -> Result<StoreReader, StoreError> {
        let path = state_dir.join(FILE_NAME);
        if !path.exists() {
            return Err(StoreError::Missing(path));
        }
        let db = mode()
            .open_read_only(&path)
            .map_err(|e| db_err(&path)(e.into()))?;
        Ok(StoreReader { db, path })
    }

    pub fn read(&self) -> Result<Snapshot, StoreError> {
        snapshot(&self.db, &self.path)
    }
}

/// Everything in the store at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub rollout: Option<RolloutInfo>,
    pub nodes: Vec<(String, NodeProgress)>,
    pub upgrade: Option<UpgradeInfo>,
    pub upgrades: Vec<(String, NodeUpgrade)>,
    pub reports: Vec<(String, StoredReport)>,
    /// (node, token sha256), oldest first per node.
    pub token_hashes: Vec<(String, String)>,
}

impl Snapshot {
    pub fn node(&self, name: &str) -> Option<&NodeProgress> {
        self.nodes.iter().find(|(n, _)| n == name).map(|(_, p)| p)
    }

    pub fn upgrade_of(&self, name: &str) -> Option<&NodeUpgrade> {
        self.upgrades
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p)
    }

    pub fn reports_of<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a StoredReport> {
        self.reports
            .iter()
            .filter(move |(n, _)| n == node)
            .map(|(_, r)| r)
    }
}

/// A table's rows as (key, JSON text); an absent table (a store from before it existed) has
/// none.
fn rows<K: redb::Key + 'static>(
    tx: &redb::ReadTransaction,
    table: TableDefinition<K, &str>,
    key: impl Fn(K::SelfType<'_>) -> String,
) -> Result<Vec<(String, String)>, redb::Error> {
    let t = match tx.open_table(table) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    for row in t.iter()? {
        let (k, v) = row?;
        out.push((key(k.value()), v.value().to_string()));
    }
    Ok(out)
}

fn decode_rows<T: serde::de::DeserializeOwned>(
    path: &Path,
    table: &str,
    rows: Vec<(String, String)>,
) -> Result<Vec<(String, T)>, StoreError> {
    rows.into_iter()
        .map(|(n, t)| Ok((n.clone(), decode(path, &format!("{table}/{n}"), &t)?)))
        .collect()
}

fn snapshot(db: &impl ReadableDatabase, path: &Path) -> Result<Snapshot, StoreError> {
    let read = || -> Result<_, redb::Error> {
        let tx = db.begin_read()?;
        let meta = rows(&tx, META, |k| k.to_string())?;
        let nodes = rows(&tx, NODES, |k| k.to_string())?;
        let upgrades = rows(&tx, UPGRADES, |k| k.to_string())?;
        let reports = rows(&tx, REPORTS, |k| k.0.to_string())?;
        let tokens = rows(&tx, TOKENS, |k| k.0.to_string())?;
        Ok((meta, nodes, upgrades, reports, tokens))
    };
    let (meta, nodes, upgrades, reports, tokens) = read().map_err(db_err(path))?;
    let meta_of = |key: &str| meta.iter().find(|(k, _)| k == key).map(|(_, v)| v);
    Ok(Snapshot {
        rollout: meta_of("rollout")
            .map(|t| decode(path, "meta/rollout", t))
            .transpose()?,
        upgrade: meta_of("upgrade")
            .map(|t| decode(path, "meta/upgrade", t))
            .transpose()?,
        nodes: decode_rows(path, "nodes", nodes)?,
        upgrades: decode_rows(path, "upgrades", upgrades)?,
        reports: decode_rows(path, "reports", reports)?,
        token_hashes: tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_spec::enrol::Phase;

    #[test]
    fn what_is_written_survives_a_reopen_and_readers_share_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut p = NodeProgress::new(5);
        p.installs = 1;
        store.put_nodes(&[("node-01".into(), p.clone())]).unwrap();
        store
            .add_report(
                "node-01",
                &StoredReport {
                    at_ms: 6,
                    report: Report::new(Phase::InstallerStarted, None),
                },
            )
            .unwrap();
        store
            .add_report(
                "node-01",
                &StoredReport {
                    at_ms: 7,
                    report: Report::new(Phase::Installed, None),
                },
            )
            .unwrap();
        store.add_token_hash("node-01", "aa").unwrap();
        store.add_token_hash("node-01", "bb").unwrap();
        // A second writer is refused while the first is open; a reader is not.
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::Busy { .. })
        ));
        let reader = StoreReader::open(dir.path()).unwrap();
        assert_eq!(reader.read().unwrap().node("node-01"), Some(&p));
        drop(reader);
        drop(store);

        let snap = Store::open(dir.path()).unwrap().read().unwrap();
        assert_eq!(snap.node("node-01"), Some(&p));
        let phases: Vec<Phase> = snap.reports_of("node-01").map(|r| r.report.phase).collect();
        assert_eq!(phases, [Phase::InstallerStarted, Phase::Installed]);
        assert_eq!(
            snap.token_hashes,
            [
                ("node-01".to_string(), "aa".to_string()),
                ("node-01".to_string(), "bb".to_string())
            ]
        );
    }

    #[test]
    fn status_of_a_missing_store_says_how_to_make_one() {
        let dir = tempfile::tempdir().unwrap();
        let e = StoreReader::open(dir.path()).unwrap_err();
        assert!(e.to_string().contains("kiln fleet rollout"), "{e}");
    }
}
