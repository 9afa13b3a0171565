//! OpenIPMI `ipmi_sim` instances: configuration, start/stop, chassis control of a QEMU VM.
