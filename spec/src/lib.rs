//! kiln-spec: the configuration model shared by every part of kiln.
//!
//! Pure code only: parsing, validation (every error at once, with its field path) and the
//! JSON schema of the documents. Nothing here touches disks, networks or processes.

pub mod errors;
pub mod inventory;

pub use errors::{FieldError, SpecError, ValidationErrors};
pub use inventory::{BmcEndpoint, BmcProtocol, Inventory, InventoryNode, NodeRole, SecretRef};

/// The `apiVersion` every kiln document carries.
pub const API_VERSION: &str = "kiln.dev/v1alpha1";
