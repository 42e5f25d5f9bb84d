"""Board descriptions: `boards/<name>/board.json`, one folder per supported board.

Adding a board is adding a folder. Each file names the chip (an esptool chip name, or "unix" for this host through a
virtual board), the official MicroPython image pinned by sha256, where and how fast to flash it, and the defaults
that go into the firmware's config (device name template and sensors).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from host_tools.build import BOARDS as BOARDS_DIR

# esptool chip name -> the chip name esptool prints (image-info "Detected image type", connect banner).
CHIPS: dict[str, str] = {"esp32": "ESP32", "esp32s3": "ESP32-S3", "esp32c3": "ESP32-C3"}
HOST_CHIP = "unix"
# Sensor names the firmware knows (tbfleet.config.SENSORS); a board may list a subset.
KNOWN_SENSORS = ("uptime", "free_heap", "heap_used", "rssi", "mcu_temp")

_SHA256 = re.compile(r"[0-9a-f]{64}")
_VERSION = re.compile(r"\d+\.\d+\.\d+")
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")
_OFFICIAL_URL = "https://micropython.org/resources/firmware/"


class BoardError(ValueError):
    """A board that does not exist or whose board.json is wrong; the message names the board and the field."""


@dataclass(frozen=True)
class Image:
    """The official MicroPython image for a board; file fields are None for the host board."""

    version: str
    file: str | None
    sha256: str | None
    url: str | None


@dataclass(frozen=True)
class FlashLayout:
    """Where and how esptool writes the image."""

    offset: int
    baud: int
    erase_default: bool


@dataclass(frozen=True)
class Board:
    """One supported board, as read from boards/<name>/board.json."""

    name: str
    chip: str
    description: str
    micropython: Image
    flash: FlashLayout | None
    device_name: str
    sensors: tuple[str, ...]
    pins: dict[str, int | None] = field(default_factory=dict)

    @property
    def is_host(self) -> bool:
        """True for the Unix-port board, which is never flashed."""
        return self.chip == HOST_CHIP


def names(boards_dir: Path = BOARDS_DIR) -> list[str]:
    """Names of all boards (folders holding a board.json), sorted."""
    return sorted(p.parent.name for p in boards_dir.glob("*/board.json"))


def load(name: str, boards_dir: Path = BOARDS_DIR) -> Board:
    """Read and validate boards/<name>/board.json; BoardError names the board and the wrong field."""
    known = names(boards_dir)
    if name not in known:
        raise BoardError(f"unknown board {name!r}; known boards: {', '.join(known) or '(none)'}")
    path = boards_dir / name / "board.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BoardError(f"board {name}: cannot read {path}: {e}") from None
    return _parse(name, data)


class _Fields:
    """Typed access to one JSON object, with errors naming board and field path."""

    def __init__(self, board: str, data: Any, where: str = "") -> None:
        self.board, self.where = board, where
        if not isinstance(data, dict):
            raise self.error(where.rstrip(".") or "board.json", "must be a JSON object")
        self.data = data

    def error(self, key: str, problem: str) -> BoardError:
        return BoardError(f"board {self.board}: field {self.where}{key} {problem}")

    def get(self, key: str, kind: type | tuple[type, ...], nullable: bool = False) -> Any:
        if key not in self.data:
            raise self.error(key, "is missing")
        value = self.data[key]
        if value is None and nullable:
            return None
        # bool is an int in Python: never accept one where a number is wanted, or the reverse.
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            names_ = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise self.error(key, f"must be {names_}{' or null' if nullable else ''}, not {value!r}")
        return value

    def sub(self, key: str, nullable: bool = False) -> "_Fields | None":
        value = self.get(key, dict, nullable)
        return None if value is None else _Fields(self.board, value, f"{self.where}{key}.")


def _parse(name: str, data: Any) -> Board:
    f = _Fields(name, data)
    if f.get("name", str) != name:
        raise f.error("name", f"must match its folder name {name!r}")
    if not _NAME.fullmatch(name):
        raise f.error("name", "must be lower-case letters, digits, '-' or '_'")
    chip = f.get("chip", str)
    if chip not in CHIPS and chip != HOST_CHIP:
        raise f.error("chip", f"{chip!r} is not supported (one of: {', '.join([*CHIPS, HOST_CHIP])})")
    image = _parse_image(f.sub("micropython"), chip)
    flash_f = f.sub("flash", nullable=True)
    if chip == HOST_CHIP:
        if flash_f is not None:
            raise f.error("flash", "must be null for the host board (it is never flashed)")
        layout = None
    else:
        if flash_f is None:
            raise f.error("flash", "is required for a chip board")
        layout = _parse_flash(flash_f)
    device_name = f.get("device_name", str)
    if not device_name.strip() or device_name.replace("{uid}", "") == "provision":
        raise f.error("device_name", f"{device_name!r} is not a usable device name template")
    sensors = f.get("sensors", list)
    for s in sensors:
        if s not in KNOWN_SENSORS:
            raise f.error("sensors", f"has unknown sensor {s!r} (known: {', '.join(KNOWN_SENSORS)})")
    pins = f.get("pins", dict)
    for pin, number in pins.items():
        if number is not None and (isinstance(number, bool) or not isinstance(number, int) or number < 0):
            raise f.error(f"pins.{pin}", f"must be a GPIO number or null, not {number!r}")
    return Board(name=name, chip=chip, description=f.get("description", str), micropython=image,
                 flash=layout, device_name=device_name, sensors=tuple(sensors), pins=dict(pins))


def _parse_image(f: _Fields | None, chip: str) -> Image:
    assert f is not None
    version = f.get("version", str)
    if not _VERSION.fullmatch(version):
        raise f.error("version", f"must look like 1.29.0, not {version!r}")
    file, sha, url = f.get("image", str, True), f.get("sha256", str, True), f.get("url", str, True)
    if chip == HOST_CHIP:
        if file is not None or sha is not None or url is not None:
            raise f.error("image", "must be null for the host board (it runs the Unix port)")
        return Image(version, None, None, None)
    if not file or "/" in file or not file.endswith(".bin"):
        raise f.error("image", f"must be a .bin file name, not {file!r}")
    if f"v{version}" not in file:
        raise f.error("image", f"{file!r} does not match version {version}")
    if sha is not None and not _SHA256.fullmatch(sha):
        raise f.error("sha256", "must be 64 lower-case hex digits or null (unpinned: FIRMWARE= is then required)")
    if url is None or not url.startswith(_OFFICIAL_URL) or not url.endswith("/" + file):
        raise f.error("url", f"must be the official download address {_OFFICIAL_URL}{file}")
    return Image(version, file, sha, url)


def _parse_flash(f: _Fields) -> FlashLayout:
    raw = f.get("offset", (str, int))
    try:
        offset = int(raw, 0) if isinstance(raw, str) else raw
    except ValueError:
        raise f.error("offset", f"must be a number like \"0x1000\", not {raw!r}") from None
    if offset < 0 or offset % 0x1000:
        raise f.error("offset", f"must be a multiple of 0x1000 (a flash sector), not {raw!r}")
    baud = f.get("baud", int)
    if not 9600 <= baud <= 5_000_000:
        raise f.error("baud", f"{baud} is outside 9600..5000000")
    return FlashLayout(offset=offset, baud=baud, erase_default=f.get("erase_default", bool))
