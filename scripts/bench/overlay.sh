#!/usr/bin/env bash
# Runs the overlay benchmarks through the real daemon and API server (benches/overlay_api.rs):
# convergence of one node when N simulated nodes + blocks appear in the API, and pod-to-pod
# iperf3 throughput through tortie's VXLAN vs a hand-built VXLAN pair. Needs root.
#   scripts/bench/overlay.sh                 # debug build (the shared machine's default)
#   BENCH_PROFILE=release scripts/bench/overlay.sh
#   OVERLAY_API_NODES=500 OVERLAY_API_IPERF_RUNS=3 OVERLAY_API_IPERF_SECS=5 scripts/bench/overlay.sh
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root"

[ "$(id -u)" = 0 ] || { echo "overlay bench: needs root (network namespaces)" >&2; exit 1; }
for tool in iperf3 ip bridge jq; do
  command -v "$tool" >/dev/null || { echo "overlay bench: $tool is required" >&2; exit 1; }
done

# etcd, kube-apiserver and cnitool (cached per machine); the harness finds them itself.
"$root/scripts/controlplane/build.sh" >/dev/null

profile_args=()
[ "${BENCH_PROFILE:-dev}" = release ] && profile_args=(--release)
# Building the bench target also builds the tortie binary it runs (CARGO_BIN_EXE_tortie).
bin=$(cargo build "${profile_args[@]}" --bench overlay_api --message-format=json \
  | jq -r 'select(.executable != null and .target.name == "overlay_api") | .executable')
[ -x "$bin" ] || { echo "overlay bench: no bench binary built" >&2; exit 1; }
echo "overlay bench: $bin (${BENCH_PROFILE:-dev} profile)" >&2
exec "$bin" --bench
