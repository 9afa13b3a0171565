#!/usr/bin/env bash
# The README's main job: build the embedded default appliance spec into a hybrid ISO, then
# install it into a lab VM and boot the installed disk until the node agent is ready.
# KILN_FIRMWARE=bios|uefi picks the lab VM's firmware (default uefi).
set -euo pipefail
cd "$(dirname "$0")/.."

export KILN_CACHE="${KILN_CACHE:-$HOME/.cache/kiln}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$KILN_CACHE/target}"
firmware="${KILN_FIRMWARE:-uefi}"

step() { printf '\n== %s\n' "$*"; }

step "installing dependencies"
scripts/install-deps.sh

step "building kiln (release)"
cargo build --release --locked
kiln="$CARGO_TARGET_DIR/release/kiln"

step "building the appliance image into out/"
"$kiln" build --out out/

step "installing out/kiln.iso into a lab VM ($firmware) and booting it"
# The lab disk is scratch space: every run installs onto a fresh one.
rm -f out/disk.raw
"$kiln" lab install --iso out/kiln.iso --disk out/disk.raw --firmware "$firmware"
