#!/usr/bin/env bash
# Image build benchmarks (figures, not a test; never gates CI). Measured in one run:
#   - cold build of the `test` profile (empty cache: mmdebstrap runs) vs mkosi building the same
#     package set, when mkosi is installed;
#   - rebuild after a one-line spec change (base rootfs from the cache) vs the cold build;
#   - ISO and squashfs sizes of the `test` profile, and of `appliance` with --appliance.
# Usage: benches/build.sh [--appliance]
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh

cargo build --quiet --bin kiln --bin kiln-init
kiln="$CARGO_TARGET_DIR/debug/kiln"
work=$(mktemp -d /var/tmp/kiln-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT

seconds() { jq -r '.seconds' "$1"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
size_mib() { jq -r --arg p "$2" '.manifest.artifacts[] | select(.path == $p) | .size / 1048576 | . * 10 | floor / 10' "$1"; }

echo "== cold build (empty cache)"
"$kiln" build --profile test --out "$work/cold" --cache "$work/cache" --output json >"$work/cold.json"
cold=$(seconds "$work/cold.json")

echo "== rebuild after a spec change (cached base rootfs)"
{ bench_spec; printf '  os:\n    kernelArgs:\n      - kiln.bench=1\n'; } >"$work/changed.yaml"
"$kiln" build --spec "$work/changed.yaml" --out "$work/warm" --cache "$work/cache" --output json >"$work/warm.json"
warm=$(seconds "$work/warm.json")
record "rebuild after a spec change" s lower "$warm" "kiln cold build" "$cold" 0.05
[ "$(jq -r .rootfs_cache_hit "$work/warm.json")" = true ] || { echo "rebuild missed the cache" >&2; exit 1; }

mkosi_line="mkosi: not installed (Debian package mkosi), no comparison"
if command -v mkosi >/dev/null 2>&1; then
  echo "== mkosi, same package set"
  include=$(jq -r '[.manifest.packages[].name] | join(",")' "$work/cold.json")
  mkdir -p "$work/mkosi"
  start=$(date +%s.%N)
  # --with-docs: mkosi 14 strips docs through systemd-nspawn, which fails without a running
  # systemd (containers, CI); kiln's trim step does that work, so mkosi is measured without it.
  (cd "$work/mkosi" && mkosi --distribution debian --release bookworm --with-docs \
    --format directory --package "$include" --output image build >/dev/null)
  mkosi_s=$(awk -v a="$(date +%s.%N)" -v b="$start" 'BEGIN { print a - b }')
  record "cold build, test profile" s lower "$cold" "mkosi, same packages" "$mkosi_s" 1.0
  mkosi_line=$(printf "mkosi (directory, same packages): %.1f s; kiln cold / mkosi = %s" "$mkosi_s" "$(ratio "$cold" "$mkosi_s")")
fi

appliance_line="appliance profile: skipped (pass --appliance)"
if [ "${1:-}" = "--appliance" ]; then
  echo "== appliance profile"
  "$kiln" build --profile appliance --out "$work/appliance" --cache "$work/cache" --output json >"$work/appliance.json"
  appliance_line="appliance profile: ISO $(size_mib "$work/appliance.json" kiln.iso) MiB, built in $(seconds "$work/appliance.json") s"
fi

echo
printf "cold build (test profile):  %6.1f s\n" "$cold"
printf "rebuild after spec change:  %6.1f s  (rebuild / cold = %s)\n" "$warm" "$(ratio "$warm" "$cold")"
echo "test profile: ISO $(size_mib "$work/cold.json" kiln.iso) MiB, squashfs $(size_mib "$work/cold.json" pxe/rootfs.squashfs) MiB"
echo "$mkosi_line"
echo "$appliance_line"
