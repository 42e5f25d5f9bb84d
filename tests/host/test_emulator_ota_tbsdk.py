"""The official SDK's firmware update over MQTT (tb-mqtt-client, run from .venv-tbsdk) from an OTA package the
emulator's config file assigns: the SDK downloads it, verifies the checksum and reports its states."""

from __future__ import annotations

import base64
import copy
import hashlib

import pytest

from emulator_fixtures import CONFIG, emulator_process
from host_tools.emulator import ota
from tbsdk import events

TOKEN = "preTokenValue0000001"  # device "pre-token"
IMAGE = bytes(range(256)) * 40 + b"tbfleet"


@pytest.mark.parametrize("protocol, algorithm, chunk_size", [
    ("5", "SHA256", 1000), ("5", "MURMUR3_128", 0), ("5", "CRC32", 4096),  # MQTT 5: the SDK's default
    ("3.1.1", "SHA256", 1000),
])
def test_sdk_updates_its_firmware_from_an_assigned_package(tb_sdk, protocol, algorithm, chunk_size):
    # The SDK drops leading zero bytes of 32-bit checksums (sdk_utils.verify_checksum): this image has none.
    assert not ota.checksum(algorithm, IMAGE).startswith("00") and not ota.checksum(algorithm, IMAGE).endswith("00")
    config = copy.deepcopy(CONFIG)
    config["otaPackages"] = [{"title": "sdk-fw", "version": "2.0", "type": "FIRMWARE", "profile": "check",
                              "base64": base64.b64encode(IMAGE).decode(), "checksumAlgorithm": algorithm}]
    config["devices"][0]["firmware"] = {"title": "sdk-fw", "version": "2.0"}
    with emulator_process(config) as emu:
        lines = tb_sdk.run("firmware_update.py", {"host": "127.0.0.1", "port": emu.ports["mqtt"], "token": TOKEN,
                                                  "protocol": protocol, "chunk_size": chunk_size})
        assert sorted(events(lines, "connected")[0]["subacks"]) == [[1]] * 4
        firmware = events(lines, "firmware")[0]
        assert (firmware["version"], firmware["size"]) == ("2.0", len(IMAGE))
        assert firmware["sha256"] == hashlib.sha256(IMAGE).hexdigest()
        assert events(lines, "done")
        # The script waited for the PUBACK of a marker it sent after its UPDATED report.
        reports = [e["values"] for e in emu.telemetry("pre-token") if "fw_state" in e["values"]]
        states = [values["fw_state"] for values in reports]
        assert states == ["QUEUED", "INITIATED", "IDLE", "DOWNLOADING", "DOWNLOADED", "VERIFIED", "UPDATED"]
        last = reports[-1]
        # "2.0" is stored as the number 2.0: telemetry strings that parse as numbers are cast (reference §6.1).
        assert (last["current_fw_title"], last["current_fw_version"]) == ("sdk-fw", 2.0)
