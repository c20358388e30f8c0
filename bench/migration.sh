#!/usr/bin/env bash
# Live migration figures (bench/migration.lua), with the loopback TCP bandwidth measured
# first in the same run: one stream of 1 MiB writes over 127.0.0.1 for 4 GiB.
#
#   bench/migration.sh [ROUNDS]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
luvisor=${LUVISOR:-$root/target/release/luvisor}
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
"$luvisor" run "$root/bench/migration.lua" "$loopback" "${1:-3}"
