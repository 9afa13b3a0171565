#!/usr/bin/env bash
# Builds the real Kubernetes pieces from their Go modules, pinned in
# scripts/kube-fixtures/versions.env: `kube`, one multi-call binary holding kube-apiserver,
# kube-controller-manager, kube-scheduler, kubelet, kube-proxy and kubectl (k8s.io/kubernetes,
# main in scripts/kube-fixtures/kube), etcd (go.etcd.io/etcd/server/v3) and CoreDNS with the
# cluster DNS plugins only (main in scripts/kube-fixtures/coredns). The tests run them and
# `kiln build` puts them into the appliance image. Binaries land in $KILN_CACHE/bin/<version>/
# (CoreDNS: bin/coredns-<version>/) with a symlink per component; a no-op when cached.
#
# k8s.io/kubernetes cannot be required as-is: its go.mod replaces every k8s.io staging module
# with a path inside its own tree. A wrapper module requires it and replaces each staging
# module it requires with the published v0.Y.Z of the same release.
#
# `kiln build` runs this same script (embedded) for images with the kubernetes feature, with
# KUBE_FIXTURES_DIR pointing at its copies of versions.env and kube/main.go.
set -euo pipefail
fixtures="${KUBE_FIXTURES_DIR:-$(cd "$(dirname "$0")" && pwd)/kube-fixtures}"
# shellcheck source=kube-fixtures/versions.env
source "$fixtures/versions.env"

export KILN_CACHE="${KILN_CACHE:-$HOME/.cache/kiln}"
export PATH="$PATH:/usr/local/go/bin"
export GOFLAGS=-mod=mod CGO_ENABLED=0
command -v go >/dev/null || { echo "kube-fixtures: go not found (install Go to /usr/local/go)" >&2; exit 1; }

kube_bin="$KILN_CACHE/bin/$KUBERNETES_VERSION"
etcd_bin="$KILN_CACHE/bin/$ETCD_VERSION"
work="$KILN_CACHE/src/kube-fixtures"
main_go="$fixtures/kube/main.go"
main_sum="$(sha256sum "$main_go" | cut -d' ' -f1)"
coredns_bin="$KILN_CACHE/bin/coredns-$COREDNS_VERSION"
coredns_main="$fixtures/coredns/main.go"
coredns_sum="$(sha256sum "$coredns_main" | cut -d' ' -f1)"

build_kubernetes() {
    if [[ -x $kube_bin/kube && $(cat "$kube_bin/kube.main.sha256" 2>/dev/null) == "$main_sum" ]]; then
        return
    fi
    local dir="$work/kubernetes-$KUBERNETES_VERSION" staging="v0.${KUBERNETES_VERSION#v1.}"
    echo "kube-fixtures: building the Kubernetes components $KUBERNETES_VERSION (slow, once: 20-40 CPU-minutes)"
    mkdir -p "$dir" "$kube_bin"
    cd "$dir"
    # Outside a module -mod=mod is refused; only this download runs there.
    GOFLAGS= go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" >/dev/null
    local upstream_mod
    upstream_mod="$(go env GOMODCACHE)/cache/download/k8s.io/kubernetes/@v/$KUBERNETES_VERSION.mod"
    {
        echo "module kiln.test/kube-fixtures"
        echo
        echo "go $(awk '$1 == "go" {print $2; exit}' "$upstream_mod")"
        echo
        echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
        echo
        echo "replace ("
        # Staging modules: the ones upstream replaces with ./staging/... and also requires.
        awk '$2 == "=>" && $3 ~ /^\.\/staging\// {print $1}' "$upstream_mod" | while read -r m; do
            if grep -qE "^[[:space:]]+$m v0\.0\.0" "$upstream_mod"; then
                echo "	$m => $m $staging"
            fi
        done
        echo ")"
    } >go.mod
    rm -f go.sum
    local v=k8s.io/component-base/version cv=k8s.io/client-go/pkg/version
    local major="${KUBERNETES_VERSION#v}" minor
    minor="${major#*.}"
    minor="${minor%%.*}"
    major="${major%%.*}"
    local ldflags="-s -w"
    for p in $v $cv; do
        ldflags+=" -X $p.gitVersion=$KUBERNETES_VERSION -X $p.gitMajor=$major -X $p.gitMinor=$minor"
        ldflags+=" -X $p.gitTreeState=clean"
    done
    cp "$main_go" main.go
    go build -trimpath -ldflags "$ldflags" -o "$kube_bin/.kube.tmp" .
    mv "$kube_bin/.kube.tmp" "$kube_bin/kube"
    for c in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl; do
        ln -sfn kube "$kube_bin/$c"
    done
    echo "$main_sum" >"$kube_bin/kube.main.sha256"
}

build_etcd() {
    if [[ -x $etcd_bin/etcd ]]; then
        return
    fi
    local dir="$work/etcd-$ETCD_VERSION"
    echo "kube-fixtures: building etcd $ETCD_VERSION"
    mkdir -p "$dir" "$etcd_bin"
    cd "$dir"
    # The etcd server module replaces its sibling modules with relative paths; a wrapper
    # requires them at the same published version instead.
    cat >go.mod <<MOD
module kiln.test/etcd-fixture

go 1.24

require (
	go.etcd.io/etcd/server/v3 $ETCD_VERSION
	go.etcd.io/etcd/api/v3 $ETCD_VERSION
	go.etcd.io/etcd/client/pkg/v3 $ETCD_VERSION
	go.etcd.io/etcd/client/v3 $ETCD_VERSION
	go.etcd.io/etcd/pkg/v3 $ETCD_VERSION
)
MOD
    rm -f go.sum
    go build -trimpath -ldflags "-s -w" -o "$etcd_bin/.etcd.tmp" go.etcd.io/etcd/server/v3
    mv "$etcd_bin/.etcd.tmp" "$etcd_bin/etcd"
}

build_coredns() {
    if [[ -x $coredns_bin/coredns && $(cat "$coredns_bin/coredns.main.sha256" 2>/dev/null) == "$coredns_sum" ]]; then
        return
    fi
    local dir="$work/coredns-$COREDNS_VERSION"
    echo "kube-fixtures: building CoreDNS $COREDNS_VERSION"
    mkdir -p "$dir" "$coredns_bin"
    cd "$dir"
    cat >go.mod <<MOD
module kiln.test/coredns

go 1.24

require github.com/coredns/coredns $COREDNS_VERSION
MOD
    rm -f go.sum
    cp "$coredns_main" main.go
    go build -trimpath -ldflags "-s -w" -o "$coredns_bin/.coredns.tmp" .
    mv "$coredns_bin/.coredns.tmp" "$coredns_bin/coredns"
    echo "$coredns_sum" >"$coredns_bin/coredns.main.sha256"
}

(build_etcd)
(build_coredns)
(build_kubernetes)
echo "kube-fixtures: $kube_bin/kube $etcd_bin/etcd $coredns_bin/coredns"
