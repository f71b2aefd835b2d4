#!/usr/bin/env bash
# Removes everything scripts/cluster/up.sh made, whatever state it is in (idempotent):
# every process in the cluster's cgroup (SIGTERM, then SIGKILL after a timeout), its
# namespaces (node nft/iptables state goes with them), cgroups, mounts and state folder.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR
. "$here/common.sh"
case $S in */tortie-cluster*) ;; *) log "refusing to remove state folder $S (name must contain tortie-cluster)"; exit 1 ;; esac

procs() {
  [ -d "$CGROUP_FS/pids/$CGROUP" ] || return 0
  find "$CGROUP_FS/pids/$CGROUP" -name cgroup.procs -exec cat {} + 2>/dev/null
}
signal_all() {
  local p
  for p in $(procs); do kill "-$1" "$p" 2>/dev/null; done
}

if [ -n "$(procs)" ]; then
  log "stopping $(procs | wc -l) processes"
  signal_all TERM
  for _ in $(seq 1 "${TORTIE_CLUSTER_STOP_TIMEOUT:-10}"); do
    [ -z "$(procs)" ] && break
    sleep 1
  done
  # kube-apiserver and containers may take long in graceful shutdown: kill what is left.
  for _ in $(seq 1 50); do
    [ -z "$(procs)" ] && break
    signal_all KILL
    sleep 0.2
  done
  [ -z "$(procs)" ] || log "processes left in cgroup $CGROUP: $(procs | tr '\n' ' ')"
fi

# Mounts made from the root mount namespace (none are expected: the nodes mount in their own).
if [ -d "$S" ]; then
  awk -v s="$S" 'index($5, s) == 1 {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do
    umount -l "$m" 2>/dev/null
  done
fi

for ns in $(ip netns list | awk '{print $1}' | grep "^$NS_PREFIX"); do
  ip netns del "$ns" 2>/dev/null || log "could not delete netns $ns"
done
# The root end of the VNet veth goes with the vnet namespace; remove it if it outlived it.
ip link del "$ROOT_IF" 2>/dev/null

for h in $(cgroup_hierarchies); do
  [ -d "$h/$CGROUP" ] && find "$h/$CGROUP" -depth -type d -exec rmdir {} + 2>/dev/null
  [ -d "$h/$CGROUP" ] && log "cgroup $h/$CGROUP not removed"
done

# Mount points the nodes had to create on the host (empty: their content was the nodes').
if [ -f "$S/created-host-paths" ]; then
  sort -u -r "$S/created-host-paths" | while read -r top; do
    [ -d "$top" ] && find "$top" -depth -type d -empty -delete
    [ -e "$top" ] && log "host path $top is not empty: left in place"
  done
fi

if [ -d "$S" ]; then
  # The overlay snapshots hold root-owned files only; nothing is mounted under $S by now.
  rm -rf "$S" || log "could not remove $S"
fi
exit 0
