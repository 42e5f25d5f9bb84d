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
    assert call(emu, "POST", "/emulator/ota", {"title": "fw", "version": "4", "type": "FIRMWARE",
                                                "additionalInfo": "x"}) == \
        (400, {"error": "'additionalInfo' must be an object"})


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


def assigned(emu: Emulator, **fields: object) -> dict:
    info = create(emu, **fields)
    assert call(emu, "POST", "/emulator/devices/pre-token/ota", {"type": info["type"], "package": info["id"]})[0] == 200
    return info


def test_firmware_download_whole_and_in_chunks(emu: Emulator) -> None:
    assigned(emu, fileName="fw.bin", contentType="application/x-fw")
    status, headers, body = emu.request("GET", f"/api/v1/{TOKEN}/firmware?title=fw&version=1.0")
    assert (status, body) == (200, FOX)
    assert headers["content-type"] == "application/x-fw"
    assert headers["content-disposition"] == "attachment;filename=fw.bin" and headers["x-filename"] == "fw.bin"
    chunks = [emu.request("GET", f"/api/v1/{TOKEN}/firmware?title=fw&version=1.0&size=10&chunk={n}")[2]
              for n in range(6)]
    assert [len(c) for c in chunks] == [10, 10, 10, 10, 3, 0] and b"".join(chunks) == FOX


def test_software_download_and_its_refusals(emu: Emulator) -> None:
    assigned(emu, title="app", type="SOFTWARE")
    assert emu.request("GET", f"/api/v1/{TOKEN}/software?title=app&version=1.0&size=4&chunk=1")[::2] == (200, FOX[4:8])
    assert emu.request("GET", f"/api/v1/{TOKEN}/software?title=app&version=2.0")[::2] == (400, b"")
    assert emu.request("GET", f"/api/v1/{TOKEN}/software?title=other&version=1.0")[::2] == (400, b"")
    assert emu.request("GET", f"/api/v1/{TOKEN}/firmware?title=app&version=1.0")[::2] == (404, b"")
    assert emu.request("GET", "/api/v1/wrongToken/software?title=app&version=1.0")[::2] == (401, b"")
    assert emu.request("POST", f"/api/v1/{TOKEN}/software?title=app&version=1.0", b"{}")[0] == 405


@pytest.mark.parametrize("query, message", [
    ("version=1.0", "Required request parameter 'title' for method parameter type String is not present"),
    ("title=fw", "Required request parameter 'version' for method parameter type String is not present"),
    ("title=fw&version=1.0&size=big", "Failed to convert value of type 'java.lang.String' to required type 'int'; "
                                      'For input string: "big"'),
])
def test_bad_parameters_are_spring_400s_even_before_the_token_is_checked(emu: Emulator, query: str,
                                                                        message: str) -> None:
    for token in (TOKEN, "wrongToken"):
        status, _, body = emu.request("GET", f"/api/v1/{token}/firmware?{query}")
        error = json.loads(body)
        assert (status, error["status"], error["errorCode"], error["message"]) == (400, 400, 31, message)


def test_before_3_3_the_download_paths_do_not_exist() -> None:
    emu = Emulator(CONFIG, (3, 2, 2))
    try:
        status, _, body = emu.request("GET", f"/api/v1/{TOKEN}/firmware?title=fw&version=1.0")
        assert (status, json.loads(body)["errorCode"]) == (404, 32)
    finally:
        emu.close()
