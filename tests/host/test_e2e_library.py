"""The firmware as a library, end to end: a user's own main.py on tbfleet.Device against the emulator.

Per transport: the user's readings join the built-in sensors; the emulator's inspection API sends RPCs (answered,
one handler raising, one method without a handler, the built-in status) and pushes shared attributes (the
callback sees them, the built-in telemetry_interval takes effect and survives a reboot); client attributes are
published at connect and the current shared attributes arrive after each connect.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from emulator_fixtures import ALLOW_KEY, ALLOW_SECRET, CONFIG
from firmware_board import FirmwareBoard
from host_tools.emulator.process import EmulatorProcess

USER_MAIN = """\
import sys
sys.path.append("lib")
import json
import tbfleet

dev = tbfleet.Device()


@dev.telemetry
def climate():
    return {"temperature": dev.app["base"] + 0.5}


@dev.rpc("setRelay")
def set_relay(params):
    dev.send({"relay": params["on"]})
    return {"on": params["on"]}


@dev.rpc("explode")
def explode(params):
    raise ValueError("relay stuck")


@dev.attributes
def on_attributes(changed):
    print("ATTRS " + json.dumps(changed))


dev.run()
"""


@pytest.fixture
def emulator():
    with EmulatorProcess(CONFIG) as emu:
        yield emu


def rpc(emu: EmulatorProcess, name: str, method: str, params: object, timeout: float = 20) -> object:
    """Send a server-side RPC until the board's reply is recorded; the reply.

    The emulator delivers an RPC only to a session listening at that moment (an HTTP board is between two polls
    now and then), so an RPC that found no listener is sent again; each has its own id.
    """
    path = f"/emulator/devices/{quote(name, safe='')}/rpc"
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        rid = emu.api("POST", path, {"method": method, "params": params})["id"]
        until = time.monotonic() + 3
        while time.monotonic() < until:
            replies = emu.api("GET", path)
            if str(rid) in replies:
                return replies[str(rid)]
            time.sleep(0.05)
    raise AssertionError(f"no reply to {method} within {timeout} s")


@pytest.mark.parametrize("transport", ["mqtt", "http", "coap"])
def test_user_application(emulator, tmp_path: Path, transport: str) -> None:
    name = f"lib-{transport}"
    board = FirmwareBoard(tmp_path / "b", {
        "host": "127.0.0.1", "port": emulator.ports[transport], "transport": transport,
        "provision_key": ALLOW_KEY, "provision_secret": ALLOW_SECRET, "device_name": name,
        "telemetry_interval": 0.3, "timeout": 3, "sensors": ["uptime"], "app": {"base": 20}})
    (board.path / "main.py").write_text(USER_MAIN)
    with board.boot() as run:
        run.wait_for("telemetry 2 sent")
        entries = emulator.wait_for_telemetry(name, 2, timeout=10)
        assert entries[0]["values"] == {"uptime": entries[0]["values"]["uptime"], "temperature": 20.5}
        client = emulator.api("GET", f"/emulator/devices/{name}/attributes")["client"]
        assert set(client) == {"firmware", "board", "micropython"}

        assert rpc(emulator, name, "setRelay", {"on": True}) == {"on": True}
        assert {"relay": True} in [e["values"] for e in emulator.telemetry(name)]  # dev.send from a handler
        assert rpc(emulator, name, "explode", {}) == {"error": "ValueError: relay stuck"}
        assert rpc(emulator, name, "nope", None) == {"error": "no handler for method nope"}
        status = rpc(emulator, name, "status", None)
        assert set(status) == {"firmware", "micropython", "board", "uptime", "free_heap", "rssi", "reset_cause",
                               "last_error"}
        assert status["free_heap"] > 0 and status["rssi"] is None

        emulator.api("POST", f"/emulator/devices/{name}/attributes/shared", {"target": 22, "telemetry_interval": 1})
        run.wait_for(r"telemetry interval 1 s")  # the built-in first, then the user's callback
        changed = json.loads(run.wait_for(r"ATTRS (\{.*\})").group(1))
        assert changed == {"target": 22, "telemetry_interval": 1}
        before = len(emulator.telemetry(name))
        time.sleep(2.5)
        assert len(emulator.telemetry(name)) - before <= 4  # one a second now, not three
        assert "error" not in run.output.lower() or "relay stuck" in run.output
    assert json.loads((board.path / "settings.json").read_text()) == {"telemetry_interval": 1}

    with board.boot() as run:
        # After the reboot the interval is the saved one at once, and the current shared attributes arrive.
        current = json.loads(run.wait_for(r"ATTRS (\{.*\})").group(1))
        assert current == {"target": 22, "telemetry_interval": 1}
        run.wait_for("telemetry 2 sent")
        assert "telemetry interval" not in run.output  # unchanged: it was the saved one
