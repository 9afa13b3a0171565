//! QEMU machines: firmware, disks, NICs, serial console capture.
