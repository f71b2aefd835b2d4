#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests, and the integration tests
# against a real kube-apiserver + etcd and real network namespaces (needs root).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

[ "$(id -u)" = 0 ] || { echo "the integration tests create network namespaces: run as root" >&2; exit 1; }
# shellcheck source=deps.sh
. scripts/deps.sh
tortie_ensure_deps
export TORTIE_CONTROLPLANE_BIN=${TORTIE_CONTROLPLANE_BIN:-$(bash scripts/controlplane/build.sh)}

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --all-targets --locked
