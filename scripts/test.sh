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
scripts/guest-kernel.sh

step "formatting and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

step "tests (unit, golden, integration, end to end)"
test_log="$KILN_CACHE/last-test-run.log"
cargo test --workspace --locked --no-fail-fast -- --test-threads="${KILN_TEST_THREADS:-2}" 2>&1 \
  | tee "$test_log"

step "fuzzing every network parser briefly"
scripts/fuzz.sh

# One closing line for the whole suite (cargo prints one result line per test binary).
awk '/^test result:/ { passed += $4; failed += $6; ignored += $8 }
     END { printf "tests: %d passed, %d failed, %d skipped\n", passed, failed, ignored }' "$test_log"
