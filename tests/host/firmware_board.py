"""A board for end-to-end tests: the real firmware on the Unix port, in its own directory, run as `main.py`.

    board = FirmwareBoard(tmp_path / "board", config)   # firmware copied in, config.json written
    with board.boot() as run:                           # `micropython main.py` in that directory
        run.wait_for("telemetry 3 sent")                 # console lines, read as they come
    # leaving the block cuts the power (SIGKILL), as a user pulling the plug would

The retry timings are the firmware's defaults; a test that needs them shorter passes `retry_ms`, which boots
through a two-line wrapper that sets `app.RETRY_FIRST_MS` before calling `stock.main()`; `heap` (bytes) runs it
with `-X heapsize=`, as a board with that much RAM.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from pathlib import Path

from support import MICROPYTHON, install_firmware


class BoardRun:
    """One boot of a board: its console lines as they arrive, read in order like an `expect` script."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._cursor = 0  # wait_for looks only at lines after its previous match
        self._done = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
        self._done.set()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 20) -> re.Match:
        """The next console line (after the previous match) matching the regular expression; AssertionError
        with the whole console when none comes within `timeout` seconds."""
        rx = re.compile(pattern)
        end = time.monotonic() + timeout
        while True:
            while self._cursor < len(self.lines):
                line = self.lines[self._cursor]
                self._cursor += 1
                if m := rx.search(line):
                    return m
            if self._done.is_set() and self._cursor >= len(self.lines):
                break
            if time.monotonic() > end:
                break
            time.sleep(0.01)
        raise AssertionError(f"no console line matching {pattern!r} within {timeout} s:\n{self.output}")

    def power_off(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


class FirmwareBoard:
    """A board directory holding the firmware and a config.json."""

    def __init__(self, path: Path, config: dict) -> None:
        self.path = install_firmware(path)
        self.write_config(config)

    def write_config(self, config: dict) -> None:
        (self.path / "config.json").write_text(json.dumps(config))

    @property
    def credentials(self) -> dict | None:
        f = self.path / "creds.json"
        return json.loads(f.read_text()) if f.exists() else None

    def boot(self, retry_ms: int | None = None, heap: int | None = None) -> "_Boot":
        if retry_ms is None:
            args = ["main.py"]
        else:
            (self.path / "fastretry.py").write_text(
                "import sys\nsys.path.append('lib')\nfrom tbfleet import app, stock\n"
                f"app.RETRY_FIRST_MS = {retry_ms}\nsys.exit(stock.main())\n")
            args = ["fastretry.py"]
        if heap is not None:
            args = ["-X", f"heapsize={heap}", *args]
        proc = subprocess.Popen([MICROPYTHON, *args], cwd=self.path, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return _Boot(BoardRun(proc))


class _Boot:
    def __init__(self, run: BoardRun) -> None:
        self.run = run

    def __enter__(self) -> BoardRun:
        return self.run

    def __exit__(self, *exc: object) -> None:
        self.run.power_off()
