//! kiln-lab: the virtual rack used by `kiln lab …` and by the end-to-end tests: QEMU machines
//! with real firmware, network namespaces with bridges and taps, and BMC simulators.

pub mod ipmi_sim;
pub mod netns;
pub mod qemu;
pub mod rack;
