//! Network namespaces, bridges, veth pairs and taps created (and removed) by tests and the lab.
