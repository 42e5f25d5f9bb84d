"""`fleet`: several virtual boards deployed in parallel through real mpremote, one of them failing on purpose."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fake_rom import build_image
from host_tools import boards, deploy, devconfig, flash, fleet
from host_tools.deploy import BoardState, Console, DeployError
from host_tools.vboard import VirtualBoard, board_mac
from vboard_fixtures import ArgvWatch, Server, emulator, run_tool  # noqa: F401 - fixture


def make_board(tmp_path: Path, name: str) -> VirtualBoard:
    flash = tmp_path / name
    flash.mkdir()
    return VirtualBoard(flash, console_log=tmp_path / f"{name}.log")


def server_env(emulator: Server) -> dict[str, str]:
    return {"BOARD": "unix", "TB_HOST": "127.0.0.1", "TB_PORT": str(emulator.emu.ports["mqtt"]),
            "PROVISION_KEY": emulator.key, "PROVISION_SECRET": emulator.secret, "INTERVAL": "0.3"}


def test_fleet_deploys_boards_in_parallel_and_writes_inventory(tmp_path: Path, emulator: Server) -> None:
    good = [make_board(tmp_path, "a"), make_board(tmp_path, "b")]
    broken = make_board(tmp_path, "broken")
    # Its flash holds a file where the firmware's lib/ directory must go: copying onto it fails.
    (broken.flash_dir / "lib").write_text("not a directory\n")
    inventory = tmp_path / "inventory.csv"
    try:
        for b in (*good, broken):
            b.start()
        env = {**server_env(emulator), "PORTS": " ".join(b.port for b in (good[0], broken, good[1])),
               "INVENTORY": str(inventory), "DEVICE_NAME": "lab-{mac}"}
        started = time.monotonic()
        with ArgvWatch([emulator.secret]) as watch:
            proc = run_tool(["fleet"], env, timeout=90)
        elapsed = time.monotonic() - started
        names = {b.port: "lab-" + board_mac(b.flash_dir).hex() for b in (*good, broken)}
        for b in good:
            emulator.emu.wait_for_telemetry(names[b.port], 1, timeout=20)
    finally:
        for b in (*good, broken):
            b.stop()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "2 of 3 boards deployed, 1 failed" in proc.stdout
    rows = list(csv.DictReader(inventory.open()))
    assert [r["port"] for r in rows] == [good[0].port, broken.port, good[1].port]
    assert list(rows[0]) == list(fleet.INVENTORY_COLUMNS)
    by_port = {r["port"]: r for r in rows}
    for b in good:
        row = by_port[b.port]
        assert row["result"] == "ok"
        assert row["chip_mac"] == board_mac(b.flash_dir).hex(":")
        assert row["device_name"] == names[b.port]
        assert float(row["seconds"]) > 0 and row["time"].endswith("+00:00")
    failed = by_port[broken.port]
    assert failed["result"].startswith("failed: ") and "mpremote failed" in failed["result"]
    assert failed["chip_mac"] == board_mac(broken.flash_dir).hex(":")
    assert emulator.secret not in inventory.read_text() + proc.stdout + proc.stderr
    assert watch.hits == []
    assert "[fleet 3/3]" in proc.stdout
    assert elapsed < 60


def test_fleet_picks_up_ports_as_they_appear(tmp_path: Path, emulator: Server) -> None:
    board = make_board(tmp_path, "late")
    board.start()
    appear_at = time.monotonic() + 0.4
    try:
        out = io.StringIO()
        rows = fleet.run_fleet(fleet.validate(server_env(emulator)), None, Console([emulator.secret], out),
                               wait=1.2, jobs=2,
                               discover=lambda: {board.port} if time.monotonic() > appear_at else set())
    finally:
        board.stop()
    assert [(r.port, r.result) for r in rows] == [(board.port, "ok")]
    assert rows[0].device_name == "unix-" + board_mac(board.flash_dir).hex()
    assert f"[fleet 1/1] {board.port}: deployed" in out.getvalue()
    with pytest.raises(DeployError, match="no serial port appeared within 1 s"):
        fleet.run_fleet(fleet.validate(server_env(emulator)), None, Console([]), wait=0.6, jobs=1, discover=set)


@pytest.mark.parametrize("change,message", [
    ({"TB_HOST": ""}, "TB_HOST is not set"),
    ({"BOARD": "esp32"}, "WIFI_SSID is not set"),
    ({"PROVISION_KEY": ""}, "PROVISION_KEY is not set"),
    ({"CREDENTIALS_TYPE": "SERVER_GENERATED", "TOKEN": "t0k"},
     "TOKEN (config.json token): only with credentials_type ACCESS_TOKEN"),
    ({"ESPTOOL_ARGS": "--before 'no-reset"}, "ESPTOOL_ARGS: No closing quotation"),
    ({"DEVICE_NAME": "sensor"}, "DEVICE_NAME='sensor' has neither {uid} nor {mac}"),
])
def test_fleet_refuses_bad_input_before_touching_boards(tmp_path: Path, change: dict, message: str) -> None:
    env = {"BOARD": "unix", "TB_HOST": "127.0.0.1", "PROVISION_KEY": "k", "PROVISION_SECRET": "s",
           "PORTS": "/dev/ttyNOSUCH0", "INVENTORY": str(tmp_path / "inv.csv")}
    env.update(change)
    proc = run_tool(["fleet"], {k: v for k, v in env.items() if v}, timeout=30)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert not (tmp_path / "inv.csv").exists()


def test_each_board_gets_the_fleets_config_under_its_own_name_without_reading_it_again(monkeypatch) -> None:
    shared = fleet.validate({"BOARD": "esp32", "TB_HOST": "tb.example.com", "PROVISION_KEY": "k",
                             "PROVISION_SECRET": "s", "WIFI_SSID": "lab", "DEVICE_NAME": "lab-{mac}"})

    def again(*args, **kwargs):
        raise AssertionError("the config is built and checked once per fleet")

    monkeypatch.setattr(devconfig, "from_env", again)
    monkeypatch.setattr(devconfig, "firmware_check", again)
    state = BoardState("1.29.0", 6, "ESP32", "246f28a1b2c3", {})
    dc = fleet.board_config(shared.template, state)
    assert dc.config["device_name"] == "lab-246f28a1b2c3"
    assert {k: v for k, v in dc.config.items() if k != "device_name"} == {
        k: v for k, v in shared.template.config.items() if k != "device_name"}
    assert shared.template.config["device_name"] == "lab-{uid}", "the template is left for the next board"
    with pytest.raises(DeployError, match="no machine.unique_id"):
        fleet.board_config(shared.template, BoardState("1.29.0", 6, "ESP32", None, {}))


def test_the_image_is_resolved_once_for_the_whole_fleet(tmp_path: Path, monkeypatch) -> None:
    raw = boards.load("esp32")
    cache = tmp_path / "cache"
    cache.mkdir()
    data = build_image("esp32", cache / raw.micropython.file)
    board = dataclasses.replace(raw, micropython=dataclasses.replace(
        raw.micropython, sha256=hashlib.sha256(data).hexdigest()))
    hashed: list[Path] = []
    real_sha256 = flash.sha256_of
    monkeypatch.setattr(flash, "sha256_of", lambda path: hashed.append(path) or real_sha256(path))
    flasher = deploy.Flasher(board, flash.settings(board, None, None, None, None), "FLASH=1", cache_dir=cache)
    with ThreadPoolExecutor(max_workers=4) as pool:
        images = list(pool.map(lambda _: flasher.image(), range(8)))
    assert images == [cache / raw.micropython.file] * 8
    assert hashed == [cache / raw.micropython.file]
