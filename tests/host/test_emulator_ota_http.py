"""OTA over the emulator's HTTP side: the inspection API for packages and assignments, and the device API's
firmware/software download (reference §4.3), with the stdlib's http.client."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import pytest

from emulator_fixtures import CONFIG
from test_emulator_http import Emulator

FOX = b"The quick brown fox jumps over the lazy dog"
TOKEN = "preTokenValue0000001"


@pytest.fixture
def emu() -> Iterator[Emulator]:
    e = Emulator(CONFIG)
    try:
        yield e
    finally:
        e.close()


def call(emu: Emulator, method: str, path: str, body: object = None) -> tuple[int, object]:
    status, _, raw = emu.request(method, path, None if body is None else json.dumps(body))
    return status, json.loads(raw) if raw else None


def create(emu: Emulator, **fields: object) -> dict:
    body = {"title": "fw", "version": "1.0", "type": "FIRMWARE", "profile": "check", "text": FOX.decode(), **fields}
    status, info = call(emu, "POST", "/emulator/ota", body)
    assert status == 200, info
    return info


def test_inspection_creates_lists_gets_downloads_and_deletes_packages(emu: Emulator) -> None:
    info = create(emu, checksumAlgorithm="MURMUR3_128", fileName="fw.bin", contentType="application/x-fw",
                  tag="t")
    assert info["checksum"] == "6c1b07bc7bbc4be347939ac4a93c437a" and info["dataSize"] == len(FOX)
    assert (info["hasData"], info["fileName"], info["tag"]) == (True, "fw.bin", "t")
    assert call(emu, "GET", "/emulator/ota") == (200, [info])
    assert call(emu, "GET", f"/emulator/ota/{info['id']}") == (200, info)
    status, headers, data = emu.request("GET", f"/emulator/ota/{info['id']}/data")
    assert (status, headers["content-type"], data) == (200, "application/x-fw", FOX)
    assert call(emu, "DELETE", f"/emulator/ota/{info['id']}") == (200, None)
    assert call(emu, "GET", f"/emulator/ota/{info['id']}")[0] == 404


def test_inspection_refusals_carry_thingsboards_messages(emu: Emulator) -> None:
    create(emu)
    assert call(emu, "POST", "/emulator/ota", {"title": "fw", "version": "1.0", "type": "FIRMWARE",
                                                "profile": "check"}) == \
        (400, {"error": "OtaPackage with such title and version already exists!"})
    assert call(emu, "POST", "/emulator/ota", {"title": "fw", "version": "2", "type": "FIRMWARE", "profile": "check",
                                                "base64": base64.b64encode(FOX).decode(), "checksum": "0"}) == \
        (400, {"error": "Wrong otaPackage file!"})
    assert call(emu, "GET", "/emulator/ota")[1][0]["version"] == "1.0"  # the refused upload left no package behind
    assert call(emu, "POST", "/emulator/ota", {"title": "fw", "version": "3", "type": "FIRMWARE",
                                                "base64": "not base64!"})[0] == 400
    assert call(emu, "POST", "/emulator/ota", [])[0] == 400


def test_inspection_assigns_to_devices_and_profiles(emu: Emulator) -> None:
    own, shared = create(emu, version="1"), create(emu, version="2")
    assert call(emu, "POST", "/emulator/devices/pre-token/ota", {"type": "FIRMWARE", "package": own["id"]}) == \
        (200, None)
    assert call(emu, "POST", "/emulator/profiles/check/ota", {"type": "FIRMWARE", "package": shared["id"]}) == \
        (200, None)
    status, info = call(emu, "GET", "/emulator/devices/pre-token/ota")
    assert info["FIRMWARE"]["device"] == own["id"] and info["FIRMWARE"]["profile"] == shared["id"]
    assert info["FIRMWARE"]["target"]["version"] == "1" and info["SOFTWARE"]["target"] is None
    assert call(emu, "GET", "/emulator/profiles/check/ota") == (200, {"FIRMWARE": shared["id"], "SOFTWARE": None})
    assert emu.inspect("/pre-basic/attributes")["shared"]["fw_version"] == "2"
    assert call(emu, "POST", "/emulator/devices/pre-token/ota", {"type": "FIRMWARE", "package": None}) == (200, None)
    assert emu.inspect("/pre-token/attributes")["shared"]["fw_version"] == "2"
    assert call(emu, "POST", "/emulator/devices/pre-token/ota", {"type": "SOFTWARE", "package": own["id"]}) == \
        (400, {"error": "Can't assign software with type: FIRMWARE"})
    assert call(emu, "POST", "/emulator/profiles/nothing/ota", {"type": "FIRMWARE", "package": None})[0] == 404
    assert call(emu, "POST", "/emulator/devices/pre-token/ota", {"type": "BOTH"})[0] == 400
