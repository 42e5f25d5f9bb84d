"""Shared pieces of the virtual board, deploy and fleet tests.

- `vboard(tmp_path)`: a started VirtualBoard whose flash is an empty directory (stopped after the test).
- `emulator()`: the real emulator process with one profile whose key and secret are random per test, so that a
  scan for the secret can only match this test's own processes and output.
- `ArgvWatch(secrets)`: scans /proc/*/cmdline every few ms while it runs; `.hits` lists processes whose argv held
  a secret (no secret may ever be passed as an argument).
- `run_tool(args, env)`: `python -m host_tools ...` with exactly the make variables in `env`.
- `snapshot(dir)`: sha256 and mtime of every file below `dir`, to prove a board was left untouched.
- `mirror(tmp_path)`: a local HTTP server standing in for the MicroPython image download site.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from host_tools.emulator.process import EmulatorProcess
from host_tools.vboard import VirtualBoard
from support import ROOT

# Every variable the Makefile passes; tests start from an environment without any of them.
MAKE_VARIABLES = ("BOARD", "PORT", "TB_HOST", "TB_PORT", "TRANSPORT", "TLS", "PROVISION_KEY", "PROVISION_SECRET",
                  "PROVISION_SECRET_FILE", "DEVICE_NAME", "CREDENTIALS_TYPE", "TOKEN", "CLIENT_ID", "USERNAME",
                  "PASSWORD", "CERT_FILE", "KEY_FILE", "CA_FILE", "WIFI_SSID", "WIFI_PASSWORD", "FIRMWARE", "FLASH",
                  "ERASE", "ESPTOOL_ARGS", "MONITOR", "COUNT", "INTERVAL", "PORTS", "INVENTORY", "LOG_LEVEL",
                  "TBFLEET_IMAGE_MIRROR")


@dataclass
class Server:
    """A running emulator and the provisioning key and secret of its one profile."""

    emu: EmulatorProcess
    key: str
    secret: str


def run_tool(args: list[str], env: dict[str, str], timeout: float = 90) -> subprocess.CompletedProcess:
    """Run `python -m host_tools <args>` from the repository with the make variables in `env`."""
    full = {k: v for k, v in os.environ.items() if k not in MAKE_VARIABLES}
    full.update(env)
    return subprocess.run([sys.executable, "-m", "host_tools", *args], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def snapshot(directory: Path) -> dict[str, tuple[str, int]]:
    """{relative path: (sha256, mtime_ns)} of every file below `directory`."""
    return {p.relative_to(directory).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0
    return int(stat[stat.rindex(b")") + 2:].split()[1])


def descends_from(pid: int, ancestor: int) -> bool:
    """Whether process `pid` is `ancestor` or one of its descendants."""
    while pid > 1:
        if pid == ancestor:
            return True
        pid = _parent(pid)
    return False


class ArgvWatch:
    """While running, records every process started from this one whose command line holds one of `secrets`.

    Only descendants count, so that other tests running at the same time cannot make this one fail.
    """

    def __init__(self, secret_values: list[str]) -> None:
        self.secrets = [s.encode() for s in secret_values if s]
        self.hits: list[tuple[int, str]] = []
        self.scans = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> "ArgvWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(0.01):
            for entry in os.scandir("/proc"):
                if not entry.name.isdigit():
                    continue
                try:
                    with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                        cmdline = f.read()
                except OSError:
                    continue
                if any(s in cmdline for s in self.secrets) and descends_from(int(entry.name), os.getpid()):
                    hit = (int(entry.name), cmdline.split(b"\0")[0].decode(errors="replace"))
                    if hit not in self.hits:
                        self.hits.append(hit)
            self.scans += 1


@pytest.fixture
def vboard(tmp_path: Path) -> Iterator[VirtualBoard]:
    """A powered-on virtual board with an empty flash at tmp_path/flash and its console in tmp_path/console.log."""
    flash = tmp_path / "flash"
    flash.mkdir()
    board = VirtualBoard(flash, console_log=tmp_path / "console.log")
    board.start()
    try:
        yield board
    finally:
        board.stop()


@pytest.fixture
def emulator() -> Iterator[Server]:
    """The emulator with a profile that creates devices, its key and secret random for this test."""
    key, secret = "key-" + secrets.token_hex(6), "secret-" + secrets.token_hex(8)
    config = {"profiles": [{"name": "fleet", "provisionDeviceKey": key, "provisionDeviceSecret": secret,
                            "provisionType": "ALLOW_CREATE_NEW_DEVICES"}], "devices": []}
    emu = EmulatorProcess(config)
    emu.start()
    try:
        yield Server(emu, key, secret)
    finally:
        emu.stop()


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[tuple[str, Path, list[str]]]:
    """A local HTTP server standing in for the image download site: (base URL, folder it serves, paths fetched)."""
    root = tmp_path / "mirror"
    root.mkdir()
    fetched: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def do_GET(self):
            fetched.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        (root / "fw").mkdir()
        yield f"http://127.0.0.1:{server.server_address[1]}/fw/", root / "fw", fetched
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
