"""The emulator as a child process: started on free ports, its ready line read, its inspection API at hand.

Used by the deploy command, the benchmark and the tests, so that all of them start and stop it the same way.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

log = logging.getLogger(__name__)


class EmulatorError(RuntimeError):
    """The emulator did not start, or its inspection API failed."""


class EmulatorProcess:
    """A `python -m host_tools emulator` child process on free loopback ports (or the ports given)."""

    def __init__(self, config: dict | Path, *, bind: str = "127.0.0.1", ports: dict[str, int] | None = None,
                 server_version: str | None = None, extra_args: tuple[str, ...] = (),
                 on_event: Callable[[str], None] | None = None) -> None:
        self._config = config
        self.bind = bind
        self._ports = ports or {}
        self._server_version = server_version
        self._extra_args = extra_args
        self._on_event = on_event
        self.events: list[str] = []
        self.ports: dict[str, int] = {}
        self.proc: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None

    def start(self, timeout: float = 30) -> "EmulatorProcess":
        """Start it and wait for its ready line; EmulatorError if it does not come."""
        config_path = self._config
        if isinstance(config_path, dict):
            self._tmp = tempfile.TemporaryDirectory(prefix="tb-emulator-")
            config_path = Path(self._tmp.name) / "emulator.json"
            config_path.touch(mode=0o600)
            config_path.write_text(json.dumps(self._config))
        cmd = [sys.executable, "-m", "host_tools", "emulator", "--config", str(config_path), "--bind", self.bind]
        for name in ("mqtt", "http", "coap"):
            cmd += [f"--{name}-port", str(self._ports.get(name, 0))]
        if self._server_version:
            cmd += ["--server-version", self._server_version]
        cmd += list(self._extra_args)
        root = Path(__file__).resolve().parents[2]
        self.proc = subprocess.Popen(cmd, cwd=root, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1)
        threading.Thread(target=self._pump, args=(self.proc.stderr,), daemon=True).start()
        ready: list[str] = []
        reader = threading.Thread(target=lambda: ready.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not ready or not ready[0].strip():
            self.stop()
            raise EmulatorError("the emulator did not start: " + " | ".join(self.events[-5:]))
        message = json.loads(ready[0])
        if message.get("event") != "ready":
            self.stop()
            raise EmulatorError(f"unexpected first line from the emulator: {ready[0].strip()}")
        self.ports = {k: v for k, v in message.items() if k != "event"}
        threading.Thread(target=self._pump, args=(self.proc.stdout,), daemon=True).start()
        return self

    def _pump(self, stream) -> None:
        # Every line the child writes after its ready line is an event (stderr: the readable event lines).
        for line in stream:
            line = line.rstrip("\n")
            self.events.append(line)
            if self._on_event:
                self._on_event(line)

    def stop(self) -> None:
        """Stop the child (SIGTERM, then SIGKILL after 5 s) and remove its temporary config."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._tmp:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "EmulatorProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_event(self, text: str, timeout: float = 5.0) -> str:
        """The first event line containing `text`, waiting up to `timeout` seconds for it."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for line in list(self.events):
                if text in line:
                    return line
            time.sleep(0.02)
        raise EmulatorError(f"no event line containing {text!r}; got {self.events!r}")

    def api(self, method: str, path: str, body: Any = None, timeout: float = 5) -> Any:
        """Call the inspection API; returns the decoded JSON (None for an empty body)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://{self.bind}:{self.ports['http']}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raise EmulatorError(f"{method} {path}: HTTP {e.code}") from None
        return json.loads(raw) if raw else None

    def devices(self) -> list[dict]:
        """Every device the emulator knows, as its inspection API lists them."""
        return self.api("GET", "/emulator/devices")

    def telemetry(self, name: str) -> list[dict]:
        """The telemetry stored for device `name`, in arrival order ([] for an unknown device)."""
        try:
            return self.api("GET", f"/emulator/devices/{quote(name, safe='')}/telemetry")
        except EmulatorError:
            return []

    def delete_device(self, name: str) -> None:
        """Delete device `name` and its credentials on the server."""
        self.api("DELETE", f"/emulator/devices/{quote(name, safe='')}")

    def wait_for_telemetry(self, name: str, count: int, timeout: float) -> list[dict]:
        """Poll until device `name` has `count` telemetry entries; EmulatorError after `timeout` seconds."""
        end = time.monotonic() + timeout
        while True:
            entries = self.telemetry(name)
            if len(entries) >= count:
                return entries
            if time.monotonic() > end:
                raise EmulatorError(f"{name}: {len(entries)} of {count} telemetry messages after {timeout} s")
            time.sleep(0.05)
