#!/usr/bin/env bash
# `luvisor test` overhead: what the runner adds per test and per file, apart from what
# the tests themselves do.
#
#   - per test: a file of TESTS trivial tests (`assert.equal(1, 1)`) against a file of one;
#     each test costs its cleanup scope, hooks lookup, timing, print capture and a line
#     of output;
#   - per test with a VM: TESTS/10 tests that each create a VM (not started) that the
#     runner destroys when the test ends;
#   - per file: FILES files of one trivial test against one file; each file costs a fresh
#     Lua state with `hv` and the DSL, a registry, its thread, and the file's report;
#   - the same FILES files with --jobs 2 and with --isolate (a scratch directory each).
#
# Each figure is the median wall time of ROUNDS runs of the release binary, minus the
# one-test run, divided by the number of extra tests or files.
#
#   bench/runner.sh [TESTS] [FILES] [ROUNDS]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
luvisor=${LUVISOR:-$root/target/release/luvisor}
tests=${1:-1000}
files=${2:-100}
rounds=${3:-5}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT

mkdir -p "$dir/one" "$dir/many-tests" "$dir/vm-tests" "$dir/many-files"
echo 'it("is trivial", function() assert.equal(1, 1) end)' > "$dir/one/one.lua"
{
  echo 'describe("trivial", function()'
  for i in $(seq "$tests"); do echo "  it(\"test $i\", function() assert.equal($i, $i) end)"; done
  echo 'end)'
} > "$dir/many-tests/tests.lua"
vm_tests=$((tests / 10))
{
  echo 'local guest = hv.guest.builtin{ cmdline = "exit 0" }'
  echo 'describe("a VM per test", function()'
  for i in $(seq "$vm_tests"); do
    echo "  it(\"test $i\", function() hv.vm{ name = \"vm\", memory = \"16M\", guest = guest } end)"
  done
  echo 'end)'
} > "$dir/vm-tests/tests.lua"
for i in $(seq "$files"); do
  echo 'it("is trivial", function() assert.equal(1, 1) end)' > "$dir/many-files/f$i.lua"
done

# Median wall time in ms of `luvisor test ARGS` over the rounds.
median_ms() {
  local times=()
  for _ in $(seq "$rounds"); do
    local start end
    start=$(date +%s%N)
    "$luvisor" test --format tap "$@" > /dev/null
    end=$(date +%s%N)
    times+=("$(( (end - start) / 1000 ))")
  done
  printf '%s\n' "${times[@]}" | sort -n | awk '{ a[NR] = $1 } END { m = (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2; printf "%.3f", m / 1000 }'
}

base=$(median_ms "$dir/one")
many_tests=$(median_ms "$dir/many-tests")
vm_each=$(median_ms "$dir/vm-tests")
many_files=$(median_ms "$dir/many-files")
many_files_jobs=$(median_ms --jobs 2 "$dir/many-files")
many_files_isolated=$(median_ms --isolate "$dir/many-files")
awk -v base="$base" -v t="$tests" -v mt="$many_tests" -v vt="$vm_tests" -v ve="$vm_each" \
    -v f="$files" -v mf="$many_files" -v mj="$many_files_jobs" -v mi="$many_files_isolated" -v r="$rounds" 'BEGIN {
  printf "luvisor test, median of %d runs; one file of one test: %.1f ms (process start to exit)\n", r, base
  printf "  %d trivial tests in one file: %.1f ms, %.1f us per test\n", t, mt, (mt - base) * 1000 / (t - 1)
  printf "  %d tests each making a VM the runner destroys: %.1f ms, %.1f us per test\n", vt, ve, (ve - base) * 1000 / (vt - 1)
  printf "  %d files of one test: %.1f ms, %.2f ms per file\n", f, mf, (mf - base) / (f - 1)
  printf "  the same with --jobs 2: %.1f ms, %.2f ms per file\n", mj, (mj - base) / (f - 1)
  printf "  the same with --isolate: %.1f ms, %.2f ms per file\n", mi, (mi - base) / (f - 1)
}'
