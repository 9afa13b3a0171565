#!/usr/bin/env bash
# The whole test suite: installs what the tests need (Debian packages, Rust targets, test
# fixtures built from source, cached under ~/.cache/kiln), then lints and runs every test tier.
set -euo pipefail
cd "$(dirname "$0")/.."

export KILN_CACHE="${KILN_CACHE:-$HOME/.cache/kiln}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$KILN_CACHE/target}"
mkdir -p "$KILN_CACHE"

step() { printf '\n== %s\n' "$*"; }

step "installing test dependencies"
scripts/install-deps.sh
scripts/redfish-sim.sh --install
scripts/kube-fixtures.sh

step "formatting and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

step "tests (unit, golden, integration, end to end)"
cargo test --workspace --locked --no-fail-fast -- --test-threads="${KILN_TEST_THREADS:-2}"

step "fuzzing every network parser briefly"
scripts/fuzz.sh
