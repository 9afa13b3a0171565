#!/usr/bin/env bash
# Node maintenance benchmark: `kiln node maintenance enter` (100 VMIs + 200 pods, and the
# 200 pods alone) against `kubectl drain` of the same 200 pods, on one real kube-apiserver +
# etcd with stand-in kubelet and virt-controller. Prints wall time and API request counts;
# never gates anything.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh

scripts/kube-fixtures.sh
cargo build -p kiln
out=$(cargo run -q -p kiln-cluster --features testing --example maintenance_bench -- "$CARGO_TARGET_DIR/debug/kiln")
echo "$out"
# Rows 2 and 3 of its table: kiln and kubectl draining the same 200 pods.
read -r kiln_s kubectl_s < <(awk '/^run / {t = 1; next} t && NF {r++; w[r] = $(NF - 1)} END {print w[2], w[3]}' <<<"$out")
record "drain of 200 pods" s lower "$kiln_s" "kubectl drain" "$kubectl_s" 1.0
