"""The flash command and its Python API, through real esptool against the fake ROM bootloader (never a real board)."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fake_rom import FakeRom, build_image
from host_tools import boards, cli
from host_tools import flash as fl
from support import ROOT
from vboard_fixtures import mirror  # noqa: F401 - fixture

# The fake cannot be reset over TCP; one connect attempt keeps failures fast.
NO_RESET = ("--before", "no-reset", "--after", "no-reset", "--connect-attempts", "1")
ROM_ONLY = ("--no-stub", *NO_RESET)


@pytest.fixture
def rom(request) -> Iterator[FakeRom]:
    """A fake bootloader for the chip named by the test's `chip` parameter (default esp32)."""
    chip = getattr(request, "param", "esp32")
    fake = FakeRom(chip=chip).start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def silent_port() -> Iterator[str]:
    """A TCP port that accepts connections and never answers: a board that is not in its bootloader."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except (socket.timeout, OSError):
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"socket://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in accepted:
            conn.close()
        server.close()


def closed_port_url() -> str:
    """An http URL on a local port nobody listens on: the network as seen offline."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def pinned_to(board: boards.Board, data: bytes) -> boards.Board:
    """The board with its pinned sha256 replaced by that of `data` (a test image stands in for the official one)."""
    image = dataclasses.replace(board.micropython, sha256=hashlib.sha256(data).hexdigest())
    return dataclasses.replace(board, micropython=image)


# -- writing the flash ----------------------------------------------------------------------------------------

def test_flash_rom_only_writes_the_image_byte_for_byte_at_the_board_offset(rom: FakeRom, tmp_path: Path) -> None:
    board = boards.load("esp32")
    data = build_image("esp32", tmp_path / "fw.bin")
    lines: list[str] = []
    fl.flash(board, rom.url, tmp_path / "fw.bin", esptool_args=ROM_ONLY, progress=lines.append)
    assert board.flash is not None and board.flash.offset == 0x1000
    assert rom.flash[0x1000:0x1000 + len(data)] == data
    assert rom.flash[:0x1000] == b"\xff" * 0x1000, "nothing may be written below the offset"
    assert any("Hash of data verified" in line for line in lines), lines
    assert any(line.startswith("Writing at") for line in lines), "esptool progress lines reach the callback"


@pytest.mark.parametrize("rom", ["esp32s3", "esp32c3"], indirect=True)
def test_flash_s3_and_c3_through_the_stub_write_at_offset_zero(rom: FakeRom, tmp_path: Path) -> None:
    board = boards.load(rom.chip)
    data = build_image(rom.chip, tmp_path / "fw.bin", seed=7)
    fl.flash(board, rom.url, tmp_path / "fw.bin", esptool_args=NO_RESET)
    assert rom.flash[:len(data)] == data
    assert 0x10 in rom.opcodes, "the stub path writes compressed (FLASH_DEFL_BEGIN)"


def test_erase_clears_the_whole_flash_before_writing(rom: FakeRom, tmp_path: Path) -> None:
    board = boards.load("esp32")
    data = build_image("esp32", tmp_path / "fw.bin")
    old_files = 0x300000
    rom.flash[old_files:old_files + 4] = b"LFS2"  # a filesystem left by an earlier firmware
    fl.flash(board, rom.url, tmp_path / "fw.bin", esptool_args=NO_RESET)
    assert rom.flash[old_files:old_files + 4] == b"LFS2", "without erase, data beyond the image stays"
    fl.flash(board, rom.url, tmp_path / "fw.bin", erase=True, esptool_args=NO_RESET)
    assert rom.flash[old_files:old_files + 4] == b"\xff" * 4
    assert rom.flash[0x1000:0x1000 + len(data)] == data
    assert 0xD0 in rom.opcodes, "ERASE_FLASH was sent"


def test_read_mac_returns_the_chips_mac(tmp_path: Path) -> None:
    fake = FakeRom(mac=bytes.fromhex("a0b1c2d3e4f5")).start()
    try:
        assert fl.read_mac(boards.load("esp32"), fake.url, ROM_ONLY) == "a0:b1:c2:d3:e4:f5"
    finally:
        fake.stop()
    assert not fake.wrote_flash()


@pytest.mark.parametrize("rom", ["esp32s3"], indirect=True)
def test_a_board_of_another_chip_is_refused_by_esptool_with_its_reason(rom: FakeRom, tmp_path: Path) -> None:
    build_image("esp32", tmp_path / "fw.bin")
    with pytest.raises(fl.FlashError, match="This chip is ESP32-S3, not ESP32"):
        fl.flash(boards.load("esp32"), rom.url, tmp_path / "fw.bin", esptool_args=ROM_ONLY)
    assert not rom.wrote_flash()


def test_unreachable_port_fails_fast_with_a_clear_message(silent_port: str, tmp_path: Path) -> None:
    build_image("esp32", tmp_path / "fw.bin")
    start = time.monotonic()
    with pytest.raises(fl.FlashError) as err:
        fl.flash(boards.load("esp32"), silent_port, tmp_path / "fw.bin", esptool_args=ROM_ONLY)
    assert time.monotonic() - start < 10
    assert str(err.value).startswith(f"flashing board esp32 on {silent_port} failed: Failed to connect to ESP32")
    with pytest.raises(fl.FlashError, match="port is busy or doesn't exist"):
        fl.read_mac(boards.load("esp32"), closed_port_url().replace("http", "socket"), ROM_ONLY)


def test_esptool_that_never_finishes_is_stopped_at_the_deadline(silent_port: str, tmp_path: Path) -> None:
    build_image("esp32", tmp_path / "fw.bin")
    forever = ("--no-stub", "--before", "no-reset", "--connect-attempts", "0")  # 0: retry without end
    start = time.monotonic()
    # 4 s: enough for esptool to reach "Connecting" on a busy machine too (1.5 s once saw only its banner).
    with pytest.raises(fl.FlashError, match=r"esptool did not finish within 4 s: .*Connecting"):
        fl.flash(boards.load("esp32"), silent_port, tmp_path / "fw.bin", esptool_args=forever, timeout=4)
    assert time.monotonic() - start < 10


# -- choosing the image ---------------------------------------------------------------------------------------

def test_firmware_for_the_wrong_chip_or_not_an_image_is_refused(tmp_path: Path) -> None:
    board = boards.load("esp32")
    build_image("esp32s3", tmp_path / "s3.bin")
    with pytest.raises(fl.FlashError, match=r"is an image for ESP32-S3, but board esp32 has an ESP32"):
        fl.resolve_image(board, tmp_path / "s3.bin", tmp_path / "cache")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(fl.FlashError, match="not a valid image"):
        fl.resolve_image(board, tmp_path / "notes.txt", tmp_path / "cache")
    with pytest.raises(fl.FlashError, match="does not exist"):
        fl.resolve_image(board, tmp_path / "missing.bin", tmp_path / "cache")
    build_image("esp32", tmp_path / "own.bin")
    assert fl.resolve_image(board, tmp_path / "own.bin", tmp_path / "cache") == tmp_path / "own.bin"


def test_cached_image_with_wrong_sha256_is_refused_and_nothing_is_written(rom: FakeRom, tmp_path: Path,
                                                                          caplog) -> None:
    board = boards.load("esp32")
    cache = tmp_path / "cache"
    cache.mkdir()
    build_image("esp32", cache / board.micropython.file)  # right name, not the official bytes
    argv = ["flash", "--board", "esp32", "--port", rom.url, "--cache-dir", str(cache), "--offline",
            f"--esptool-args={' '.join(ROM_ONLY)}"]
    with caplog.at_level(logging.ERROR):
        assert cli.main(argv) == 2
    assert f"but board esp32 pins {board.micropython.sha256}: refusing it" in caplog.text
    assert rom.connections == 0 and not rom.wrote_flash()
    assert (cache / board.micropython.file).exists(), "the user's file is left for them to inspect"


def test_cached_image_with_the_pinned_sha256_is_used(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    raw = boards.load("esp32")
    data = build_image("esp32", cache / raw.micropython.file)
    board = pinned_to(raw, data)
    assert fl.resolve_image(board, None, cache, download=False) == cache / raw.micropython.file


def test_missing_image_is_downloaded_once_verified_and_kept(mirror, tmp_path: Path) -> None:
    base, served, fetched = mirror
    raw = boards.load("esp32c3")
    data = build_image("esp32c3", served / raw.micropython.file)
    board = pinned_to(raw, data)
    cache = tmp_path / "cache"
    path = fl.resolve_image(board, None, cache, mirror=base)
    assert path == cache / raw.micropython.file and path.read_bytes() == data
    assert fl.resolve_image(board, None, cache, mirror=base) == path
    assert fetched == [f"/fw/{raw.micropython.file}"], "a verified cached image is not fetched again"
    assert sorted(p.name for p in cache.iterdir()) == [raw.micropython.file], "no temporary file is left"


def test_download_with_wrong_sha256_is_refused_and_not_kept(mirror, tmp_path: Path) -> None:
    base, served, _ = mirror
    board = boards.load("esp32")
    build_image("esp32", served / board.micropython.file)  # the server hands out different bytes
    cache = tmp_path / "cache"
    with pytest.raises(fl.FlashError, match=f"but the board file pins {board.micropython.sha256}: not using it"):
        fl.resolve_image(board, None, cache, mirror=base)
    assert list(cache.iterdir()) == []


def test_offline_without_an_image_says_what_to_download_and_how_to_pass_it(tmp_path: Path) -> None:
    board = boards.load("esp32s3")
    url = board.micropython.url
    with pytest.raises(fl.FlashError) as err:
        fl.resolve_image(board, None, tmp_path / "cache", mirror=closed_port_url())
    message = str(err.value)
    assert f"download {url}" in message and "FIRMWARE=<path to the file>" in message
    assert str(tmp_path / "cache" / board.micropython.file) in message
    with pytest.raises(fl.FlashError, match="downloading is off: download https://micropython.org/"):
        fl.resolve_image(board, None, tmp_path / "cache", download=False)


def test_unpinned_image_requires_firmware(tmp_path: Path) -> None:
    raw = boards.load("esp32")
    board = dataclasses.replace(raw, micropython=dataclasses.replace(raw.micropython, sha256=None))
    with pytest.raises(fl.FlashError, match=r"pins no sha256 .* pass FIRMWARE=<file>"):
        fl.resolve_image(board, None, tmp_path, download=False)


def test_the_host_board_is_never_flashed(tmp_path: Path) -> None:
    board = boards.load("unix")
    with pytest.raises(fl.FlashError, match="board unix is this host"):
        fl.resolve_image(board, None, tmp_path)
    with pytest.raises(fl.FlashError, match="board unix is this host"):
        fl.read_mac(board, "socket://127.0.0.1:1")


# -- the command line -----------------------------------------------------------------------------------------

def _run_cli(env_extra: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("BOARD", "PORT", "FIRMWARE", "ERASE", "ESPTOOL_ARGS", "TBFLEET_IMAGE_MIRROR")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    env.update(env_extra)
    return subprocess.run([sys.executable, "-m", "host_tools", "flash"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_cli_flashes_from_environment_variables(rom: FakeRom, tmp_path: Path) -> None:
    data = build_image("esp32", tmp_path / "own.bin", seed=3)
    rom.flash[0x200000:0x200004] = b"OLD!"
    proc = _run_cli({"BOARD": "esp32", "PORT": rom.url, "FIRMWARE": str(tmp_path / "own.bin"), "ERASE": "1",
                     "ESPTOOL_ARGS": " ".join(NO_RESET)}, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert rom.flash[0x1000:0x1000 + len(data)] == data
    assert rom.flash[0x200000:0x200004] == b"\xff" * 4
    assert "flashed own.bin onto board esp32" in proc.stderr
    assert "Hash of data verified" in proc.stderr, "esptool's progress is shown through the log"


def test_cli_offline_message_names_the_url_and_firmware(tmp_path: Path) -> None:
    board = boards.load("esp32")
    proc = _run_cli({"BOARD": "esp32", "PORT": "socket://127.0.0.1:1", "TBFLEET_IMAGE_MIRROR": closed_port_url()},
                    tmp_path)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, proc.stderr
    assert board.micropython.url in errors[0] and "FIRMWARE=" in errors[0]
    assert str(tmp_path / "xdg" / "tbfleet" / "images") in errors[0], "the XDG cache folder is used"


@pytest.mark.parametrize("env, expected", [
    ({"BOARD": "esp33", "PORT": "socket://127.0.0.1:1"}, "unknown board 'esp33'; known boards: esp32, esp32c3"),
    ({"PORT": "socket://127.0.0.1:1"}, "no board given: pass BOARD=<name>"),
    ({"BOARD": "esp32"}, "no serial port given for board esp32: pass PORT="),
    ({"BOARD": "unix", "PORT": "x"}, "board unix is this host"),
    ({"BOARD": "esp32", "PORT": "x", "ERASE": "maybe"}, "ERASE='maybe' is not a yes/no value"),
])
def test_cli_bad_input_gets_one_clear_message(env: dict[str, str], expected: str, tmp_path: Path) -> None:
    proc = _run_cli(env, tmp_path)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and expected in errors[0], proc.stderr
