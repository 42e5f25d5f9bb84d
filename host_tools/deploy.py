"""`python -m host_tools deploy` (`make deploy`): take a board to provisioned and sending telemetry.

Everything the user gives is checked first (board, config, CA file, FIRMWARE, port), so a bad input changes
nothing. Then: a real board is flashed when it has no MicroPython, another version, or FLASH=1 (FIRMWARE and ERASE=1
imply it); the firmware is compiled with mpy-cross for the board's .mpy version (or copied as source when the board
cannot load ours); only files whose sha256 differs from the board's are copied, with real mpremote; config.json goes
through a 0600 temporary file; the board is soft-reset into main.py and its console followed (MONITOR=0 skips that).

With BOARD=unix (the default) and no PORT, the same path runs against a virtual board (the Unix port behind a pty)
and a local ThingsBoard emulator started here; COUNT=N stops after the emulator stored N telemetry messages.

Why a hash walk rather than a manifest: one `mpremote exec` hashes every file on the board itself, so what is
compared is what the board holds (a manifest goes stale when anything else writes the flash), it finds stale
modules to delete (a leftover .py would shadow its .mpy), and it costs one round trip instead of one per file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import serial

from host_tools import boards, build, devconfig, flash
from host_tools.boards import Board, BoardError
from host_tools.devconfig import ConfigProblem, DeviceConfig, env_flag, env_value

if TYPE_CHECKING:
    from host_tools.emulator.process import EmulatorProcess

log = logging.getLogger(__name__)

DEMO_CONFIG = Path(__file__).resolve().parent / "emulator" / "demo.json"
PACKAGE_DIR = "lib/tbfleet/"
_PROBE_MARK = "TBFLEET-PROBE"
_MPREMOTE_TIMEOUT = 60.0
_BYTES_PER_SECOND = 4000  # mpremote sends files as repr() literals in 256-byte chunks at 115200 baud: a safe floor
_REBOOT_WAIT = 30.0  # a freshly flashed board's first boot formats its filesystem
_BAUD = 115200
_COUNT_GRACE = 60.0  # seconds beyond COUNT x interval before COUNT gives up (provisioning, retries)
_DEMO_INTERVAL = "5"  # seconds between telemetry messages on the local demo, unless INTERVAL says otherwise

# Runs on the board (any MicroPython): what it is, its chip id, and the sha256 of every file at / and under lib/.
_PROBE = """\
import sys, os, json, hashlib, binascii
def _h(p, b=bytearray(256)):
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while True:
            n = f.readinto(b)
            if not n:
                break
            h.update(memoryview(b)[:n])
    return binascii.hexlify(h.digest()).decode()
def _w(d, out, deep):
    for e in os.ilistdir(d):
        p = d + e[0]
        if e[1] & 0x4000:
            if deep or p == "/lib":
                _w(p + "/", out, True)
        else:
            out[p[1:]] = _h(p)
_f = {}
_w("/", _f, False)
try:
    import machine
    _u = binascii.hexlify(machine.unique_id()).decode()
except (ImportError, AttributeError):
    _u = None
_i = sys.implementation
print("%s", json.dumps({"version": list(_i.version[:3]), "mpy": getattr(_i, "_mpy", None),
                        "machine": getattr(_i, "_machine", ""), "uid": _u, "files": _f}))
""" % _PROBE_MARK


class DeployError(Exception):
    """Deploying cannot go on; the message says what is wrong and what to do."""


@dataclass
class BoardState:
    """What a board told the probe."""

    version: str
    mpy: int | None
    machine: str
    uid: str | None
    files: dict[str, str]

    def mac(self) -> str | None:
        """The chip id as a MAC address (aa:bb:...), or None when the board has no machine.unique_id."""
        if not self.uid:
            return None
        return ":".join(self.uid[i:i + 2] for i in range(0, len(self.uid), 2))


@dataclass
class Outcome:
    """What a deploy did to one board."""

    port: str
    state: BoardState
    flashed: bool = False
    copied: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: int = 0
    source_only: bool = False


def mpremote(port: str, *commands: str, timeout: float = _MPREMOTE_TIMEOUT) -> str:
    """Run real mpremote on `port` with `commands` (never secrets: they are visible in argv); return stdout."""
    cmd = [sys.executable, "-m", "mpremote", "connect", port, *commands]
    log.debug("mpremote %s", " ".join(shlex.quote(c) if len(c) < 60 else "<script>" for c in commands))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise DeployError(f"{port}: mpremote did not finish within {timeout:.0f} s (is MicroPython running "
                          "there, and is no other program using the port?)") from None
    if proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise DeployError(f"{port}: mpremote failed: {detail[-1] if detail else f'exit {proc.returncode}'}")
    return proc.stdout


def check_port(port: str) -> None:
    """DeployError unless `port` (a device path or any pyserial URL) can be opened right now."""
    if "://" not in port and not Path(port).exists():
        raise DeployError(f"PORT={port}: no such serial port (is the board plugged in? see `ls /dev/tty*`)")
    try:
        serial.serial_for_url(port, baudrate=_BAUD, timeout=1, do_not_open=False).close()
    except (serial.SerialException, OSError, ValueError) as e:
        raise DeployError(f"PORT={port}: cannot open it: {e}") from None


def probe(port: str, timeout: float = 20.0) -> BoardState | None:
    """Ask the board on `port` what it runs (stopping its main.py); None when no MicroPython answers there."""
    try:
        out = mpremote(port, "exec", _PROBE, timeout=timeout)
    except DeployError as e:
        log.debug("probe: %s", e)
        return None
    for line in out.splitlines():
        if line.startswith(_PROBE_MARK + " "):
            data = json.loads(line[len(_PROBE_MARK) + 1:])
            return BoardState(".".join(str(v) for v in data["version"]), data["mpy"], data["machine"],
                              data["uid"], data["files"])
    raise DeployError(f"{port}: the board answered the probe with something unexpected: {out.strip()[:200]!r}")


def mpy_version_of(path: Path) -> tuple[int, int | None]:
    """(major version, sub-version) from a .mpy header; sub-version None for bytecode-only files.

    Bytecode-only files carry no sub-version (it only matters for native code), so any board of the same major
    version imports them.
    """
    header = path.read_bytes()[:4]
    if len(header) < 4 or header[0:1] != b"M":
        raise DeployError(f"{path} is not a .mpy file")
    native = header[2] >> 2
    return header[1], (header[2] & 3) if native else None


def board_accepts(mpy: int | None, ours: tuple[int, int | None]) -> bool:
    """Whether a board whose sys.implementation._mpy is `mpy` imports .mpy files of version `ours`."""
    if mpy is None:
        return False
    major, sub = ours
    return mpy & 0xFF == major and (sub is None or (mpy >> 8) & 3 == sub)


class FirmwareBuild:
    """The firmware compiled once into a temporary directory, shared by every board deployed from it.

    `files(board_mpy)` gives the board its files (board path -> host file) and whether they are sources: lib/
    is compiled to .mpy and main.py stays source; a board that cannot import our .mpy version gets the .py
    sources instead. Thread-safe, so that a fleet compiles once; `close()` removes the directory.
    """

    def __init__(self, source: Path = build.FIRMWARE, app: Mapping[str, Path] | None = None) -> None:
        """`app`: the user's application files by board path (see app_files), copied over the firmware's."""
        self.source = source
        self.app = dict(app or {})
        self._dir = Path(tempfile.mkdtemp(prefix="tbfleet-build-"))
        self._compiled: dict[str, Path] | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> "FirmwareBuild":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove the build directory."""
        shutil.rmtree(self._dir, ignore_errors=True)

    def _compile(self) -> dict[str, Path]:
        with self._lock:
            if self._compiled is None:
                try:
                    built = build.compile_firmware(self._dir, self.source)
                except build.BuildError as e:
                    raise DeployError(f"compiling the firmware failed: {e}") from None
                self._compiled = {**{p.relative_to(self._dir).as_posix(): p for p in built}, **self.app}
            return self._compiled

    def files(self, board_mpy: int | None) -> tuple[dict[str, Path], bool]:
        """What to copy onto a board whose sys.implementation._mpy is `board_mpy`, and whether it is source."""
        compiled = self._compile()
        sample = next((p for p in compiled.values() if p.suffix == ".mpy"), None)
        if sample is None or board_accepts(board_mpy, mpy_version_of(sample)):
            return compiled, False
        log.warning("the board's MicroPython loads .mpy version %s, mpy-cross makes version %d: deploying .py "
                    "sources instead", "(unknown)" if board_mpy is None else board_mpy & 0xFF,
                    mpy_version_of(sample)[0])
        sources = {p.relative_to(self.source).as_posix(): p for p in sorted(self.source.rglob("*.py"))}
        return {**sources, **self.app}, True


# Board files the firmware writes or deploy makes: an application may not bring its own.
_RESERVED = ("config.json", "creds.json", "settings.json", "uid.txt")


def app_files(path: str | None) -> dict[str, Path]:
    """The user's application that APP names, by board path: a .py file becomes main.py; a folder is copied as it
    is (its main.py, its own modules and data), hidden files and __pycache__ left out. {} without APP (the stock
    main.py). DeployError names what is wrong."""
    if not path:
        return {}
    root = Path(path).expanduser()
    if root.is_file():
        if root.suffix != ".py":
            raise DeployError(f"APP={path}: not a .py file or a folder")
        return {"main.py": root}
    if not root.is_dir():
        raise DeployError(f"APP={path}: no such file or folder")
    files = {}
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root)
        if not f.is_file() or any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
            continue
        name = rel.as_posix()
        if name.startswith(PACKAGE_DIR) or name in _RESERVED:
            raise DeployError(f"APP={path}: {name} would replace the firmware's own {name}")
        files[name] = f
    if "main.py" not in files:
        raise DeployError(f"APP={path}: the folder has no main.py")
    return files


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sync(port: str, state: BoardState, files: Mapping[str, Path], dc: DeviceConfig,
         progress: Callable[[str], None] = log.info) -> tuple[list[str], list[str], int]:
    """Copy to the board what differs from it: firmware `files`, config.json and its DER files.

    Secrets reach the board only inside files: config.json is written to a 0600 file in a private temporary
    directory, copied with `mpremote fs cp` and deleted. Returns (copied, removed, unchanged count).
    """
    with tempfile.TemporaryDirectory(prefix="tbfleet-deploy-") as tmp:
        sources: dict[str, Path] = dict(files)
        private = {"config.json": dc.json_bytes(), **dc.files}
        for name, data in private.items():
            sources[name] = devconfig.write_private(Path(tmp) / name, data)
        wanted = {name: _sha256(path.read_bytes()) for name, path in sources.items()}
        changed = [n for n, digest in wanted.items() if state.files.get(n) != digest]
        stale = [n for n in state.files if n not in wanted
                 and (n.startswith(PACKAGE_DIR) or n in devconfig.BOARD_FILES.values())]
        unchanged = len(wanted) - len(changed)
        if not changed and not stale:
            progress(f"{port}: all {unchanged} files up to date, nothing copied")
            return [], [], unchanged
        dirs = sorted({"/".join(n.split("/")[:i]) for n in changed for i in range(1, n.count("/") + 1)},
                      key=lambda d: d.count("/"))
        prepare = ("import os\n"
                   f"for d in {dirs!r}:\n    try:\n        os.mkdir(d)\n    except OSError:\n        pass\n"
                   f"for f in {stale!r}:\n    os.remove(f)\n")
        size = sum(sources[n].stat().st_size for n in changed)
        progress(f"{port}: copying {len(changed)} files ({size} bytes), {unchanged} unchanged"
                 + (f", removing {len(stale)} stale" if stale else ""))
        commands = ["resume", "exec", prepare]
        for name in changed:
            commands += ["+", "fs", "cp", "-f", str(sources[name]), ":" + name]
        mpremote(port, *commands, timeout=_MPREMOTE_TIMEOUT + size / _BYTES_PER_SECOND)
    return changed, stale, unchanged


def reset_into_main(port: str) -> serial.Serial:
    """Soft-reset the board from its friendly REPL, which runs boot.py and main.py; returns the open port."""
    conn = serial.serial_for_url(port, baudrate=_BAUD, timeout=0.1)
    conn.write(b"\r\x03\x03")  # stop anything running
    time.sleep(0.1)
    conn.write(b"\x02")  # friendly REPL: its soft reset runs main.py (the raw REPL's does not)
    time.sleep(0.1)
    conn.reset_input_buffer()
    conn.write(b"\x04")
    return conn


def flash_settings(env: Mapping[str, str], board: Board) -> flash.Settings:
    """FIRMWARE, ERASE, ESPTOOL_ARGS and TBFLEET_IMAGE_MIRROR for a board that can be flashed, read as `flash`
    reads them."""
    try:
        return flash.settings(board, env_value(env, "FIRMWARE"), env_flag(env, "ERASE"),
                              env_value(env, "ESPTOOL_ARGS"), env_value(env, "TBFLEET_IMAGE_MIRROR"))
    except flash.FlashError as e:
        raise DeployError(str(e)) from None


class Flasher:
    """Flashes boards of one kind as the settings say (flash.py, esptool), however many boards there are.

    The image is FIRMWARE (checked with the settings) or the board's pinned image, resolved on first use and then
    kept: a fleet reads and hashes it once, not once per board. Thread-safe.
    """

    def __init__(self, board: Board, settings: flash.Settings | None, force: str | None,
                 cache_dir: Path | None = None) -> None:
        self.board = board
        self.settings = settings
        self.force = force
        self.cache_dir = cache_dir or flash.default_cache_dir()
        self._image = settings.firmware if settings else None
        self._lock = threading.Lock()

    def reason(self, state: BoardState | None) -> str | None:
        """Why the board that answered with `state` must be flashed first, or None."""
        return flash_reason(self.board, state, self.force)

    def image(self) -> Path:
        """The image to write; FlashError when there is none."""
        assert self.settings is not None, "the host board is never flashed"
        with self._lock:
            if self._image is None:
                self._image = flash.resolve_image(self.board, None, self.cache_dir, mirror=self.settings.mirror)
            return self._image

    def flash(self, port: str, progress: Callable[[str], None]) -> None:
        """Write the image onto the board at `port`."""
        if self.settings is None:
            raise DeployError(f"{port}: board {self.board.name} runs the Unix port and cannot be flashed")
        try:
            image = self.image()
            progress(f"{port}: flashing {image.name} onto {self.board.name}")
            flash.flash(self.board, port, image, erase=self.settings.erase, esptool_args=self.settings.esptool_args,
                        progress=lambda line: progress(f"{port}: {line}"))
        except flash.FlashError as e:
            raise DeployError(str(e)) from None


def flash_forced(env: Mapping[str, str]) -> str | None:
    """The setting that asks for flashing whatever the board runs (FLASH=1, FIRMWARE or ERASE=1), or None.

    FIRMWARE and ERASE=1 only act while flashing, so they imply it; with FLASH=0 they contradict it.
    """
    asked = env_flag(env, "FLASH")
    firmware = env_value(env, "FIRMWARE")
    implied = f"FIRMWARE={firmware}" if firmware else "ERASE=1" if env_flag(env, "ERASE") else None
    if asked is False and implied:
        raise DeployError(f"FLASH=0, but {implied} only acts while flashing: drop one of them")
    return "FLASH=1" if asked else implied


def flash_reason(board: Board, state: BoardState | None, force: str | None) -> str | None:
    """Why the board must be flashed before deploying (no MicroPython, another version, `force`), or None."""
    if state is None:
        return "no MicroPython answers"
    if state.version != board.micropython.version:
        return f"it runs MicroPython {state.version}, board {board.name} wants {board.micropython.version}"
    return None if board.is_host else force


def deploy_board(board: Board, port: str, dc_for: Callable[[BoardState], DeviceConfig], flasher: Flasher,
                 firmware: FirmwareBuild, progress: Callable[[str], None] = log.info) -> Outcome:
    """Deploy onto the board at `port`: flash when needed, build, copy what changed, write config.json.

    `dc_for` makes the validated config once the board's identity is known. The board is left in its REPL,
    not yet reset.
    """
    progress(f"{port}: asking the board what it runs")
    state = probe(port)
    flashed = False
    why = flasher.reason(state)
    if why:
        if board.is_host:
            raise DeployError(f"{port}: {why}, and a virtual board cannot be flashed")
        progress(f"{port}: flashing because {why}")
        flasher.flash(port, progress)
        flashed = True
        state = _wait_for_micropython(port)
    dc = dc_for(state)
    files, source_only = firmware.files(state.mpy)
    copied, removed, unchanged = sync(port, state, files, dc, progress)
    return Outcome(port, state, flashed, copied, removed, unchanged, source_only)


def _wait_for_micropython(port: str) -> BoardState:
    end = time.monotonic() + _REBOOT_WAIT
    while time.monotonic() < end:
        state = probe(port, timeout=10)
        if state is not None:
            return state
        time.sleep(1)
    raise DeployError(f"{port}: MicroPython does not answer after flashing (press the board's reset button and "
                      "deploy again; with ESPTOOL_ARGS --after no-reset the chip stays in its bootloader)")


def check_flash_settings(env: Mapping[str, str], board: Board) -> Flasher:
    """FLASH, ERASE, FIRMWARE, ESPTOOL_ARGS and TBFLEET_IMAGE_MIRROR make sense for `board` (FIRMWARE an image for
    its chip, checked by esptool): the Flasher they make; DeployError naming the first that does not."""
    forced = flash_forced(env)
    if board.is_host:
        if forced:
            raise DeployError(f"{forced}: board {board.name} runs the Unix port and is never flashed")
        try:
            flash.split_esptool_args(env_value(env, "ESPTOOL_ARGS"))
        except flash.FlashError as e:
            raise DeployError(str(e)) from None
        return Flasher(board, None, None)
    chosen = flash_settings(env, board)
    if chosen.firmware is not None:
        try:
            flash.check_image(board, chosen.firmware)
        except flash.FlashError as e:
            raise DeployError(str(e)) from None
    return Flasher(board, chosen, forced)


def env_count(env: Mapping[str, str]) -> int | None:
    """COUNT as a positive integer, or None."""
    value = env_value(env, "COUNT")
    if value is None:
        return None
    if not value.isdigit() or int(value) < 1:
        raise DeployError(f"COUNT={value!r} is not a positive whole number of telemetry messages")
    return int(value)


def demo_profile() -> tuple[str, str]:
    """Provisioning key and secret of the demo profile that creates new devices (the unix board's default)."""
    data = json.loads(DEMO_CONFIG.read_text())
    for profile in data["profiles"]:
        if profile.get("provisionType") == "ALLOW_CREATE_NEW_DEVICES":
            return profile["provisionDeviceKey"], profile["provisionDeviceSecret"]
    raise DeployError(f"{DEMO_CONFIG} has no profile that creates new devices")


class Console:
    """Shows board console and emulator lines, with every secret value replaced by ***."""

    def __init__(self, secrets: list[str], out: TextIO | None = None) -> None:
        self.secrets = sorted((s for s in secrets if s), key=len, reverse=True)
        self.out = out or sys.stdout

    def scrub(self, text: str) -> str:
        """`text` with the secrets blanked out."""
        for s in self.secrets:
            text = text.replace(s, "***")
        return text

    def show(self, prefix: str, line: str) -> None:
        """Write one line to the output."""
        self.out.write(f"{prefix}{self.scrub(line)}\n")
        self.out.flush()


def follow(conn: serial.Serial, console: Console, until: Callable[[], bool] | None = None,
           poll_every: float = 0.5) -> None:
    """Show the board's console line by line until `until()` is true (checked every `poll_every` s).

    Without `until`, following ends at Ctrl-C, which is then the normal way out; with it, Ctrl-C aborts.
    """
    try:
        _follow(conn, console, until, poll_every)
    except KeyboardInterrupt:
        if until:
            raise


def _follow(conn: serial.Serial, console: Console, until: Callable[[], bool] | None, poll_every: float) -> None:
    pending = b""
    next_check = time.monotonic()
    while True:
        data = conn.read(4096)
        if data:
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                console.show("[board] ", line.decode(errors="replace").rstrip("\r"))
        if until and time.monotonic() >= next_check:
            if until():
                return
            next_check = time.monotonic() + poll_every


@dataclass
class Plan:
    """Everything validated before anything is touched."""

    board: Board
    port: str | None
    dc: DeviceConfig
    count: int | None
    monitor: bool
    emulator: bool
    transport: str
    flasher: Flasher
    app: dict[str, Path] = field(default_factory=dict)


def plan(env: Mapping[str, str]) -> Plan:
    """Check every input; DeployError / ConfigProblem / BoardError name the first wrong one."""
    board = boards.load(env_value(env, "BOARD") or "unix")
    port = env_value(env, "PORT")
    if not board.is_host and not port:
        raise DeployError(f"PORT is not set: give board {board.name}'s serial port, e.g. PORT=/dev/ttyUSB0")
    if not board.is_host and not env_value(env, "WIFI_SSID"):
        raise DeployError(f"WIFI_SSID is not set: board {board.name} needs a Wi-Fi network to reach the server "
                          "(and WIFI_PASSWORD unless it is open)")
    emulator = board.is_host and not env_value(env, "TB_HOST")
    count = env_count(env)
    if count is not None and not emulator:
        raise DeployError("COUNT needs the local emulator, which only runs with BOARD=unix and no TB_HOST")
    monitor = env_flag(env, "MONITOR")
    flasher = check_flash_settings(env, board)
    defaults: dict[str, object] = {}
    if emulator:
        key, secret = demo_profile()
        defaults = {"host": "127.0.0.1", "provision_key": key, "provision_secret": secret,
                    "telemetry_interval": _DEMO_INTERVAL}
        if env_value(env, "TB_PORT"):
            raise DeployError("TB_PORT is set without TB_HOST: the local emulator picks its own free ports")
    dc = devconfig.from_env(env, board.device_name, board.sensors, defaults)
    if emulator and dc.config["tls"]:
        raise DeployError("TLS=1 (or CA_FILE) needs a server given with TB_HOST: the local demo runs without TLS")
    devconfig.firmware_check(dc)
    if port:
        check_port(port)
    return Plan(board, port, dc, count, True if monitor is None else monitor, emulator, dc.config["transport"],
                flasher, app_files(env_value(env, "APP")))


def _device_name(dc: DeviceConfig, state: BoardState) -> str:
    name = dc.config["device_name"]
    return name.replace("{uid}", state.uid) if state.uid else name


def _counted(emulator: EmulatorProcess, name: str, count: int, deadline: float) -> bool:
    stored = len(emulator.telemetry(name))
    if stored >= count:
        return True
    if time.monotonic() > deadline:
        raise DeployError(f"COUNT={count}: the emulator stored only {stored} telemetry messages from {name} in time; "
                          "the board's console above says why")
    return False


def execute(p: Plan, console: Console) -> int:
    """Run a validated plan: emulator and virtual board when needed, deploy, reset, follow."""
    from host_tools.emulator.process import EmulatorError, EmulatorProcess
    from host_tools.vboard import VirtualBoard

    emulator = vboard = conn = None
    flash_dir = None
    try:
        if p.emulator:
            emulator = EmulatorProcess(DEMO_CONFIG, on_event=lambda line: console.show("[emulator] ", line))
            try:
                emulator.start()
            except EmulatorError as e:
                raise DeployError(str(e)) from None
            p.dc.config["port"] = emulator.ports[p.transport]
            log.info("emulator listening: %s", ", ".join(f"{k} {v}" for k, v in emulator.ports.items()))
        port = p.port
        if port is None:
            flash_dir = tempfile.mkdtemp(prefix="tbfleet-vboard-")
            vboard = VirtualBoard(flash_dir)
            port = vboard.start()
            log.info("virtual board on %s (flash %s)", port, flash_dir)
        with FirmwareBuild(app=p.app) as firmware:
            outcome = deploy_board(p.board, port, lambda state: p.dc, p.flasher, firmware)
        name = _device_name(p.dc, outcome.state)
        log.info("%s: device %s, %d files copied, %d unchanged, %d removed%s; resetting the board", port, name,
                 len(outcome.copied), outcome.unchanged, len(outcome.removed),
                 " (as .py sources)" if outcome.source_only else "")
        conn = reset_into_main(port)
        interval = float(p.dc.config.get("telemetry_interval", 60))
        deadline = time.monotonic() + _COUNT_GRACE + (p.count or 0) * interval
        if p.count is not None:
            log.info("waiting for %d telemetry messages from %s", p.count, name)
            follow(conn, console, until=lambda: _counted(emulator, name, p.count, deadline))
            log.info("the emulator stored %d telemetry messages from %s", len(emulator.telemetry(name)), name)
        elif p.monitor:
            log.info("following the board's console; Ctrl-C to stop")
            follow(conn, console)
        return 0
    finally:
        if conn:
            conn.close()
        if vboard:
            vboard.stop()
        if emulator:
            emulator.stop()
        if flash_dir:
            shutil.rmtree(flash_dir, ignore_errors=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`deploy` takes its settings from make variables in the environment (secrets never as arguments)."""
    parser.epilog = ("settings come from the environment (make variables): BOARD PORT APP APP_CONFIG FLASH FIRMWARE "
                     "ERASE ESPTOOL_ARGS TBFLEET_IMAGE_MIRROR MONITOR COUNT TRANSPORT TB_HOST TB_PORT TLS "
                     "PROVISION_KEY PROVISION_SECRET PROVISION_SECRET_FILE DEVICE_NAME CREDENTIALS_TYPE TOKEN "
                     "CLIENT_ID USERNAME PASSWORD CERT_FILE KEY_FILE CA_FILE WIFI_SSID WIFI_PASSWORD INTERVAL "
                     "LOG_LEVEL")


def run(args: argparse.Namespace) -> int:
    """Deploy as the environment says; one clear message and exit status 2 on bad input, 1 on failure."""
    env = os.environ
    try:
        p = plan(env)
    except (DeployError, ConfigProblem, BoardError) as e:
        log.error("%s", e)
        return 2
    console = Console(p.dc.secrets())
    try:
        return execute(p, console)
    except DeployError as e:
        log.error("%s", console.scrub(str(e)))
        return 1
