"""`deploy` for real: the real firmware through real mpremote onto a virtual board, provisioning against the emulator.

Every run is watched for secrets in the argv of any process and in the output.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fake_rom import build_image
from host_tools import boards, build, deploy, devconfig
from host_tools.vboard import VirtualBoard, board_mac
from support import ROOT
from vboard_fixtures import (MAKE_VARIABLES, ArgvWatch, Server, emulator, run_tool, snapshot,  # noqa: F401
                             vboard)

DEMO_SECRET = deploy.demo_profile()[1]


def deployed(flash: Path) -> dict[str, tuple[str, int]]:
    """Snapshot of what deploy writes (the firmware's own files, like the saved credentials, excluded)."""
    return {k: v for k, v in snapshot(flash).items() if k.startswith("lib/") or k in ("main.py", "config.json")}


@pytest.mark.parametrize("transport", ["mqtt", "http", "coap"])
def test_unix_board_deploys_provisions_and_sends_telemetry(transport: str) -> None:
    env = {"COUNT": "2", "INTERVAL": "0.3", "TRANSPORT": transport}
    with ArgvWatch([DEMO_SECRET]) as watch:
        proc = run_tool(["deploy"], env, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert "provisioned device 'unix-" in out and f"over {transport}" in out
    # deploy stops once the emulator holds COUNT messages; on a busy machine the board may get one more out first
    stored = re.search(r"the emulator stored (\d+) telemetry messages", out)
    assert stored and int(stored.group(1)) >= 2, out
    assert "[board]" in out and "telemetry 2 sent" in out
    assert DEMO_SECRET not in out
    assert watch.scans > 0 and watch.hits == []


def test_deploy_to_a_port_copies_only_changes_and_never_shows_secrets(vboard: VirtualBoard, emulator: Server,
                                                                      tmp_path: Path) -> None:
    wifi_password = "wifi-" + secrets.token_hex(8)
    stale = vboard.flash_dir / "lib" / "tbfleet" / "retired_module.py"
    stale.parent.mkdir(parents=True)
    stale.write_text("raise ImportError('a module the firmware no longer has')\n")
    env = {"PORT": vboard.port, "TB_HOST": "127.0.0.1", "TB_PORT": str(emulator.emu.ports["mqtt"]),
           "PROVISION_KEY": emulator.key, "PROVISION_SECRET": emulator.secret, "INTERVAL": "0.3", "MONITOR": "0",
           "WIFI_SSID": "lab", "WIFI_PASSWORD": wifi_password}
    name = "unix-" + board_mac(vboard.flash_dir).hex()
    with ArgvWatch([emulator.secret, wifi_password]) as watch:
        first = run_tool(["deploy"], env, timeout=60)
        assert first.returncode == 0, first.stdout + first.stderr
        emulator.emu.wait_for_telemetry(name, 2, timeout=20)
        before = deployed(vboard.flash_dir)
        second = run_tool(["deploy"], env, timeout=60)
        assert second.returncode == 0, second.stdout + second.stderr
        count = len(emulator.emu.telemetry(name))
        emulator.emu.wait_for_telemetry(name, count + 1, timeout=20)
    assert "lib/tbfleet/config.mpy" in before and "main.py" in before and "config.json" in before
    assert not stale.exists(), "a module the firmware no longer has must be removed"
    assert "removing 1 stale" in first.stderr
    assert "nothing copied" in second.stderr
    assert deployed(vboard.flash_dir) == before, "the second deploy rewrote files that did not change"
    console = (tmp_path / "console.log").read_bytes().decode(errors="replace")
    assert "telemetry" in console
    for text in (first.stdout, first.stderr, second.stdout, second.stderr, console):
        assert emulator.secret not in text and wifi_password not in text
    assert watch.hits == []
    devices = {d["name"] for d in emulator.emu.devices()}
    assert name in devices


def test_argv_watch_sees_a_secret_passed_to_a_child() -> None:
    # The child lives until the watcher has seen it (it waits on its stdin), so that the outcome does not depend on
    # how soon a busy machine lets the watcher poll; the deadline only bounds a failing run.
    needle = "needle-" + secrets.token_hex(6)
    with ArgvWatch([needle]) as watch:
        child = subprocess.Popen(["sh", "-c", f"read line; : {needle}"], stdin=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while not watch.hits and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            child.communicate(b"go\n", timeout=60)
    assert child.returncode == 0
    assert [name for _, name in watch.hits] == ["sh"]


def _ca_garbage(tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    path.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n")
    return str(path)


def _file(folder: Path, name: str, text: str) -> str:
    """Write folder/name and return the path that APP or APP_CONFIG names (the folder, or the file for a .json)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
    return str(folder / name if name.endswith(".json") and folder.name != "app" else folder)


def _c3_image(tmp_path: Path) -> str:
    build_image("esp32c3", tmp_path / "c3.bin")
    return str(tmp_path / "c3.bin")


BAD_INPUTS = [
    ({"BOARD": "esp33"}, "unknown board 'esp33'"),
    ({"PROVISION_KEY": ""}, "PROVISION_KEY is not set"),
    ({"PROVISION_SECRET": ""}, "PROVISION_SECRET is not set"),
    ({"PROVISION_SECRET_FILE": "/nonexistent/secret"}, "PROVISION_SECRET and PROVISION_SECRET_FILE are both set"),
    ({"PROVISION_SECRET": "", "PROVISION_SECRET_FILE": "/nonexistent/secret"},
     "PROVISION_SECRET_FILE: cannot read /nonexistent/secret"),
    ({"CA_FILE": _ca_garbage}, "is not a PEM or DER X.509 certificate"),
    ({"TRANSPORT": "pigeon"}, "TRANSPORT='pigeon' is not one of mqtt, http, coap"),
    ({"TB_PORT": "70000"}, "TB_PORT=70000 is outside 1..65535"),
    ({"CREDENTIALS_TYPE": "SERVER_GENERATED", "TOKEN": "t0k"},
     "TOKEN (config.json token): only with credentials_type ACCESS_TOKEN"),
    ({"CREDENTIALS_TYPE": "MQTT_BASIC", "USERNAME": "u", "TRANSPORT": "http"},
     "CREDENTIALS_TYPE (config.json credentials_type): MQTT_BASIC works only with transport mqtt"),
    ({"DEVICE_NAME": "provision"}, "DEVICE_NAME (config.json device_name): 'provision' is reserved"),
    ({"INTERVAL": "soon"}, "INTERVAL='soon' is not a number of seconds"),
    ({"INTERVAL": "inf"}, "INTERVAL='inf' is not a number of seconds"),
    ({"INTERVAL": "-1"}, "INTERVAL (config.json telemetry_interval): must be in 0..604800"),
    ({"INTERVAL": "604801"}, "INTERVAL (config.json telemetry_interval): must be in 0..604800"),
    ({"PORT": "/dev/ttyNOSUCH0"}, "PORT=/dev/ttyNOSUCH0: no such serial port"),
    ({"BOARD": "esp32", "WIFI_SSID": "lab", "PORT": "/dev/ttyNOSUCH0"}, "PORT=/dev/ttyNOSUCH0: no such serial port"),
    ({"BOARD": "esp32"}, "WIFI_SSID is not set"),
    ({"COUNT": "2"}, "COUNT needs the local emulator"),
    ({"FLASH": "maybe"}, "FLASH='maybe' is not a yes/no value"),
    ({"FIRMWARE": "/nonexistent/fw.bin"}, "FIRMWARE=/nonexistent/fw.bin: board unix runs the Unix port and is never"),
    ({"ERASE": "1"}, "ERASE=1: board unix runs the Unix port and is never flashed"),
    ({"BOARD": "esp32", "WIFI_SSID": "lab", "PORT": "/dev/ttyNOSUCH0", "FIRMWARE": _c3_image},
     "is an image for ESP32-C3, but board esp32 has an ESP32: refusing to flash it"),
    ({"BOARD": "esp32", "WIFI_SSID": "lab", "PORT": "/dev/ttyNOSUCH0", "FLASH": "0", "ERASE": "1"},
     "FLASH=0, but ERASE=1 only acts while flashing"),
    ({"APP": "/nonexistent/app"}, "APP=/nonexistent/app: no such file or folder"),
    ({"APP": lambda tmp: _file(tmp / "app", "config.json", "{}")}, "config.json would replace the firmware's own"),
    ({"APP": lambda tmp: _file(tmp / "lib", "helpers.py", "")}, "the folder has no main.py"),
    ({"APP_CONFIG": lambda tmp: _file(tmp, "app.json", "[1, 2]")}, "app.json: not a JSON object"),
]


@pytest.mark.parametrize("change,message", BAD_INPUTS, ids=[m.split(":")[0][:40] for _, m in BAD_INPUTS])
def test_bad_input_gets_one_message_and_leaves_the_board_untouched(vboard: VirtualBoard, tmp_path: Path,
                                                                   change: dict, message: str) -> None:
    (vboard.flash_dir / "main.py").write_text("print('old firmware')\n")
    before = snapshot(vboard.flash_dir)
    env = {"PORT": vboard.port, "TB_HOST": "127.0.0.1", "TB_PORT": "1883", "PROVISION_KEY": "k",
           "PROVISION_SECRET": "s3cret-value", "MONITOR": "0"}
    env.update({k: v(tmp_path) if callable(v) else v for k, v in change.items()})
    env = {k: v for k, v in env.items() if v}
    proc = run_tool(["deploy"], env, timeout=30)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "ERROR" in errors[0], proc.stderr
    assert message in errors[0]
    assert "s3cret-value" not in proc.stderr + proc.stdout
    assert snapshot(vboard.flash_dir) == before
    assert vboard.restarts == 0, "nothing may have talked to the board"


APP_MAIN = """\
import sys
if "/lib" not in sys.path:
    sys.path.append("lib")
import tbfleet
import greenhouse

dev = tbfleet.Device()
dev.telemetry(greenhouse.reading(dev.app["base"]))
print("greenhouse app, base", dev.app["base"])
dev.run()
"""


def test_unix_board_runs_the_users_application_folder_with_its_settings(tmp_path: Path) -> None:
    app = tmp_path / "myapp"
    _file(app, "main.py", APP_MAIN)
    _file(app, "greenhouse.py", "def reading(base):\n    return lambda: {'temperature': base + 0.5}\n")
    _file(app / ".git", "HEAD", "not for the board")
    settings = _file(tmp_path, "app.json", '{"base": 20}')
    proc = run_tool(["deploy"], {"COUNT": "2", "INTERVAL": "0.3", "APP": str(app), "APP_CONFIG": settings},
                    timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "greenhouse app, base 20" in out and "telemetry 2 sent" in out
    files = deploy.app_files(str(app))
    assert sorted(files) == ["greenhouse.py", "main.py"]  # .git left out
    assert deploy.app_files(str(app / "main.py")) == {"main.py": app / "main.py"}


def test_board_that_cannot_load_our_mpy_gets_sources() -> None:
    with deploy.FirmwareBuild() as firmware:
        files, sources = firmware.files(board_mpy=5)  # a MicroPython before 1.19 (.mpy v5)
        assert sources and files["lib/tbfleet/config.py"] == build.FIRMWARE / "lib" / "tbfleet" / "config.py"
        assert all(p.suffix == ".py" for p in files.values())
        files, sources = firmware.files(board_mpy=2822)  # the Unix port here: v6.3, x64
        assert not sources and files["lib/tbfleet/config.mpy"].read_bytes()[:2] == b"M\x06"
        assert files["main.py"].suffix == ".py"
        assert firmware.files(board_mpy=2822)[0] is files, "the firmware is compiled once per build"
        built = files["main.py"].parent
    assert not built.exists()


def test_mpy_compatibility_rules(tmp_path: Path) -> None:
    assert deploy.board_accepts(2822, (6, None))  # bytecode-only v6 loads on any 6.x
    assert deploy.board_accepts(0x306, (6, None))
    assert not deploy.board_accepts(5, (6, None))
    assert not deploy.board_accepts(None, (6, None))
    assert deploy.board_accepts(0xB06, (6, 3)) and not deploy.board_accepts(0xB06, (6, 2))
    bogus = tmp_path / "x.mpy"
    bogus.write_bytes(b"#!/bin/sh\n")
    with pytest.raises(deploy.DeployError, match="not a .mpy file"):
        deploy.mpy_version_of(bogus)


def test_console_scrubs_every_secret() -> None:
    import io

    out = io.StringIO()
    console = deploy.Console(["abc", "abcdef", ""], out)
    console.show("[board] ", "token abcdef and abc")
    assert out.getvalue() == "[board] token *** and ***\n"


def test_flash_decision() -> None:
    esp32, unix = boards.load("esp32"), boards.load("unix")
    same = deploy.BoardState(esp32.micropython.version, 2822, "ESP32", "246f28a1b2c3", {})
    older = deploy.BoardState("1.22.2", 2822, "ESP32", "246f28a1b2c3", {})
    assert deploy.flash_reason(esp32, same, force=None) is None
    assert deploy.flash_reason(esp32, same, force="FLASH=1") == "FLASH=1"
    assert deploy.flash_reason(esp32, None, force=None) == "no MicroPython answers"
    assert deploy.flash_reason(esp32, older, force=None) == (
        f"it runs MicroPython 1.22.2, board esp32 wants {esp32.micropython.version}")
    assert deploy.flash_reason(unix, same, force="FLASH=1") is None  # the host board is never flashed
    assert deploy.flash_forced({}) is None and deploy.flash_forced({"ERASE": "0"}) is None
    assert deploy.flash_forced({"FLASH": "1", "ERASE": "1"}) == "FLASH=1"
    assert deploy.flash_forced({"FIRMWARE": "own.bin"}) == "FIRMWARE=own.bin", "FIRMWARE alone flashes"
    assert deploy.flash_forced({"ERASE": "1"}) == "ERASE=1", "ERASE=1 alone flashes"


def test_monitor_follows_the_console_until_ctrl_c(vboard: VirtualBoard, emulator: Server) -> None:
    env = {"PORT": vboard.port, "TB_HOST": "127.0.0.1", "TB_PORT": str(emulator.emu.ports["http"]),
           "TRANSPORT": "http", "PROVISION_KEY": emulator.key, "PROVISION_SECRET": emulator.secret,
           "INTERVAL": "0.2"}
    full = {k: v for k, v in os.environ.items() if k not in MAKE_VARIABLES}
    full.update(env)
    proc = subprocess.Popen([sys.executable, "-m", "host_tools", "deploy"], cwd=ROOT, env=full, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if "telemetry 3 sent" in line:
                break
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert any(line.startswith("[board] ") and "provisioned" in line for line in seen), "".join(seen)
    assert "telemetry 3 sent" in seen[-1]


def test_interval_takes_what_the_firmware_takes() -> None:
    for interval, expected in (("0", 0), ("0.5", 0.5), ("604800", 604800)):
        dc = devconfig.from_env({"TB_HOST": "127.0.0.1", "PROVISION_KEY": "k", "PROVISION_SECRET": "s",
                                 "INTERVAL": interval}, "unix-{uid}", ["uptime"])
        assert dc.config["telemetry_interval"] == expected
        devconfig.firmware_check(dc)
