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
target=$(realpath -m "${CARGO_TARGET_DIR:-target}")
src=$(mktemp -d /tmp/tortie-bench-base.XXXXXX)
trap 'rm -rf "$src"' EXIT
git archive "$base" | tar -x -C "$src"
# The same target dir (dependencies are built once); the base binary is copied out before
# this tree's build replaces target/release/tortie.
(cd "$src" && CARGO_TARGET_DIR="$target" cargo build --release --bin tortie)
cp "$target/release/tortie" "$target/release/tortie-$base"
cargo build --release --bin tortie
this="$target/release/tortie"
base_bin="$target/release/tortie-$base"
FOOTPRINT_BINS="this=$this,$base=$base_bin" cargo bench --bench node_footprint -- --bench
