"""Board data files: every shipped board loads, and every wrong field is named in the error."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import pytest

from host_tools import boards
from support import MICROPYTHON, ROOT, micropython_env

GOOD = json.loads((boards.BOARDS_DIR / "esp32" / "board.json").read_text())


def test_the_shipped_boards_load_with_their_chip_offsets() -> None:
    assert boards.names() == ["esp32", "esp32c3", "esp32s3", "unix"]
    offsets = {}
    for name in boards.names():
        board = boards.load(name)
        assert board.name == name and board.sensors and board.device_name.endswith("{uid}")
        if board.is_host:
            assert board.flash is None and board.micropython.file is None
            continue
        assert board.chip == name and board.micropython.sha256 is not None
        assert board.micropython.url == "https://micropython.org/resources/firmware/" + board.micropython.file
        offsets[name] = board.flash.offset
    assert offsets == {"esp32": 0x1000, "esp32s3": 0x0, "esp32c3": 0x0}


def test_every_board_runs_the_same_micropython_version() -> None:
    # deploy compiles once with mpy-cross; the boards and the Unix port must agree on the release.
    assert {boards.load(n).micropython.version for n in boards.names()} == {"1.29.0"}


def test_board_sensors_are_ones_the_firmware_knows() -> None:
    proc = subprocess.run([MICROPYTHON, "-c", "from tbfleet.config import SENSORS; print(' '.join(SENSORS))"],
                          cwd=ROOT, env=micropython_env(), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert tuple(proc.stdout.split()) == boards.KNOWN_SENSORS
    assert "rssi" not in boards.load("unix").sensors, "the host has no Wi-Fi"


def test_unknown_board_lists_the_known_ones() -> None:
    with pytest.raises(boards.BoardError, match=r"unknown board 'esp8266'; known boards: esp32, esp32c3, "
                                                r"esp32s3, unix"):
        boards.load("esp8266")


def write_board(tmp_path: Path, data, name: str = "myboard") -> Path:
    folder = tmp_path / name
    folder.mkdir(parents=True, exist_ok=True)
    text = data if isinstance(data, str) else json.dumps(data)
    (folder / "board.json").write_text(text)
    return tmp_path


def variant(**changes) -> dict:
    """The esp32 board renamed `myboard`, with `changes` applied ("a__b" reaches into a sub-object; ... deletes)."""
    data = copy.deepcopy(GOOD)
    data["name"] = "myboard"
    for key, value in changes.items():
        *parents, leaf = key.split("__")
        target = data
        for p in parents:
            target = target[p]
        if value is Ellipsis:
            del target[leaf]
        else:
            target[leaf] = value
    return data


def test_adding_a_board_is_adding_a_folder(tmp_path: Path) -> None:
    write_board(tmp_path, variant(flash__offset=0x2000, flash__baud=921600))
    board = boards.load("myboard", tmp_path)
    assert boards.names(tmp_path) == ["myboard"]
    assert board.flash is not None and (board.flash.offset, board.flash.baud) == (0x2000, 921600)


@pytest.mark.parametrize("changes, message", [
    ({"chip": Ellipsis}, "field chip is missing"),
    ({"chip": "esp8266"}, "field chip 'esp8266' is not supported (one of: esp32, esp32s3, esp32c3, unix)"),
    ({"name": "other"}, "field name must match its folder name 'myboard'"),
    ({"flash__offset": "0x1001"}, "field flash.offset must be a multiple of 0x1000"),
    ({"flash__offset": "ten"}, "field flash.offset must be a number like \"0x1000\", not 'ten'"),
    ({"flash__baud": "460800"}, "field flash.baud must be int, not '460800'"),
    ({"flash__erase_default": 1}, "field flash.erase_default must be bool, not 1"),
    ({"flash": None}, "field flash is required for a chip board"),
    ({"micropython__sha256": "ABC"}, "field micropython.sha256 must be 64 lower-case hex digits or null"),
    ({"micropython__version": "1.29"}, "field micropython.version must look like 1.29.0"),
    ({"micropython__image": "ESP32_GENERIC-20260406-v1.28.0.bin"}, "does not match version 1.29.0"),
    ({"micropython__url": "http://example.com/ESP32_GENERIC-20260824-v1.29.0.bin"},
     "field micropython.url must be the official download address"),
    ({"sensors": ["uptime", "humidity"]}, "field sensors has unknown sensor 'humidity'"),
    ({"pins": {"status_led": -1}}, "field pins.status_led must be a GPIO number or null"),
    ({"device_name": "provision"}, "field device_name 'provision' is not a usable device name template"),
])
def test_a_wrong_field_is_named_with_its_board(tmp_path: Path, changes: dict, message: str) -> None:
    write_board(tmp_path, variant(**changes))
    with pytest.raises(boards.BoardError) as err:
        boards.load("myboard", tmp_path)
    assert str(err.value).startswith("board myboard: ")
    assert message in str(err.value)


def test_a_null_sha256_loads_as_unpinned(tmp_path: Path) -> None:
    write_board(tmp_path, variant(micropython__sha256=None))
    assert boards.load("myboard", tmp_path).micropython.sha256 is None


def test_the_host_board_has_no_image_and_no_flash(tmp_path: Path) -> None:
    host = json.loads((boards.BOARDS_DIR / "unix" / "board.json").read_text())
    host["name"] = "myboard"
    host["flash"] = GOOD["flash"]
    write_board(tmp_path, host)
    with pytest.raises(boards.BoardError, match="field flash must be null for the host board"):
        boards.load("myboard", tmp_path)
    host["flash"] = None
    host["micropython"] = GOOD["micropython"]
    write_board(tmp_path, host)
    with pytest.raises(boards.BoardError, match="field micropython.image must be null for the host board"):
        boards.load("myboard", tmp_path)


def test_unreadable_json_is_reported_with_its_path(tmp_path: Path) -> None:
    write_board(tmp_path, "{ not json")
    with pytest.raises(boards.BoardError, match=r"board myboard: cannot read .*myboard/board.json"):
        boards.load("myboard", tmp_path)
    write_board(tmp_path, "[1, 2]")
    with pytest.raises(boards.BoardError, match="board myboard: field board.json must be a JSON object"):
        boards.load("myboard", tmp_path)
