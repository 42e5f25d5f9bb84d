"""`make bench`: what the firmware costs, measured on the Unix port against the local emulator.

For each transport: the smallest `-X heapsize` at which the whole lifecycle passes (provision, save, reconnect
with the saved credentials, 100 telemetry messages) with the firmware deployed as .mpy, in every one of --runs
bisections on fresh boards (the bisections one by one are in min_heap_bytes_per_run); the same for the application
lifecycle (min_heap_bytes_app: a user's telemetry function, RPC and attribute handlers on tbfleet.Device, one RPC
answered and one attribute push handled too); the round trips from connected to the first acknowledged telemetry
with saved credentials (round_trips_to_first_ack, counted by a relay); the lifecycle's wall time;
the time from start to the first telemetry stored by the emulator; application bytes on the wire per telemetry
message (TCP/UDP payload both ways, counted by a relay between board and emulator); microseconds per message of
wall time on the board (ticks_us around whole boots, so waiting for the server's answers is included: not CPU time).
Also the .mpy footprint of the whole firmware. Prints a table and writes bench-results.json at the repository root.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from host_tools.build import MICROPYTHON, compile_firmware
from host_tools.devconfig import TRANSPORTS
from host_tools.emulator.process import EmulatorProcess

MESSAGES = 100
TARGET_HEAP = 24576
TARGET_HEAP_APP = 28672  # the application lifecycle (issue 11): under 0.82x the official SDK's 35072
TARGET_FOOTPRINT = 24576
KEY, SECRET = "bench-provision-key", "bench-provision-secret"
EMULATOR_CONFIG = {"profiles": [{"name": "bench", "provisionDeviceKey": KEY, "provisionDeviceSecret": SECRET,
                                 "provisionType": "ALLOW_CREATE_NEW_DEVICES"}], "devices": []}

# Runs on the board: each argument is one boot, sending that many messages (0: provision/connect only).
# Prints the microseconds each boot took, as JSON. The first message of a boot goes with the connect.
BOOTS_SCRIPT = """\
import sys, time
from tbfleet import stock
took = []
for n in sys.argv[1:]:
    t0 = time.ticks_us()
    stock.main(max_messages=int(n))
    took.append(time.ticks_diff(time.ticks_us(), t0))
print(took)
"""

# The full application lifecycle, one boot per process as on a board: a user's telemetry function, RPC and
# attribute handlers registered on tbfleet.Device. The first boot (argument 1) provisions and sends one message; the
# second (100) sends 100, then goes on sending every 0.1 s, listening in between, until it has answered an RPC and
# handled a pushed attribute, which the bench sends meanwhile. (Over HTTP an RPC comes only on a long poll, which is
# open only while the board listens: one message per connection would never take one.)
APP_SCRIPT = """\
import sys
import tbfleet

dev = tbfleet.Device()
handled = set()


@dev.telemetry
def reading():
    return {"reading": 21.5}


@dev.rpc("ping")
def ping(params):
    handled.add("rpc")
    return {"pong": params}


@dev.attributes
def changed(values):
    if "target" in values:
        handled.add("attributes")


n = int(sys.argv[1])
dev.run(n)
dev.interval = 0.1
while n > 1 and len(handled) < 2:
    dev.run(dev.sent + 2)
"""


def board_command(module: str, args: list[str], heapsize: int | None = None) -> list[str]:
    """The command line that runs a bench board's module (boots or app) from its directory.

    Run with -m from the board's directory and board_env(), the board's sys.path is a board's: ['', '.frozen', 'lib'].
    A script path would put the script's absolute directory first in sys.path, and the Unix port interns every
    entry of it (with MICROPYPATH's default, the home directory too): heap figures would then move with TMPDIR and
    HOME by up to 0.5 KB.
    """
    return [MICROPYTHON] + (["-X", f"heapsize={heapsize}"] if heapsize else []) + ["-m", module] + args


def board_env() -> dict[str, str]:
    """The environment of a bench board: the firmware's lib folder in sys.path, as on a board."""
    return {**os.environ, "MICROPYPATH": ".frozen:lib"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `python -m host_tools bench`."""
    parser.add_argument("--transport", action="append", choices=TRANSPORTS,
                        help="measure only this transport (repeatable; default all)")
    parser.add_argument("--runs", type=int, default=5, help="runs to take the median of (default 5)")
    parser.add_argument("--output", type=Path, default=Path("bench-results.json"),
                        help="where to write the JSON (default: in the current directory)")


class CountingRelay:
    """A loopback relay between board and emulator that counts the bytes it carries (TCP streams or UDP)."""

    def __init__(self, upstream_port: int, udp: bool) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.udp = udp
        self.bytes = 0
        self._lock = threading.Lock()
        kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
        self.sock = socket.socket(socket.AF_INET, kind)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._closing = False
        # (connection number, board to server, carries telemetry) of each chunk relayed, in order: the request
        # bursts and answers that round_trips counts.
        self.flow: list[tuple[int, bool, bool]] = []
        self._connections = 0
        if not udp:
            self.sock.listen(16)
        threading.Thread(target=self._serve_udp if udp else self._serve_tcp, daemon=True).start()

    def _count(self, n: int, conn: int, up: bool, data: bytes) -> None:
        with self._lock:
            self.bytes += n
            self.flow.append((conn, up, b"telemetry" in data))

    def round_trips(self) -> int | None:
        """Request bursts the board sent, in every connection, up to and including the one carrying its first
        telemetry: each burst waits for an answer, so that is the round trips to the first acknowledged message
        (TCP handshakes not counted). None when no telemetry went through."""
        last_up: dict[int, bool] = {}
        bursts = 0
        with self._lock:
            flow = list(self.flow)
        for conn, up, telemetry in flow:
            if up and not last_up.get(conn, False):
                bursts += 1
            last_up[conn] = up
            if up and telemetry:
                return bursts
        return None

    def _serve_tcp(self) -> None:
        while not self._closing:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            self._connections += 1
            for a, b, up in ((client, server, True), (server, client, False)):
                threading.Thread(target=self._pipe, args=(a, b, self._connections, up), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, conn: int, up: bool) -> None:
        try:
            while data := src.recv(65536):
                self._count(len(data), conn, up, data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _serve_udp(self) -> None:
        upstreams: dict[tuple, socket.socket] = {}
        while not self._closing:
            try:
                data, client = self.sock.recvfrom(65536)
            except OSError:
                return
            self._count(len(data), 0, True, data)
            up = upstreams.get(client)
            if up is None:
                up = upstreams[client] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                up.connect(self.upstream)
                threading.Thread(target=self._udp_back, args=(up, client), daemon=True).start()
            up.send(data)

    def _udp_back(self, up: socket.socket, client: tuple) -> None:
        while not self._closing:
            try:
                data = up.recv(65536)
            except OSError:
                return
            self._count(len(data), 0, False, data)
            self.sock.sendto(data, client)

    def close(self) -> None:
        """Stop accepting and close the listening socket (connections already relayed end with their peers)."""
        self._closing = True
        self.sock.close()


class Bench:
    """One emulator, one compiled firmware tree, fresh board directories per measurement."""

    def __init__(self, emulator: EmulatorProcess, build: Path, work: Path) -> None:
        self.emulator = emulator
        self.build = build
        self.work = work
        self._n = 0

    def board(self, transport: str, port: int | None = None) -> tuple[Path, str]:
        """A fresh board (firmware, config for a new device, boots.py and app.py) and its device name."""
        self._n += 1
        # One name length for every board: the heap a lifecycle needs moves with it.
        name = f"bench-{transport}-{self._n:04d}"
        path = self.work / name
        shutil.copytree(self.build, path)
        (path / "boots.py").write_text(BOOTS_SCRIPT)
        (path / "app.py").write_text(APP_SCRIPT)
        config = {"host": "127.0.0.1", "port": port or self.emulator.ports[transport], "transport": transport,
                  "provision_key": KEY, "provision_secret": SECRET, "device_name": name,
                  "telemetry_interval": 0, "qos": 1, "timeout": 5, "log_level": "warn",
                  "sensors": ["uptime", "free_heap", "heap_used"]}
        (path / "config.json").write_text(json.dumps(config))
        return path, name

    def boots(self, board: Path, counts: list[int], heapsize: int | None = None,
              timeout: float = 60, module: str = "boots") -> tuple[bool, list[int], float]:
        """Run the boots; (exited 0, µs per boot, wall seconds). module app: the application's boots (no µs)."""
        cmd = board_command(module, [str(c) for c in counts], heapsize)
        t0 = time.perf_counter()
        lines: list[str] = []
        with subprocess.Popen(cmd, cwd=board, env=board_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) as proc:
            assert proc.stdout is not None
            # A board that ran out of heap logs the MemoryError and retries after a backoff: at this heap size the
            # lifecycle has failed, so the run ends there instead of waiting out the timeout.
            timer = threading.Timer(timeout, proc.kill)
            timer.start()
            try:
                for line in proc.stdout:
                    lines.append(line)
                    if "MemoryError" in line:
                        proc.kill()
                        break
            finally:
                timer.cancel()
                proc.kill()
            returncode = proc.wait()
        wall = time.perf_counter() - t0
        if returncode != 0:
            return False, [], wall
        if module != "boots":
            return True, [], wall
        return True, json.loads(lines[-1]), wall

    def lifecycle_passes(self, transport: str, heapsize: int | None) -> tuple[bool, float]:
        """Provision, save and connect (the first message goes with the connect), then reconnect and send 100
        messages: exit 0 and all 101 stored by the emulator."""
        board, name = self.board(transport)
        ok, _, wall = self.boots(board, [1, MESSAGES], heapsize, timeout=30)
        return ok and len(self.emulator.telemetry(name)) == MESSAGES + 1, wall

    def app_lifecycle_passes(self, transport: str, heapsize: int | None) -> bool:
        """The application lifecycle (APP_SCRIPT): provision, save, connect; reconnect, 100 messages, one RPC
        answered and one attribute push handled, both sent by a thread here once the second boot is sending."""
        board, name = self.board(transport)
        stop = threading.Event()

        def server_side() -> None:
            # Once the second boot sent a message: the push, then an RPC every 0.2 s until one is answered (the
            # emulator delivers an RPC only to a session subscribed at that moment).
            while not stop.is_set() and len(self.emulator.telemetry(name)) < 2:
                time.sleep(0.005)
            if stop.is_set():
                return
            path = f"/emulator/devices/{name}"
            self.emulator.api("POST", path + "/attributes/shared", {"target": 22})
            while not stop.is_set() and not self.emulator.api("GET", path + "/rpc"):
                self.emulator.api("POST", path + "/rpc", {"method": "ping", "params": 1})
                stop.wait(0.2)

        helper = threading.Thread(target=server_side, daemon=True)
        helper.start()
        try:
            ok = all(self.boots(board, [n], heapsize, timeout=30, module="app")[0] for n in (1, MESSAGES))
        finally:
            stop.set()
            helper.join(10)
        replies = self.emulator.api("GET", f"/emulator/devices/{name}/rpc") if ok else {}
        return ok and len(self.emulator.telemetry(name)) >= MESSAGES + 1 and {"pong": 1} in replies.values()

    def lifecycle_seconds(self, transport: str) -> float:
        """Wall seconds of one lifecycle with the default heap; RuntimeError naming the transport when it fails."""
        ok, wall = self.lifecycle_passes(transport, None)
        if not ok:
            raise RuntimeError(f"{transport}: a timing run of the lifecycle failed or timed out ({wall:.1f} s); "
                               "no lifecycle_ms from it")
        return wall

    def min_heap(self, transport: str, app: bool = False) -> int:
        """Bisect the smallest passing heap size (256-byte resolution) of the lifecycle (app: the application's)."""

        def passes(heapsize: int) -> bool:
            if app:
                return self.app_lifecycle_passes(transport, heapsize)
            return self.lifecycle_passes(transport, heapsize)[0]

        low, high = 2048, 262144
        if not passes(high):
            raise RuntimeError(f"{transport}: the {'application ' if app else ''}lifecycle fails even with a "
                               f"{high}-byte heap")
        while high - low > 256:
            mid = (low + high) // 2
            if passes(mid):
                high = mid
            else:
                low = mid
        return high

    def first_telemetry_ms(self, transport: str) -> float:
        """Start of a never-provisioned board to its first telemetry stored by the emulator."""
        board, name = self.board(transport)
        t0 = time.perf_counter()
        proc = subprocess.Popen(board_command("boots", ["0", "1"]), cwd=board, env=board_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while not self.emulator.telemetry(name):
                if time.perf_counter() - t0 > 30:
                    raise RuntimeError(f"{transport}: no telemetry within 30 s")
                time.sleep(0.002)
            return (time.perf_counter() - t0) * 1000
        finally:
            proc.wait(30)

    def round_trips_to_first_ack(self, transport: str) -> int | None:
        """Round trips (relay-counted request bursts) from connected to the first telemetry, with saved
        credentials."""
        relay = CountingRelay(self.emulator.ports[transport], transport == "coap")
        try:
            board, _ = self.board(transport, relay.port)
            self.boots(board, [1])  # provision and save
            time.sleep(0.2)  # the relay threads have counted the first boot
            with relay._lock:
                relay.flow.clear()
            ok, _, _ = self.boots(board, [1])
            time.sleep(0.2)
            if not ok:
                raise RuntimeError(f"{transport}: a boot with saved credentials failed")
            return relay.round_trips()
        finally:
            relay.close()

    def per_message(self, transport: str) -> tuple[float, float]:
        """(application bytes on the wire, µs of wall time on the board) per telemetry message.

        From boots of 10 and 10 + 100 messages; the µs include waiting for the server's answers.
        """
        udp = transport == "coap"
        relay = CountingRelay(self.emulator.ports[transport], udp)
        try:
            board, _ = self.board(transport, relay.port)
            self.boots(board, [0])
            before = relay.bytes
            ok, short, _ = self.boots(board, [10])
            mid = relay.bytes
            ok2, long, _ = self.boots(board, [10 + MESSAGES])
            time.sleep(0.2)  # let the relay threads count the last answers
            if not (ok and ok2):
                raise RuntimeError(f"{transport}: telemetry boots failed")
            wire = ((relay.bytes - mid) - (mid - before)) / MESSAGES
            return wire, (long[0] - short[0]) / MESSAGES
        finally:
            relay.close()


def footprint(build: Path) -> dict[str, int]:
    """Bytes of each file of the compiled firmware tree, by its path in the tree."""
    return {str(p.relative_to(build)): p.stat().st_size for p in sorted(build.rglob("*")) if p.is_file()}


def run(args: argparse.Namespace) -> int:
    """Measure every requested transport, print the table, write the JSON; 0 when every run completed."""
    transports = args.transport or list(TRANSPORTS)
    results: dict = {"machine": f"{platform.machine()} {platform.system()}, Python {platform.python_version()}",
                     "note": "Unix port on x86-64: objects are larger than on the 32-bit ESP32, so heap figures "
                             "overestimate the board", "transports": {}}
    with tempfile.TemporaryDirectory(prefix="tbfleet-bench-") as tmp, \
            EmulatorProcess(EMULATOR_CONFIG) as emulator:
        build = Path(tmp) / "build"
        compile_firmware(build)
        files = footprint(build)
        results["firmware_files"] = files
        results["firmware_mpy_bytes"] = sum(files.values())
        bench = Bench(emulator, build, Path(tmp))
        for transport in transports:
            walls = [bench.lifecycle_seconds(transport) for _ in range(args.runs)]
            wire, us = bench.per_message(transport)
            # Pass/fail is not monotonic in the heap size (fragmentation follows every allocation, down to the
            # length of the device name), so one bisection can land a few KB off: each run bisects on a fresh
            # board, and the figure is the heap that passed in every run.
            heaps = [bench.min_heap(transport) for _ in range(args.runs)]
            app_heaps = [bench.min_heap(transport, app=True) for _ in range(args.runs)]
            results["transports"][transport] = {
                "min_heap_bytes": max(heaps),
                "min_heap_bytes_per_run": heaps,
                "min_heap_bytes_app": max(app_heaps),
                "min_heap_bytes_app_per_run": app_heaps,
                "round_trips_to_first_ack": bench.round_trips_to_first_ack(transport),
                "lifecycle_ms": round(statistics.median(walls) * 1000, 1),
                "first_telemetry_ms": round(statistics.median(
                    bench.first_telemetry_ms(transport) for _ in range(args.runs)), 1),
                "wire_bytes_per_message": round(wire, 1),
                "us_per_message": round(us, 1),  # wall time on the board, per message
            }
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    return 0


def print_table(results: dict) -> None:
    """The figures as a plain table on stdout."""
    print(f"firmware .mpy footprint: {results['firmware_mpy_bytes']} bytes (target <= {TARGET_FOOTPRINT})")
    cols = ("min_heap_bytes", "min_heap_bytes_app", "round_trips_to_first_ack", "lifecycle_ms", "first_telemetry_ms",
            "wire_bytes_per_message", "us_per_message")
    print(f"{'transport':<10}" + "".join(f"{c:>26}" for c in cols))
    for name, figures in results["transports"].items():
        print(f"{name:<10}" + "".join(f"{figures[c]!s:>26}" for c in cols))
    print(f"targets: min_heap_bytes <= {TARGET_HEAP}, min_heap_bytes_app <= {TARGET_HEAP_APP}, "
          "round_trips_to_first_ack 1 (mqtt), lifecycle_ms < 300 (mqtt)")
