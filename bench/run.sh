#!/usr/bin/env bash
# Runs every benchmark and prints its figures. Nothing here asserts a time: the machines
# are shared and noisy, so compare figures taken in one run.
#
#   bench/run.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cargo build --release --quiet
luvisor="$root/target/release/luvisor"
echo "== boot to exit, luvisor vs QEMU"
bench/boot_vs_qemu.sh 20
echo "== start -> ready latency"
"$luvisor" run bench/boot_latency.lua 200
echo "== VMM memory overhead per VM"
"$luvisor" run bench/vmm_overhead.lua 50
echo "== idle host CPU"
"$luvisor" run bench/idle_cpu.lua 50 5
echo "== virtio-blk, guest vs host"
bench/storage.sh 3
echo "== snapshot and restore"
"$luvisor" run bench/snapshot.lua 100
echo "== virtio-balloon"
"$luvisor" run bench/balloon.lua 5
echo "== labs and warm pools"
"$luvisor" run bench/lab.lua 200
echo "== live migration"
bench/migration.sh 3
echo "== agent channel: exec round trip, key-value latency"
"$luvisor" run bench/agent.lua 1000
echo "== policies: tick cost and reload latency"
bench/policy.sh 200 20
echo "== luvisor test: runner overhead"
bench/runner.sh 1000 100 5
