# shellcheck shell=bash
# shellcheck disable=SC2034 # the variables are used by the scripts that source this file
# Shared layout of the local real cluster (sourced by up.sh, down.sh and the e2e wrapper):
# where its state lives, its namespaces, addresses and cgroups. Everything it creates is
# named from these, so down.sh can find and remove all of it.
# On disk, not under /run: each node mounts its own tmpfs over /run.
S=${TORTIE_CLUSTER_DIR:-/var/lib/tortie-cluster}
# A running cluster's node count wins over the default (up.sh records it).
NODES=${TORTIE_CLUSTER_NODES:-$(cat "$S/nodes" 2>/dev/null || echo 2)}
PROXY_MODE=${TORTIE_CLUSTER_PROXY_MODE:-iptables}
# Namespaces: the VNet bridge, one per node, the "internet".
NS_PREFIX=tcl-
NS_VNET=${NS_PREFIX}vnet
NS_INET=${NS_PREFIX}inet
# The VNet (198.18.0.0/15 is for benchmarks: never routed outside). The root namespace
# reaches it by one veth with ROOT_IP, and the API server listens there.
VNET=198.19.128
ROOT_IP=$VNET.1
ROOT_IF=tcl-root
INET_GW=$VNET.254
INET_IP=198.51.100.10
API_PORT=26443
ETCD_PORT=22379
SERVICE_CIDR=10.0.0.0/16
SERVICE_IP=10.0.0.1
# One cgroup (every v1 hierarchy) holds every process of the cluster: control plane,
# containerd and its shims, kubelets, kube-proxies and all containers. down.sh kills by it.
CGROUP=tortie-cluster
CGROUP_FS=/sys/fs/cgroup
PAUSE_IMAGE=registry.k8s.io/pause:3.10.1
AGNHOST_IMAGE=registry.k8s.io/e2e-test-images/agnhost:2.56

node_name() { echo "node-$1"; }
node_ns() { echo "${NS_PREFIX}n$1"; }
node_ip() { echo "$VNET.$((10 + $1))"; }
node_dir() { echo "$S/node-$1"; }
log() { echo "[cluster $(date -u +%T)] $*" >&2; }

# The v1 hierarchies to create cgroups in (named ones included, the empty v2 mount not).
cgroup_hierarchies() {
  awk '$3 == "cgroup" {print $2}' /proc/self/mounts
}

# start <name> <cgroup> <command...>: a daemon in the cluster's cgroup, log in $S/logs.
start() {
  local name=$1 cg=$2
  shift 2
  # shellcheck disable=SC2016 # expanded by the inner shell
  setsid bash -c 'echo $$ >"$1"; shift; exec "$@"' _ "$CGROUP_FS/pids/$CGROUP/$cg/cgroup.procs" "$@" \
    >>"$S/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$S/$name.pid"
}

# start_kube_proxy <node index> <iptables|nftables>: in the node's network and mount
# namespaces; --conntrack-max-per-core=0 leaves the host-wide nf_conntrack_max alone.
start_kube_proxy() {
  local i=$1 mode=$2 bin
  bin=$(cat "$S/bin")
  start "kube-proxy-$i" "node-$i-sys" nsenter -t "$(cat "$(node_dir "$i")/containerd.pid")" -m -n "$bin/kube-proxy" \
    --kubeconfig="$S/cp/kube-proxy.kubeconfig" --hostname-override="$(node_name "$i")" \
    --proxy-mode="$mode" --conntrack-max-per-core=0 \
    --metrics-bind-address=127.0.0.1:10249 --healthz-bind-address=127.0.0.1:10256
}
