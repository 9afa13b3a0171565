#!/usr/bin/env bash
# Fleet rollout: wall time of `kiln fleet rollout` for N nodes at --parallel N against the same
# image rolled onto one node alone, same machine, same run (a virtual rack: QEMU under TCG
# behind ipmi_sim BMCs). Prints the per-stage split of both, the ratio N-node / 1-node (the
# target is at most 1.3), and the provisioner's own CPU time and peak memory. Not a CI gate.
# Needs root. KILN_BIN=PATH measures that binary; NODES=N (default 3).
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh

nodes="${NODES:-3}"
kiln=$(release_kiln)
out="$KILN_CACHE/bench-fleet-image"
echo "bench: building the test image into $out"
"$kiln" build --profile test --out "$out" >/dev/null

work=$(mktemp -d)
cleanup() {
  "$kiln" lab rack down --dir "$work/rack" --purge >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# One rollout of a fresh rack of $1 nodes; prints "wall cpu_seconds max_rss_kib".
rollout() {
  local n=$1
  "$kiln" lab rack down --dir "$work/rack" --purge >/dev/null 2>&1 || true
  "$kiln" lab rack up --nodes "$n" --dir "$work/rack" >/dev/null
  local start end
  start=$(date +%s.%N)
  "$kiln" lab rack exec --dir "$work/rack" -- /usr/bin/time -f "%U %S %M" -o "$work/time" \
    "$kiln" fleet rollout --inventory "$work/rack/fleet.yaml" --artifacts "$out" \
    --state-dir "$work/rack/state" --parallel "$n" >"$work/rollout-$n.log" 2>&1
  end=$(date +%s.%N)
  "$kiln" lab rack exec --dir "$work/rack" -- "$kiln" fleet status --output json \
    --state-dir "$work/rack/state" >"$work/status-$n.json"
  read -r user sys rss <"$work/time"
  echo "$(echo "$end - $start" | bc) $(echo "$user + $sys" | bc) $rss"
}

# Mean seconds per stage over the nodes of one status JSON.
split() {
  python3 - "$1" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
sums = {}
for n in s["nodes"]:
    for t in n["stages"]:
        sums.setdefault(t["stage"], []).append(t["seconds"])
order = ["powering-on", "netbooting", "installing", "rebooting"]
print("  ".join(f"{k} {sum(sums[k]) / len(sums[k]):6.1f}s" for k in order if k in sums))
EOF
}

read -r one_wall one_cpu one_rss < <(rollout 1)
one_split=$(split "$work/status-1.json")
read -r many_wall many_cpu many_rss < <(rollout "$nodes")
many_split=$(split "$work/status-$nodes.json")

printf '\n%-10s %9s %12s %12s   %s\n' nodes wall "kiln CPU" "kiln RSS" "mean per stage"
printf '%-10s %8.1fs %11.2fs %9d KiB   %s\n' 1 "$one_wall" "$one_cpu" "$one_rss" "$one_split"
printf '%-10s %8.1fs %11.2fs %9d KiB   %s\n' "$nodes" "$many_wall" "$many_cpu" "$many_rss" "$many_split"
record "rollout wall time, $nodes nodes at once" s lower "$many_wall" "one node alone" "$one_wall" 1.3
printf '\nratio %s-node / 1-node wall time: %.2f (target <= 1.3; the machines share %s cores)\n' \
  "$nodes" "$(echo "$many_wall / $one_wall" | bc -l)" "$(nproc)"
