#!/usr/bin/env bash
# The local sandbox (README's run command): builds tortie, starts a real etcd +
# kube-apiserver on loopback and a `tortie node` against it. Ctrl-C stops and removes it all.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

[ "$(id -u)" = 0 ] || { echo "run as root (the daemon manages kernel networking)" >&2; exit 1; }
export TORTIE_CONTROLPLANE_BIN=${TORTIE_CONTROLPLANE_BIN:-$(bash scripts/controlplane/build.sh)}
cargo build --bin tortie --example sandbox
exec target/debug/examples/sandbox --tortie target/debug/tortie "$@"
