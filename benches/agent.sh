#!/usr/bin/env bash
# Node agent benchmarks on a temporary root (nothing outside it is touched):
#   1. time to converge 1,000 managed files from empty (`kiln node apply`), next to a peer
#      that writes the same files without the agent (tar extract + sync) in the same run;
#   2. drift-repair latency p50/p99 over 200 hand edits of a managed file;
#   3. idle RSS and CPU of the agent over 60 s (KILN_BENCH_IDLE_SECS to change).
# Build profile: KILN_BENCH_PROFILE (default release). Prints figures; never fails on them.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh

profile="${KILN_BENCH_PROFILE:-release}"
idle_secs="${KILN_BENCH_IDLE_SECS:-60}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${KILN_CACHE:-$HOME/.cache/kiln}/target}"
flag=(); [ "$profile" = release ] && flag=(--release)
cargo build -q "${flag[@]}" -p kiln
cargo build -q "${flag[@]}" -p kiln-agent --example drift_latency
bin="$CARGO_TARGET_DIR/$profile"
kiln="$bin/kiln"

work="$(mktemp -d)"
agent_pid=""
cleanup() {
    [ -n "$agent_pid" ] && kill "$agent_pid" 2>/dev/null && wait "$agent_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

root="$work/root"
mkdir -p "$root/etc" "$root/var/lib/kiln"
echo 'root:x:0:0:root:/root:/bin/bash' > "$root/etc/passwd"
echo 'root:x:0:' > "$root/etc/group"
sock="$work/agent.sock"
config="$root/var/lib/kiln/node.yaml"

write_config() { # $1 = number of files
    {
        printf 'apiVersion: kiln.dev/v1alpha1\nkind: NodeConfig\nspec:\n  files:\n'
        printf '    - {path: /etc/bench/watched.conf, content: "managed\\n"}\n'
        for ((i = 0; i < $1; i++)); do
            printf '    - {path: /srv/bench/d%02d/f%04d, content: "file %d of the benchmark\\n"}\n' $((i % 50)) "$i" "$i"
        done
    } > "$config"
}

now_ms() { date +%s%3N; }

write_config 0
"$kiln" agent run --root "$root" --socket "$sock" --resync-secs 3600 > "$work/agent.out" 2> "$work/agent.log" &
agent_pid=$!
for _ in $(seq 1 300); do grep -q 'kiln-agent ready' "$work/agent.out" 2>/dev/null && break; sleep 0.1; done
grep -q 'kiln-agent ready' "$work/agent.out" || { echo "agent did not start:"; cat "$work/agent.log"; exit 1; }

echo "== converge 1,000 managed files from empty"
write_config 1000
t0=$(now_ms)
"$kiln" node apply --socket "$sock" > /dev/null
t1=$(now_ms)
kiln_ms=$((t1 - t0))
count=$(find "$root/srv/bench" -type f | wc -l)
# Peer: the same files extracted by tar, then synced (no diff, no per-file fsync).
peer_src="$work/peer-src"; peer_dst="$work/peer-dst"
mkdir -p "$peer_dst"; cp -a "$root/srv/bench" "$peer_src"
tar -C "$peer_src" -cf "$work/peer.tar" .
t0=$(now_ms)
tar -C "$peer_dst" -xf "$work/peer.tar" && sync -f "$peer_dst"
t1=$(now_ms)
peer_ms=$((t1 - t0))
echo "kiln agent: ${kiln_ms} ms for $count files (atomic writes, made durable per batch; record, journal)"
echo "peer (tar -x + sync): ${peer_ms} ms; ratio kiln/peer: $(awk "BEGIN{printf \"%.1f\", $kiln_ms/($peer_ms>0?$peer_ms:1)}")"
record "agent converge, 1,000 files from empty" ms lower "$kiln_ms" "tar -x + sync" "$((peer_ms > 0 ? peer_ms : 1))" 1.0
t0=$(now_ms)
"$kiln" node apply --socket "$sock" > /dev/null
t1=$(now_ms)
echo "second apply (no change, 1,001 files compared): $((t1 - t0)) ms"

echo "== drift repair (inotify), 200 edits"
drift=$("$bin/examples/drift_latency" "$root/etc/bench/watched.conf" $'managed\n' 200)
echo "$drift"
p99=$(sed -n 's/.* p99 \([0-9.]*\) ms.*/\1/p' <<<"$drift")
record "agent drift repair p99" ms lower "$p99" "the 100 ms target" 100 1.0

echo "== idle agent over ${idle_secs} s (1,001 managed files, resync every hour)"
clk=$(getconf CLK_TCK)
cpu() { awk '{print $14 + $15}' "/proc/$agent_pid/stat"; }
c0=$(cpu); t0=$(now_ms)
sleep "$idle_secs"
c1=$(cpu); t1=$(now_ms)
rss=$(awk '/VmRSS/ {print $2}' "/proc/$agent_pid/status")
echo "RSS ${rss} kB; CPU $(awk "BEGIN{printf \"%.3f\", 100*($c1-$c0)/$clk/(($t1-$t0)/1000)}") % of one core"
