//! The leading replica follows its Machines while it drives them: each change goes to the
//! netboot services as a new inventory (their per-MAC decisions), and a Machine being deleted
//! is withdrawn from the rollout before its finalizer lets it go.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kiln_spec::Inventory;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};

use crate::controller::{Requests, inventory_of};
use crate::crd::Machine;
use crate::rollout::Shared;
use crate::store::StoreError;

/// Held on every Machine a replica drives, so that a deleted Machine stays until the rollout
/// has let go of it (failed it where it stood, its last status and Event written).
pub const FINALIZER: &str = "kiln.dev/rollout";

/// Why a withdrawn node failed.
pub const DELETED: &str = "its Machine was deleted";

/// Puts and takes the rollout's finalizer on Machines.
#[derive(Clone, Debug)]
pub struct Holder {
    pub(crate) machines: Api<Machine>,
    pub(crate) requests: Requests,
    pub(crate) concurrency: usize,
}

/// Whether `m` is being deleted (held by a finalizer until let go of).
pub(crate) fn being_deleted(m: &Machine) -> bool {
    m.meta().deletion_timestamp.is_some()
}

fn holds(m: &Machine) -> bool {
    m.finalizers().iter().any(|f| f == FINALIZER)
}

impl Holder {
    /// Sets the finalizer on (`on`) or off each of `machines` that needs it.
    pub async fn set(&self, machines: &[&Machine], on: bool) -> Result<(), StoreError> {
        // A loop, not stream combinators over closures: the caller's future stays `Send`.
        let mut pending = futures::stream::FuturesUnordered::new();
        let mut results = Vec::new();
        for m in machines.iter().copied().filter(|m| holds(m) != on) {
            if pending.len() >= self.concurrency
                && let Some(r) = pending.next().await
            {
                results.push(r);
            }
            pending.push(self.set_one(m.clone(), on));
        }
        while let Some(r) = pending.next().await {
            results.push(r);
        }
        results.into_iter().collect()
    }

    async fn set_one(&self, mut machine: Machine, on: bool) -> Result<(), StoreError> {
        let name = machine.name_any();
        let what = if on { "holding" } else { "letting go of" };
        loop {
            if holds(&machine) == on {
                return Ok(());
            }
            let mut finalizers: Vec<String> = machine.finalizers().to_vec();
            if on {
                finalizers.push(FINALIZER.into());
            } else {
                finalizers.retain(|f| f != FINALIZER);
            }
            // The list as it was read, checked by its resource version: another writer's
            // change in between is read again rather than lost.
            let patch = serde_json::json!({"metadata": {
                "finalizers": finalizers,
                "resourceVersion": machine.resource_version(),
            }});
            let patched = self
                .requests
                .call(
                    format!("{what} Machine {name}"),
                    self.machines
                        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch)),
                )
                .await;
            let code = match &patched {
                Err(StoreError::Kube {
                    source: kube::Error::Api(e),
                    ..
                }) => e.code,
                _ => return patched.map(drop),
            };
            match code {
                404 => return Ok(()),
                409 => {
                    machine = match self
                        .requests
                        .call(
                            format!("reading Machine {name}"),
                            self.machines.get_opt(&name),
                        )
                        .await?
                    {
                        Some(m) => m,
                        None => return Ok(()),
                    }
                }
                _ => return patched.map(drop),
            }
        }
    }

    /// Lets go of every Machine in `names` (the rollout is over): read again, as their
    /// finalizers may have changed since.
    pub async fn release(&self, names: &BTreeSet<String>) -> Result<(), StoreError> {
        let mut held = Vec::new();
        let mut params = ListParams::default().limit(500);
        loop {
            let page = self
                .requests
                .call("listing Machines", self.machines.list(&params))
                .await?;
            held.extend(
                page.items
                    .into_iter()
                    .filter(|m| holds(m) && names.contains(&m.name_any())),
            );
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(next) => params = params.continue_token(&next),
                None => break,
            }
        }
        self.set(&held.iter().collect::<Vec<_>>(), false).await
    }
}

/// The Machines netboot serves: all but those being deleted.
pub fn served(machines: &BTreeMap<String, Machine>) -> Inventory {
    let live: Vec<Machine> = machines
        .values()
        .filter(|m| !being_deleted(m))
        .cloned()
        .collect();
    inventory_of(&live)
}

/// Follows the namespace's Machines until dropped: sends each changed inventory on
/// `inventories`, withdraws a driven Machine that is being deleted or is gone, and lets go of
/// it once its withdrawal is committed.
pub async fn follow(
    holder: Holder,
    shared: Arc<Shared>,
    driven: BTreeSet<String>,
    mut known: BTreeMap<String, Machine>,
    inventories: tokio::sync::watch::Sender<Inventory>,
) {
    let mut withdrawn = BTreeSet::new();
    let mut relisted: Option<BTreeMap<String, Machine>> = None;
    let events = watcher(holder.machines.clone(), watcher::Config::default()).default_backoff();
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        // Most events are the rollout's own status writes: only a change of what netboot
        // serves or of a deletion is looked at (with thousands of Machines, every event
        // would cost a whole inventory).
        let changed = match event {
            Ok(watcher::Event::Apply(m)) => {
                let name = m.name_any();
                let served_differently = known.get(&name).is_none_or(|old| {
                    old.spec != m.spec
                        || old.labels() != m.labels()
                        || being_deleted(old) != being_deleted(&m)
                });
                known.insert(name, m);
                served_differently
            }
            Ok(watcher::Event::Delete(m)) => known.remove(&m.name_any()).is_some(),
            Ok(watcher::Event::Init) => {
                relisted = Some(BTreeMap::new());
                false
            }
            Ok(watcher::Event::InitApply(m)) => {
                relisted.get_or_insert_default().insert(m.name_any(), m);
                false
            }
            Ok(watcher::Event::InitDone) => {
                known = relisted.take().unwrap_or_default();
                true
            }
            Err(e) => {
                tracing::warn!("watching the Machines: {e}");
                false
            }
        };
        if !changed {
            continue;
        }
        for name in &driven {
            let machine = known.get(name);
            if withdrawn.contains(name) || machine.is_some_and(|m| !being_deleted(m)) {
                continue;
            }
            tracing::info!(machine = %name, "withdrawn from the rollout: {DELETED}");
            shared.withdraw(name, DELETED);
            withdrawn.insert(name.clone());
            if let Some(m) = machine.filter(|m| holds(m)).cloned() {
                tokio::spawn(let_go(holder.clone(), shared.clone(), m));
            }
        }
        let inventory = served(&known);
        inventories.send_if_modified(|current| {
            let changed = current.spec.nodes != inventory.spec.nodes;
            if changed {
                current.spec.nodes = inventory.spec.nodes;
            }
            changed
        });
    }
}

/// Takes the finalizer off `machine` once its node's withdrawal is committed.
async fn let_go(holder: Holder, shared: Arc<Shared>, machine: Machine) {
    let name = machine.name_any();
    let committed = async {
        while !shared.stage(&name).is_some_and(|s| s.is_done()) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    // A commit that does not come (the API server unreachable) still lets the delete finish.
    if tokio::time::timeout(Duration::from_secs(60), committed)
        .await
        .is_err()
    {
        tracing::warn!(machine = %name, "its withdrawal was not committed in 60 s: let go of anyway");
    }
    if let Err(e) = holder.set_one(machine, false).await {
        tracing::warn!(machine = %name, "{e}");
    }
}
