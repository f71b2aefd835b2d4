#!/usr/bin/env bash
# Starts a real Kubernetes cluster on this machine, without Docker or a registry:
# etcd, kube-apiserver (Node,RBAC + NodeRestriction), controller-manager and scheduler in
# the root namespace on $ROOT_IP, and TORTIE_CLUSTER_NODES (default 2) nodes, each a network
# namespace on a VNet bridge with its own mount namespace, containerd, kubelet and
# kube-proxy (TORTIE_CLUSTER_PROXY_MODE iptables|nftables). Nodes start NotReady: there is
# no CNI config until a network plugin writes one. An "internet" namespace ($INET_IP, an
# agnhost netexec server) is the nodes' default gateway.
# Images: the agnhost test image (also the pause image) and, if given, OCI archives in
# TORTIE_CLUSTER_IMAGES (space separated, each `archive.tar[=extra-tag,...]`).
# Prints the admin kubeconfig's path. Needs root. Undo with scripts/cluster/down.sh.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source-path=SCRIPTDIR
. "$here/common.sh"

[ "$(id -u)" = 0 ] || { echo "run as root (the cluster uses namespaces, mounts, cgroups)" >&2; exit 1; }
case $PROXY_MODE in iptables | nftables) ;; *) echo "TORTIE_CLUSTER_PROXY_MODE: iptables or nftables" >&2; exit 2 ;; esac
for tool in containerd runc ctr openssl curl jq nsenter unshare ip; do
  command -v "$tool" >/dev/null || { echo "$tool is required" >&2; exit 1; }
done
[ -x /usr/lib/cni/loopback ] || { echo "/usr/lib/cni/loopback is required (containernetworking-plugins)" >&2; exit 1; }

t0=$SECONDS
CP=${TORTIE_CONTROLPLANE_BIN:-$(bash "$repo/scripts/controlplane/build.sh")}
BIN=${TORTIE_CLUSTER_BIN:-$(bash "$here/build.sh")}
AGNHOST_ARCHIVE=$(bash "$here/images.sh" "$BIN")

# A previous run that was killed may have left its parts: start clean.
bash "$here/down.sh"
ok=0
cleanup() { [ "$ok" = 1 ] || { log "start failed; logs copied to /tmp/tortie-cluster-logs"; rm -rf /tmp/tortie-cluster-logs; cp -a "$S/logs" /tmp/tortie-cluster-logs 2>/dev/null; bash "$here/down.sh"; }; }
trap cleanup EXIT
mkdir -p "$S"/{pki,logs,cp}
echo "$BIN" >"$S/bin"
echo "$NODES" >"$S/nodes"

# ---- cgroups -------------------------------------------------------------------------
for h in $(cgroup_hierarchies); do
  for sub in "" /cp $(for i in $(seq 1 "$NODES"); do echo "/node-$i" "/node-$i-sys"; done); do
    mkdir -p "$h/$CGROUP$sub"
    if [ -f "$h/cpuset.cpus" ]; then
      cp "$h/cpuset.cpus" "$h/$CGROUP$sub/cpuset.cpus"
      cp "$h/cpuset.mems" "$h/$CGROUP$sub/cpuset.mems"
    fi
  done
done
wait_for() { # <what> <seconds> <command...>
  local what=$1 limit=$2
  shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || { log "timed out after ${limit}s waiting for $what"; return 1; }
    sleep 0.3
  done
}

# ---- network: VNet bridge, root veth, internet, nodes ----------------------------------
ip netns add "$NS_VNET"
vnet() { ip -n "$NS_VNET" "$@"; }
vnet link add br0 type bridge
vnet link set br0 up
vnet link set lo up
ip link add "$ROOT_IF" type veth peer name root netns "$NS_VNET"
vnet link set root master br0 up
ip addr add "$ROOT_IP/24" dev "$ROOT_IF"
ip link set "$ROOT_IF" up

ip netns add "$NS_INET"
ip -n "$NS_INET" link set lo up
ip -n "$NS_INET" addr add "$INET_IP/32" dev lo
ip link add eth0 netns "$NS_INET" type veth peer name inet netns "$NS_VNET"
vnet link set inet master br0 up
ip -n "$NS_INET" addr add "$INET_GW/24" dev eth0
ip -n "$NS_INET" link set eth0 up

for i in $(seq 1 "$NODES"); do
  ns=$(node_ns "$i")
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  ip link add eth0 netns "$ns" type veth peer name "n$i" netns "$NS_VNET"
  vnet link set "n$i" master br0 up
  ip -n "$ns" addr add "$(node_ip "$i")/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" route add default via "$INET_GW"
  nsenter --net="/run/netns/$ns" sysctl -qw net.ipv4.ip_forward=1
done

# ---- credentials ---------------------------------------------------------------------
pki=$S/pki
openssl_quiet() { openssl "$@" 2>/dev/null; }
openssl_quiet req -x509 -newkey rsa:2048 -nodes -keyout "$pki/ca.key" -out "$pki/ca.crt" -days 2 -subj /CN=tortie-cluster-ca
openssl_quiet req -newkey rsa:2048 -nodes -keyout "$pki/apiserver.key" -out "$pki/apiserver.csr" -subj /CN=kube-apiserver
printf 'subjectAltName=IP:127.0.0.1,IP:%s,IP:%s,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\nextendedKeyUsage=serverAuth\n' \
  "$ROOT_IP" "$SERVICE_IP" >"$pki/apiserver.ext"
openssl_quiet x509 -req -in "$pki/apiserver.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
  -out "$pki/apiserver.crt" -days 2 -extfile "$pki/apiserver.ext"
openssl_quiet genrsa -out "$pki/sa.key" 2048
openssl_quiet rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub"

token() { head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
: >"$pki/tokens.csv"
# kubeconfig <file> <user> <groups>: a token user in the token file and its kubeconfig.
kubeconfig() {
  local file=$1 user=$2 groups=$3 t
  t=$(token)
  echo "$t,$user,$user,\"$groups\"" >>"$pki/tokens.csv"
  cat >"$file" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: tortie-cluster
  cluster: {server: "https://$ROOT_IP:$API_PORT", certificate-authority: "$pki/ca.crt"}
users:
- name: "$user"
  user: {token: "$t"}
contexts:
- name: tortie-cluster
  context: {cluster: tortie-cluster, user: "$user"}
current-context: tortie-cluster
EOF
}
kubeconfig "$S/admin.kubeconfig" admin system:masters
kubeconfig "$S/cp/controller-manager.kubeconfig" system:kube-controller-manager ""
kubeconfig "$S/cp/scheduler.kubeconfig" system:kube-scheduler ""
kubeconfig "$S/cp/kube-proxy.kubeconfig" system:kube-proxy ""
for i in $(seq 1 "$NODES"); do
  mkdir -p "$(node_dir "$i")"
  kubeconfig "$(node_dir "$i")/kubelet.kubeconfig" "system:node:$(node_name "$i")" system:nodes
done
admin_token=$(awk -F, '$2 == "admin" {print $1}' "$pki/tokens.csv")

# ---- control plane -------------------------------------------------------------------
start etcd cp "$CP/etcd" --name=tortie-cluster --data-dir="$S/cp/etcd" \
  --listen-client-urls="http://127.0.0.1:$ETCD_PORT" --advertise-client-urls="http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls="http://127.0.0.1:$((ETCD_PORT + 1))" --initial-advertise-peer-urls="http://127.0.0.1:$((ETCD_PORT + 1))" \
  --initial-cluster="tortie-cluster=http://127.0.0.1:$((ETCD_PORT + 1))" --unsafe-no-fsync --log-level=warn
start kube-apiserver cp "$CP/kube-apiserver" --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
  --bind-address="$ROOT_IP" --advertise-address="$ROOT_IP" --secure-port="$API_PORT" \
  --cert-dir="$S/cp/apiserver-certs" --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
  --client-ca-file="$pki/ca.crt" --token-auth-file="$pki/tokens.csv" \
  --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \
  --service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key" \
  --service-cluster-ip-range="$SERVICE_CIDR" --allow-privileged=true \
  --kubelet-preferred-address-types=InternalIP --profiling=false
api_ready() { curl -fsS --cacert "$pki/ca.crt" -H "Authorization: Bearer $admin_token" "https://$ROOT_IP:$API_PORT/readyz"; }
wait_for kube-apiserver 120 api_ready
log "kube-apiserver ready after $((SECONDS - t0)) s"
start kube-controller-manager cp "$BIN/kube-controller-manager" --kubeconfig="$S/cp/controller-manager.kubeconfig" \
  --bind-address=127.0.0.1 --secure-port=20257 --leader-elect=false \
  --service-account-private-key-file="$pki/sa.key" --root-ca-file="$pki/ca.crt" \
  --use-service-account-credentials=true --allocate-node-cidrs=false \
  --service-cluster-ip-range="$SERVICE_CIDR" --profiling=false
start kube-scheduler cp "$BIN/kube-scheduler" --kubeconfig="$S/cp/scheduler.kubeconfig" \
  --bind-address=127.0.0.1 --secure-port=20259 --leader-elect=false --profiling=false
start internet cp nsenter --net="/run/netns/$NS_INET" "$BIN/agnhost" netexec --http-port=8080 --udp-port=8081

# ---- nodes ---------------------------------------------------------------------------
printf 'nameserver %s\noptions ndots:1 timeout:1 attempts:1\n' "$INET_GW" >"$S/resolv.conf"
start_node() {
  local i=$1 d name ip ns
  d=$(node_dir "$i")
  name=$(node_name "$i")
  ip=$(node_ip "$i")
  ns=$(node_ns "$i")
  mkdir -p "$d"/{containerd,fs}
  cat >"$d/containerd.toml" <<EOF
version = 2
root = "$d/containerd/root"
state = "$d/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "$d/containerd.sock"
[ttrpc]
  address = "$d/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$d/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  restrict_oom_score_adj = true
  disable_apparmor = true
  netns_mounts_under_state_dir = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
    max_conf_num = 1
EOF
  start "containerd-$i" "node-$i-sys" nsenter --net="/run/netns/$ns" \
    unshare -m --propagation slave bash "$here/node-ns.sh" "$d" "$d/containerd.toml"
  wait_for "containerd on $name" 60 ctr --address "$d/containerd.sock" version
  local ctr_pid
  ctr_pid=$(pgrep -f -x "containerd --config $d/containerd.toml")
  echo "$ctr_pid" >"$d/containerd.pid"
  cat >"$d/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
  x509: {clientCAFile: "$pki/ca.crt"}
authorization: {mode: AlwaysAllow}
cgroupDriver: cgroupfs
cgroupRoot: /$CGROUP/node-$i
failCgroupV1: false
containerRuntimeEndpoint: unix://$d/containerd.sock
failSwapOn: false
protectKernelDefaults: true
resolvConf: $S/resolv.conf
clusterDomain: cluster.local
volumePluginDir: /usr/libexec/kubernetes/kubelet-plugins/volume/exec
evictionHard: {memory.available: "1Mi", nodefs.available: "1%", nodefs.inodesFree: "1%", imagefs.available: "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
healthzBindAddress: 127.0.0.1
readOnlyPort: 0
syncFrequency: 10s
nodeStatusUpdateFrequency: 4s
EOF
  start "kubelet-$i" "node-$i-sys" nsenter -t "$ctr_pid" -m -n "$BIN/kubelet" \
    --config="$d/kubelet.yaml" --kubeconfig="$d/kubelet.kubeconfig" \
    --hostname-override="$name" --node-ip="$ip" --cert-dir="$d/kubelet-pki" --v=1
  start_kube_proxy "$i" "$PROXY_MODE"
}
# import <node> <archive> [extra tags...]
import_image() {
  local d name
  d=$(node_dir "$1")
  name=$(tar -xOf "$2" index.json | jq -r '.manifests[0].annotations["io.containerd.image.name"] // .manifests[0].annotations["org.opencontainers.image.ref.name"]')
  ctr --address "$d/containerd.sock" -n k8s.io images import --snapshotter overlayfs "$2" >/dev/null
  shift 2
  for tag in "$@"; do
    ctr --address "$d/containerd.sock" -n k8s.io images tag --force "$name" "$tag" >/dev/null
  done
}
for i in $(seq 1 "$NODES"); do
  start_node "$i"
  import_image "$i" "$AGNHOST_ARCHIVE" "$PAUSE_IMAGE"
  for spec in ${TORTIE_CLUSTER_IMAGES:-}; do
    archive=${spec%%=*}
    tags=()
    [ "$spec" != "$archive" ] && IFS=, read -r -a tags <<<"${spec#*=}"
    import_image "$i" "$archive" "${tags[@]}"
  done
done
kubectl_admin() { "$BIN/kubectl" --kubeconfig="$S/admin.kubeconfig" "$@"; }
nodes_registered() { [ "$(kubectl_admin get nodes -o name | wc -l)" = "$NODES" ]; }
wait_for "$NODES nodes registered" 120 nodes_registered
cat >"$S/env" <<EOF
KUBECONFIG=$S/admin.kubeconfig
TORTIE_CLUSTER_BIN=$BIN
E2E_INTERNET_IP=$INET_IP
E2E_INTERNET_PORT=8080
E2E_PROXY_MODE=$PROXY_MODE
EOF
ok=1
log "cluster up in $((SECONDS - t0)) s: $NODES nodes (kube-proxy $PROXY_MODE), state $S"
echo "$S/admin.kubeconfig"
