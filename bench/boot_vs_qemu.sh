#!/usr/bin/env bash
# Boot-to-exit wall time: `luvisor run` on a script that boots the built-in guest with
# `hello; exit 0` and waits for its end, against QEMU (-M microvm, KVM) booting a
# minimal PVH guest that prints hello and exits. Both are measured in this one run.
#
#   bench/boot_vs_qemu.sh [RUNS]
set -euo pipefail
runs=${1:-20}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cargo build --release --quiet
luvisor="$root/target/release/luvisor"

if ! command -v qemu-system-x86_64 >/dev/null; then
  echo "installing qemu-system-x86 (Debian package) for the comparison..."
  apt-get update -qq && apt-get install -y -qq qemu-system-x86 >/dev/null
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat > "$work/hello.lua" <<'LUA'
local vm = hv.vm{ name = "hello", memory = "32M", guest = hv.guest.builtin{ cmdline = "hello; exit 0" } }
vm:start()
assert(vm:wait{ timeout = 30 } == 0)
assert(vm:console() == "hello from luvisor guest\n")
LUA
as --32 -o "$work/hello.o" bench/qemu-hello/hello.S
ld -m elf_i386 -T bench/qemu-hello/hello.ld -o "$work/hello.elf" "$work/hello.o"
qemu=(qemu-system-x86_64 -M microvm,x-option-roms=off,rtc=off,pit=off,pic=off,isa-serial=on
      -enable-kvm -m 32M -nodefaults -no-user-config -display none -serial stdio
      -device isa-debug-exit,iobase=0xf4,iosize=4 -kernel "$work/hello.elf")

# Prints the wall time of one command in milliseconds; fails if its output lacks $2.
time_ms() {
  local expect=$1; shift
  local start end out
  start=$(date +%s%N)
  out=$("$@" 2>&1 || true)
  end=$(date +%s%N)
  if [[ "$out" != *"$expect"* ]]; then
    echo "unexpected output from $1: $out" >&2
    return 1
  fi
  echo $(( (end - start) / 1000 ))
}

median() { sort -n | awk '{ a[NR] = $1 } END { m = a[int((NR + 1) / 2)]; printf "%.1f", m / 1000 }'; }

# One warm-up each, so both start from a warm page cache.
time_ms "" "$luvisor" run "$work/hello.lua" >/dev/null
time_ms "hello from qemu guest" "${qemu[@]}" >/dev/null
ours=$(for _ in $(seq "$runs"); do time_ms "" "$luvisor" run "$work/hello.lua"; done | median)
theirs=$(for _ in $(seq "$runs"); do time_ms "hello from qemu guest" "${qemu[@]}"; done | median)
echo "boot to exit, median of $runs runs: luvisor run ${ours} ms, qemu-system-x86_64 -M microvm ${theirs} ms," \
     "ratio qemu/luvisor $(awk -v a="$theirs" -v b="$ours" 'BEGIN { printf "%.1fx", a / b }')"
