//! kiln's cluster layer, talking to a real Kubernetes API server through kube:
//!
//! - [`bootstrap`]: the addon set from pinned upstream manifests ([`lock`], [`manifests`]),
//!   planned in dependency order ([`plan`]) and applied with server-side apply.
//! - [`maintenance`]: node maintenance — preflight, cordon, VM live migration, eviction
//!   honouring PodDisruptionBudgets, Ceph `noout` — resumable through a node annotation.
//! - [`status`]: nodes, maintenance state and addon health.
//!
//! Planning is pure (objects in, plan out); IO lives in the functions that take a `Client`.
//! Every write is idempotent: running a command again converges on the same state.

pub mod bootstrap;
pub mod ceph;
mod error;
pub mod kube_client;
pub mod lock;
pub mod maintenance;
pub mod manifests;
pub mod node;
pub mod pki;
pub mod plan;
pub mod status;
#[cfg(feature = "testing")]
pub mod testing;

pub use error::{ChecksumMismatch, Error};

/// Field manager of every server-side apply kiln makes.
pub const FIELD_MANAGER: &str = "kiln";
