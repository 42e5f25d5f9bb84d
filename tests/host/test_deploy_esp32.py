"""A real-board deploy end to end over one `socket://` port: esptool flashes, mpremote deploys, the board provisions.

The "ESP32" is a TCP port that routes each connection by its first byte, as the chip's UART serves whichever side
talks: SLIP (0xC0, esptool's SYNC) goes to the fake ROM bootloader of tests/host/fake_rom.py, anything else to a
virtual board's REPL (MicroPython 1.29.0, like the esp32 board file).
"""

from __future__ import annotations

import os
import select
import socket
import threading
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest

from fake_rom import FakeRom, build_image
from host_tools import boards
from host_tools.vboard import VirtualBoard, board_mac
from vboard_fixtures import ArgvWatch, Server, emulator, mirror, run_tool, vboard  # noqa: F401 - fixtures

_SLIP_END = 0xC0


class FakeEsp32:
    """socket://127.0.0.1:<port> leading to the ROM bootloader (SLIP) or the MicroPython REPL (anything else)."""

    def __init__(self, rom: FakeRom, board: VirtualBoard, blank: bool = False) -> None:
        self.rom = rom
        self.board = board
        self.blank = blank  # no MicroPython until something is flashed: REPL bytes go unanswered
        self.routes: list[str] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        return f"socket://127.0.0.1:{self._listener.getsockname()[1]}"

    def start(self) -> None:
        self._spawn(self._accept)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)
        self._listener.close()

    def _spawn(self, target, *args) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except (socket.timeout, OSError):
                continue
            self._spawn(self._route, conn)

    def _route(self, conn: socket.socket) -> None:
        # A UART has no Nagle delay: without this each small REPL reply waits for a delayed ACK.
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            ready, _, _ = select.select([conn], [], [], 5)
            first = conn.recv(1, socket.MSG_PEEK) if ready else b""
            if not first:
                return
            if first[0] == _SLIP_END:
                self.routes.append("rom")
                with socket.create_connection(("127.0.0.1", self.rom.port)) as rom:
                    self._relay(conn, rom.fileno())
            elif self.blank and not self.rom.wrote_flash():
                self.routes.append("silence")
                while not self._stop.is_set() and conn.recv(4096):
                    pass
            else:
                self.routes.append("repl")
                fd = os.open(self.board.port, os.O_RDWR | os.O_NOCTTY)
                try:
                    tty.setraw(fd)
                    self._relay(conn, fd)
                finally:
                    os.close(fd)

    def _relay(self, conn: socket.socket, fd: int) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([conn, fd], [], [], 0.1)
            if conn in ready:
                # Acknowledge at once: the client (pyserial) leaves Nagle on, so its next small write waits for it.
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
                data = conn.recv(65536)
                if not data:
                    return
                os.write(fd, data)
            if fd in ready:
                try:
                    data = os.read(fd, 65536)
                except OSError:
                    return
                if not data:
                    return
                try:
                    conn.sendall(data)
                except OSError:  # the client (esptool, mpremote) hung up first: nothing left to relay
                    return


@pytest.fixture
def esp32(vboard: VirtualBoard) -> Iterator[FakeEsp32]:
    rom = FakeRom(chip="esp32").start()
    board = FakeEsp32(rom, vboard)
    board.start()
    try:
        yield board
    finally:
        board.stop()
        rom.stop()


def test_flash_then_deploy_a_real_board_over_one_port(esp32: FakeEsp32, emulator: Server, tmp_path: Path) -> None:
    image = build_image("esp32", tmp_path / "micropython.bin")
    wifi_password = "wifi-" + os.urandom(6).hex()
    env = {"BOARD": "esp32", "PORT": esp32.url, "FLASH": "1", "FIRMWARE": str(tmp_path / "micropython.bin"),
           "ESPTOOL_ARGS": "--no-stub --before no-reset --after no-reset", "TB_HOST": "127.0.0.1",
           "TB_PORT": str(emulator.emu.ports["mqtt"]), "PROVISION_KEY": emulator.key,
           "PROVISION_SECRET": emulator.secret, "WIFI_SSID": "lab", "WIFI_PASSWORD": wifi_password,
           "INTERVAL": "0.3", "MONITOR": "0"}
    with ArgvWatch([emulator.secret, wifi_password]) as watch:
        proc = run_tool(["deploy"], env, timeout=90)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    offset = boards.load("esp32").flash.offset
    assert bytes(esp32.rom.flash[offset:offset + len(image)]) == image
    assert "flashing because FLASH=1" in proc.stderr
    assert esp32.routes[0] == "repl" and "rom" in esp32.routes and esp32.routes[-1] == "repl"
    name = "esp32-" + board_mac(esp32.board.flash_dir).hex()
    emulator.emu.wait_for_telemetry(name, 1, timeout=30)
    assert watch.hits == []
    assert emulator.secret not in proc.stdout + proc.stderr and wifi_password not in proc.stdout + proc.stderr


def test_blank_board_is_flashed_first(vboard: VirtualBoard, emulator: Server, tmp_path: Path) -> None:
    build_image("esp32", tmp_path / "micropython.bin")
    rom = FakeRom(chip="esp32").start()
    board = FakeEsp32(rom, vboard, blank=True)
    board.start()
    env = {"BOARD": "esp32", "PORT": board.url, "FIRMWARE": str(tmp_path / "micropython.bin"),
           "ESPTOOL_ARGS": "--no-stub --before no-reset --after no-reset", "TB_HOST": "127.0.0.1",
           "TB_PORT": str(emulator.emu.ports["mqtt"]), "PROVISION_KEY": emulator.key,
           "PROVISION_SECRET": emulator.secret, "WIFI_SSID": "lab", "MONITOR": "0"}
    try:
        proc = run_tool(["deploy"], env, timeout=90)
    finally:
        board.stop()
        rom.stop()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "flashing because no MicroPython answers" in proc.stderr
    assert board.routes[0] == "silence" and "rom" in board.routes and board.routes[-1] == "repl"


def test_board_with_the_wanted_micropython_is_not_flashed(esp32: FakeEsp32, emulator: Server) -> None:
    env = {"BOARD": "esp32", "PORT": esp32.url, "TB_HOST": "127.0.0.1", "TB_PORT": str(emulator.emu.ports["mqtt"]),
           "PROVISION_KEY": emulator.key, "PROVISION_SECRET": emulator.secret, "WIFI_SSID": "lab",
           "MONITOR": "0"}
    proc = run_tool(["deploy"], env, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rom" not in esp32.routes and not esp32.rom.wrote_flash()
    assert "flashing" not in proc.stderr


def test_the_official_image_is_downloaded_from_the_image_mirror(esp32: FakeEsp32, emulator: Server, mirror,
                                                               tmp_path: Path) -> None:
    base, served, fetched = mirror
    official = boards.load("esp32").micropython
    build_image("esp32", served / official.file)  # not the pinned bytes: the download is refused after fetching
    env = {"BOARD": "esp32", "PORT": esp32.url, "FLASH": "1", "TBFLEET_IMAGE_MIRROR": base,
           "XDG_CACHE_HOME": str(tmp_path / "xdg"), "ESPTOOL_ARGS": "--no-stub --before no-reset --after no-reset",
           "TB_HOST": "127.0.0.1", "TB_PORT": str(emulator.emu.ports["mqtt"]), "PROVISION_KEY": emulator.key,
           "PROVISION_SECRET": emulator.secret, "WIFI_SSID": "lab", "MONITOR": "0"}
    proc = run_tool(["deploy"], env, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert fetched == [f"/fw/{official.file}"]
    assert f"downloaded {base}{official.file} has sha256" in proc.stderr
    assert not esp32.rom.wrote_flash()
