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
# Two lanes side by side, so the tests that leave a core idle (one booting guest, a host-side
# API server) lend it to the other lane: the tests that boot QEMU guests, which also build and
# share the lab images under $KILN_CACHE, run in one lane; everything else in the other.
vm_tests=(bmc_ipmi build_image ceph_node fleet_rollout lab_ceph lab_disk_safety lab_install
  lab_kubernetes lab_rack pxe_qemu)
host_tests=()
for f in tests/*.rs; do
  t=$(basename "$f" .rs)
  [[ " ${vm_tests[*]} " == *" $t "* ]] || host_tests+=("$t")
done
threads="${KILN_TEST_THREADS:-2}"
# Each selection unifies its dependencies' features on its own, so each is built (once, then
# cached) before the lanes start, rather than one lane waiting on the other's build.
host_packages=(cargo test --workspace --exclude kiln --locked --no-fail-fast)
host_root=(cargo test -p kiln --locked --no-fail-fast --bins "${host_tests[@]/#/--test=}")
vm_lane=(cargo test -p kiln --locked --no-fail-fast "${vm_tests[@]/#/--test=}")
"${host_packages[@]}" --no-run
"${host_root[@]}" --no-run
"${vm_lane[@]}" --no-run
test_log="$KILN_CACHE/last-test-run.log"
host_log="$KILN_CACHE/last-test-run.host.log"
vm_log="$KILN_CACHE/last-test-run.vm.log"
host_lane() {
  local status=0
  "${host_packages[@]}" -- --test-threads="$threads" || status=$?
  "${host_root[@]}" -- --test-threads="$threads" || status=$?
  return "$status"
}
host_lane > "$host_log" 2>&1 &
host_pid=$!
echo "host-side tests (${host_tests[*]} and every other package) run beside this lane; their"
echo "output follows it (and is in $host_log)"
vm_status=0
"${vm_lane[@]}" -- --test-threads="$threads" 2>&1 | tee "$vm_log" || vm_status=$?
host_status=0
wait "$host_pid" || host_status=$?
step "host-side tests (ran beside the lane above)"
cat "$host_log"
cat "$vm_log" "$host_log" > "$test_log"

# One closing line for the whole suite (cargo prints one result line per test binary).
summary() {
  awk '/^test result:/ { passed += $4; failed += $6; ignored += $8 }
       END { printf "tests: %d passed, %d failed, %d skipped\n", passed, failed, ignored }' "$test_log"
}
if [ "$vm_status" != 0 ] || [ "$host_status" != 0 ]; then
  summary
  echo "tests failed (lane status: VM $vm_status, host $host_status)" >&2
  exit 1
fi

step "fuzzing every network parser briefly"
scripts/fuzz.sh

summary
