//! kiln-spec: the configuration model shared by every part of kiln.
//!
//! Pure code only: parsing, validation (every error at once, with its field path) and the
//! JSON schema of the documents. Nothing here touches disks, networks or processes.

pub mod appliance;
pub mod boot;
pub mod bootargs;
pub mod ceph;
mod check;
pub mod document;
pub mod enrol;
pub mod errors;
pub mod exposition;
pub mod glob;
pub mod hardware;
pub mod host;
pub mod inventory;
pub mod ipxe;
pub mod kmod;
pub mod kubernetes;
pub mod layout;
pub mod manifest;
pub mod nodeconfig;
pub mod paths;
pub mod remote;
pub mod signing;
pub mod size;

pub use appliance::{Appliance, ApplianceSpec, Feature, ProfileName};
pub use document::{Document, DocumentKind};
pub use errors::{FieldError, SpecError, ValidationErrors};
pub use hardware::{Disk, Firmware, HardwareInventory};
pub use inventory::{BmcEndpoint, BmcProtocol, Inventory, InventoryNode, NodeRole, SecretRef};
pub use nodeconfig::{NodeConfig, NodeSpec};
pub use size::ByteSize;

/// How a unit enum value is written in a document (`control-plane`, `kilnOnly`).
pub fn serde_name<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The `apiVersion` every kiln document carries.
pub const API_VERSION: &str = "kiln.dev/v1alpha1";
