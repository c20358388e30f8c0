#!/usr/bin/env bash
# The live-migration fault rounds of tests/migration.rs, many times: destinations that
# die or drop the connection at every step, and connections cut at random bytes and at
# every hand-over frame. After each round the VM must run in exactly one place with its
# memory intact. Not run in CI (1000 rounds take about 5 minutes in a release build).
#
#   bench/migration_faults.sh [ROUNDS] [SEED]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
LUVISOR_MIGRATION_ROUNDS=${1:-1000} LUVISOR_MIGRATION_SEED=${2:-$RANDOM$RANDOM} \
  cargo test --release --test migration faults_at_random_points -- --nocapture 2>&1 |
  grep -E "rounds|moved the VM|test result|panicked|FAILED"
