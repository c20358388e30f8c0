#!/usr/bin/env python3
"""One live migration of luvisor's built-in guest under QEMU, for bench/migration.lua's
comparison with luvisor's own (see bench/README.md).

Two qemu-system-x86_64 processes (-M microvm, KVM) on this machine boot the same image
(`luvisor guest-elf`, through its PVH entry) with the same command line and memory size;
the destination waits with `-incoming defer` on a free loopback port. Driven over QMP
(stdlib only): the source gets the downtime limit (our `max_downtime_ms`), no bandwidth
cap (QEMU's default is 128 MiB/s; luvisor has none) and, with --auto-converge, QEMU's
auto-converge; it runs until the console shows every --wait text, then migrates. Once
the migration completed and the destination runs, --verify is sent to the destination's
console and its answer checked.

Prints one line of key=value fields:
  downtime_ms       QEMU's own figure, in whole ms: from just before the source stops
                    the VM until it has sent the last byte (the destination may still be
                    loading then, and has not started the VM)
  stop_to_run_ms    from the source's run state leaving `running` (the stop begins) to
                    the destination's entering it (its vCPUs start), from QEMU's
                    `runstate_set` trace with `-msg timestamp=on` (one host clock, µs):
                    pausing here to running there, as luvisor's downtime_ms
  stop_to_resume_ms the source's STOP event (vCPUs already paused) to the destination's
                    RESUME event, from QMP timestamps
  total_ms, bytes   QEMU's total-time and ram.transferred
  syncs             ram.dirty-sync-count (dirty bitmap syncs: about one per pass, plus one)
  verify            the destination guest's answer to --verify
or `error=...` on a line of its own, and exits 1.

  qemu_migration.py --elf GUEST.elf --memory 128M --cmdline 'touch 64; dirty 64 100; listen'
                    --wait touched --wait 'dirty: pass' --downtime-ms 5 --auto-converge
                    --verify dirty-verify --expect 'dirty-verify: ok'
"""

import argparse
import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

QEMU = "qemu-system-x86_64"


class Failure(Exception):
    pass


def connect_unix(path, deadline):
    """Connects to a socket QEMU is about to create."""
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise Failure(f"QEMU did not open {path}")
            time.sleep(0.01)


class Qmp:
    """A QMP connection: commands one at a time; events kept with their timestamps."""

    def __init__(self, path, deadline):
        self.sock = connect_unix(path, deadline)
        self.file = self.sock.makefile("rw", encoding="utf-8")
        self.replies = queue.Queue()
        self.events = []
        self.events_lock = threading.Lock()
        json.loads(self.file.readline())  # greeting
        threading.Thread(target=self._read, daemon=True).start()
        self.command("qmp_capabilities")

    def _read(self):
        try:
            for line in self.file:
                message = json.loads(line)
                if "event" in message:
                    stamp = message["timestamp"]
                    with self.events_lock:
                        self.events.append((message["event"],
                                            stamp["seconds"] + stamp["microseconds"] / 1e6))
                else:
                    self.replies.put(message)
        except OSError:
            pass  # QEMU quit
        self.replies.put(None)

    def command(self, name, **arguments):
        self.file.write(json.dumps({"execute": name, "arguments": arguments}) + "\n")
        self.file.flush()
        reply = self.replies.get(timeout=30)
        if reply is None:
            raise Failure(f"QEMU closed its monitor during {name}")
        if "error" in reply:
            raise Failure(f"{name}: {reply['error'].get('desc', reply['error'])}")
        return reply["return"]

    def event_time(self, name):
        with self.events_lock:
            return next((t for e, t in self.events if e == name), None)


class Console:
    """The guest's COM1 on a unix socket: everything it printed, and input."""

    def __init__(self, path, deadline):
        self.sock = connect_unix(path, deadline)
        self.text = ""
        self.changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                data = b""  # QEMU quit
            if not data:
                return
            with self.changed:
                self.text += data.decode("utf-8", "replace").replace("\r", "")
                self.changed.notify_all()

    def wait_for(self, needle, start, timeout):
        """Waits until `needle` appears after offset `start`; returns the offset after it."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                at = self.text.find(needle, start)
                if at >= 0:
                    return at + len(needle)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Failure(f"no {needle!r} on the console; it shows: {self.text[-300:]!r}")
                self.changed.wait(left)

    def line_after(self, offset, timeout):
        """The rest of the line `offset` is in, once its end has arrived."""
        end = self.wait_for("\n", offset, timeout) - 1
        with self.changed:
            return self.text[offset:end]

    def send(self, text):
        self.sock.sendall(text.encode())


def qemu_command(args, work, side):
    command = [
        QEMU,
        "-M", "microvm,x-option-roms=off,rtc=off,pit=off,pic=off,isa-serial=on",
        "-enable-kvm",
        # qemu64 less SSE3, which PVM's CPUID lacks (QEMU warns); -cpu host fails here
        # (KVM refuses MSR 0x10a).
        "-cpu", "qemu64,pni=off",
        "-m", args.memory,
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-device", "isa-debug-exit,iobase=0x500,iosize=4",
        "-chardev", f"socket,id=console,path={work}/{side}.console,server=on,wait=off",
        "-serial", "chardev:console",
        "-qmp", f"unix:{work}/{side}.qmp,server=on,wait=off",
        # Run state changes with their wall-clock time, for stop_to_run_ms.
        "-msg", "timestamp=on", "-trace", "runstate_set", "-D", f"{work}/{side}.trace",
        "-kernel", args.elf,
        "-append", args.cmdline,
    ]
    # The source starts stopped, so nothing it prints is lost before we listen.
    return command + (["-S"] if side == "source" else ["-incoming", "defer"])


def runstate_time(path, old, new):
    """When QEMU's run state went from `old` to `new`: the wall-clock time of the first
    such `runstate_set` line of its trace log (`PID@SECONDS.MICROS:runstate_set
    current_run_state 9 (running) new_state 5 (finish-migrate)`)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            with open(path) as log:
                for line in log:
                    stamp, _, rest = line.partition(":runstate_set ")
                    if rest and f"({old}) new_state" in rest and rest.rstrip().endswith(f"({new})"):
                        return float(stamp.split("@", 1)[1])
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise Failure(f"no run state change {old} -> {new} in {os.path.basename(path)}")
        time.sleep(0.005)


def migrate(args, work):
    procs = []
    try:
        for side in ("source", "destination"):
            procs.append(subprocess.Popen(qemu_command(args, work, side), stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL,
                                          stderr=open(f"{work}/{side}.log", "w")))
        deadline = time.monotonic() + 30
        source, destination = (Qmp(f"{work}/{s}.qmp", deadline) for s in ("source", "destination"))
        source_console, destination_console = (Console(f"{work}/{s}.console", deadline)
                                               for s in ("source", "destination"))

        destination.command("migrate-incoming", uri="tcp:127.0.0.1:0")
        listening = destination.command("query-migrate").get("socket-address") or []
        ports = [a["port"] for a in listening if a.get("type") == "inet"]
        if not ports:
            raise Failure(f"the destination reports no listening port: {listening}")

        source.command("migrate-set-capabilities", capabilities=[
            {"capability": "auto-converge", "state": args.auto_converge}])
        source.command("migrate-set-parameters", **{
            "downtime-limit": args.downtime_ms,
            "max-bandwidth": 1 << 40,
        })
        source.command("cont")
        offset = 0
        for needle in args.wait:
            offset = source_console.wait_for(needle, offset, 120)

        source.command("migrate", uri=f"tcp:127.0.0.1:{ports[0]}")
        give_up = time.monotonic() + args.timeout
        while True:
            info = source.command("query-migrate")
            status = info.get("status")
            if status == "completed":
                break
            if status in ("failed", "cancelled"):
                raise Failure(f"migration {status}: {info.get('error-desc', info)}")
            if time.monotonic() > give_up:
                source.command("migrate_cancel")
                raise Failure(f"migration did not complete in {args.timeout} s: {info}")
            time.sleep(0.005)

        deadline = time.monotonic() + 30
        while destination.event_time("RESUME") is None or source.event_time("STOP") is None:
            if time.monotonic() > deadline:
                raise Failure("no STOP event at the source or no RESUME at the destination")
            time.sleep(0.005)
        stop_to_resume = (destination.event_time("RESUME") - source.event_time("STOP")) * 1000
        stopping = runstate_time(f"{work}/source.trace", "running", "finish-migrate")
        running = runstate_time(f"{work}/destination.trace", "inmigrate", "running")
        stop_to_run = (running - stopping) * 1000

        if source.command("query-status")["status"] != "postmigrate":
            raise Failure("the source is not in postmigrate after the migration")
        destination_console.send(args.verify + "\n")
        after = destination_console.wait_for(args.expect, 0, 120)
        verdict = args.expect + destination_console.line_after(after, 30)

        ram = info.get("ram", {})
        print(f"downtime_ms={info.get('downtime', -1)} stop_to_run_ms={stop_to_run:.2f} "
              f"stop_to_resume_ms={stop_to_resume:.2f} "
              f"total_ms={info.get('total-time', -1)} bytes={ram.get('transferred', -1)} "
              f"syncs={ram.get('dirty-sync-count', -1)} verify={json.dumps(verdict)}")
        for qmp in (source, destination):
            try:
                qmp.command("quit")
            except (Failure, OSError, queue.Empty):
                pass
    finally:
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--elf", required=True, help="the guest image (luvisor guest-elf PATH)")
    parser.add_argument("--memory", required=True, help="guest memory, as for qemu -m (128M)")
    parser.add_argument("--cmdline", required=True, help="the guest's command line")
    parser.add_argument("--wait", action="append", default=[],
                        help="console text to see before migrating (in order; repeatable)")
    parser.add_argument("--downtime-ms", type=int, default=5, help="QEMU's downtime-limit")
    parser.add_argument("--auto-converge", action="store_true", help="QEMU's auto-converge")
    parser.add_argument("--timeout", type=float, default=120, help="give up after this many s")
    parser.add_argument("--verify", default="hello", help="line sent to the destination's console")
    parser.add_argument("--expect", default="hello from luvisor guest",
                        help="answer expected from the destination")
    args = parser.parse_args()
    if shutil.which(QEMU) is None:
        print(f"error={QEMU} is not installed (Debian package qemu-system-x86)")
        return 1
    # Unix socket paths are short; a fresh directory under /tmp keeps them so.
    work = tempfile.mkdtemp(prefix="qmig-")
    try:
        migrate(args, work)
        return 0
    except (Failure, OSError, queue.Empty) as e:
        logs = " | ".join(open(f"{work}/{s}.log").read().strip().replace("\n", " / ")
                          for s in ("source", "destination") if os.path.exists(f"{work}/{s}.log"))
        print(f"error={json.dumps(str(e) + (' (QEMU: ' + logs + ')' if logs else ''))}")
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
