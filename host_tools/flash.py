"""`python -m host_tools flash`: write a board's MicroPython image with esptool.

The image is either the user's own build (FIRMWARE=<file>, flashed as given once esptool confirms it is an image
for the board's chip) or the board's pinned official image from a local cache, downloaded into the cache when there
is network and always checked against the sha256 in boards/<name>/board.json. esptool runs as a subprocess of this
Python (`-m esptool`); its output lines are forwarded as progress.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import selectors
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from host_tools import boards
from host_tools.boards import Board, BoardError
from host_tools.devconfig import ConfigProblem, env_flag

LOG = logging.getLogger("flash")

# Long enough for a 4 MB erase plus a 2 MB write at 115200 baud on a real board.
ESPTOOL_TIMEOUT_S = 600.0
DOWNLOAD_TIMEOUT_S = 30.0
_MAC = re.compile(r"^MAC:\s+((?:[0-9a-f]{2}:){5}[0-9a-f]{2})\s*$", re.I | re.M)
_DETECTED = re.compile(r"^Detected image type:\s*(\S+)", re.M)
_ERROR = re.compile(r"(?:A fatal error occurred|error):\s*(?:A fatal error occurred:\s*)?(.+)", re.I)


class FlashError(Exception):
    """Flashing cannot go on; the message says what is wrong and what to do."""


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/tbfleet/images, or ~/.cache/tbfleet/images."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tbfleet" / "images"


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _esptool(args: Sequence[str], timeout: float = ESPTOOL_TIMEOUT_S,
             progress: Callable[[str], None] | None = None) -> tuple[int, str]:
    """Run esptool with `args`; return its exit status and its whole output, forwarding each line.

    The whole run has a deadline: esptool waiting on a port that never answers is killed at `timeout`.
    """
    cmd = [sys.executable, "-m", "esptool", *args]
    LOG.debug("running %s", shlex.join(cmd))
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    except OSError as e:
        raise FlashError(f"cannot start esptool: {e}") from None
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    buf = b""
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise subprocess.TimeoutExpired(cmd, timeout)
                if not sel.select(left):
                    continue
                # Raw chunks, not lines: esptool redraws progress with '\r', which readline() would hold back.
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                *done, buf = re.split(rb"[\r\n]", buf + chunk)
                for raw in done:
                    _forward(raw, lines, progress)
        _forward(buf, lines, progress)
        status = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise FlashError(f"esptool did not finish within {timeout:g} s: {' | '.join(lines[-2:]) or 'no output'}"
                         ) from None
    finally:
        proc.stdout.close()
    return status, "\n".join(lines)


def _forward(raw: bytes, lines: list[str], progress: Callable[[str], None] | None) -> None:
    line = raw.decode("utf-8", "replace").strip()
    if not line:
        return
    lines.append(line)
    if progress is not None:
        progress(line)
    else:
        LOG.info("esptool: %s", line)


def _esptool_failure(what: str, output: str) -> FlashError:
    """One clear message from a failed esptool run: its own error line, or its last line."""
    errors = [m.group(1).strip() for m in _ERROR.finditer(output)]
    lines = output.strip().splitlines()
    reason = errors[-1] if errors else (lines[-1] if lines else "no output")
    return FlashError(f"{what} failed: {reason}")


def _require_chip(board: Board) -> None:
    if board.is_host or board.flash is None:
        raise FlashError(f"board {board.name} is this host (the Unix port through a virtual board): "
                         "there is no image to flash; deploy to it instead")


def check_image(board: Board, image: Path) -> None:
    """Refuse `image` unless esptool recognises it as a firmware image for the board's chip."""
    _require_chip(board)
    if not image.is_file():
        raise FlashError(f"FIRMWARE file {image} does not exist or is not a file")
    status, output = _esptool(["image-info", str(image)], timeout=60, progress=LOG.debug)
    found = _DETECTED.search(output)
    if status != 0 or not found:
        raise _esptool_failure(f"checking FIRMWARE file {image} (esptool image-info)", output)
    wanted = boards.CHIPS[board.chip]
    if found.group(1) != wanted:
        raise FlashError(f"FIRMWARE file {image} is an image for {found.group(1)}, but board {board.name} "
                         f"has an {wanted}: refusing to flash it")


def _download(url: str, dest: Path, sha256: str) -> None:
    """Fetch `url` into `dest` through a temporary file in the same folder, renamed only once its sha256 matches."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
            for chunk in iter(lambda: resp.read(1 << 16), b""):
                out.write(chunk)
                h.update(chunk)
        if h.hexdigest() != sha256:
            raise FlashError(f"downloaded {url} has sha256 {h.hexdigest()}, but the board file pins {sha256}: "
                             "not using it")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def resolve_image(board: Board, firmware: Path | None, cache_dir: Path, download: bool = True,
                  mirror: str | None = None) -> Path:
    """The image file to flash onto `board`.

    `firmware` (the user's FIRMWARE=) is used as given once esptool confirms it is for the board's chip. Otherwise
    the board's pinned image comes from `cache_dir`, downloaded there first when missing and `download` is true
    (from `mirror`, a base URL, instead of micropython.org when given). The sha256 is always checked, also for a
    file already in the cache; a mismatch is refused. FlashError explains what to download when nothing works.
    """
    _require_chip(board)
    if firmware is not None:
        check_image(board, firmware)
        return firmware
    img = board.micropython
    assert img.file is not None and img.url is not None
    if img.sha256 is None:
        raise FlashError(f"board {board.name} pins no sha256 for {img.file}, so it will not be used unchecked: "
                         f"download {img.url} yourself, check it, and pass FIRMWARE=<file>")
    cached = cache_dir / img.file
    if cached.is_file():
        actual = sha256_of(cached)
        if actual != img.sha256:
            raise FlashError(f"cached image {cached} has sha256 {actual}, but board {board.name} pins "
                             f"{img.sha256}: refusing it; delete the file to download it again")
        LOG.info("using cached %s (sha256 verified)", cached)
        return cached
    url = f"{mirror.rstrip('/')}/{img.file}" if mirror else img.url
    hint = (f"download {img.url} (MicroPython {img.version}, sha256 {img.sha256}) and either put it at {cached} "
            f"or pass FIRMWARE=<path to the file>")
    if not download:
        raise FlashError(f"no MicroPython image for board {board.name} in {cache_dir} and downloading is off: "
                         + hint)
    LOG.info("downloading %s into %s", url, cache_dir)
    try:
        _download(url, cached, img.sha256)
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise FlashError(f"no MicroPython image for board {board.name} in {cache_dir}, and {url} cannot be "
                         f"downloaded ({reason}): " + hint) from None
    LOG.info("downloaded %s (sha256 verified)", cached)
    return cached


def _base_args(board: Board, port: str, esptool_args: Sequence[str]) -> list[str]:
    _require_chip(board)
    assert board.flash is not None
    if not port:
        raise FlashError(f"no serial port given for board {board.name}: pass PORT=<device or pyserial URL>")
    return ["--chip", board.chip, "--port", port, "--baud", str(board.flash.baud), *esptool_args]


def flash(board: Board, port: str, image: Path, erase: bool = False, esptool_args: Sequence[str] = (),
          progress: Callable[[str], None] | None = None, timeout: float = ESPTOOL_TIMEOUT_S) -> None:
    """Write `image` at the board's offset with esptool (erasing the whole flash first when `erase`).

    esptool's output lines go to `progress` (or the log); the whole run is stopped after `timeout` seconds.
    """
    args = _base_args(board, port, esptool_args)
    assert board.flash is not None
    if not image.is_file():
        raise FlashError(f"image {image} does not exist")
    args += ["write-flash", *(["--erase-all"] if erase else []), hex(board.flash.offset), str(image)]
    status, output = _esptool(args, timeout=timeout, progress=progress)
    if status != 0:
        raise _esptool_failure(f"flashing board {board.name} on {port}", output)


def read_mac(board: Board, port: str, esptool_args: Sequence[str] = (), timeout: float = 120.0) -> str:
    """The chip's base MAC as esptool reads it from eFuse, e.g. "24:6f:28:a1:b2:c3"."""
    status, output = _esptool([*_base_args(board, port, esptool_args), "read-mac"], timeout=timeout,
                              progress=LOG.debug)
    macs = _MAC.findall(output)
    if status != 0 or not macs:
        raise _esptool_failure(f"reading the MAC of board {board.name} on {port}", output)
    return macs[-1].lower()


@dataclass(frozen=True)
class Settings:
    """How to flash a board: one reading of FIRMWARE, ERASE, ESPTOOL_ARGS and TBFLEET_IMAGE_MIRROR for `flash`
    and `deploy` alike."""

    firmware: Path | None
    erase: bool
    esptool_args: tuple[str, ...]
    mirror: str | None


def split_esptool_args(text: str | None) -> tuple[str, ...]:
    """ESPTOOL_ARGS split as a shell would; FlashError naming it when it cannot be."""
    try:
        return tuple(shlex.split(text or ""))
    except ValueError as e:
        raise FlashError(f"ESPTOOL_ARGS: {e}") from None


def settings(board: Board, firmware: str | Path | None, erase: bool | None, esptool_args: str | None,
             mirror: str | None) -> Settings:
    """The flash settings for `board`; ERASE unset takes the board file's default. FlashError names what is wrong."""
    _require_chip(board)
    assert board.flash is not None
    return Settings(Path(firmware) if firmware else None, board.flash.erase_default if erase is None else erase,
                    split_esptool_args(esptool_args), mirror or None)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `flash`; each defaults to the environment variable the Makefile passes."""
    env = os.environ.get
    parser.add_argument("--board", default=env("BOARD"), help="board name (env BOARD): one of "
                        + ", ".join(boards.names()))
    parser.add_argument("--port", default=env("PORT"), help="serial device or pyserial URL (env PORT)")
    parser.add_argument("--firmware", type=Path, default=Path(env("FIRMWARE")) if env("FIRMWARE") else None,
                        help="flash this image instead of the board's pinned one (env FIRMWARE)")
    parser.add_argument("--erase", action="store_true", default=None,
                        help="erase the whole flash first (env ERASE=1; default from the board file)")
    parser.add_argument("--esptool-args", default=env("ESPTOOL_ARGS", ""),
                        help='extra esptool options, e.g. "--no-stub --before no-reset" (env ESPTOOL_ARGS)')
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                        help="where official images are kept (default $XDG_CACHE_HOME/tbfleet/images)")
    parser.add_argument("--offline", action="store_true", help="never download; use FIRMWARE or the cache only")
    parser.add_argument("--image-mirror", default=env("TBFLEET_IMAGE_MIRROR"),
                        help="base URL to download official images from instead of micropython.org "
                             "(env TBFLEET_IMAGE_MIRROR)")


def run(args: argparse.Namespace) -> int:
    """Flash one board; 0 on success, 2 for bad input, 1 when flashing failed."""
    try:
        if not args.board:
            raise BoardError(f"no board given: pass BOARD=<name> (known boards: {', '.join(boards.names())})")
        board = boards.load(args.board)
        erase = args.erase if args.erase is not None else env_flag(os.environ, "ERASE")
        chosen = settings(board, args.firmware, erase, args.esptool_args, args.image_mirror)
        _base_args(board, args.port or "", chosen.esptool_args)
        image = resolve_image(board, chosen.firmware, args.cache_dir, download=not args.offline,
                              mirror=chosen.mirror)
    except (BoardError, ConfigProblem, FlashError) as e:
        LOG.error("%s", e)
        return 2
    try:
        flash(board, args.port, image, erase=chosen.erase, esptool_args=chosen.esptool_args)
    except FlashError as e:
        LOG.error("%s", e)
        return 1
    LOG.info("flashed %s onto board %s on %s", image.name, board.name, args.port)
    return 0
