#!/usr/bin/env bash
# Power-status sweep over N ipmi_sim BMCs on loopback (default 200, no VMs attached):
# kiln's wall time against ipmitool run once per BMC through `xargs -P 64`, and sequentially.
# Prints the times and the ratios; never fails on absolute times.
#   benches/bmc.sh [N]      (KILN_BENCH_PROFILE=release for an optimised kiln build)
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh

n="${1:-200}"
profile="${KILN_BENCH_PROFILE:-dev}"
for tool in ipmi_sim ipmitool; do
  command -v "$tool" >/dev/null || { echo "$tool missing (Debian packages openipmi, ipmitool)" >&2; exit 1; }
done

cargo build -q --profile "$profile" -p kiln -p kiln-bmc --example ipmi_sim_fleet
out_dir="$CARGO_TARGET_DIR/$([ "$profile" = dev ] && echo debug || echo "$profile")"
kiln="$out_dir/kiln"

work="$(mktemp -d)"
coproc FLEET { "$out_dir/examples/ipmi_sim_fleet" "$n" "$work"; }
trap 'exec {FLEET[1]}>&-; wait "$FLEET_PID" 2>/dev/null || true; rm -rf "$work"' EXIT
read -r line <&"${FLEET[0]}"
[ "$line" = ready ] || { echo "the simulators did not start" >&2; exit 1; }

now() { date +%s.%N; }
ipmi() { ipmitool -I lanplus -C 3 -H 127.0.0.1 -p "$1" -U admin -f "$work/password" chassis power status; }
export -f ipmi
export work

t0=$(now)
ok=$("$kiln" bmc power status --inventory "$work/fleet.yaml" --nodes '*' -o json --concurrency 64 \
  | grep -c '"ok":true' || true)
t1=$(now)
par=$(xargs -P 64 -I{} bash -c 'ipmi {}' <"$work/ports" | grep -c 'is off' || true)
t2=$(now)
seq=0
while read -r port; do
  ipmi "$port" | grep -q 'is off' && seq=$((seq + 1))
done <"$work/ports"
t3=$(now)
record "power status of $n BMCs" s lower "$(bc <<<"$t1 - $t0")" "ipmitool, 64 at once" "$(bc <<<"$t2 - $t1")" 1.0

awk -v n="$n" -v ok="$ok" -v par="$par" -v seq="$seq" \
    -v t0="$t0" -v t1="$t1" -v t2="$t2" -v t3="$t3" 'BEGIN {
  k = t1 - t0; p = t2 - t1; s = t3 - t2
  printf "power-status sweep over %d ipmi_sim BMCs (answers: kiln %d, ipmitool -P64 %d, sequential %d)\n", n, ok, par, seq
  printf "  kiln bmc (64 at once)        %7.2f s\n", k
  printf "  ipmitool via xargs -P 64     %7.2f s   kiln is %.1fx faster\n", p, p / k
  printf "  ipmitool sequential          %7.2f s   kiln is %.1fx faster\n", s, s / k
}'
