#!/usr/bin/env bash
# Guest virtio-blk throughput against the host doing the same I/O on the same image file.
# The guest runs `blk-bench` (16 requests in flight); the host runs fio with the syscalls
# the device uses (synchronous buffered pread/pwrite from one thread). Prints both and
# the guest/host ratio. Then the copy-on-write path: the guest fills a fresh qcow2
# overlay of the image, against `qemu-img bench` (QEMU's own block layer) filling another
# one with the same 64 KiB writes, 16 in flight (no flush on either side).
#
#   bench/storage.sh [SECONDS] [ROUNDS]
set -euo pipefail
seconds=${1:-3}
rounds=${2:-3}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cargo build --release --quiet
luvisor="$root/target/release/luvisor"
if ! command -v fio >/dev/null; then
  echo "installing fio (Debian package) for the host side..."
  apt-get update -qq && apt-get install -y -qq fio >/dev/null
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
image="$work/bench.img"
dd if=/dev/zero of="$image" bs=1M count=256 status=none
sync

host_mib() { # rw bs -> "MiB/s IOPS"
  fio --name=host --filename="$image" --rw="$1" --bs="$2" --ioengine=psync --iodepth=1 --numjobs=1 --gtod_reduce=1 --invalidate=0 \
      --time_based --runtime="$seconds" --size=256M --output-format=json 2>/dev/null |
    python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; d=j["read"] if j["read"]["io_bytes"] else j["write"]; print("%.1f %d" % (d["bw_bytes"]/1048576, d["iops"]))'
}

median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# The machine's speed drifts over seconds (shared, noisy), so the guest and the host take
# turns on each pattern, ROUNDS times, and the table shows medians.
echo "each pattern: guest then host, ${seconds}s each, ${rounds} rounds; medians"
printf "%-22s %14s %12s %14s %12s %8s\n" pattern "guest MiB/s" "guest IOPS" "host MiB/s" "host IOPS" ratio
for pattern in "seq read 64" "seq write 64" "rand read 4" "rand write 4"; do
  read -r mode op size <<<"$pattern"
  case "$mode-$op" in
    seq-read) rw=read ;; seq-write) rw=write ;; rand-read) rw=randread ;; rand-write) rw=randwrite ;;
  esac
  samples=()
  for _ in $(seq "$rounds"); do
    # blk-bench seq read 64K: 1050.4 MiB/s, 16807 IOPS
    line=$("$luvisor" run bench/storage.lua "$image" "$seconds" "$pattern" | grep '^blk-bench')
    read -r h_mib h_iops < <(host_mib "$rw" "${size}k")
    samples+=("$(awk '{print $5, $7}' <<<"$line") $h_mib $h_iops")
  done
  col() { printf '%s\n' "${samples[@]}" | awk -v c="$1" '{print $c}' | median; }
  g_mib=$(col 1); g_iops=$(col 2); h_mib=$(col 3); h_iops=$(col 4)
  ratio=$(awk -v g="$g_mib" -v h="$h_mib" 'BEGIN { printf "%.2f", g / h }')
  printf "%-22s %14s %12s %14s %12s %8s\n" "$mode $op ${size}K" "$g_mib" "$g_iops" "$h_mib" "$h_iops" "$ratio"
done

echo
guest_fill=$("$luvisor" run bench/storage_overlay.lua "$image" "$work/guest.qcow2")
echo "$guest_fill"
qemu-img create -q -f qcow2 -b "$image" -F raw "$work/qemu.qcow2"
requests=$((256 * 1024 / 64))
qemu_s=$(qemu-img bench -w -c "$requests" -d 16 -s 65536 --pattern=7 -f qcow2 "$work/qemu.qcow2" |
  sed -n 's/^Run completed in \(.*\) seconds\./\1/p')
qemu_mib=$(awk -v s="$qemu_s" 'BEGIN { printf "%.1f", 256 / s }')
guest_mib=$(sed -n 's/.*, \([0-9.]*\) MiB\/s$/\1/p' <<<"$guest_fill")
echo "qemu-img bench fill: 256 MiB in ${qemu_s} s, ${qemu_mib} MiB/s"
echo "overlay fill ratio luvisor/qemu: $(awk -v g="$guest_mib" -v q="$qemu_mib" 'BEGIN { printf "%.2f", g / q }')"
