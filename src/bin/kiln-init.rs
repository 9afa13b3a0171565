//! kiln's stage-1: PID 1 of the initramfs (see `kiln_installer::stage1`). A binary of its own,
//! about a megabyte rather than the whole CLI, because every boot loads and unpacks it.

fn main() {
    kiln_installer::stage1::run();
}
