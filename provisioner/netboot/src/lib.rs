//! kiln-netboot
