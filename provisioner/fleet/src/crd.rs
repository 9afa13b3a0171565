//! The fleet as Kubernetes resources (`kiln.dev/v1alpha1`): one `Machine` per node and
//! `Rollout`s over them, for provisioners that keep their state in a cluster. The custom
//! resource definitions are generated from these types; `machines_from` maps an inventory onto
//! them (pure), with each BMC password in a Secret the Machine names, never in the Machine.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kiln_spec::Inventory;
use kiln_spec::inventory::{BmcProtocol, InventoryNode, NodeRole, SecretRef};
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::stage::NodeProgress;
use crate::store::StoredReport;

/// The key of the password in a BMC credentials Secret.
pub const PASSWORD_KEY: &str = "password";

/// One machine of the fleet: how to reach its BMC, how it boots, what it is for.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "kiln.dev",
    version = "v1alpha1",
    kind = "Machine",
    namespaced,
    status = "MachineStatus",
    shortname = "mach",
    category = "kiln",
    derive = "PartialEq",
    printcolumn = r#"{"name": "Role", "type": "string", "jsonPath": ".spec.role"}"#,
    printcolumn = r#"{"name": "Stage", "type": "string", "jsonPath": ".status.stage"}"#,
    printcolumn = r#"{"name": "Slot", "type": "string", "jsonPath": ".status.slot"}"#,
    printcolumn = r#"{"name": "Error", "type": "string", "jsonPath": ".status.failure.reason", "priority": 1}"#,
    printcolumn = r#"{"name": "Image", "type": "string", "jsonPath": ".status.imageSha256", "priority": 1}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MachineSpec {
    pub role: NodeRole,
    /// MACs the machine network-boots from.
    #[serde(rename = "bootMACs")]
    pub boot_macs: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_address: Option<std::net::Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bmc: Option<MachineBmc>,
    /// The machine's own settings over the appliance spec (static addresses, disk rules, …),
    /// as an inventory node's `overrides`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overrides: Option<kiln_spec::appliance::ApplianceOverrides>,
}

/// A BMC, its password in a Secret of the Machine's namespace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MachineBmc {
    pub protocol: BmcProtocol,
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub username: String,
    /// The Secret holding the password under `password`.
    pub credentials_secret: String,
    /// Redfish only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure: bool,
    /// Redfish only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_plain_http: bool,
}

/// Where the machine's rollout stands: its progress as the rollout engine keeps it (stage,
/// stage history, failure, booted slot, image digest, install count and the BMC action it
/// waits on), the phone-home reports it sent, and the hashes of its enrolment tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MachineStatus {
    /// The Rollout that drives the machine.
    pub rollout: String,
    #[serde(flatten)]
    pub progress: NodeProgress,
    /// The last phone-home reports, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reports: Vec<StoredReport>,
    /// What the installer found on the machine (CPUs, memory, disks, NICs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware: Option<kiln_spec::enrol::HardwareSummary>,
    /// sha256 of each enrolment token handed out in this rollout (never the tokens).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub enrolment_token_hashes: Vec<String>,
}

/// A rollout of one image to the Machines a selector picks.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "kiln.dev",
    version = "v1alpha1",
    kind = "Rollout",
    root = "RolloutResource",
    namespaced,
    status = "RolloutStatus",
    category = "kiln",
    derive = "PartialEq",
    printcolumn = r#"{"name": "Image", "type": "string", "jsonPath": ".spec.imageSha256"}"#,
    printcolumn = r#"{"name": "Ready", "type": "integer", "jsonPath": ".status.ready"}"#,
    printcolumn = r#"{"name": "Failed", "type": "integer", "jsonPath": ".status.failed"}"#,
    printcolumn = r#"{"name": "Total", "type": "integer", "jsonPath": ".status.total"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// Which Machines: their names, globs, `role=R`, `label=V`, comma-separated (as
    /// `kiln fleet rollout --nodes`); all when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Where the signed build is (manifest.json, pxe/).
    pub artifacts: String,
    /// sha256 of the root image the Machines install.
    pub image_sha256: String,
    /// Machines in progress at once.
    #[serde(default = "default_parallelism")]
    pub parallelism: u32,
    /// Machines that may be failed or in progress before no more start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<u32>,
}

fn default_parallelism() -> u32 {
    10
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    pub total: u32,
    pub ready: u32,
    pub failed: u32,
    /// Machines per stage.
    #[serde(default)]
    pub stages: BTreeMap<String, u32>,
    /// When the replica leading it now started (milliseconds since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<u64>,
}

/// Every custom resource definition kiln's provisioner uses.
pub fn definitions() -> Vec<CustomResourceDefinition> {
    vec![Machine::crd(), RolloutResource::crd()]
}

/// The Secret a node's BMC password goes in.
pub fn credentials_secret_name(node: &str) -> String {
    format!("{node}-bmc")
}

/// What importing an inventory makes: the Machines, and for each BMC the Secret to fill with
/// the password the inventory points at.
#[derive(Debug, Clone, PartialEq)]
pub struct Import {
    pub machines: Vec<Machine>,
    pub secrets: Vec<SecretToFill>,
}

/// A Secret named `name`, to hold what `password` refers to.
#[derive(Debug, Clone, PartialEq)]
pub struct SecretToFill {
    pub name: String,
    pub node: String,
    pub password: SecretRef,
}

fn machine(node: &InventoryNode, namespace: &str) -> Machine {
    let bmc = node.bmc.as_ref().map(|b| MachineBmc {
        protocol: b.protocol,
        address: b.address.clone(),
        port: b.port,
        username: b.username.clone(),
        credentials_secret: credentials_secret_name(&node.name),
        insecure: b.insecure,
        allow_plain_http: b.allow_plain_http,
    });
    let mut labels: BTreeMap<String, String> = node
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    labels.insert("kiln.dev/role".into(), node.role.as_str().into());
    Machine {
        metadata: ObjectMeta {
            name: Some(node.name.clone()),
            namespace: Some(namespace.into()),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        spec: MachineSpec {
            role: node.role,
            boot_macs: node.boot_macs.clone(),
            boot_address: node.boot_address,
            bmc,
            overrides: node.overrides.clone(),
        },
        status: None,
    }
}

/// The resources an inventory becomes in `namespace`.
pub fn machines_from(inventory: &Inventory, namespace: &str) -> Import {
    let nodes = &inventory.spec.nodes;
    Import {
        machines: nodes.iter().map(|n| machine(n, namespace)).collect(),
        secrets: nodes
            .iter()
            .filter_map(|n| {
                let bmc = n.bmc.as_ref()?;
                Some(SecretToFill {
                    name: credentials_secret_name(&n.name),
                    node: n.name.clone(),
                    password: bmc.password_ref.clone(),
                })
            })
            .collect(),
    }
}

/// The Secret of `fill` holding `password`.
pub fn credentials_secret(fill: &SecretToFill, namespace: &str, password: String) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(fill.name.clone()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([(
                "kiln.dev/machine".to_string(),
                fill.node.clone(),
            )])),
            ..ObjectMeta::default()
        },
        string_data: Some(BTreeMap::from([(PASSWORD_KEY.to_string(), password)])),
        type_: Some("Opaque".into()),
        ..Secret::default()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("node {node}: reading its BMC password: {source}")]
    Password {
        node: String,
        source: std::io::Error,
    },
    #[error("{context}: {error}")]
    Kube { context: String, error: kube::Error },
    #[error(transparent)]
    Cluster(#[from] kiln_cluster::Error),
}

/// What an import applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Imported {
    pub namespace: String,
    pub machines: Vec<String>,
    pub secrets: Vec<String>,
}

async fn apply<K>(api: &Api<K>, name: &str, object: &K) -> Result<(), ImportError>
where
    K: kube::Resource + Clone + Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch(
        name,
        &PatchParams::apply(kiln_cluster::FIELD_MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
    .map(drop)
    .map_err(|error| ImportError::Kube {
        context: format!("applying {name}"),
        error,
    })
}

/// Applies the definitions, the namespace, every BMC Secret and every Machine of `import`
/// (server-side apply: running it again changes nothing). Every password is read first, so a
/// missing one stops the import before anything is written. Relative password files resolve
/// against `base`.
pub async fn import(
    client: &Client,
    import: &Import,
    namespace: &str,
    base: &std::path::Path,
) -> Result<Imported, ImportError> {
    let mut secrets = Vec::new();
    for fill in &import.secrets {
        let password = fill
            .password
            .resolve(base)
            .map_err(|source| ImportError::Password {
                node: fill.node.clone(),
                source,
            })?;
        secrets.push(credentials_secret(fill, namespace, password));
    }
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut names = Vec::new();
    for crd in definitions() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        apply(&crds, &name, &crd).await?;
        names.push(name);
    }
    kiln_cluster::bootstrap::wait_established(client, names, std::time::Duration::from_secs(60))
        .await?;
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(namespace.into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    apply(&Api::<Namespace>::all(client.clone()), namespace, &ns).await?;
    let secret_api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    for s in &secrets {
        apply(
            &secret_api,
            s.metadata.name.as_deref().unwrap_or_default(),
            s,
        )
        .await?;
    }
    let machine_api: Api<Machine> = Api::namespaced(client.clone(), namespace);
    for m in &import.machines {
        apply(
            &machine_api,
            m.metadata.name.as_deref().unwrap_or_default(),
            m,
        )
        .await?;
    }
    Ok(Imported {
        namespace: namespace.into(),
        machines: import
            .machines
            .iter()
            .filter_map(|m| m.metadata.name.clone())
            .collect(),
        secrets: secrets
            .iter()
            .filter_map(|s| s.metadata.name.clone())
            .collect(),
    })
}
