#!/usr/bin/env bash
# The dataplane-core benchmarks, this tree beside main in the same run: builds both `tortie`
# binaries in release (main from `git archive`, no worktree touched), then runs
# benches/node_footprint.rs (RSS with 500 nodes / 10,000 pods / 500 blocks in the API, idle
# CPU over 60 s, new-block route latency p50/p99). Needs root.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
# shellcheck source=../deps.sh
. scripts/deps.sh
tortie_ensure_deps
export TORTIE_CONTROLPLANE_BIN=${TORTIE_CONTROLPLANE_BIN:-$(bash scripts/controlplane/build.sh)}
base=${BASE:-main}
target=${CARGO_TARGET_DIR:-target}
src=$(mktemp -d /tmp/tortie-bench-base.XXXXXX)
trap 'rm -rf "$src"' EXIT
git archive "$base" | tar -x -C "$src"
(cd "$src" && CARGO_TARGET_DIR="$(realpath -m "$OLDPWD/$target")-base" cargo build --release --bin tortie)
cargo build --release --bin tortie
this=$(realpath "$target/release/tortie")
base_bin=$(realpath -m "$target-base/release/tortie")
FOOTPRINT_BINS="this=$this,$base=$base_bin" cargo bench --bench node_footprint -- --bench
