#!/usr/bin/env bash
# Runs inside a node's own mount namespace (up.sh starts it under
# `nsenter --net=<node netns> unshare -m --propagation slave`): puts the node's private
# folders over the host paths that containerd, kubelet, the CNI and tortie's DaemonSet use,
# hides the host-wide sysctls kubelet checks, then becomes containerd.
# Usage: node-ns.sh <node dir> <containerd config>
set -euo pipefail
dir=$1
config=$2

# A node's own /run (and so /var/run): containerd 1.6 keeps shim sockets and FIFOs under
# /run/containerd whatever its state dir, iptables locks /run/xtables.lock, and hostPath
# volumes such as tortie's /var/run/tortie are created there.
mount -t tmpfs -o mode=0755 tmpfs /run
# Host paths outside /run that each node must have for itself (kubelet, the CNI, tortie's
# DaemonSet). A mount point missing on the host is made and recorded, and down.sh removes it.
created=$dir/../created-host-paths
private_dirs=(
  /var/lib/kubelet /var/log/pods /var/log/containers /var/lib/cni
  /opt/cni/bin /etc/cni/net.d /usr/libexec/kubernetes
)
for p in "${private_dirs[@]}"; do
  top=
  q=$p
  while [ ! -e "$q" ]; do top=$q; q=$(dirname "$q"); done
  if [ -n "$top" ]; then
    echo "$top" >>"$created"
    mkdir -p "$p"
  fi
  mkdir -p "$dir/fs$p"
  mount --bind "$dir/fs$p" "$p"
done

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
