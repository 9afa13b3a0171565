//! kiln-installer
