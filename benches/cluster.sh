#!/usr/bin/env bash
# Node maintenance benchmark: `kiln node maintenance enter` (100 VMIs + 200 pods, and the
# 200 pods alone) against `kubectl drain` of the same 200 pods, on one real kube-apiserver +
# etcd with stand-in kubelet and virt-controller. Prints wall time and API request counts;
# never gates anything.
set -euo pipefail
cd "$(dirname "$0")/.."
export KILN_CACHE="${KILN_CACHE:-$HOME/.cache/kiln}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$KILN_CACHE/target}"

scripts/kube-fixtures.sh
cargo build -p kiln
cargo run -q -p kiln-cluster --features testing --example maintenance_bench -- "$CARGO_TARGET_DIR/debug/kiln"
