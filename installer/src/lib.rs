//! kiln-installer
pub mod apply;
pub mod biosboot;
pub mod blockdev;
pub mod esp;
pub mod hardware;
pub mod live;
pub mod phonehome;
pub mod plan;
pub mod power;
pub mod preflight;
pub mod source;
pub mod stage1;
pub mod statefs;
pub mod tools;
pub mod upgrade;

/// How long a netbooted node keeps trying a download from the provisioner (connection
/// refused, a cut transfer, a 5xx) before it gives up: long enough to ride out a provisioner
/// restart, while a refusal (4xx) or a wrong digest fails at once.
pub const FETCH_PATIENCE: std::time::Duration = std::time::Duration::from_secs(300);
