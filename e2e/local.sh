#!/usr/bin/env bash
# The e2e tier on this machine: a local real cluster (scripts/cluster/up.sh: containerd,
# kubelet and kube-proxy per node namespace) with tortie's image imported, then e2e/run.sh:
# the whole suite with kube-proxy in iptables mode (upstream pod-networking conformance
# included), the Service check again after kube-proxy switched to nftables, and node
# deletion last. The cluster is removed on any exit (scripts/cluster/down.sh).
# Needs root. TORTIE_IMAGE_ARCHIVE skips building tortie's image; TORTIE_E2E_KEEP=1 leaves
# the cluster running for a look (remove it with scripts/cluster/down.sh);
# TORTIE_E2E_NETPOL=full runs every upstream NetworkPolicy spec instead of the CI subset
# (47 specs, about 21 minutes instead of 2; docs/netpol-conformance.md).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
# shellcheck source-path=SCRIPTDIR/../scripts/cluster
. scripts/cluster/common.sh
[ "$(id -u)" = 0 ] || { echo "run as root (the local cluster uses namespaces, mounts, cgroups)" >&2; exit 1; }

t0=$SECONDS
phase() { log "phase $1: $((SECONDS - $2)) s"; }
[ "${TORTIE_E2E_KEEP:-0}" = 1 ] || trap 'bash scripts/cluster/down.sh' EXIT
# Each long step runs as its own process group and the script waits for it, so INT/TERM
# stop the step at once (bash defers traps while a foreground child runs) and then the
# EXIT trap removes the cluster.
set -m
child=
# shellcheck disable=SC2317 # called by the trap
on_signal() {
  [ -z "$child" ] || kill -TERM -- "-$child" 2>/dev/null
  exit 130
}
trap on_signal INT TERM
step() {
  "$@" &
  child=$!
  local rc=0
  wait "$child" || rc=$?
  child=
  return "$rc"
}

t=$SECONDS
bin=$(bash scripts/cluster/build.sh)
export TORTIE_CLUSTER_BIN=$bin
phase "Go fixtures" $t
t=$SECONDS
archive=${TORTIE_IMAGE_ARCHIVE:-$(bash scripts/image.sh)}
image=$(tar -xOf "$archive" index.json | jq -r '.manifests[0].annotations["io.containerd.image.name"] // .manifests[0].annotations["org.opencontainers.image.ref.name"]')
case $image in */*:*) ;; *) log "$archive names no full image reference ($image)"; exit 1 ;; esac
image2=${image%:*}:e2e-rollout
phase "tortie image ($image, $(du -h "$archive" | cut -f1))" $t

t=$SECONDS
step env TORTIE_CLUSTER_IMAGES="$archive=$image2" TORTIE_CLUSTER_PROXY_MODE=iptables bash scripts/cluster/up.sh >/dev/null
kubeconfig=$S/admin.kubeconfig
phase "cluster up" $t
set -a
# shellcheck disable=SC1091 # written by up.sh
. "$S/env"
set +a
export KUBECTL=$bin/kubectl E2E_TORTIE_IMAGE=$image E2E_TORTIE_IMAGE_2=$image2 E2E_TEST_BIN=$bin/e2e.test

passed=0
failed=0
suite() {
  local out
  out=$(mktemp)
  local rc=0
  # shellcheck disable=SC2016 # expanded by the inner shell
  step env OUT="$out" bash -o pipefail -c 'bash e2e/run.sh "$@" | tee "$OUT"' _ "$kubeconfig" "$@" || rc=$?
  read -r p f < <(awk '/^e2e: / {print $2, $4}' "$out")
  passed=$((passed + ${p:-0}))
  failed=$((failed + ${f:-1}))
  rm -f "$out"
  return "$rc"
}
tortie_rss() {
  local pid
  for pid in $(pgrep -x tortie); do
    grep -q "/$CGROUP/" "/proc/$pid/cgroup" 2>/dev/null || continue
    log "FIGURE tortie RSS (pid $pid): $(awk '/^VmRSS/ {print $2, $3}' "/proc/$pid/status")"
  done
}

t=$SECONDS
rc=0
E2E_NETPOL=${TORTIE_E2E_NETPOL:-subset} suite install pods internet service second-pool fixed-ip metrics rollout conformance netpol || rc=1
tortie_rss
if [ $rc = 0 ]; then
  step bash scripts/cluster/proxy-mode.sh nftables
  # The Service must now go through kube-proxy's nftables rules, not leftover iptables ones.
  proxied_by_nft() {
    local netns=$1
    nsenter --net="$netns" nft list table ip kube-proxy >/dev/null 2>&1 || return 1
    ! nsenter --net="$netns" iptables -t nat -S 2>/dev/null | grep -q KUBE-SVC-
  }
  for i in $(seq 1 "$NODES"); do
    deadline=$((SECONDS + 60))
    until proxied_by_nft "/run/netns/$(node_ns "$i")"; do
      [ $SECONDS -lt $deadline ] || { log "node $i: no kube-proxy nftables table, or iptables Service rules left, after 60 s"; rc=1; break; }
      sleep 1
    done
  done
  # Policy through ClusterIPs again, now that kube-proxy DNATs in its own nftables table.
  [ $rc = 0 ] && { E2E_PROXY_MODE=nftables E2E_NETPOL=smoke suite service netpol || rc=1; }
  [ $rc = 0 ] && { suite node-delete || rc=1; }
fi
phase "e2e suite" $t
log "e2e total: $((SECONDS - t0)) s"
echo "e2e-local: $passed passed, $failed failed"
exit $rc
