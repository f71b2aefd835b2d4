#!/usr/bin/env bash
# Restarts every node's kube-proxy of the running local cluster in another mode
# (iptables|nftables). kube-proxy removes the other mode's rules when it starts.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR
. "$here/common.sh"
mode=${1:?usage: proxy-mode.sh iptables|nftables}
case $mode in iptables | nftables) ;; *) echo "mode: iptables or nftables" >&2; exit 2 ;; esac
for i in $(seq 1 "$NODES"); do
  pidfile="$S/kube-proxy-$i.pid"
  if [ -f "$pidfile" ]; then
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  start_kube_proxy "$i" "$mode"
done
sed -i "s/^E2E_PROXY_MODE=.*/E2E_PROXY_MODE=$mode/" "$S/env"
log "kube-proxy restarted in $mode mode on $NODES nodes"
