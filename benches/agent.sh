#!/usr/bin/env bash
# Node agent benchmarks on a temporary root (nothing outside it is touched):
#   1. time to converge 1,000 managed files from empty (`kiln node apply`), next to a peer
#      that writes the same files without the agent (tar extract + sync) in the same run;
#   2. drift-repair latency p50/p99 over 200 hand edits of a managed file;
#   3. idle RSS and CPU of the agent over 60 s (KILN_BENCH_IDLE_SECS to change).
# Build profile: KILN_BENCH_PROFILE (default release); RUNS converges each (default 5). Needs
# root (each converge gets a loop-mounted file system). Prints figures; never fails on them.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh

profile="${KILN_BENCH_PROFILE:-release}"
idle_secs="${KILN_BENCH_IDLE_SECS:-60}"
flag=(); [ "$profile" = release ] && flag=(--release)
cargo build -q "${flag[@]}" -p kiln
cargo build -q "${flag[@]}" -p kiln-agent --example drift_latency
bin="$CARGO_TARGET_DIR/$profile"
kiln="$bin/kiln"

work="$(mktemp -d)"
agent_pid=""
mounts=()
cleanup() {
    [ -n "$agent_pid" ] && kill "$agent_pid" 2>/dev/null && wait "$agent_pid" 2>/dev/null
    for m in "${mounts[@]}"; do umount "$m" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
sock="$work/agent.sock"
runs="${RUNS:-5}"

make_root() { # $1 = root directory
    root="$1"
    config="$root/var/lib/kiln/node.yaml"
    mkdir -p "$root/etc" "$root/var/lib/kiln"
    echo 'root:x:0:0:root:/root:/bin/bash' > "$root/etc/passwd"
    echo 'root:x:0:' > "$root/etc/group"
}
write_config() { # $1 = number of files
    {
        printf 'apiVersion: kiln.dev/v1alpha1\nkind: NodeConfig\nspec:\n  files:\n'
        printf '    - {path: /etc/bench/watched.conf, content: "managed\\n"}\n'
        for ((i = 0; i < $1; i++)); do
            printf '    - {path: /srv/bench/d%02d/f%04d, content: "file %d of the benchmark\\n"}\n' $((i % 50)) "$i" "$i"
        done
    } > "$config"
}
start_agent() {
    "$kiln" agent run --root "$root" --socket "$sock" --resync-secs 3600 > "$work/agent.out" 2> "$work/agent.log" &
    agent_pid=$!
    for _ in $(seq 1 300); do grep -q 'kiln-agent ready' "$work/agent.out" 2>/dev/null && break; sleep 0.1; done
    grep -q 'kiln-agent ready' "$work/agent.out" || { echo "agent did not start:"; cat "$work/agent.log"; exit 1; }
}
stop_agent() { kill "$agent_pid"; wait "$agent_pid" 2>/dev/null || true; agent_pid=""; }
# Each converge, kiln's and the peer's, writes into a new ext4 file system of its own (as a
# node's state partition is): ext4 passes over inodes freed in the last minutes when it
# allocates, so on the shared /tmp either side's figure would depend on what was deleted
# before it (the same 1,000 files took 23 ms or 120 ms to extract there).
fresh_fs() { # $1 = mount point
    mkdir -p "$1"
    truncate -s 256M "$1.img"
    mkfs.ext4 -q -F "$1.img"
    mount -o loop "$1.img" "$1"
    mounts+=("$1")
}
drop_fs() { umount "$1"; rm -f "$1.img"; }
now_ms() { date +%s%3N; }

echo "== converge 1,000 managed files from empty, $runs runs each"
kiln_runs=(); peer_runs=()
for run in $(seq "$runs"); do
    fresh_fs "$work/kiln-fs"
    make_root "$work/kiln-fs"
    write_config 0
    start_agent
    write_config 1000
    sync
    t0=$(now_ms)
    "$kiln" node apply --socket "$sock" > /dev/null
    t1=$(now_ms)
    kiln_runs+=($((t1 - t0)))
    count=$(find "$root/srv/bench" -type f | wc -l)
    [ "$count" -eq 1000 ] || { echo "kiln converged $count files, not 1000"; exit 1; }
    # Peer: the same files extracted by tar, then synced (no diff, no per-file fsync).
    [ -f "$work/peer.tar" ] || tar -C "$root/srv/bench" -cf "$work/peer.tar" .
    stop_agent
    drop_fs "$work/kiln-fs"

    fresh_fs "$work/peer-fs"
    sync
    t0=$(now_ms)
    tar -C "$work/peer-fs" -xf "$work/peer.tar" && sync -f "$work/peer-fs"
    t1=$(now_ms)
    peer_runs+=($((t1 - t0)))
    drop_fs "$work/peer-fs"
    echo "run $run: kiln ${kiln_runs[-1]} ms, tar -x + sync ${peer_runs[-1]} ms"
done
kiln_ms=$(printf '%s\n' "${kiln_runs[@]}" | median)
peer_ms=$(printf '%s\n' "${peer_runs[@]}" | median)
echo "kiln agent: ${kiln_ms} ms for 1000 files (median; atomic writes, made durable per batch; record, journal)"
echo "peer (tar -x + sync): ${peer_ms} ms; ratio kiln/peer: $(awk "BEGIN{printf \"%.1f\", $kiln_ms/($peer_ms>0?$peer_ms:1)}")"
record "agent converge, 1,000 files from empty" ms lower "$kiln_ms" "tar -x + sync" "$((peer_ms > 0 ? peer_ms : 1))" 1.0

# The rest runs one agent over 1,001 converged files.
make_root "$work/root"
write_config 1000
start_agent
"$kiln" node apply --socket "$sock" > /dev/null
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
