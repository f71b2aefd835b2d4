#!/usr/bin/env bash
# The local multi-node sandbox (README's run command): builds tortie and the sandbox, then
# `up` (default): a real etcd + kube-apiserver, 3 node namespaces on a VNet bridge, each with
# `tortie node` and a kubelet-like agent, until Ctrl-C. Also: `run.sh demo`, `run.sh down`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

[ "$(id -u)" = 0 ] || { echo "run as root (the sandbox creates network namespaces)" >&2; exit 1; }
# shellcheck source=deps.sh
. scripts/deps.sh
tortie_ensure_deps
cmd=${1:-up}
[ $# -gt 0 ] && shift
case "$cmd" in
  up)
    export TORTIE_CONTROLPLANE_BIN=${TORTIE_CONTROLPLANE_BIN:-$(bash scripts/controlplane/build.sh)}
    cargo build --bin tortie --example sandbox
    exec target/debug/examples/sandbox up --tortie target/debug/tortie "$@" ;;
  demo|down)
    [ -x target/debug/examples/sandbox ] || cargo build --example sandbox
    exec target/debug/examples/sandbox "$cmd" "$@" ;;
  *)
    echo "usage: $0 [up [--nodes N] | demo [--keep] | down]" >&2; exit 2 ;;
esac
