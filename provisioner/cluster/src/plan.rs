//! Pure bootstrap planning: parsed manifests in, objects in dependency order out.
//!
//! Order across the whole addon set: CRDs (then wait until Established) → namespaces →
//! everything else (operators, RBAC, services, …) → custom resources of the CRDs in the set.
//! Within a phase, objects keep the order of the lock file and of each file.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde_json::{Value, json};

use crate::Error;
use crate::manifests::FetchedFile;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Crds,
    Namespaces,
    Resources,
    CustomResources,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Crds => "CRDs",
            Phase::Namespaces => "namespaces",
            Phase::Resources => "operators, RBAC and other resources",
            Phase::CustomResources => "custom resources",
        })
    }
}

/// One object to apply.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedObject {
    pub phase: Phase,
    pub addon: String,
    /// The manifest file it came from, or `kiln` for objects kiln adds.
    pub source: String,
    pub api_version: String,
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
    pub object: Value,
}

impl PlannedObject {
    /// `Kind namespace/name` or `Kind name`.
    pub fn id(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{} {ns}/{}", self.kind, self.name),
            None => format!("{} {}", self.kind, self.name),
        }
    }

    pub fn group(&self) -> &str {
        self.api_version.rsplit_once('/').map_or("", |(g, _)| g)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BootstrapPlan {
    pub objects: Vec<PlannedObject>,
}

impl BootstrapPlan {
    pub fn phase(&self, phase: Phase) -> impl Iterator<Item = &PlannedObject> {
        self.objects.iter().filter(move |o| o.phase == phase)
    }

    /// One line per object, for golden tests and `--dry-run` headers.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for o in &self.objects {
            out.push_str(&format!(
                "{:<16} {:<16} {} {} ({})\n",
                format!("{:?}", o.phase),
                o.addon,
                o.api_version,
                o.id(),
                o.source
            ));
        }
        out
    }
}

/// Kinds of the core API groups that are cluster-scoped; everything else built in is namespaced.
/// Custom kinds take their scope from the CRDs in the set.
const CLUSTER_SCOPED: &[(&str, &str)] = &[
    ("", "Namespace"),
    ("", "Node"),
    ("", "PersistentVolume"),
    ("apiextensions.k8s.io", "CustomResourceDefinition"),
    ("apiregistration.k8s.io", "APIService"),
    ("rbac.authorization.k8s.io", "ClusterRole"),
    ("rbac.authorization.k8s.io", "ClusterRoleBinding"),
    ("storage.k8s.io", "StorageClass"),
    ("storage.k8s.io", "CSIDriver"),
    ("storage.k8s.io", "VolumeAttributesClass"),
    ("scheduling.k8s.io", "PriorityClass"),
    ("node.k8s.io", "RuntimeClass"),
    (
        "admissionregistration.k8s.io",
        "ValidatingWebhookConfiguration",
    ),
    (
        "admissionregistration.k8s.io",
        "MutatingWebhookConfiguration",
    ),
    ("admissionregistration.k8s.io", "ValidatingAdmissionPolicy"),
    (
        "admissionregistration.k8s.io",
        "ValidatingAdmissionPolicyBinding",
    ),
];

/// Objects kiln adds to the upstream set: the storage configuration on top of Rook.
pub fn kiln_objects() -> Vec<(String, Value)> {
    let rook = |v: Value| ("rook-ceph".to_string(), v);
    vec![
        rook(json!({
            "apiVersion": "ceph.rook.io/v1",
            "kind": "CephCluster",
            "metadata": {"name": "rook-ceph", "namespace": "rook-ceph"},
            "spec": {
                "cephVersion": {"image": "quay.io/ceph/ceph:v20.2.4"},
                "dataDirHostPath": "/var/lib/rook",
                "mon": {"count": 3, "allowMultiplePerNode": false},
                "mgr": {"count": 2},
                "dashboard": {"enabled": false},
                // kiln leaves the disk space after KILN_STATE to Ceph: OSDs on the partitions
                // the installer labels for data.
                "storage": {"useAllNodes": true, "useAllDevices": false, "devicePathFilter": "^/dev/disk/by-partlabel/KILN_DATA.*"},
            },
        })),
        rook(json!({
            "apiVersion": "ceph.rook.io/v1",
            "kind": "CephBlockPool",
            "metadata": {"name": "replicapool", "namespace": "rook-ceph"},
            "spec": {"failureDomain": "host", "replicated": {"size": 3, "requireSafeReplicaSize": true}},
        })),
        rook(json!({
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {"name": "rook-ceph-block", "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
            "provisioner": "rook-ceph.rbd.csi.ceph.com",
            "parameters": {
                "clusterID": "rook-ceph",
                "pool": "replicapool",
                "imageFormat": "2",
                "imageFeatures": "layering",
                "csi.storage.k8s.io/provisioner-secret-name": "rook-csi-rbd-provisioner",
                "csi.storage.k8s.io/provisioner-secret-namespace": "rook-ceph",
                "csi.storage.k8s.io/controller-expand-secret-name": "rook-csi-rbd-provisioner",
                "csi.storage.k8s.io/controller-expand-secret-namespace": "rook-ceph",
                "csi.storage.k8s.io/node-stage-secret-name": "rook-csi-rbd-node",
                "csi.storage.k8s.io/node-stage-secret-namespace": "rook-ceph",
                "csi.storage.k8s.io/fstype": "ext4",
            },
            "allowVolumeExpansion": true,
            "reclaimPolicy": "Delete",
        })),
        rook(json!({
            "apiVersion": "snapshot.storage.k8s.io/v1",
            "kind": "VolumeSnapshotClass",
            "metadata": {"name": "csi-rbdplugin-snapclass"},
            "driver": "rook-ceph.rbd.csi.ceph.com",
            "parameters": {
                "clusterID": "rook-ceph",
                "csi.storage.k8s.io/snapshotter-secret-name": "rook-csi-rbd-provisioner",
                "csi.storage.k8s.io/snapshotter-secret-namespace": "rook-ceph",
            },
            "deletionPolicy": "Delete",
        })),
    ]
}

/// Parses every file, places each object in its phase and namespace, and drops exact
/// duplicates (upstream files repeat some objects). All problems are reported together.
pub fn plan_bootstrap(
    files: &[FetchedFile],
    extra: Vec<(String, Value)>,
) -> Result<BootstrapPlan, Error> {
    let mut problems = Vec::new();
    let mut docs: Vec<(String, String, Option<String>, Value)> = Vec::new();
    for f in files {
        match serde_saphyr::from_multiple::<Value>(&f.text) {
            Ok(values) => {
                for v in values.into_iter().filter(|v| !v.is_null()) {
                    docs.push((f.addon.clone(), f.path.clone(), f.namespace.clone(), v));
                }
            }
            Err(e) => problems.push(format!("{}: {e}", f.path)),
        }
    }
    for (addon, v) in extra {
        docs.push((addon, "kiln".into(), None, v));
    }

    // Scope and group of every custom kind the set defines.
    let mut custom: BTreeMap<(String, String), bool> = BTreeMap::new();
    for (_, _, _, v) in &docs {
        if v["kind"] == "CustomResourceDefinition" {
            let group = v["spec"]["group"].as_str().unwrap_or_default().to_string();
            let kind = v["spec"]["names"]["kind"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            custom.insert((group, kind), v["spec"]["scope"] == "Namespaced");
        }
    }

    let mut objects: Vec<PlannedObject> = Vec::new();
    let mut seen: BTreeMap<(String, String, Option<String>, String), usize> = BTreeMap::new();
    let mut namespaces = BTreeSet::new();
    for (addon, source, default_ns, mut v) in docs {
        let api_version = v["apiVersion"].as_str().unwrap_or_default().to_string();
        let kind = v["kind"].as_str().unwrap_or_default().to_string();
        let name = v["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if api_version.is_empty() || kind.is_empty() || name.is_empty() {
            problems.push(format!(
                "{source}: object without apiVersion, kind or metadata.name: {}",
                short(&v)
            ));
            continue;
        }
        let group = api_version
            .rsplit_once('/')
            .map_or("", |(g, _)| g)
            .to_string();
        if kind == "Namespace" && group.is_empty() {
            // The API server sets this label on every namespace; applying it too keeps the
            // label's ownership stable, so a second apply is a no-op.
            v["metadata"]["labels"]["kubernetes.io/metadata.name"] = Value::String(name.clone());
        }
        let (phase, namespaced) = match custom.get(&(group.clone(), kind.clone())) {
            Some(&namespaced) => (Phase::CustomResources, namespaced),
            None if kind == "CustomResourceDefinition" => (Phase::Crds, false),
            None if kind == "Namespace" && group.is_empty() => (Phase::Namespaces, false),
            None => (
                Phase::Resources,
                !CLUSTER_SCOPED.contains(&(group.as_str(), kind.as_str())),
            ),
        };
        let namespace = if namespaced {
            match v["metadata"]["namespace"]
                .as_str()
                .map(str::to_string)
                .or(default_ns)
            {
                Some(ns) => {
                    v["metadata"]["namespace"] = Value::String(ns.clone());
                    Some(ns)
                }
                None => {
                    problems.push(format!("{source}: {kind} {name} is namespaced but names no namespace and the addon sets none"));
                    continue;
                }
            }
        } else {
            if let Some(m) = v["metadata"].as_object_mut() {
                m.remove("namespace");
            }
            None
        };
        if let Some(ns) = &namespace {
            namespaces.insert((addon.clone(), ns.clone()));
        }
        let key = (group, kind.clone(), namespace.clone(), name.clone());
        if let Some(&i) = seen.get(&key) {
            if objects[i].object != v {
                problems.push(format!("{source}: {kind} {name} is defined twice with different content ({} and {source})", objects[i].source));
            }
            continue;
        }
        seen.insert(key, objects.len());
        objects.push(PlannedObject {
            phase,
            addon,
            source,
            api_version,
            kind,
            namespace,
            name,
            object: v,
        });
    }

    // Namespaces the addons use but do not create.
    let declared: BTreeSet<String> = objects
        .iter()
        .filter(|o| o.phase == Phase::Namespaces)
        .map(|o| o.name.clone())
        .collect();
    let mut added = BTreeSet::new();
    for (addon, ns) in namespaces {
        if declared.contains(&ns) || is_system_namespace(&ns) || !added.insert(ns.clone()) {
            continue;
        }
        objects.push(PlannedObject {
            phase: Phase::Namespaces,
            addon,
            source: "kiln".into(),
            api_version: "v1".into(),
            kind: "Namespace".into(),
            namespace: None,
            name: ns.clone(),
            object: json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": {"kubernetes.io/metadata.name": ns}}}),
        });
    }

    if !problems.is_empty() {
        return Err(Error::Manifest {
            source_path: "addon manifests".into(),
            reason: format!("\n  {}", problems.join("\n  ")),
        });
    }
    // Stable: file order within a phase.
    objects.sort_by_key(|o| o.phase);
    Ok(BootstrapPlan { objects })
}

fn is_system_namespace(ns: &str) -> bool {
    matches!(
        ns,
        "default" | "kube-system" | "kube-public" | "kube-node-lease"
    )
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 80 {
        format!(
            "{}…",
            &s[..s.char_indices().nth(80).map_or(s.len(), |(i, _)| i)]
        )
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(addon: &str, path: &str, ns: Option<&str>, text: &str) -> FetchedFile {
        FetchedFile {
            addon: addon.into(),
            path: path.into(),
            namespace: ns.map(Into::into),
            text: text.into(),
        }
    }

    const CRD: &str = "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata:\n  name: widgets.example.org\nspec:\n  group: example.org\n  scope: Namespaced\n  names:\n    kind: Widget\n    plural: widgets\n";

    #[test]
    fn phases_namespaces_and_duplicates() {
        let files = [
            file(
                "a",
                "a/ops.yaml",
                Some("apps"),
                "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: op\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: s\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: s\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: r\n  namespace: ignored\n",
            ),
            file("a", "a/crd.yaml", None, CRD),
            file(
                "a",
                "a/cr.yaml",
                Some("apps"),
                "---\napiVersion: example.org/v1\nkind: Widget\nmetadata:\n  name: w\n",
            ),
        ];
        let plan = plan_bootstrap(&files, vec![]).unwrap();
        let ids: Vec<_> = plan
            .objects
            .iter()
            .map(|o| format!("{:?} {}", o.phase, o.id()))
            .collect();
        assert_eq!(
            ids,
            [
                "Crds CustomResourceDefinition widgets.example.org",
                "Namespaces Namespace apps",
                "Resources Deployment apps/op",
                "Resources Service apps/s",
                "Resources ClusterRole r",
                "CustomResources Widget apps/w",
            ]
        );
        assert_eq!(plan.objects[2].object["metadata"]["namespace"], "apps");
        assert!(
            plan.objects[4].object["metadata"]
                .get("namespace")
                .is_none()
        );
    }

    #[test]
    fn conflicting_duplicates_and_missing_namespaces_are_all_reported() {
        let files = [file(
            "a",
            "x.yaml",
            None,
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\n  namespace: ns1\ndata: {a: '1'}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\n  namespace: ns1\ndata: {a: '2'}\n---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: s\n---\nkind: Secret\n",
        )];
        let err = plan_bootstrap(&files, vec![]).unwrap_err().to_string();
        assert_eq!(
            err,
            "addon manifests: \n  x.yaml: ConfigMap c is defined twice with different content (x.yaml and x.yaml)\n  \
             x.yaml: Secret s is namespaced but names no namespace and the addon sets none\n  \
             x.yaml: object without apiVersion, kind or metadata.name: {\"kind\":\"Secret\"}"
        );
    }
}
