#!/usr/bin/env bash
# Network policy at scale (benches/policy_scale.rs): 5,000 endpoints on 50 simulated nodes
# and 1,000 policies. The incremental calculation beside the full rebuild in the same run,
# then real nft and real packets in test namespaces (label-change transaction, policy write
# → probe flips, a new local pod's commit with and without policy, new TCP connections/s and
# iperf3 throughput with the table vs none). Release build, built once. Needs root for part 2.
#   scripts/bench/policy.sh
#   POLICY_BENCH_FLIPS=40 POLICY_BENCH_LABELS=400 POLICY_BENCH_NAMESPACES=100 \
#   POLICY_BENCH_PODS_PER_NS=50 POLICY_BENCH_POLICIES_PER_NS=10 POLICY_BENCH_NODES=50 \
#   POLICY_BENCH_ROUNDS=5 scripts/bench/policy.sh
# (POLICY_BENCH_NODES=6 puts 900 of the 5,000 endpoints on the measured node: 14,411 rules.)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
for tool in nft conntrack iperf3 ip jq; do
  command -v "$tool" >/dev/null || { echo "policy bench: $tool is required" >&2; exit 1; }
done
bin=$(cargo bench --no-run --bench policy_scale --message-format=json \
  | jq -r 'select(.executable != null and .target.name == "policy_scale") | .executable')
[ -x "$bin" ] || { echo "policy bench: no bench binary built" >&2; exit 1; }
echo "policy bench: $bin (release)" >&2
exec "$bin" --bench
