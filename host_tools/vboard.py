"""A virtual board: the MicroPython Unix port behind a pty that speaks the REPL protocol as a real board does.

The pty's path works as a port for real mpremote, pyserial or a terminal. Behind it, the Unix port runs with a
directory mounted as its root filesystem (the board's flash) and behaves like an ESP32 running MicroPython:

- power-on and every soft reset in the friendly REPL run /boot.py then /main.py, then the REPL;
- a soft reset in the raw REPL (Ctrl-D on an empty line, which makes the Unix port exit) restarts the process,
  prints `soft reboot` and returns to the raw REPL without running main.py, which is what mpremote expects;
- Ctrl-C while code runs becomes SIGINT (in a raw-mode pty it is only a byte), and is passed on as a byte when
  the REPL is idle (SIGINT then would kill the process);
- `machine.unique_id()` returns a made-up 6-byte MAC derived from the flash directory, and `machine.reset()`
  restarts the board as a hard reset does; both come from a small `machine` module mounted at /.vboard.
The console (everything the board prints) goes to the pty and, when asked, to a log file.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import os
import pty
import select
import shutil
import signal
import subprocess
import tempfile
import termios
import threading
import time
import tty
from pathlib import Path

from host_tools.build import MICROPYTHON

log = logging.getLogger(__name__)

HARD_RESET_EXIT = 86  # exit status of the child when the firmware calls machine.reset()
_MIN_LIFETIME = 1.0  # main.py is rerun no sooner than this after the last start, so a crash loop cannot spin
_CTRL_A, _CTRL_B, _CTRL_C, _CTRL_D = 1, 2, 3, 4
# Output endings that mean the REPL waits for input (friendly prompt, continuation, raw prompt after a run).
_IDLE_ENDINGS = (b">>> ", b"... ", b"\x04>", b"raw REPL; CTRL-B to exit\r\n>")
_SOFT_REBOOT = b"MPY: soft reboot\r\n"
# The child prints this first, once its SIGINT handler is live; the proxy removes it from the console.
_ALIVE = b"\x00vboard-alive\x00"

_MACHINE_SHIM = """\
from umachine import *

_UID = {uid!r}


def unique_id():
    return _UID


def reset():
    import sys

    sys.exit({code})
"""

# Runs in the child before the REPL: mount the flash as /, then do what a board does at start.
_BOOT = """\
import os, sys, vfs
sys.stdout.write({alive!r})
vfs.umount("/")
vfs.mount(vfs.VfsPosix({flash!r}), "/")
vfs.mount(vfs.VfsPosix({shim!r}), "/.vboard")
os.chdir("/")
sys.path[:] = ["", ".frozen", "/lib", "/.vboard"]


def _vboard_start(names):
    for name in names:
        try:
            with open(name) as f:
                code = compile(f.read(), name, "exec")
        except OSError:
            continue
        try:
            exec(code, {{"__name__": "__main__"}})
        except SystemExit:
            raise
        except KeyboardInterrupt as e:
            sys.print_exception(e)
            return
        except BaseException as e:
            sys.print_exception(e)


_vboard_start({names!r})
del _vboard_start, os, sys, vfs
"""


def board_mac(flash_dir: os.PathLike | str) -> bytes:
    """The 6-byte MAC a virtual board reports for `flash_dir`: stable per directory, locally administered."""
    digest = hashlib.sha256(str(Path(flash_dir).resolve()).encode()).digest()
    return bytes([(digest[0] & 0xFC) | 0x02]) + digest[1:6]


class VirtualBoard:
    """A pty at `.port` whose other side is a MicroPython Unix-port board with `flash_dir` as its flash.

    `start()` powers it on (boot.py and main.py run); `stop()` powers it off. `console_log` receives a copy of
    everything the board prints. `restarts` counts the resets since power-on (0: nothing reset the board).
    """

    def __init__(self, flash_dir: os.PathLike | str, console_log: os.PathLike | str | None = None,
                 micropython: str = MICROPYTHON) -> None:
        self.flash_dir = Path(flash_dir).resolve()
        if not self.flash_dir.is_dir():
            raise FileNotFoundError(f"virtual board flash directory does not exist: {self.flash_dir}")
        self.console_log = Path(console_log) if console_log else None
        self.micropython = micropython
        self.mac = board_mac(self.flash_dir)
        self.port: str | None = None
        self.restarts = 0
        self._master = self._slave = -1
        self._child: subprocess.Popen | None = None
        self._child_fd = -1
        self._child_started = 0.0
        self._raw = False
        self._busy = False
        self._typed = False
        self._alive = False
        self._interrupt = False
        self._tail = b""
        self._shim_dir: str | None = None
        self._log_file = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "VirtualBoard":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> str:
        """Power the board on and return its port (the pty path)."""
        if self._thread:
            raise RuntimeError("virtual board already started")
        self._shim_dir = tempfile.mkdtemp(prefix="vboard-")
        Path(self._shim_dir, "machine.py").write_text(
            _MACHINE_SHIM.format(uid=self.mac, code=HARD_RESET_EXIT))
        self._master, self._slave = pty.openpty()
        tty.setraw(self._slave)
        os.set_blocking(self._master, False)
        self.port = os.ttyname(self._slave)
        if self.console_log:
            self._log_file = open(self.console_log, "ab", buffering=0)
        self._stop.clear()
        self._spawn(run_main=True)
        self._thread = threading.Thread(target=self._serve, name=f"vboard {self.port}", daemon=True)
        self._thread.start()
        log.debug("virtual board on %s, flash %s", self.port, self.flash_dir)
        return self.port

    def stop(self) -> None:
        """Power the board off: stop the Unix port and close the pty. Safe to call twice."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
            self._thread = None
        self._kill_child()
        for fd in (self._master, self._slave):
            if fd >= 0:
                os.close(fd)
        self._master = self._slave = -1
        if self._log_file:
            self._log_file.close()
            self._log_file = None
        if self._shim_dir:
            shutil.rmtree(self._shim_dir, ignore_errors=True)
            self._shim_dir = None

    def _spawn(self, run_main: bool) -> None:
        names = ["boot.py", "main.py"] if run_main else ["boot.py"]
        boot = _BOOT.format(alive=_ALIVE.decode(), flash=str(self.flash_dir), shim=self._shim_dir, names=names)
        parent, child = pty.openpty()
        # Raw mode: without it ONLCR turns the REPL's \r\n into \r\r\n and mpremote never finds its banners.
        tty.setraw(child)
        env = dict(os.environ)
        env.pop("MICROPYPATH", None)
        self._child = subprocess.Popen([self.micropython, "-i", "-c", boot], stdin=child, stdout=child,
                                       stderr=child, cwd=self.flash_dir, env=env, start_new_session=True)
        os.close(child)
        os.set_blocking(parent, False)
        self._child_fd = parent
        self._child_started = time.monotonic()
        self._busy = run_main
        self._alive = False
        self._interrupt = False
        self._tail = b""
        if not run_main:
            # A soft reset from the raw REPL comes back in the raw REPL, as on a real board.
            os.write(parent, bytes([_CTRL_A]))

    def _kill_child(self) -> None:
        child, self._child = self._child, None
        if child and child.poll() is None:
            child.kill()
        if child:
            child.wait()
        if self._child_fd >= 0:
            os.close(self._child_fd)
            self._child_fd = -1

    def _restart(self) -> None:
        try:
            status = self._child.wait(timeout=2) if self._child else None
        except subprocess.TimeoutExpired:
            status = None  # its console closed but it lingers: _kill_child ends it
        lived = time.monotonic() - self._child_started
        run_main = status == HARD_RESET_EXIT or not self._raw
        self._kill_child()
        if status == -signal.SIGINT:
            log.debug("Ctrl-C reached an idle REPL on %s; board restarted", self.port)
        if run_main and lived < _MIN_LIFETIME:
            self._stop.wait(_MIN_LIFETIME - lived)
        if self._stop.is_set():
            return
        self.restarts += 1
        if status == HARD_RESET_EXIT:
            self._raw = False
        else:
            self._to_host(_SOFT_REBOOT)
        self._spawn(run_main)

    def _serve(self) -> None:
        while not self._stop.is_set():
            # pyserial sets TIOCEXCL on open; clear it so that the next mpremote can open the port.
            fcntl.ioctl(self._slave, termios.TIOCNXCL)
            try:
                ready, _, _ = select.select([self._master, self._child_fd], [], [], 0.05)
            except (OSError, ValueError):
                break
            if self._child_fd in ready and not self._from_child():
                self._restart()
                continue
            if self._master in ready:
                self._from_host()
            if self._child and self._child.poll() is not None:
                self._from_child()
                self._restart()

    def _from_child(self) -> bool:
        """Pass what the board printed to the host; False when the child has gone."""
        try:
            data = os.read(self._child_fd, 4096)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not data:
            return False
        if not self._alive:
            self._tail += data
            if _ALIVE not in self._tail:
                return True
            data = self._tail.replace(_ALIVE, b"")
            self._tail = b""
            self._alive = True
            if self._interrupt:
                os.kill(self._child.pid, signal.SIGINT)
                self._interrupt = False
        self._tail = (self._tail + data)[-32:]
        if self._tail.endswith(_IDLE_ENDINGS):
            self._busy = False
        self._to_host(data)
        return True

    def _to_host(self, data: bytes) -> None:
        if self._log_file:
            self._log_file.write(data)
        while data:
            try:
                n = os.write(self._master, data)
            except BlockingIOError:
                # Nobody reads the port: drop the oldest output, as a UART with nothing attached loses it.
                self._discard_unread()
                continue
            data = data[n:]

    def _discard_unread(self) -> None:
        os.set_blocking(self._slave, False)
        try:
            os.read(self._slave, 65536)
        except BlockingIOError:
            pass
        finally:
            os.set_blocking(self._slave, True)

    def _from_host(self) -> None:
        try:
            data = os.read(self._master, 4096)
        except (BlockingIOError, OSError):
            return
        start = 0
        for i, byte in enumerate(data):
            if byte == _CTRL_C and self._busy:
                self._to_child(data[start:i])
                start = i
                self._drain_child()
                if self._busy:
                    start = i + 1
                    self._interrupt_child()
                    continue
                # It went idle just now: this Ctrl-C goes to the REPL as a byte after all.
            self._note_input(byte)
        self._to_child(data[start:])

    def _interrupt_child(self) -> None:
        # Before the child can take SIGINT, the interrupt waits for its first sign of life.
        if self._alive:
            os.kill(self._child.pid, signal.SIGINT)
        else:
            self._interrupt = True

    def _drain_child(self) -> None:
        # Read what the child has already printed, so a prompt it printed just now marks it idle before SIGINT.
        while self._child_fd >= 0:
            r, _, _ = select.select([self._child_fd], [], [], 0)
            if not r or not self._from_child():
                return

    def _note_input(self, byte: int) -> None:
        if byte == _CTRL_A:
            self._raw = True
        elif byte == _CTRL_B:
            self._raw = False
        elif byte == _CTRL_D and self._raw:
            # The raw REPL runs the code at Ctrl-D.
            self._start_run()
        elif not self._raw and byte == 13:
            # The friendly REPL runs a line at Enter; an empty line only gives a new prompt.
            if self._typed:
                self._start_run()
            self._typed = False
        elif not self._raw and byte == _CTRL_C:
            self._typed = False
        elif not self._raw and byte >= 32:
            self._typed = True

    def _start_run(self) -> None:
        self._busy = True
        self._tail = b""

    def _to_child(self, data: bytes) -> None:
        while data and self._child_fd >= 0:
            try:
                data = data[os.write(self._child_fd, data):]
            except BlockingIOError:
                # The board is not reading: keep taking its output meanwhile, or both sides would wait for ever.
                readable, _, _ = select.select([self._child_fd], [self._child_fd], [], 0.05)
                if readable and not self._from_child():
                    return
            except OSError:
                log.debug("input for %s lost: the board is restarting", self.port)
                return


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `python -m host_tools vboard`."""
    parser.add_argument("--flash-dir", required=True, type=Path, help="directory that is the board's flash (/)")
    parser.add_argument("--log", type=Path, help="also append the board's console output to this file")


def run(args: argparse.Namespace) -> int:
    """Run a virtual board until SIGTERM or Ctrl-C; print its port as a JSON line first."""
    args.flash_dir.mkdir(parents=True, exist_ok=True)
    board = VirtualBoard(args.flash_dir, console_log=args.log)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    board.start()
    try:
        print(json.dumps({"event": "ready", "port": board.port, "mac": board.mac.hex(":")}), flush=True)
        while not stopped.wait(0.5):
            pass
    finally:
        board.stop()
    return 0
