//! kiln-cluster
