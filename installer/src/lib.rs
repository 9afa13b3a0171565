//! kiln-installer
pub mod apply;
pub mod biosboot;
pub mod blockdev;
pub mod esp;
pub mod hardware;
pub mod plan;
pub mod power;
pub mod preflight;
pub mod source;
pub mod stage1;
pub mod statefs;
pub mod tools;
