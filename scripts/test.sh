#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests, and the integration tests
# against a real kube-apiserver + etcd and real network namespaces (needs root), then the
# e2e suite on a local real cluster (e2e/local.sh; TORTIE_E2E=0 leaves it out).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

[ "$(id -u)" = 0 ] || { echo "the integration tests create network namespaces: run as root" >&2; exit 1; }
# shellcheck source=deps.sh
. scripts/deps.sh
tortie_ensure_deps
phase_start=$SECONDS
phase() { echo "[test] phase $1: $((SECONDS - phase_start)) s" >&2; phase_start=$SECONDS; }
export TORTIE_CONTROLPLANE_BIN=${TORTIE_CONTROLPLANE_BIN:-$(bash scripts/controlplane/build.sh)}
if [ "${TORTIE_E2E:-1}" != 0 ]; then
  # The cluster's kubectl also runs the manifests' `kubectl apply --dry-run=server` tests.
  cluster_bin=$(bash scripts/cluster/build.sh)
  export TORTIE_KUBECTL=${TORTIE_KUBECTL:-$cluster_bin/kubectl}
fi
phase "Go builds"

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
phase "fmt and clippy"
cargo test --all-targets --locked --no-run
phase "cargo build"
cargo test --lib --bins --locked
phase unit
cargo test --locked --test "*" --benches --examples
phase integration
if [ "${TORTIE_E2E:-1}" != 0 ]; then
  # The e2e image carries the debug build the tests above used: a release build would add
  # about 10 minutes on 2 cores. TORTIE_IMAGE_PROFILE=release tests the release image.
  TORTIE_IMAGE_PROFILE=${TORTIE_IMAGE_PROFILE:-dev} bash e2e/local.sh
  phase "e2e (local cluster)"
fi
