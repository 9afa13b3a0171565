//! kiln-netboot: the provisioner's netboot services, smee-style: each service is
//! `server(listener, handler(backend))`, the [`backend::Backend`] decides per MAC.
//!
//! - [`dhcp`]: proxyDHCP (next to an existing DHCP server) or authoritative (address pool,
//!   leases persisted, reservations); option 93 picks the iPXE build, iPXE gets its script.
//! - [`tftp`]: read-only, jailed, RFC 1350 + options 2347–2349 + windowsize 7440.
//! - [`http`]: iPXE script per MAC, artifacts with Range/ETag, node config, phone-home.
//! - [`enrol`]: the per-node tokens that guard node config and phone-home.
//! - [`trace`]: every step of every machine's boot chain, with metrics.
//!
//! [`server::serve`] runs them all, for `kiln pxe serve` and for a caller in-process.

pub mod backend;
pub mod config;
pub mod dhcp;
pub mod download;
pub mod enrol;
pub mod http;
pub mod ipxe;
pub mod jail;
pub mod leases;
pub mod server;
pub mod tftp;
pub mod trace;
