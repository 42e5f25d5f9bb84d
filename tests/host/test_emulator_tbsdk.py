"""The official ThingsBoard Python SDK (`tb-mqtt-client`, run from .venv-tbsdk) against the emulator process."""

from __future__ import annotations

import pytest

from emulator_fixtures import ALLOW_KEY, ALLOW_SECRET, CONFIG, emulator_process
from tbsdk import events


def session_params(emu, protocol: str, name: str) -> dict:
    return {"host": "127.0.0.1", "port": emu.ports["mqtt"], "http_port": emu.ports["http"], "protocol": protocol,
            "device_name": name, "provision": {"key": ALLOW_KEY, "secret": ALLOW_SECRET}}


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_sdk_provisions_and_runs_a_device_session(tb_sdk, protocol):
    name = f"sdk-{protocol}"
    with emulator_process(CONFIG) as emu:
        lines = tb_sdk.run("device_session.py", session_params(emu, protocol, name))
        provisioned = events(lines, "provisioned")[0]["credentials"]
        assert provisioned["status"] == "SUCCESS" and provisioned["credentialsType"] == "ACCESS_TOKEN"
        connected = events(lines, "connected")[0]
        assert connected["protocol"] == {"5": 5, "3.1.1": 4}[protocol]
        assert sorted(connected["subacks"]) == [[1]] * 4  # attributes, their responses, RPC requests and responses
        assert ("MQTT 5" in emu.wait_event(f"device {name!r} connected")) == (protocol == "5")
        assert events(lines, "telemetry")[0]["published"]
        assert events(lines, "attributes_response")[0]["content"] == {
            "client": {"firmwareVersion": "1.0.0"}, "shared": {"targetTemperature": 22}}
        assert events(lines, "attribute_update")[0]["content"] == {"mode": "eco"}
        rpc = events(lines, "rpc_request")[0]
        assert rpc["request"] == {"method": "ping", "params": {"n": 7}} and int(rpc["id"]) == rpc["sent_id"]
        assert events(lines, "done")
        values = [entry["values"] for entry in emu.telemetry(name)]
        assert {"temperature": 21.5, "sdk": True} in values
        assert emu.api("GET", f"/emulator/devices/{name}/rpc") == {str(rpc["sent_id"]): {"echo": {"n": 7}}}
