#!/usr/bin/env bash
# Runs every bench script in one go on this machine and writes, into OUT (default
# bench-results/): bench.txt, each script's own table one after another, and
# bench-results.json, every recorded figure (kiln, peer, ratio, target, met) with the machine
# it was measured on. One release build of kiln serves the scripts that take a prebuilt binary.
#   benches/run-all.sh [SCRIPT...]     (default: netboot install boot agent bmc cluster build fleet)
# Needs root (network namespaces, virtual rack). A failing script is reported and the rest run;
# the exit status says whether all of them finished.
set -euo pipefail
cd "$(dirname "$0")/.."

out="${OUT:-bench-results}"
scripts=("$@")
[ "${#scripts[@]}" -gt 0 ] || scripts=(netboot install boot agent bmc cluster build fleet)
for s in "${scripts[@]}"; do
  [ -x "benches/$s.sh" ] || { echo "run-all: no benches/$s.sh" >&2; exit 2; }
done

source benches/lib.sh
scripts/install-deps.sh
KILN_BIN=$(release_kiln)
export KILN_BIN

mkdir -p "$out"
export KILN_BENCH_RESULTS
KILN_BENCH_RESULTS="$(realpath "$out")/figures.jsonl"
: > "$KILN_BENCH_RESULTS"
: > "$out/bench.txt"
failed=()
for s in "${scripts[@]}"; do
  echo "== benches/$s.sh" | tee -a "$out/bench.txt"
  start=$(date +%s)
  if ! "benches/$s.sh" 2>&1 | tee -a "$out/bench.txt"; then
    failed+=("$s")
    echo "run-all: benches/$s.sh failed" | tee -a "$out/bench.txt"
  fi
  echo "run-all: benches/$s.sh took $(($(date +%s) - start)) s" | tee -a "$out/bench.txt"
done

jq -s --arg cpu "$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)" \
  --argjson cores "$(nproc)" \
  --argjson mem_kib "$(awk '/^MemTotal/ {print $2}' /proc/meminfo)" \
  --arg kernel "$(uname -r)" \
  --arg os "$(. /etc/os-release && echo "$PRETTY_NAME")" \
  --arg commit "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
  --arg date "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
  --argjson failed "$(printf '%s\n' "${failed[@]}" | jq -R 'select(length > 0)' | jq -s .)" '
  {machine: {cpu: $cpu, cores: $cores, memory_kib: $mem_kib, kernel: $kernel, os: $os},
   kiln_commit: $commit, date: $date, failed_scripts: $failed, figures: .}' \
  "$KILN_BENCH_RESULTS" > "$out/bench-results.json"
rm -f "$KILN_BENCH_RESULTS"

echo
printf '%-52s %10s %12s  %-38s %7s %7s\n' figure kiln peer "(peer)" ratio target | tee -a "$out/bench.txt"
jq -r '.figures[] | [.figure, (.kiln | tostring), (.peer_value | tostring), .peer,
  (.ratio | tostring), ((if .better == "higher" then ">= " else "<= " end) + (.target | tostring))
  + (if .met then "" else "  (missed)" end)] | @tsv' "$out/bench-results.json" \
  | while IFS=$'\t' read -r f k p pn r t; do
      printf '%-52s %10s %12s  %-38s %7s %s\n' "$f" "$k" "$p" "$pn" "$r" "$t"
    done | tee -a "$out/bench.txt"
echo "run-all: $out/bench-results.json, $out/bench.txt"
[ "${#failed[@]}" -eq 0 ]
