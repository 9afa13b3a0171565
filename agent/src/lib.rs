//! kiln-agent: the on-node reconciliation daemon.
//!
//! - [`engine`]: the controller runtime (declared inputs/outputs, one writer per kind,
//!   level-triggered, events + periodic resync, backoff), reusable by the fleet controller.
//! - [`desired`] → [`plan`] → [`apply`]: NodeConfig to host resources, the diff against the
//!   host, and the crash-safe apply (journal, record of managed resources, atomic writes).
//! - [`host`] and [`sysroot`]: every host access under one root, behind small traits.
//! - [`controllers`], [`kubernetes`], [`ceph`], [`watch`], [`api`], [`daemon`]: the running agent.
//! - [`slots`]: A/B upgrades, rollbacks and the boot assessment.

pub mod api;
pub mod apply;
pub mod ceph;
pub mod controllers;
pub mod daemon;
pub mod desired;
pub mod engine;
pub mod enrolment;
pub mod host;
pub mod kubernetes;
pub mod metrics;
pub mod notify;
pub mod plan;
pub mod remote;
pub mod slots;
pub mod status;
pub mod sysroot;
pub mod watch;

pub use api::{Client, DEFAULT_SOCKET};
pub use daemon::{AgentOptions, run};
