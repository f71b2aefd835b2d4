#!/usr/bin/env bash
# The e2e suite on kind (machines with Docker, e.g. CI): creates a cluster without a CNI,
# builds tortie's image with Docker, loads it into the nodes, applies manifests/tortie.yaml
# with only the image replaced, and runs the shared suite (e2e/run.sh <kubeconfig>).
#
#   e2e/kind/run.sh [iptables|nftables]      # kube-proxy mode, default iptables
#
# Env: KIND_CLUSTER (default tortie-e2e-<mode>), TORTIE_IMAGE (default
# tortie:e2e), KEEP_CLUSTER=1 keeps the cluster afterwards.
set -euo pipefail
export LC_ALL=C
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

mode=${1:-iptables}
case "$mode" in
  iptables|nftables) ;;
  *) echo "usage: $0 [iptables|nftables]" >&2; exit 2 ;;
esac
for tool in kind docker kubectl; do
  command -v "$tool" >/dev/null || { echo "[kind] $tool is required" >&2; exit 1; }
done

cluster=${KIND_CLUSTER:-tortie-e2e-$mode}
image=${TORTIE_IMAGE:-tortie:e2e}
work=$(mktemp -d)
kubeconfig=$work/kubeconfig
cleanup() {
  if [ "${KEEP_CLUSTER:-0}" != 1 ]; then
    kind delete cluster --name "$cluster" >/dev/null 2>&1 || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

echo "[kind] cluster $cluster, kube-proxy $mode"
kind create cluster --name "$cluster" --config "e2e/kind/kind-$mode.yaml" \
  --kubeconfig "$kubeconfig" --wait 0s

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
echo "[kind] docker build $image (version $version)"
docker build --build-arg "VERSION=$version" \
  --build-arg "GIT_COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)" -t "$image" .
kind load docker-image "$image" --name "$cluster"

# The manifest unchanged but for the image (and the pull policy: the image exists only in
# the nodes' containerd).
sed -e "s#image: ghcr.io/tortie/tortie:.*#image: $image#" \
  -e 's#imagePullPolicy: IfNotPresent#imagePullPolicy: Never#' \
  manifests/tortie.yaml >"$work/tortie.yaml"
grep -q "image: $image" "$work/tortie.yaml" || { echo "[kind] image not replaced" >&2; exit 1; }
started=$(date +%s)
kubectl --kubeconfig "$kubeconfig" apply -f "$work/tortie.yaml"
kubectl --kubeconfig "$kubeconfig" -n kube-system rollout status daemonset/tortie-node --timeout=300s
kubectl --kubeconfig "$kubeconfig" wait --for=condition=Ready nodes --all --timeout=300s
echo "[kind] all nodes Ready $(( $(date +%s) - started )) s after kubectl apply"

TORTIE_E2E_PROXY_MODE=$mode TORTIE_E2E_IMAGE=$image bash e2e/run.sh "$kubeconfig"
