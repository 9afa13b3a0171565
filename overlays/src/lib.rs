//! kiln-overlays
