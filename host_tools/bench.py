"""`make bench`: what the firmware costs, measured on the Unix port against the local emulator.

For each transport: the smallest `-X heapsize` at which the whole lifecycle passes (provision, save, reconnect
with the saved credentials, 100 telemetry messages) with the firmware deployed as .mpy, in every one of --runs
bisections on fresh boards (the bisections one by one are in min_heap_bytes_per_run); the lifecycle's wall time;
the time from start to the first telemetry stored by the emulator; application bytes on the wire per telemetry
message (TCP/UDP payload both ways, counted by a relay between board and emulator); microseconds per message of
wall time on the board (ticks_us around whole boots, so waiting for the server's answers is included: not CPU time).
Also the .mpy footprint of the whole firmware. Prints a table and writes bench-results.json at the repository root.
"""

from __future__ import annotations

import argparse
import json
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
TARGET_FOOTPRINT = 24576
KEY, SECRET = "bench-provision-key", "bench-provision-secret"
EMULATOR_CONFIG = {"profiles": [{"name": "bench", "provisionDeviceKey": KEY, "provisionDeviceSecret": SECRET,
                                 "provisionType": "ALLOW_CREATE_NEW_DEVICES"}], "devices": []}

# Runs on the board: each argument is one boot, sending that many messages (0: provision/connect only).
# Prints the microseconds each boot took, as JSON. The first message of a boot goes with the connect.
BOOTS_SCRIPT = """\
import sys, time
sys.path.append("lib")
from tbfleet import app
took = []
for n in sys.argv[1:]:
    t0 = time.ticks_us()
    app.main(max_messages=int(n))
    took.append(time.ticks_diff(time.ticks_us(), t0))
print(took)
"""


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
        if not udp:
            self.sock.listen(16)
        threading.Thread(target=self._serve_udp if udp else self._serve_tcp, daemon=True).start()

    def _count(self, n: int) -> None:
        with self._lock:
            self.bytes += n

    def _serve_tcp(self) -> None:
        while not self._closing:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                self._count(len(data))
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
            self._count(len(data))
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
            self._count(len(data))
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
        """A fresh board (firmware, config for a new device) and its device name."""
        self._n += 1
        # One name length for every board: the heap a lifecycle needs moves with it.
        name = f"bench-{transport}-{self._n:04d}"
        path = self.work / name
        shutil.copytree(self.build, path)
        (path / "boots.py").write_text(BOOTS_SCRIPT)
        config = {"host": "127.0.0.1", "port": port or self.emulator.ports[transport], "transport": transport,
                  "provision_key": KEY, "provision_secret": SECRET, "device_name": name,
                  "telemetry_interval": 0, "qos": 1, "timeout": 5, "log_level": "error",
                  "sensors": ["uptime", "free_heap", "heap_used"]}
        (path / "config.json").write_text(json.dumps(config))
        return path, name

    def boots(self, board: Path, counts: list[int], heapsize: int | None = None,
              timeout: float = 60) -> tuple[bool, list[int], float]:
        """Run the boots; (exited 0, µs per boot, wall seconds)."""
        cmd = [MICROPYTHON] + (["-X", f"heapsize={heapsize}"] if heapsize else []) + ["boots.py"]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd + [str(c) for c in counts], cwd=board, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return False, [], time.perf_counter() - t0
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            return False, [], wall
        return True, json.loads(proc.stdout.strip().splitlines()[-1]), wall

    def lifecycle_passes(self, transport: str, heapsize: int | None) -> tuple[bool, float]:
        """Provision, save and connect (the first message goes with the connect), then reconnect and send 100
        messages: exit 0 and all 101 stored by the emulator."""
        board, name = self.board(transport)
        ok, _, wall = self.boots(board, [1, MESSAGES], heapsize, timeout=30)
        return ok and len(self.emulator.telemetry(name)) == MESSAGES + 1, wall

    def lifecycle_seconds(self, transport: str) -> float:
        """Wall seconds of one lifecycle with the default heap; RuntimeError naming the transport when it fails."""
        ok, wall = self.lifecycle_passes(transport, None)
        if not ok:
            raise RuntimeError(f"{transport}: a timing run of the lifecycle failed or timed out ({wall:.1f} s); "
                               "no lifecycle_ms from it")
        return wall

    def min_heap(self, transport: str) -> int:
        """Bisect the smallest passing heap size (256-byte resolution)."""
        low, high = 2048, 262144
        if not self.lifecycle_passes(transport, high)[0]:
            raise RuntimeError(f"{transport}: the lifecycle fails even with a {high}-byte heap")
        while high - low > 256:
            mid = (low + high) // 2
            if self.lifecycle_passes(transport, mid)[0]:
                high = mid
            else:
                low = mid
        return high

    def first_telemetry_ms(self, transport: str) -> float:
        """Start of a never-provisioned board to its first telemetry stored by the emulator."""
        board, name = self.board(transport)
        t0 = time.perf_counter()
        proc = subprocess.Popen([MICROPYTHON, "boots.py", "0", "1"], cwd=board, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            while not self.emulator.telemetry(name):
                if time.perf_counter() - t0 > 30:
                    raise RuntimeError(f"{transport}: no telemetry within 30 s")
                time.sleep(0.002)
            return (time.perf_counter() - t0) * 1000
        finally:
            proc.wait(30)

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
            results["transports"][transport] = {
                "min_heap_bytes": max(heaps),
                "min_heap_bytes_per_run": heaps,
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
    cols = ("min_heap_bytes", "lifecycle_ms", "first_telemetry_ms", "wire_bytes_per_message", "us_per_message")
    print(f"{'transport':<10}" + "".join(f"{c:>24}" for c in cols))
    for name, figures in results["transports"].items():
        print(f"{name:<10}" + "".join(f"{figures[c]:>24}" for c in cols))
    print(f"targets: min_heap_bytes <= {TARGET_HEAP}, lifecycle_ms < 300 (mqtt)")
