//! kiln-overlays: the files kiln adds to the Debian root file system, as layers of data
//! (`base/`, `network/`, `kubernetes/`, `ceph/`, `kubevirt/` beside this crate's `src/`),
//! rendered from an appliance spec. Pure: the layers are embedded at build time.
//!
//! A layer is a directory with a `layer.yaml` (file modes, units to enable, cluster addons
//! by their name in `upstream.lock.yaml`) and a `files/` tree placed at `/` of the root file system. Files ending in
//! `.tera` are templates rendered with the spec; the suffix is dropped, and a template that
//! renders to nothing but white space places no file. A path segment `{user}` or
//! `{apt_repository}` renders the file once per such item of the spec, with the item in the
//! template context under that name. The `network` layer's systemd-networkd files come from
//! [`kiln_spec::host::render_networkd`], the renderer the node agent uses too. Layers apply in
//! the order of [`LAYER_ORDER`]; a later layer's file replaces an earlier one's.

use std::collections::{BTreeMap, BTreeSet};

use kiln_spec::errors::error_chain;
use kiln_spec::host::{file_safe, render_networkd};
use kiln_spec::{Appliance, Feature, NodeRole};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

include!(concat!(env!("OUT_DIR"), "/embedded.rs"));

/// Every layer, in the order they apply.
/// The lock of pinned upstream manifests the kubernetes, ceph and kubevirt layers name their
/// addons from (`overlays/upstream.lock.yaml`): URL and sha256 per file.
pub const UPSTREAM_LOCK: &str = include_str!("../upstream.lock.yaml");

pub const LAYER_ORDER: [&str; 5] = ["base", "network", "kubernetes", "ceph", "kubevirt"];

/// What the node-specific rendering knows about the node (an installed node's config).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeContext {
    pub hostname: String,
    /// The node's name in the inventory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub role: NodeRole,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RenderedFile {
    /// Absolute path in the root file system.
    pub path: String,
    /// Permission bits, e.g. `0o644`.
    pub mode: u32,
    #[serde(skip)]
    pub content: Vec<u8>,
    /// The layer it came from.
    pub layer: String,
}

/// Everything the spec adds to the root file system.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rendered {
    pub layers: Vec<String>,
    /// Sorted by path.
    pub files: Vec<RenderedFile>,
    /// Units to enable (`systemctl enable`), sorted.
    pub units_enabled: Vec<String>,
    /// Kernel arguments the image needs (before the boot-specific ones).
    pub kernel_args: Vec<String>,
    /// Cluster addons of the enabled layers: names of addons in `overlays/upstream.lock.yaml`,
    /// which pins their upstream manifests (URL and sha256).
    pub addons: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("layer {layer}: layer.yaml: {message}")]
    LayerMeta { layer: String, message: String },
    #[error("layer {layer}: {path}: {message}")]
    Template {
        layer: String,
        path: String,
        message: String,
    },
    #[error("layer {layer}: layer.yaml: mode {mode:?} of {path} is not octal like \"0644\"")]
    BadMode {
        layer: String,
        path: String,
        mode: String,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LayerMeta {
    #[serde(default)]
    modes: BTreeMap<String, String>,
    #[serde(default)]
    enable: Vec<String>,
    #[serde(default)]
    addons: Vec<String>,
}

/// The layers a spec uses, in apply order.
pub fn layers_for(spec: &Appliance) -> Vec<&'static str> {
    LAYER_ORDER
        .into_iter()
        .filter(|layer| match *layer {
            "kubernetes" => spec.has_feature(Feature::Kubernetes),
            "ceph" => spec.has_feature(Feature::Ceph),
            "kubevirt" => spec.has_feature(Feature::Kubevirt),
            _ => true,
        })
        .collect()
}

/// Renders the overlay for `spec`: for the image when `node` is `None` (the host name is
/// the spec's name until the installer sets the node's), for one node otherwise.
pub fn render(spec: &Appliance, node: Option<&NodeContext>) -> Result<Rendered, RenderError> {
    let mut base = tera::Context::new();
    base.insert("spec", &spec.spec);
    base.insert("metadata", &spec.metadata);
    base.insert(
        "hostname",
        &node.map_or(spec.metadata.name.as_str(), |n| n.hostname.as_str()),
    );
    base.insert("node", &node);
    base.insert("spec_yaml", &spec.to_yaml());
    base.insert(
        "upgrade_json",
        &serde_json::to_string_pretty(&spec.spec.upgrade).expect("upgrade rules serialize"),
    );
    let expansions = expansions(spec);

    let mut files: BTreeMap<String, RenderedFile> = BTreeMap::new();
    let mut units = BTreeSet::new();
    let mut addons = Vec::new();
    let layers = layers_for(spec);
    for layer in &layers {
        let meta = layer_meta(layer)?;
        units.extend(meta.enable.iter().cloned());
        addons.extend(meta.addons);
        if *layer == "network" {
            for f in render_networkd(&spec.spec.network) {
                let path = format!("/etc/systemd/network/{}", f.name);
                files.insert(
                    path.clone(),
                    RenderedFile {
                        mode: 0o644,
                        path,
                        content: f.content.into_bytes(),
                        layer: layer.to_string(),
                    },
                );
            }
        }
        for (l, rel, content) in EMBEDDED {
            let Some(path) = rel.strip_prefix("files/").filter(|_| l == layer) else {
                continue;
            };
            let mode_of = |target: &str| -> Result<u32, RenderError> {
                match meta.modes.get(target.trim_start_matches('/')) {
                    None => Ok(0o644),
                    Some(m) => u32::from_str_radix(m, 8).map_err(|_| RenderError::BadMode {
                        layer: layer.to_string(),
                        path: target.to_string(),
                        mode: m.clone(),
                    }),
                }
            };
            let Some(template_path) = path.strip_suffix(".tera") else {
                let target = format!("/{path}");
                files.insert(
                    target.clone(),
                    RenderedFile {
                        mode: mode_of(&target)?,
                        path: target,
                        content: content.to_vec(),
                        layer: layer.to_string(),
                    },
                );
                continue;
            };
            let text = std::str::from_utf8(content).map_err(|_| RenderError::Template {
                layer: layer.to_string(),
                path: path.to_string(),
                message: "a template must be UTF-8".into(),
            })?;
            for (target, ctx) in instances(template_path, &base, &expansions) {
                let out =
                    tera::Tera::one_off(text, &ctx, false).map_err(|e| RenderError::Template {
                        layer: layer.to_string(),
                        path: path.to_string(),
                        message: error_chain(&e),
                    })?;
                if out.trim().is_empty() {
                    files.remove(&target);
                    continue;
                }
                files.insert(
                    target.clone(),
                    RenderedFile {
                        mode: mode_of(&target)?,
                        path: target,
                        content: out.into_bytes(),
                        layer: layer.to_string(),
                    },
                );
            }
        }
    }
    Ok(Rendered {
        layers: layers.iter().map(|l| l.to_string()).collect(),
        files: files.into_values().collect(),
        units_enabled: units.into_iter().collect(),
        kernel_args: spec.kernel_args(),
        addons,
    })
}

fn layer_meta(layer: &str) -> Result<LayerMeta, RenderError> {
    let (_, _, text) = EMBEDDED
        .iter()
        .find(|(l, rel, _)| *l == layer && *rel == "layer.yaml")
        .ok_or_else(|| RenderError::LayerMeta {
            layer: layer.to_string(),
            message: "missing".into(),
        })?;
    let text = std::str::from_utf8(text).unwrap_or_default();
    serde_saphyr::from_str(text).map_err(|e| RenderError::LayerMeta {
        layer: layer.to_string(),
        message: e.to_string(),
    })
}

/// Items a `{placeholder}` path segment expands to: (name in the path, template value).
type Expansions = BTreeMap<&'static str, Vec<(String, serde_json::Value)>>;

fn expansions(spec: &Appliance) -> Expansions {
    fn named<T: Serialize>(
        items: &[T],
        name: impl Fn(&T) -> &str,
    ) -> Vec<(String, serde_json::Value)> {
        items
            .iter()
            .map(|i| {
                (
                    file_safe(name(i)),
                    serde_json::to_value(i).expect("spec items serialize"),
                )
            })
            .collect()
    }
    let mut e = Expansions::new();
    e.insert("user", named(&spec.spec.users, |u| &u.name));
    e.insert(
        "apt_repository",
        named(&spec.spec.os.apt_repositories, |r| &r.name),
    );
    e
}

/// The (target path, context) pairs one template renders to.
fn instances(
    template_path: &str,
    base: &tera::Context,
    exp: &Expansions,
) -> Vec<(String, tera::Context)> {
    for (key, items) in exp {
        let placeholder = format!("{{{key}}}");
        if template_path.contains(&placeholder) {
            return items
                .iter()
                .map(|(name, value)| {
                    let mut ctx = base.clone();
                    ctx.insert(*key, value);
                    (
                        format!("/{}", template_path.replace(&placeholder, name)),
                        ctx,
                    )
                })
                .collect();
        }
    }
    vec![(format!("/{template_path}"), base.clone())]
}

impl Rendered {
    /// One line per file, `mode sha256 path`: what a golden test or a build manifest records.
    pub fn listing(&self) -> String {
        self.files
            .iter()
            .map(|f| {
                format!(
                    "{:04o} {} {}\n",
                    f.mode,
                    hex::encode(Sha256::digest(&f.content)),
                    f.path
                )
            })
            .collect()
    }

    pub fn file(&self, path: &str) -> Option<&RenderedFile> {
        self.files.iter().find(|f| f.path == path)
    }
}
