#!/usr/bin/env bash
# Builds the upstream test fixtures (etcd, kube-apiserver, cnitool) from their
# official Go modules and caches them by version outside the repository.
# Prints the folder that holds them (envtest layout: etcd, kube-apiserver, cnitool).
# If KUBEBUILDER_ASSETS names a folder with etcd and kube-apiserver, those are used
# and only cnitool is built.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# The versions live in the wrapper modules' `require` lines (one place to bump).
required() { awk -v m="$1" '$1 == "require" {for (i = 1; i < NF; i++) if ($i == m) print $(i + 1)}' "$2"; }
k8s_version=$(required k8s.io/kubernetes "$here/kube-apiserver/go.mod")
etcd_version=$(required go.etcd.io/etcd/server/v3 "$here/etcd/go.mod")
cni_version=${CNITOOL_VERSION:-v1.3.0}
cache=${TORTIE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tortie}
out="$cache/bin/k8s-$k8s_version-etcd-$etcd_version-cni-$cni_version"
mkdir -p "$out" "$cache/src"

log() { echo "[controlplane] $*" >&2; }
need_go() {
  command -v go >/dev/null || { log "go is required to build $1"; exit 1; }
}

build_etcd() {
  [ -x "$out/etcd" ] && return
  need_go etcd
  log "building etcd $etcd_version (once per machine)"
  local src="$cache/src/etcd-$etcd_version"
  rm -rf "$src" && mkdir -p "$src"
  cp "$here/etcd/go.mod" "$here/etcd/main.go" "$src/"
  (cd "$src" && go mod tidy >&2 && CGO_ENABLED=0 go build -trimpath -o "$out/etcd.tmp" . >&2)
  mv "$out/etcd.tmp" "$out/etcd"
}

build_kube_apiserver() {
  [ -x "$out/kube-apiserver" ] && return
  need_go kube-apiserver
  log "building kube-apiserver $k8s_version (once per machine; minutes on 2 cores)"
  local src="$cache/src/kube-apiserver-$k8s_version"
  rm -rf "$src" && mkdir -p "$src"
  cp "$here/kube-apiserver/go.mod" "$src/"
  local upstream staging=${k8s_version/v1./v0.}
  upstream=$(cd "$src" && go mod download -json "k8s.io/kubernetes@$k8s_version" | jq -r .GoMod)
  # Every `k8s.io/x => ./staging/src/k8s.io/x` upstream becomes `k8s.io/x => k8s.io/x v0.N.M`.
  local mods
  mods=$(awk '/=> \.\/staging\/src\// {print $1}' "$upstream")
  [ -n "$mods" ] || { log "no staging replaces found in $upstream"; exit 1; }
  for m in $mods; do
    (cd "$src" && go mod edit -replace "$m=$m@$staging")
  done
  (cd "$src" && CGO_ENABLED=0 GOFLAGS="-mod=mod -buildvcs=false" \
    go build -trimpath -o "$out/kube-apiserver.tmp" k8s.io/kubernetes/cmd/kube-apiserver >&2)
  mv "$out/kube-apiserver.tmp" "$out/kube-apiserver"
}

build_cnitool() {
  [ -x "$out/cnitool" ] && return
  need_go cnitool
  log "building cnitool $cni_version"
  GOBIN="$out" CGO_ENABLED=0 go install "github.com/containernetworking/cni/cnitool@$cni_version" >&2
}

if [ -n "${KUBEBUILDER_ASSETS:-}" ] && [ -x "$KUBEBUILDER_ASSETS/etcd" ] && [ -x "$KUBEBUILDER_ASSETS/kube-apiserver" ]; then
  log "using etcd and kube-apiserver from KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS"
  build_cnitool
  mkdir -p "$cache/assets" && for f in etcd kube-apiserver; do ln -sf "$KUBEBUILDER_ASSETS/$f" "$cache/assets/$f"; done
  ln -sf "$out/cnitool" "$cache/assets/cnitool"
  echo "$cache/assets"
  exit 0
fi

build_etcd
build_cnitool
build_kube_apiserver
echo "$out"
