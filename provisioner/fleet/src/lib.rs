//! kiln-fleet: rolls an inventory of machines from powered off to installed and ready.
//!
//! One state machine per node ([`stage`], pure) runs on the reconcile engine the node agent
//! uses; its inputs are the BMC drivers' results and the nodes' phone-home reports from the
//! netboot services, and its progress lives in an embedded store ([`store`]) so a rollout
//! resumes where it stopped — or, run as a Kubernetes controller ([`controller`]), in the
//! status of `Machine` resources, one replica leading at a time.

pub mod cluster;
pub mod controller;
pub mod crd;
pub mod credentials;
pub mod follow;
pub mod mailbox;
pub mod metrics;
pub mod plan;
pub mod remote;
pub mod rolling;
pub mod rollout;
pub mod stage;
pub mod status;
pub mod store;
pub mod upgrade;
pub mod web;
pub mod webhook;
