# Shared by the bench scripts (sourced).

# Every script's cache and Cargo target directory: the test suite's, so builds are shared.
export KILN_CACHE="${KILN_CACHE:-$HOME/.cache/kiln}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$KILN_CACHE/target}"

# The release kiln a bench measures: KILN_BIN (a prebuilt binary, e.g. from another checkout,
# with kiln-init beside it), else this checkout's, built now.
release_kiln() {
  if [ -n "${KILN_BIN:-}" ]; then
    echo "$KILN_BIN"
  else
    echo "bench: building kiln (release)" >&2
    cargo build --release -q -p kiln >&2
    echo "$CARGO_TARGET_DIR/release/kiln"
  fi
}

# The median of the numbers on standard input, one per line (the lower middle one of an even
# count).
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# The start of a `test` profile spec; a caller appends its own fields under `spec:`.
bench_spec() {
  printf 'apiVersion: kiln.dev/v1alpha1\nkind: Appliance\nmetadata:\n  name: bench\nspec:\n  profile: test\n'
}

# Keeps one figure for benches/run-all.sh, which gathers them into bench-results.json; a
# script run alone just prints its table.
#
#   record FIGURE UNIT BETTER KILN PEER PEER_VALUE TARGET
#
# BETTER is "higher" (throughput) or "lower" (time); the ratio is always KILN / PEER_VALUE
# and the figure meets its target when the ratio is at or beyond TARGET in that direction.
record() {
  [ -n "${KILN_BENCH_RESULTS:-}" ] || return 0
  jq -nc --arg figure "$1" --arg unit "$2" --arg better "$3" --argjson kiln "$4" \
    --arg peer "$5" --argjson peer_value "$6" --argjson target "$7" '
    def r: . * 1000 | round / 1000;
    ($kiln / $peer_value) as $ratio
    | {figure: $figure, unit: $unit, better: $better, kiln: ($kiln | r), peer: $peer,
       peer_value: ($peer_value | r), ratio: ($ratio | r), target: $target,
       met: (if $better == "higher" then $ratio >= $target else $ratio <= $target end)}' \
    >> "$KILN_BENCH_RESULTS"
}
