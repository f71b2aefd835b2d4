#!/usr/bin/env bash
# Runs inside a node's own mount namespace (up.sh starts it under
# `nsenter --net=<node netns> unshare -m --propagation slave`): puts the node's private
# folders over the host paths that containerd, kubelet, the CNI and tortie's DaemonSet use,
# hides the host-wide sysctls kubelet checks, then becomes containerd.
# Usage: node-ns.sh <node dir> <containerd config>
set -euo pipefail
dir=$1
config=$2

# Host paths each node must have for itself. containerd 1.6 keeps shim sockets and FIFOs
# under /run/containerd whatever its state dir; kubelet and the CNI use the others.
private_dirs=(
  /run/containerd /var/lib/kubelet /var/log/pods /var/log/containers /var/lib/cni
  /opt/cni/bin /etc/cni/net.d /usr/libexec/kubernetes
  /var/run/calico /var/lib/calico /var/log/calico /run/tortie /var/lib/tortie
)
for p in "${private_dirs[@]}"; do
  mkdir -p "$p" "$dir/fs$p"
  mount --bind "$dir/fs$p" "$p"
done
# /var/run is a symlink to /run on Debian: the binds above already cover both spellings.
touch /run/xtables.lock "$dir/fs/xtables.lock"
mount --bind "$dir/fs/xtables.lock" /run/xtables.lock

# kubelet with protectKernelDefaults only reads these; files holding the values it wants
# keep it from failing or from changing the host (they are host-wide, not per netns).
mkdir -p "$dir/sysctl"
while read -r key value; do
  f="$dir/sysctl/${key//\//_}"
  echo "$value" >"$f"
  mount --bind "$f" "/proc/sys/$key"
done <<'EOF'
vm/overcommit_memory 1
vm/panic_on_oom 0
kernel/panic 10
kernel/panic_on_oops 1
kernel/keys/root_maxkeys 1000000
kernel/keys/root_maxbytes 25000000
EOF

# containerd's CRI sets up each pod's loopback with the `loopback` plugin from bin_dir.
cp /usr/lib/cni/loopback /opt/cni/bin/loopback
exec containerd --config "$config"
