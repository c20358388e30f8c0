#!/usr/bin/env bash
# Policy engine figures: the default policy's tick cost over COUNT VMs with recorded
# statistics (through `luvisor policy simulate`, which times each tick), and the reload
# latency of an edited policy file.
#
#   bench/policy.sh [COUNT] [EDITS]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
luvisor=${LUVISOR:-$root/target/release/luvisor}
count=${1:-200}
edits=${2:-20}
trace=$(mktemp --suffix=.jsonl)
trap 'rm -f "$trace"' EXIT
"$luvisor" run "$root/bench/policy_trace.lua" "$trace" "$count" 100 >/dev/null
echo "default policy over $count VMs, 100 recorded ticks:"
"$luvisor" policy simulate "$root/policies/dynamic_memory.lua" --trace "$trace" 2>&1 >/dev/null \
  | grep -E "^(replayed|tick cost)" | sed 's/^/  /'
"$luvisor" run "$root/bench/policy_reload.lua" "$edits"
