#!/usr/bin/env bash
# Builds the upstream fixtures of the local real cluster from the official
# k8s.io/kubernetes module (the kube-apiserver's version): kubelet, kube-proxy,
# kube-controller-manager, kube-scheduler, kubectl, the agnhost test image binary
# and the conformance binary e2e.test. Cached by version outside the repository.
# Prints the folder that holds them.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cp_dir="$here/../controlplane"
required() { awk -v m="$1" '$1 == "require" {for (i = 1; i < NF; i++) if ($i == m) print $(i + 1)}' "$2"; }
k8s_version=$(required k8s.io/kubernetes "$cp_dir/kube-apiserver/go.mod")
cache=${TORTIE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tortie}
out="$cache/bin/cluster-$k8s_version"
mkdir -p "$out" "$cache/src"

log() { echo "[cluster-build] $*" >&2; }
bins=(kubelet kube-proxy kube-controller-manager kube-scheduler kubectl agnhost)
missing=()
for b in "${bins[@]}" e2e.test; do [ -x "$out/$b" ] || missing+=("$b"); done
if [ ${#missing[@]} -eq 0 ]; then echo "$out"; exit 0; fi
command -v go >/dev/null || { log "go is required to build ${missing[*]}"; exit 1; }

# One builder at a time per cache (the test runner and CI may race).
exec 9>"$cache/cluster-build.lock"
flock 9
src="$cache/src/cluster-$k8s_version"
rm -rf "$src" && mkdir -p "$src"
sed 's#^module .*#module tortie.test/cluster#' "$cp_dir/kube-apiserver/go.mod" >"$src/go.mod"
upstream=$(cd "$src" && go mod download -json "k8s.io/kubernetes@$k8s_version" | jq -r .GoMod)
staging=${k8s_version/v1./v0.}
# Every `k8s.io/x => ./staging/src/k8s.io/x` upstream becomes `k8s.io/x => k8s.io/x v0.N.M`.
mods=$(awk '/=> \.\/staging\/src\// {print $1}' "$upstream")
[ -n "$mods" ] || { log "no staging replaces found in $upstream"; exit 1; }
args=()
for m in $mods; do args+=(-replace "$m=$m@$staging"); done
(cd "$src" && go mod edit "${args[@]}")

export CGO_ENABLED=0 GOFLAGS="-mod=mod -buildvcs=false"
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$k8s_version"
pkgs=()
for b in "${bins[@]}"; do
  [ -x "$out/$b" ] && continue
  case $b in
    agnhost) pkgs+=(k8s.io/kubernetes/test/images/agnhost) ;;
    *) pkgs+=("k8s.io/kubernetes/cmd/$b") ;;
  esac
done
start=$SECONDS
if [ ${#pkgs[@]} -gt 0 ]; then
  log "building ${pkgs[*]##*/} $k8s_version (once per machine; many minutes on 2 cores)"
  tmp="$out/.tmp" && rm -rf "$tmp" && mkdir -p "$tmp"
  (cd "$src" && go build -trimpath -ldflags "$ldflags" -o "$tmp/" "${pkgs[@]}" >&2)
  for f in "$tmp"/*; do mv "$f" "$out/"; done
  log "components built in $((SECONDS - start)) s"
fi
if [ ! -x "$out/e2e.test" ]; then
  start=$SECONDS
  log "building e2e.test $k8s_version"
  (cd "$src" && go test -c -vet=off -trimpath -ldflags "$ldflags" -o "$out/e2e.test.tmp" k8s.io/kubernetes/test/e2e >&2)
  mv "$out/e2e.test.tmp" "$out/e2e.test"
  log "e2e.test built in $((SECONDS - start)) s"
fi
echo "$out"
