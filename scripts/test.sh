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
# Two lanes side by side: a booting guest or a host-side API server leaves part of the two
# cores idle, which the other lane takes. The rack lane holds the tests that share the signed
# lab install image, its upgrade builds and the virtual rack (all under $KILN_CACHE); the other
# lane runs every other package's tests and the rest of the root package's, the guests that
# build their own images (the live ISO, Ceph's hypervisor, the Ceph and Kubernetes nodes) among
# them.
rack_tests=(bmc_ipmi fleet_rollout lab_disk_safety lab_install lab_rack pxe_qemu)
other_tests=()
for f in tests/*.rs; do
  t=$(basename "$f" .rs)
  [[ " ${rack_tests[*]} " == *" $t "* ]] || other_tests+=("$t")
done
threads="${KILN_TEST_THREADS:-2}"
# Each selection unifies its dependencies' features on its own, so each is built (once, then
# cached) before the lanes start, rather than one lane waiting on the other's build.
other_packages=(cargo test --workspace --exclude kiln --locked --no-fail-fast)
other_root=(cargo test -p kiln --locked --no-fail-fast --bins "${other_tests[@]/#/--test=}")
rack_lane=(cargo test -p kiln --locked --no-fail-fast "${rack_tests[@]/#/--test=}")
"${other_packages[@]}" --no-run
"${other_root[@]}" --no-run
"${rack_lane[@]}" --no-run
test_log="$KILN_CACHE/last-test-run.log"
other_log="$KILN_CACHE/last-test-run.other.log"
rack_log="$KILN_CACHE/last-test-run.rack.log"
other_lane() {
  local status=0
  "${other_packages[@]}" -- --test-threads="$threads" || status=$?
  "${other_root[@]}" -- --test-threads="$threads" || status=$?
  return "$status"
}
other_lane > "$other_log" 2>&1 &
other_pid=$!
echo "every other package's tests and ${other_tests[*]} run beside this lane; their output"
echo "follows it (and is in $other_log)"
rack_status=0
"${rack_lane[@]}" -- --test-threads="$threads" 2>&1 | tee "$rack_log" || rack_status=$?
other_status=0
wait "$other_pid" || other_status=$?
step "the other lane (ran beside the one above)"
cat "$other_log"
cat "$rack_log" "$other_log" > "$test_log"

# One closing line for the whole suite (cargo prints one result line per test binary).
summary() {
  awk '/^test result:/ { passed += $4; failed += $6; ignored += $8 }
       END { printf "tests: %d passed, %d failed, %d skipped\n", passed, failed, ignored }' "$test_log"
}
if [ "$rack_status" != 0 ] || [ "$other_status" != 0 ]; then
  summary
  echo "tests failed (lane status: rack $rack_status, other $other_status)" >&2
  exit 1
fi

step "fuzzing every network parser briefly"
scripts/fuzz.sh

summary
