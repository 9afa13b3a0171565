#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ briefly: KILN_FUZZ_SECONDS each (default 30).
# cargo-fuzz is installed into $KILN_CACHE/tools on first use. Its sanitizer flags are
# nightly-only; RUSTC_BOOTSTRAP=1 lets the stable toolchain accept them. Corpora persist in
# $KILN_CACHE/fuzz-corpus so later runs start where earlier ones stopped; a crash fails the
# script and leaves its input under $KILN_CACHE/fuzz-artifacts/TARGET/.
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${KILN_CACHE:-$HOME/.cache/kiln}"
seconds="${KILN_FUZZ_SECONDS:-30}"
export PATH="$cache/tools/bin:$PATH"
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz into $cache/tools"
  cargo install --locked --root "$cache/tools" cargo-fuzz
fi
export RUSTC_BOOTSTRAP=1
# cargo-fuzz finds its binaries through --target-dir, not CARGO_TARGET_DIR.
unset CARGO_TARGET_DIR
target_dir="$cache/fuzz-target"

cd fuzz
mapfile -t targets < <(cargo fuzz list)
[ "${#targets[@]}" -gt 0 ] || { echo "fuzz: no targets in fuzz/" >&2; exit 1; }
for t in "${targets[@]}"; do
  corpus="$cache/fuzz-corpus/$t"
  artifacts="$cache/fuzz-artifacts/$t"
  log="$cache/fuzz-artifacts/$t.log"
  mkdir -p "$corpus" "$artifacts"
  echo "== fuzz: $t for ${seconds}s"
  status=0
  cargo fuzz run --target-dir "$target_dir" "$t" "$corpus" -- \
    -max_total_time="$seconds" -max_len=4096 -print_final_stats=1 \
    -artifact_prefix="$artifacts/" >"$log" 2>&1 || status=$?
  grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|Done [0-9]+ runs)' "$log" || true
  if [ "$status" -ne 0 ]; then
    grep -E 'panicked|SUMMARY|ERROR' "$log" | head -5 >&2 || true
    echo "fuzz: $t failed (status $status); input and log in $artifacts/, $log" >&2
    exit 1
  fi
done
echo "fuzz: ${#targets[@]} targets ran ${seconds}s each without a crash"
