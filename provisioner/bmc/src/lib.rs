//! kiln-bmc
