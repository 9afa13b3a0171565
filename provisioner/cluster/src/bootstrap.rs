//! Applying a [`BootstrapPlan`] with server-side apply (field manager `kiln`), phase by phase,
//! waiting for CRDs to be Established before their custom resources. `dry_run` asks the API
//! server what would change without changing anything.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::Mutex;

use crate::error::api_code;
use crate::plan::{BootstrapPlan, Phase, PlannedObject};
use crate::{Error, FIELD_MANAGER};

/// Applies at most this many objects at once.
const PARALLEL_APPLIES: usize = 8;

#[derive(Debug, Clone)]
pub struct BootstrapOptions {
    pub dry_run: bool,
    /// How long to wait for each condition (CRDs Established).
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Change {
    Created,
    Configured,
    Unchanged,
}

#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub phase: Phase,
    pub addon: String,
    pub api_version: String,
    pub object: String,
    pub change: Change,
    /// Field paths that differ (configured objects).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BootstrapReport {
    pub dry_run: bool,
    pub outcomes: Vec<Outcome>,
}

impl BootstrapReport {
    pub fn count(&self, change: Change) -> usize {
        self.outcomes.iter().filter(|o| o.change == change).count()
    }

    /// Objects created or configured.
    pub fn changed(&self) -> usize {
        self.count(Change::Created) + self.count(Change::Configured)
    }

    /// The changes, one line each, then the totals.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for o in self
            .outcomes
            .iter()
            .filter(|o| o.change != Change::Unchanged)
        {
            let verb = match (o.change, self.dry_run) {
                (Change::Created, false) => "created",
                (Change::Created, true) => "would create",
                (_, false) => "configured",
                (_, true) => "would configure",
            };
            out.push_str(&format!("{verb:<15} {} {}", o.api_version, o.object));
            if !o.fields.is_empty() {
                out.push_str(&format!(" ({})", o.fields.join(", ")));
            }
            out.push('\n');
        }
        out.push_str(&format!(
            "{} objects: {} changed ({} created, {} configured), {} unchanged{}\n",
            self.outcomes.len(),
            self.changed(),
            self.count(Change::Created),
            self.count(Change::Configured),
            self.count(Change::Unchanged),
            if self.dry_run {
                " (dry run: nothing applied)"
            } else {
                ""
            }
        ));
        out
    }
}

/// Applies `plan` in phase order. Idempotent: a second run reports 0 changed.
pub async fn bootstrap(
    client: &Client,
    plan: &BootstrapPlan,
    opts: &BootstrapOptions,
) -> Result<BootstrapReport, Error> {
    let resolver = Resolver {
        client: client.clone(),
        cache: Mutex::new(HashMap::new()),
    };
    let mut outcomes = Vec::new();
    for phase in [
        Phase::Crds,
        Phase::Namespaces,
        Phase::Resources,
        Phase::CustomResources,
    ] {
        let objects: Vec<&PlannedObject> = plan.phase(phase).collect();
        if objects.is_empty() {
            continue;
        }
        tracing::info!(
            "{} {} {phase}",
            if opts.dry_run { "checking" } else { "applying" },
            objects.len()
        );
        let done: Vec<Outcome> = futures::stream::iter(objects.iter().copied())
            .map(|o| apply_one(&resolver, o, opts.dry_run))
            .buffered(PARALLEL_APPLIES)
            .try_collect()
            .await?;
        outcomes.extend(done);
        if phase == Phase::Crds && !opts.dry_run {
            let names = plan.phase(Phase::Crds).map(|o| o.name.clone()).collect();
            wait_established(client, names, opts.timeout).await?;
        }
    }
    Ok(BootstrapReport {
        dry_run: opts.dry_run,
        outcomes,
    })
}

/// Resolves kinds to API resources once per kind (discovery of their group version).
struct Resolver {
    client: Client,
    cache: Mutex<HashMap<(String, String), Option<ApiResource>>>,
}

impl Resolver {
    /// `None` when the server does not serve the kind (yet): its CRD is not installed.
    async fn resolve(&self, api_version: &str, kind: &str) -> Result<Option<ApiResource>, Error> {
        let key = (api_version.to_string(), kind.to_string());
        if let Some(found) = self.cache.lock().await.get(&key) {
            return Ok(found.clone());
        }
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let gvk = GroupVersionKind::gvk(group, version, kind);
        let found = match kube::discovery::pinned_kind(&self.client, &gvk).await {
            Ok((ar, _)) => Some(ar),
            Err(kube::Error::Discovery(_)) => None,
            Err(e) if api_code(&e) == Some(404) => None,
            Err(e) => {
                return Err(Error::Kube {
                    context: format!("discovering {api_version} {kind}"),
                    error: e,
                });
            }
        };
        self.cache.lock().await.insert(key, found.clone());
        Ok(found)
    }
}

async fn apply_one(
    resolver: &Resolver,
    o: &PlannedObject,
    dry_run: bool,
) -> Result<Outcome, Error> {
    let outcome = |change, fields| Outcome {
        phase: o.phase,
        addon: o.addon.clone(),
        api_version: o.api_version.clone(),
        object: o.id(),
        change,
        fields,
    };
    let Some(ar) = resolver.resolve(&o.api_version, &o.kind).await? else {
        if dry_run {
            // Its CRD is part of this plan and not installed yet.
            return Ok(outcome(Change::Created, vec![]));
        }
        return Err(Error::Manifest {
            source_path: o.source.clone(),
            reason: format!("the API server does not serve {} {}", o.api_version, o.kind),
        });
    };
    let api: Api<DynamicObject> = match &o.namespace {
        Some(ns) => Api::namespaced_with(resolver.client.clone(), ns, &ar),
        None => Api::all_with(resolver.client.clone(), &ar),
    };
    let context = || format!("applying {} {}", o.api_version, o.id());
    let before = api.get_opt(&o.name).await.map_err(Error::kube(context()))?;
    let mut params = PatchParams::apply(FIELD_MANAGER).force();
    params.dry_run = dry_run;
    let after = match api.patch(&o.name, &params, &Patch::Apply(&o.object)).await {
        Ok(after) => after,
        // Dry run of an object whose namespace is only created by this plan.
        Err(e) if dry_run && before.is_none() && api_code(&e) == Some(404) => {
            return Ok(outcome(Change::Created, vec![]));
        }
        Err(e) => {
            return Err(Error::Kube {
                context: context(),
                error: e,
            });
        }
    };
    let Some(before) = before else {
        return Ok(outcome(Change::Created, vec![]));
    };
    let (before, after) = (to_value(&before), to_value(&after));
    let fields = changed_fields(&before, &after);
    let changed = if dry_run {
        !fields.is_empty()
    } else {
        before["metadata"]["resourceVersion"] != after["metadata"]["resourceVersion"]
    };
    Ok(if changed {
        outcome(Change::Configured, fields)
    } else {
        outcome(Change::Unchanged, vec![])
    })
}

fn to_value(o: &DynamicObject) -> Value {
    serde_json::to_value(o).unwrap_or(Value::Null)
}

/// Paths of the fields that differ between two versions of an object, ignoring what the
/// server maintains (status, resourceVersion, managedFields, …). At most 8, then `…`.
pub fn changed_fields(before: &Value, after: &Value) -> Vec<String> {
    fn strip(v: &Value) -> Value {
        let mut v = v.clone();
        if let Some(o) = v.as_object_mut() {
            o.remove("status");
        }
        if let Some(m) = v["metadata"].as_object_mut() {
            for k in [
                "managedFields",
                "resourceVersion",
                "generation",
                "uid",
                "creationTimestamp",
            ] {
                m.remove(k);
            }
        }
        v
    }
    fn walk(path: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
        match (a, b) {
            (Value::Object(a), Value::Object(b)) => {
                let keys: std::collections::BTreeSet<_> = a.keys().chain(b.keys()).collect();
                for k in keys {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    walk(
                        &p,
                        a.get(k).unwrap_or(&Value::Null),
                        b.get(k).unwrap_or(&Value::Null),
                        out,
                    );
                }
            }
            _ if a != b => out.push(path.to_string()),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk("", &strip(before), &strip(after), &mut out);
    if out.len() > 8 {
        out.truncate(8);
        out.push("…".into());
    }
    out
}

/// Waits until every named CRD has condition Established=True, reporting progress.
pub async fn wait_established(
    client: &Client,
    names: Vec<String>,
    timeout: Duration,
) -> Result<(), Error> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let start = Instant::now();
    let total = names.len();
    let mut pending = names;
    let mut last_report = Instant::now();
    loop {
        let mut still = Vec::new();
        let mut last_seen = String::new();
        for name in pending {
            let crd = api.get(&name).await.map_err(Error::kube(format!(
                "reading CustomResourceDefinition {name}"
            )))?;
            let conditions = crd.status.and_then(|s| s.conditions).unwrap_or_default();
            if conditions
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
            {
                continue;
            }
            if still.is_empty() {
                last_seen = conditions
                    .iter()
                    .map(|c| {
                        format!(
                            "{}={} {}",
                            c.type_,
                            c.status,
                            c.message.as_deref().unwrap_or("")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; ");
            }
            still.push(name);
        }
        if still.is_empty() {
            tracing::info!("{total}/{total} CRDs Established");
            return Ok(());
        }
        if start.elapsed() >= timeout {
            return Err(Error::Timeout {
                after: timeout,
                condition: format!(
                    "CustomResourceDefinition {} condition Established=True (last seen: {})",
                    still[0],
                    if last_seen.is_empty() {
                        "no conditions"
                    } else {
                        last_seen.trim()
                    }
                ),
            });
        }
        if last_report.elapsed() >= Duration::from_secs(2) {
            tracing::info!(
                "{}/{total} CRDs Established, waiting for {}",
                total - still.len(),
                still[0]
            );
            last_report = Instant::now();
        }
        pending = still;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn changed_fields_ignore_server_maintained_ones() {
        let a = json!({"metadata": {"name": "x", "resourceVersion": "1", "labels": {"a": "1"}}, "spec": {"r": 1, "l": [1]}, "status": {"x": 1}});
        let b = json!({"metadata": {"name": "x", "resourceVersion": "2", "labels": {"a": "2", "b": "1"}}, "spec": {"r": 1, "l": [2]}, "status": {"x": 2}});
        assert_eq!(
            changed_fields(&a, &b),
            ["metadata.labels.a", "metadata.labels.b", "spec.l"]
        );
        assert!(changed_fields(&a, &a).is_empty());
    }
}
