#!/usr/bin/env bash
# Live migration figures (bench/migration.lua), with the loopback TCP bandwidth measured
# first in the same run: one stream of 1 MiB writes over 127.0.0.1 for 4 GiB. In the
# same run, each migration is repeated under QEMU with the same guest (the built-in
# guest booted through its PVH entry) and the same dirtying (bench/qemu_migration.py),
# and a second table compares the two. Set NO_QEMU=1 to skip QEMU.
#
#   bench/migration.sh [ROUNDS]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
luvisor=${LUVISOR:-$root/target/release/luvisor}

guest_elf=
if [[ -z "${NO_QEMU:-}" ]]; then
  if ! command -v qemu-system-x86_64 >/dev/null; then
    echo "installing qemu-system-x86 (Debian package) for the comparison..."
    apt-get update -qq && apt-get install -y -qq --no-install-recommends qemu-system-x86 >/dev/null
  fi
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  guest_elf=$work/guest.elf
  "$luvisor" guest-elf "$guest_elf"
fi
loopback=$(python3 - <<'PY'
import socket, threading, time
total, chunk = 4 << 30, 1 << 20
server = socket.socket(); server.bind(("127.0.0.1", 0)); server.listen(1)
def sink():
    conn, _ = server.accept()
    buf = bytearray(chunk); view = memoryview(buf); got = 0
    while got < total:
        n = conn.recv_into(view)
        if n == 0: break
        got += n
threading.Thread(target=sink).start()
client = socket.create_connection(server.getsockname())
data = b"\x5a" * chunk
start = time.perf_counter()
for _ in range(total // chunk):
    client.sendall(data)
client.close()
print(int(total / (time.perf_counter() - start)))
PY
)
"$luvisor" run "$root/bench/migration.lua" "$loopback" "${1:-3}" ${guest_elf:+"$guest_elf"}
