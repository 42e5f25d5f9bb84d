"""The emulator's REST API against the official Python REST client (`tb-rest-client`) and plain HTTP.

One emulator process serves the module; each test makes its own profiles and devices with unique names. The device
side is driven with real clients too: the HTTP device API (urllib) and paho-mqtt for RPC and attribute pushes.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from tb_rest_client.models import AllowCreateNewDevicesDeviceProfileProvisionConfiguration, \
    DefaultDeviceProfileConfiguration, DefaultDeviceProfileTransportConfiguration, Device, DeviceProfile, \
    DeviceProfileData, SaveOtaPackageInfoRequest
from tb_rest_client.rest import ApiException
from tb_rest_client.rest_client import RestClient

from emulator_fixtures import Paho, emulator_process
from support import ROOT
from host_tools.emulator.process import EmulatorProcess

USER, PASSWORD = "tenant@example.com", "tenant-password"
CONFIG: dict = {
    "users": [{"email": USER, "password": PASSWORD, "firstName": "Ten", "lastName": "Ant"}],
    "profiles": [{"name": "pre", "provisionDeviceKey": "pre-key", "provisionDeviceSecret": "pre-secret",
                  "provisionType": "CHECK_PRE_PROVISIONED_DEVICES"}],
    "devices": [{"name": "pre-token", "profile": "pre", "credentialsType": "ACCESS_TOKEN",
                 "credentialsValue": "preTokenValue0000001"}],
}
UNKNOWN = "13814000-1dd2-11b2-8080-808080808081"
VERSION = "4.3.1.3"
"""The newest 4.x the notes describe; client 4.4 reads a device by name with /api/tenant/device (4.3.1.2+)."""


@pytest.fixture(scope="module")
def emu() -> Iterator[EmulatorProcess]:
    with emulator_process(CONFIG, "--server-version", VERSION) as e:
        yield e


@pytest.fixture
def client(emu: EmulatorProcess) -> RestClient:
    rest = RestClient(f"http://127.0.0.1:{emu.ports['http']}")
    rest.login(USER, PASSWORD)
    return rest


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def call(emu: EmulatorProcess, method: str, path: str, body: Any = None, token: str | None = None,
         headers: dict[str, str] | None = None, timeout: float = 10) -> tuple[int, str, bytes]:
    """One plain HTTP request: (status, content type, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", emu.ports["http"], timeout=timeout)
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    if token:
        all_headers["X-Authorization"] = "Bearer " + token
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    try:
        conn.request(method, path, body=data, headers=all_headers)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type") or "", resp.read()
    finally:
        conn.close()


def login(emu: EmulatorProcess) -> dict:
    status, _, body = call(emu, "POST", "/api/auth/login", {"username": USER, "password": PASSWORD})
    assert status == 200, body
    return json.loads(body)


def error(body: bytes) -> dict:
    """A ThingsBoard error JSON without its timestamp, after checking that the timestamp is there."""
    answer = json.loads(body)
    assert list(answer) == ["status", "message", "errorCode", "timestamp"]
    assert isinstance(answer.pop("timestamp"), int)
    return answer


def provisioning_profile(name: str, key: str, secret: str) -> DeviceProfile:
    provision = AllowCreateNewDevicesDeviceProfileProvisionConfiguration(provision_device_secret=secret,
                                                                         type="ALLOW_CREATE_NEW_DEVICES")
    data = DeviceProfileData(configuration=DefaultDeviceProfileConfiguration(type="DEFAULT"),
                             transport_configuration=DefaultDeviceProfileTransportConfiguration(type="DEFAULT"),
                             provision_configuration=provision)
    return DeviceProfile(name=name, type="DEFAULT", transport_type="DEFAULT",
                         provision_type="ALLOW_CREATE_NEW_DEVICES", provision_device_key=key, profile_data=data)


def device_api(emu: EmulatorProcess, path: str, body: Any) -> tuple[int, bytes]:
    status, _, answer = call(emu, "POST", "/api/v1/" + path, body)
    return status, answer


# --- the official REST client --------------------------------------------------------------------------------------

def test_client_creates_a_provisioning_profile_that_devices_then_provision_with(emu: EmulatorProcess,
                                                                                client: RestClient) -> None:
    name, key = unique("fleet"), unique("key")
    saved = client.save_device_profile(provisioning_profile(name, key, "fleet-secret"))
    assert saved.id.entity_type == "DEVICE_PROFILE" and uuid.UUID(saved.id.id)
    assert saved.provision_device_key == key and saved.provision_type == "ALLOW_CREATE_NEW_DEVICES"
    assert saved.profile_data.provision_configuration.provision_device_secret == "fleet-secret"
    assert client.get_device_profile_by_id(saved.id).name == name
    assert name in [p.name for p in client.get_device_profiles(100, 0).data]

    status, answer = device_api(emu, "provision", {"deviceName": unique("board"), "provisionDeviceKey": key,
                                                   "provisionDeviceSecret": "fleet-secret"})
    assert status == 200 and json.loads(answer)["status"] == "SUCCESS"
    status, answer = device_api(emu, "provision", {"deviceName": unique("board"), "provisionDeviceKey": key,
                                                   "provisionDeviceSecret": "wrong"})
    assert json.loads(answer)["status"] == "NOT_FOUND"


def test_client_refreshes_its_token(client: RestClient) -> None:
    first = client.get_token()
    client.refresh()
    assert client.get_token() != first and client.get_device_profiles(1, 0).total_elements >= 1


def test_client_lists_a_profiles_devices_with_paging(emu: EmulatorProcess, client: RestClient) -> None:
    profile = client.save_device_profile(provisioning_profile(unique("paged"), unique("key"), "s"))
    names = sorted(unique(f"dev{i}") for i in range(5))
    for name in names:
        client.save_device(Device(name=name, device_profile_id=profile.id))
    client.save_device(Device(name=unique("elsewhere"), type="pre"))
    first = client.get_tenant_devices(2, 0, type=profile.name, sort_property="name", sort_order="ASC")
    assert [d.name for d in first.data] == names[:2]
    assert (first.total_elements, first.total_pages, first.has_next) == (5, 3, True)
    last = client.get_tenant_devices(2, 2, type=profile.name, sort_property="name", sort_order="ASC")
    assert [d.name for d in last.data] == names[4:] and not last.has_next
    found = client.get_tenant_devices(10, 0, type=profile.name, text_search=names[3][-8:].upper())
    assert [d.name for d in found.data] == [names[3]]
    assert all(d.device_profile_id.id == profile.id.id for d in first.data)


def test_client_saves_reads_and_deletes_a_device_with_its_credentials(emu: EmulatorProcess,
                                                                       client: RestClient) -> None:
    name, token = unique("saved"), unique("token")
    device = client.save_device(Device(name=name, type="pre", label="kitchen"), access_token=token)
    assert device.id.entity_type == "DEVICE" and device.type == "pre" and device.label == "kitchen"
    credentials = client.get_device_credentials_by_device_id(device.id)
    assert credentials.credentials_type == "ACCESS_TOKEN" and credentials.credentials_id == token
    assert device_api(emu, f"{token}/telemetry", {"t": 1})[0] == 200
    assert client.get_tenant_device(name).id.id == device.id.id

    device.label = "hall"
    updated = client.save_device(device)
    assert updated.label == "hall" and updated.version == device.version + 1
    client.delete_device(device.id)
    with pytest.raises(ApiException) as e:
        client.get_device_by_id(device.id)
    assert e.value.status == 404
    assert device_api(emu, f"{token}/telemetry", {"t": 1})[0] == 401


def test_client_reads_latest_telemetry_as_strings_and_attributes_natively(emu: EmulatorProcess,
                                                                           client: RestClient) -> None:
    token = unique("tok")
    device = client.save_device(Device(name=unique("sensor")), access_token=token)
    device_api(emu, f"{token}/telemetry", {"ts": 1000, "values": {"temp": 20.5, "on": True}})
    device_api(emu, f"{token}/telemetry", {"ts": 2000, "values": {"temp": 21.5, "big": 12345678.9}})
    device_api(emu, f"{token}/telemetry", {"ts": 1500, "values": {"temp": 99, "obj": {"a": [1]}}})
    latest = {key: [(p.ts, p.value) for p in points]
              for key, points in client.get_latest_timeseries(device.id).items()}
    assert latest == {"big": [(2000, "1.23456789E7")], "obj": [(1500, '{"a":[1]}')], "on": [(1000, "true")],
                      "temp": [(2000, "21.5")]}
    strict = client.get_latest_timeseries(device.id, keys="temp,none", use_strict_data_types=True)
    assert (strict["temp"][0].ts, strict["temp"][0].value) == (2000, 21.5) and strict["none"][0].value is None

    device_api(emu, f"{token}/attributes", {"fw": "1.0", "n": 3})
    client.save_device_attributes(device.id, "SERVER_SCOPE", {"zone": "b"})
    client_scope = client.get_attributes_by_scope(device.id, "CLIENT_SCOPE", keys="n,missing")
    assert [(a.key, a.value) for a in client_scope] == [("n", 3)]
    assert isinstance(client_scope[0].last_update_ts, int)
    assert [a.key for a in client.get_attributes_by_scope(device.id, "SERVER_SCOPE")] == ["zone"]


def test_client_reads_a_telemetry_range(emu: EmulatorProcess, client: RestClient) -> None:
    token = unique("tok")
    device = client.save_device(Device(name=unique("history")), access_token=token)
    device_api(emu, f"{token}/telemetry", [{"ts": ts, "values": {"t": ts / 1000, "other": 1}}
                                           for ts in (1000, 2000, 3000)])
    device_api(emu, f"{token}/telemetry", {"ts": 2000, "values": {"t": 2.5}})  # same key and ts: replaces

    def points(**options: Any) -> dict:
        answer = client.get_timeseries(device.id, 1000, 3000, **options)
        return {key: [(p.ts, p.value) for p in values] for key, values in answer.items()}

    assert points(keys="t") == {"t": [(2000, "2.5"), (1000, "1.0")]}  # [startTs, endTs), newest first
    assert points(keys="t,none", order_by="ASC", limit=1, use_strict_data_types=True) == {"t": [(1000, 1.0)]}
    assert set(points()) == {"t", "other"}
    token_header = login(emu)["token"]
    path = f"/api/plugins/telemetry/DEVICE/{device.id.id}/values/timeseries?keys=other&startTs=0&endTs=2001"
    status, _, body = call(emu, "GET", path, token=token_header)
    assert (status, json.loads(body)) == (200, {"other": [{"ts": 2000, "value": "1"}, {"ts": 1000, "value": "1"}]})
    status, _, body = call(emu, "GET", path + "&agg=AVG", token=token_header)
    assert (status, error(body)["message"]) == (400, "Aggregation AVG is not emulated; only NONE")


def test_client_shared_attribute_write_and_delete_are_pushed_to_the_connected_device(emu: EmulatorProcess,
                                                                          client: RestClient) -> None:
    token = unique("tok")
    device = client.save_device(Device(name=unique("pushed")), access_token=token)
    with Paho(emu.ports["mqtt"], username=token) as paho:
        assert paho.rc == 0 and paho.subscribe("v1/devices/me/attributes") == [1]
        client.save_device_attributes(device.id, "SHARED_SCOPE", {"interval": 30})
        message = paho.message()
        assert message.topic == "v1/devices/me/attributes" and json.loads(message.payload) == {"interval": 30}
        assert client.get_attributes_by_scope(device.id, "SHARED_SCOPE")[0].value == 30
        client.delete_device_attributes(device.id, "SHARED_SCOPE", keys="interval")
        assert json.loads(paho.message().payload) == {"deleted": ["interval"]}
    assert client.get_attributes_by_scope(device.id, "SHARED_SCOPE") == []
    status, ctype, body = call(emu, "DELETE", f"/api/plugins/telemetry/DEVICE/{device.id.id}/SERVER_SCOPE",
                               token=login(emu)["token"])
    assert (status, body) == (400, b"Empty keys: []") and ctype.startswith("text/plain")


def test_client_two_way_rpc_gets_the_reply_of_a_device_on_paho(emu: EmulatorProcess, client: RestClient) -> None:
    token = unique("tok")
    device = client.save_device(Device(name=unique("rpc")), access_token=token)
    with Paho(emu.ports["mqtt"], username=token) as paho:
        assert paho.subscribe("v1/devices/me/rpc/request/+") == [1]

        def answer() -> None:
            request = paho.message(timeout=10)
            call_ = json.loads(request.payload)
            paho.publish(request.topic.replace("request", "response"),
                         json.dumps({"echo": call_["params"]["x"], "method": call_["method"]}))

        responder = threading.Thread(target=answer)
        responder.start()
        reply = client.handle_two_way_device_rpc_request(device.id, {"method": "echo", "params": {"x": 7},
                                                                      "timeout": 10000})
        responder.join(10)
    assert reply == {"echo": 7, "method": "echo"}


def test_client_creates_uploads_lists_downloads_and_assigns_an_ota_package(emu: EmulatorProcess,
                                                                           client: RestClient, tmp_path) -> None:
    profile = client.save_device_profile(provisioning_profile(unique("ota"), unique("key"), "s"))
    token = unique("tok")
    device = client.save_device(Device(name=unique("fw"), device_profile_id=profile.id), access_token=token)
    firmware = bytes(range(256)) * 41
    path = tmp_path / "app-1.1.0.bin"
    path.write_bytes(firmware)
    title = unique("app")
    info = client.save_ota_package_info(SaveOtaPackageInfoRequest(
        title=title, version="1.1.0", type="FIRMWARE", device_profile_id=profile.id, uses_url=False, tag="app 1.1.0"))
    assert info.id.entity_type == "OTA_PACKAGE" and not info.has_data and info.device_profile_id.id == profile.id.id
    sha256 = hashlib.sha256(firmware).hexdigest()
    uploaded = client.save_ota_package_data(info.id, "SHA256", str(path), checksum=sha256)
    assert (uploaded.has_data, uploaded.checksum, uploaded.data_size) == (True, sha256, len(firmware))
    assert (uploaded.file_name, uploaded.content_type) == ("app-1.1.0.bin", "application/octet-stream")
    assert info.id.id in [p.id.id for p in client.get_ota_packages(100, 0).data]
    assert [p.id.id for p in client.get_ota_packages_v1(profile.id, "FIRMWARE", 10, 0).data] == [info.id.id]
    assert client.download_ota_package(info.id) == firmware

    with Paho(emu.ports["mqtt"], username=token) as paho:
        assert paho.subscribe("v1/devices/me/attributes") == [1]
        device.firmware_id = info.id
        assert client.save_device(device).firmware_id.id == info.id.id
        pushed: dict = {}
        while "fw_checksum" not in pushed:
            pushed.update(json.loads(paho.message().payload))
    assert pushed["fw_title"] == title and pushed["fw_version"] == "1.1.0" and pushed["fw_checksum"] == sha256
    assert pushed["fw_size"] == len(firmware) and pushed["fw_checksum_algorithm"] == "SHA256"
    assert client.get_latest_timeseries(device.id, keys="fw_state")["fw_state"][0].value == "INITIATED"
    with pytest.raises(ApiException) as e:
        client.delete_ota_package(info.id)
    assert e.value.status == 400 and b"The otaPackage referenced by the devices cannot be deleted!" in e.value.body


def test_a_profile_package_reaches_its_devices_and_checksums_are_checked(emu: EmulatorProcess, client: RestClient,
                                                                         tmp_path) -> None:
    profile = client.save_device_profile(provisioning_profile(unique("otap"), unique("key"), "s"))
    device = client.save_device(Device(name=unique("follower"), device_profile_id=profile.id))
    path = tmp_path / "sw.bin"
    path.write_bytes(b"software image")
    info = client.save_ota_package_info(SaveOtaPackageInfoRequest(
        title=unique("sw"), version="2", type="SOFTWARE", device_profile_id=profile.id, uses_url=False))
    for algorithm, checksum in (("SHA256", hashlib.sha256(b"other").hexdigest()),
                                ("SHA256", hashlib.sha256(b"software image").hexdigest().upper())):
        with pytest.raises(ApiException) as e:
            client.save_ota_package_data(info.id, algorithm, str(path), checksum=checksum)
        assert e.value.status == 400 and json.loads(e.value.body)["message"] == "Wrong otaPackage file!"
    crc = client.save_ota_package_data(info.id, "CRC32", str(path))
    assert crc.checksum_algorithm == "CRC32" and len(crc.checksum) == 8

    profile.software_id = info.id
    assert client.save_device_profile(profile).software_id.id == info.id.id
    shared = {a.key: a.value for a in client.get_attributes_by_scope(device.id, "SHARED_SCOPE")}
    assert shared["sw_title"] == info.title and shared["sw_checksum"] == crc.checksum
    assert client.get_device_by_id(device.id).software_id is None  # the device follows its profile's package


# --- plain HTTP: error bodies, tokens, ids --------------------------------------------------------------------------

@pytest.mark.parametrize("body, message", [
    ({"username": USER, "password": "wrong"}, "Invalid username or password"),
    ({"username": "nobody@example.com", "password": PASSWORD}, "Invalid username or password"),
    ({"username": USER, "password": ""}, "Authentication failed"),
    (b"not json", "Authentication failed"),
    (b"[" * 100000, "Authentication failed"),
])
def test_bad_login_is_401_error_code_10(emu: EmulatorProcess, body: Any, message: str) -> None:
    status, ctype, answer = call(emu, "POST", "/api/auth/login", body)
    assert (status, ctype) == (401, "application/json")
    assert error(answer) == {"status": 401, "message": message, "errorCode": 10}


def test_login_returns_a_jwt_pair_and_the_user_behind_it(emu: EmulatorProcess) -> None:
    pair = login(emu)
    assert list(pair) == ["token", "refreshToken"]
    status, _, body = call(emu, "GET", "/api/auth/user", token=pair["token"])
    user = json.loads(body)
    assert status == 200 and user["email"] == USER and user["authority"] == "TENANT_ADMIN"
    assert user["firstName"] == "Ten"


@pytest.mark.parametrize("headers, status, message, code", [
    ({}, 401, "Authentication failed", 10),
    ({"X-Authorization": "Bearer not.a.jwt"}, 401, "Invalid username or password", 10),
    ({"X-Authorization": "Bearer eyJhbGciOiJIUzUxMiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"}, 401, "Token has expired", 11),
])
def test_missing_or_bad_token_is_401(emu: EmulatorProcess, headers: dict, status: int, message: str,
                                     code: int) -> None:
    answer = call(emu, "GET", "/api/tenant/devices?pageSize=10&page=0", headers=headers)
    assert answer[0] == status and error(answer[2]) == {"status": status, "message": message, "errorCode": code}


def test_authorization_header_is_a_fallback_and_the_refresh_token_is_no_access_token(emu: EmulatorProcess) -> None:
    pair = login(emu)
    bearer = {"Authorization": "Bearer " + pair["token"]}
    assert call(emu, "GET", "/api/tenant/devices?pageSize=1&page=0", headers=bearer)[0] == 200
    status, _, body = call(emu, "GET", "/api/tenant/devices?pageSize=1&page=0", token=pair["refreshToken"])
    assert status == 403 and error(body)["errorCode"] == 20


def test_refresh_gives_a_new_working_pair_and_refuses_an_access_token(emu: EmulatorProcess) -> None:
    pair = login(emu)
    status, _, body = call(emu, "POST", "/api/auth/token", {"refreshToken": pair["refreshToken"]})
    fresh = json.loads(body)
    assert status == 200 and fresh["token"] != pair["token"]
    assert call(emu, "GET", "/api/deviceProfiles?pageSize=1&page=0", token=fresh["token"])[0] == 200
    status, _, body = call(emu, "POST", "/api/auth/token", {"refreshToken": pair["token"]})
    assert status == 401 and error(body)["errorCode"] == 10


def test_an_expired_token_is_401_error_code_11() -> None:
    config = {**CONFIG, "jwt": {"tokenExpirationTime": 1, "refreshTokenExpTime": 1}}
    with emulator_process(config, "--server-version", VERSION) as emu:
        pair = login(emu)
        time.sleep(2.1)  # the lifetime is whole seconds; past it the token is expired whatever the load
        for path, body in (("/api/tenant/devices?pageSize=1&page=0", None),):
            status, _, answer = call(emu, "GET", path, body, token=pair["token"])
            assert status == 401
            assert error(answer) == {"status": 401, "message": "Token has expired", "errorCode": 11}
        status, _, answer = call(emu, "POST", "/api/auth/token", {"refreshToken": pair["refreshToken"]})
        assert status == 401 and error(answer)["errorCode"] == 11


def test_the_demo_config_has_thingsboards_demo_tenant() -> None:
    with emulator_process(ROOT / "host_tools" / "emulator" / "demo.json") as emu:
        status, _, body = call(emu, "POST", "/api/auth/login", {"username": "tenant@thingsboard.org",
                                                                "password": "tenant"})
        assert status == 200
        devices = json.loads(call(emu, "GET", "/api/tenant/devices?pageSize=10&page=0",
                                  token=json.loads(body)["token"])[2])
        assert [d["name"] for d in devices["data"]] == ["demo-device-1"]


def test_unknown_and_malformed_ids(emu: EmulatorProcess) -> None:
    token = login(emu)["token"]
    status, _, body = call(emu, "GET", f"/api/device/{UNKNOWN}", token=token)
    assert (status, error(body)) == (404, {"status": 404, "message": f"Device with id [{UNKNOWN}] is not found",
                                           "errorCode": 32})
    status, _, body = call(emu, "GET", f"/api/deviceProfile/{UNKNOWN}", token=token)
    assert error(body)["message"] == f"Device profile with id [{UNKNOWN}] is not found"
    status, _, body = call(emu, "GET", "/api/device/nope", token=token)
    assert (status, error(body)["message"]) == (400, "Invalid UUID string: nope")
    for method, path in (("GET", f"/api/plugins/telemetry/DEVICE/{UNKNOWN}/values/timeseries"),
                         ("POST", f"/api/plugins/telemetry/DEVICE/{UNKNOWN}/SHARED_SCOPE"),
                         ("POST", f"/api/plugins/rpc/twoway/{UNKNOWN}")):
        status, ctype, body = call(emu, method, path, {"method": "m", "a": 1}, token=token)
        assert (status, body) == (404, b"Device with requested id wasn't found!")
        assert ctype.startswith("text/plain")


def test_save_errors_are_400_with_thingsboards_messages(emu: EmulatorProcess, client: RestClient) -> None:
    token = login(emu)["token"]
    name = unique("dup")
    assert call(emu, "POST", "/api/device", {"name": name}, token=token)[0] == 200
    cases = [("/api/device", {"name": name}, "Device with such name already exists!"),
             ("/api/device", {"label": "x"}, "Device name should be specified!"),
             ("/api/device", {"name": unique("d"), "deviceProfileId": {"entityType": "DEVICE_PROFILE",
                                                                       "id": UNKNOWN}},
              "Device is referencing non existing device profile!"),
             ("/api/deviceProfile", {"name": "pre", "type": "DEFAULT", "transportType": "DEFAULT"},
              "Device profile with such name already exists!"),
             ("/api/deviceProfile", {"name": unique("p"), "type": "DEFAULT", "transportType": "DEFAULT",
                                     "provisionDeviceKey": "pre-key"},
              "Device profile with such provision device key already exists!"),
             ("/api/deviceProfile", {"name": unique("p"), "transportType": "DEFAULT"},
              "Device profile type should be specified!"),
             ("/api/deviceProfile", {"name": unique("p"), "type": "DEFAULT", "transportType": "DEFAULT",
                                     "default": True},
              "Another default device profile is present in scope of current tenant!"),
             ("/api/device", b"{broken", "Invalid request body"),
             ("/api/deviceProfile", b'{"a":' * 50000, "Invalid request body")]
    for path, body, message in cases:
        status, _, answer = call(emu, "POST", path, body, token=token)
        assert (status, error(answer)) == (400, {"status": 400, "message": message, "errorCode": 31}), path


def test_provisioning_follows_the_top_level_provision_type(emu: EmulatorProcess) -> None:
    token = login(emu)["token"]
    key = unique("key")
    body = {"name": unique("half"), "type": "DEFAULT", "transportType": "DEFAULT", "provisionDeviceKey": key,
            "profileData": {"provisionConfiguration": {"type": "ALLOW_CREATE_NEW_DEVICES",
                                                       "provisionDeviceSecret": "s"}}}
    status, _, answer = call(emu, "POST", "/api/deviceProfile", body, token=token)
    profile = json.loads(answer)
    assert status == 200 and profile["provisionType"] == "DISABLED"
    assert profile["profileData"]["provisionConfiguration"] == {"type": "ALLOW_CREATE_NEW_DEVICES",
                                                                "provisionDeviceSecret": "s"}
    request = {"deviceName": unique("b"), "provisionDeviceKey": key, "provisionDeviceSecret": "s"}
    assert json.loads(device_api(emu, "provision", request)[1])["status"] == "NOT_FOUND"
    status, _, _ = call(emu, "POST", "/api/deviceProfile", {**profile, "provisionType": "ALLOW_CREATE_NEW_DEVICES"},
                        token=token)
    assert status == 200 and json.loads(device_api(emu, "provision", request)[1])["status"] == "SUCCESS"


def test_deleting_profiles(emu: EmulatorProcess, client: RestClient) -> None:
    token = login(emu)["token"]
    default = next(p for p in client.get_device_profiles(100, 0).data if p.default)
    used = client.save_device_profile(provisioning_profile(unique("used"), unique("key"), "s"))
    client.save_device(Device(name=unique("user"), device_profile_id=used.id))
    for profile, message in ((default, "Deletion of Default Device Profile is prohibited!"),
                             (used, "The device profile referenced by the devices cannot be deleted!")):
        status, _, body = call(emu, "DELETE", f"/api/deviceProfile/{profile.id.id}", token=token)
        assert (status, error(body)["message"]) == (400, message)
    unused = client.save_device_profile(provisioning_profile(unique("unused"), unique("key"), "s"))
    client.delete_device_profile(unused.id)
    assert call(emu, "GET", f"/api/deviceProfile/{unused.id.id}", token=token)[0] == 404


def test_a_stale_version_is_409(emu: EmulatorProcess) -> None:
    token = login(emu)["token"]
    _, _, body = call(emu, "POST", "/api/device", {"name": unique("locked")}, token=token)
    device = json.loads(body)
    assert call(emu, "POST", "/api/device", {**device, "label": "a"}, token=token)[0] == 200
    status, _, answer = call(emu, "POST", "/api/device", {**device, "label": "b"}, token=token)
    assert (status, error(answer)) == (409, {"status": 409, "message": "Device was already changed by someone else",
                                             "errorCode": 35})


def test_sorting_puts_missing_values_last_ascending_and_first_descending(emu: EmulatorProcess) -> None:
    token = login(emu)["token"]
    profile = unique("sorted")
    for name, label in (("a", "x2"), ("b", None), ("c", "x1")):
        call(emu, "POST", "/api/device", {"name": f"{profile}-{name}", "type": profile, "label": label}, token=token)
    for order, expected in (("ASC", ["c", "a", "b"]), ("DESC", ["b", "a", "c"])):
        _, _, body = call(emu, "GET", f"/api/tenant/devices?pageSize=10&page=0&type={profile}&sortProperty=label"
                                      f"&sortOrder={order}", token=token)
        assert [d["name"][-1] for d in json.loads(body)["data"]] == expected


def test_paging_parameters_are_checked(emu: EmulatorProcess) -> None:
    token = login(emu)["token"]
    for query, message in (("page=0", "Required request parameter 'pageSize' for method parameter type int is "
                                      "not present"),
                           ("pageSize=0&page=0", "Incorrect page link page size '0'. Page size must be greater "
                                                 "than zero."),
                           ("pageSize=1_0&page=0", "Failed to convert value of type 'java.lang.String' to required "
                                                   "type 'int'; For input string: \"1_0\""),
                           ("pageSize=10&page=2147483648", "Failed to convert value of type 'java.lang.String' to "
                                                           "required type 'int'; For input string: \"2147483648\""),
                           ("pageSize=1&page=0&sortOrder=UP", "Unsupported sort order 'UP'! Only 'ASC' or 'DESC' "
                                                              "types are allowed.")):
        status, _, body = call(emu, "GET", "/api/tenant/devices?" + query, token=token)
        assert (status, error(body)["message"]) == (400, message)


@pytest.mark.parametrize("scope, body, message", [
    ("CLIENT_SCOPE", {"a": 1}, b"Invalid scope: CLIENT_SCOPE"),
    ("SHARED_SCOPE", b"{oops", b"Invalid JSON"),
    ("SHARED_SCOPE", [1], b"Request is not a JSON object"),
    ("SHARED_SCOPE", {}, b"No attributes data found in request body!"),
    ("SERVER_SCOPE", {" ": 1}, b"Key cannot be blank"),
])
def test_attribute_write_errors_are_plain_text_400(emu: EmulatorProcess, scope: str, body: Any,
                                                   message: bytes) -> None:
    token = login(emu)["token"]
    device = json.loads(call(emu, "POST", "/api/device", {"name": unique("attr")}, token=token)[2])
    status, ctype, answer = call(emu, "POST", f"/api/plugins/telemetry/DEVICE/{device['id']['id']}/attributes/"
                                 f"{scope}", body, token=token)
    assert (status, answer) == (400, message) and ctype.startswith("text/plain")


def test_rpc_expiry_is_409_without_a_subscription_and_408_without_a_reply_on_v1_504_on_v2(
        emu: EmulatorProcess) -> None:
    token = login(emu)["token"]
    device_token = unique("tok")
    device = json.loads(call(emu, "POST", f"/api/device?accessToken={device_token}", {"name": unique("quiet")},
                             token=token)[2])
    path = f"/plugins/rpc/twoway/{device['id']['id']}"

    def rpc(prefix: str) -> int:
        # expirationTime overrides the 5 s minimum timeout, so that the test need not wait that long.
        body = {"method": "noop", "params": {}, "expirationTime": int(time.time() * 1000) + 300}
        return call(emu, "POST", prefix + path, body, token=token)[0]

    assert rpc("/api") == 409
    with Paho(emu.ports["mqtt"], username=device_token) as paho:
        assert paho.subscribe("v1/devices/me/rpc/request/+") == [1]
        assert rpc("/api") == 408
        assert call(emu, "POST", f"/api/rpc/twoway/{device['id']['id']}",
                    {"method": "noop", "expirationTime": int(time.time() * 1000) + 300}, token=token)[0] == 504
        status, _, _ = call(emu, "POST", f"/api/plugins/rpc/oneway/{device['id']['id']}",
                            {"method": "blink", "params": {}}, token=token)
        assert status == 200
        assert [json.loads(paho.message().payload)["method"] for _ in range(3)] == ["noop", "noop", "blink"]


def test_ota_errors(emu: EmulatorProcess) -> None:
    token = login(emu)["token"]
    status, _, body = call(emu, "POST", "/api/otaPackage", {"title": "t", "version": "1"}, token=token)
    assert (status, error(body)["message"]) == (400, "Type should be specified!")
    status, _, body = call(emu, "POST", "/api/otaPackage", {"title": "t", "version": "1", "type": "FIRMWARE",
                                                             "usesUrl": True}, token=token)
    assert (status, error(body)["message"]) == (400, "Ota package URL should be specified!")
    _, _, body = call(emu, "POST", "/api/otaPackage", {"title": unique("url"), "version": "1", "type": "FIRMWARE",
                                                        "usesUrl": True, "url": "http://example.invalid/fw.bin"},
                      token=token)
    url_package = json.loads(body)
    assert url_package["url"] == "http://example.invalid/fw.bin" and not url_package["hasData"]
    status, _, body = call(emu, "GET", f"/api/otaPackage/{url_package['id']['id']}/download", token=token)
    assert (status, body) == (400, b"")
    status, _, body = call(emu, "POST", f"/api/otaPackage/{url_package['id']['id']}?checksumAlgorithm=MD5",
                           b"not multipart", token=token)
    assert (status, error(body)["message"]) == (400, "Current request is not a multipart request")
    status, _, body = call(emu, "GET", f"/api/otaPackage/info/{UNKNOWN}", token=token)
    assert (status, error(body)["message"]) == (404, f"Ota package with id [{UNKNOWN}] is not found")
    _, _, body = call(emu, "POST", "/api/device", {"name": unique("d"), "firmwareId": {
        "entityType": "OTA_PACKAGE", "id": url_package["id"]["id"]}}, token=token)
    assert error(body)["message"] == "Can't assign firmware with different deviceProfile!"


def test_a_device_takes_a_package_only_with_the_packages_profile_id(emu: EmulatorProcess,
                                                                     client: RestClient) -> None:
    profile = client.save_device_profile(provisioning_profile(unique("otaid"), unique("key"), "s"))
    package = client.save_ota_package_info(SaveOtaPackageInfoRequest(
        title=unique("fw"), version="1", type="FIRMWARE", device_profile_id=profile.id, uses_url=True,
        url="http://example.invalid/fw.bin"))
    token = login(emu)["token"]
    firmware = {"entityType": "OTA_PACKAGE", "id": package.id.id}
    status, _, body = call(emu, "POST", "/api/device", {"name": unique("d"), "type": profile.name,
                                                        "firmwareId": firmware}, token=token)
    assert (status, error(body)["message"]) == (400, "Can't assign firmware with different deviceProfile!")
    status, _, body = call(emu, "POST", "/api/device", {"name": unique("d"), "firmwareId": firmware,
                                                        "deviceProfileId": {"entityType": "DEVICE_PROFILE",
                                                                            "id": profile.id.id}}, token=token)
    assert status == 200 and json.loads(body)["firmwareId"]["id"] == package.id.id


def test_an_rpc_waits_for_the_devices_subscription_until_it_expires(emu: EmulatorProcess) -> None:
    token = login(emu)["token"]
    device_token = unique("tok")
    device = json.loads(call(emu, "POST", f"/api/device?accessToken={device_token}", {"name": unique("late")},
                             token=token)[2])
    answers: dict[str, tuple[int, bytes]] = {}

    def rest_call(kind: str, method: str) -> None:
        body = {"method": method, "params": {"n": 1}, "expirationTime": int(time.time() * 1000) + 20000}
        status, _, answer = call(emu, "POST", f"/api/plugins/rpc/{kind}/{device['id']['id']}", body, token=token,
                                 timeout=30)
        answers[method] = (status, answer)

    def waiting(method: str) -> str:
        return f"{method!r} sent to {device['name']!r} (no RPC subscription)"

    callers = {method: threading.Thread(target=rest_call, args=(kind, method))
               for kind, method in (("twoway", "late"), ("oneway", "later"))}
    for method, caller in callers.items():
        caller.start()
        emu.wait_event(waiting(method), timeout=10)
    with Paho(emu.ports["mqtt"], username=device_token) as paho:
        assert paho.subscribe("v1/devices/me/rpc/request/+") == [1]
        requests = [paho.message(timeout=10) for _ in range(2)]
        late = next(r for r in requests if json.loads(r.payload)["method"] == "late")
        paho.publish(late.topic.replace("request", "response"), b'{"ok":true}')
        for caller in callers.values():
            caller.join(30)
    assert answers == {"late": (200, b'{"ok":true}'), "later": (200, b"")}

    # A long poll over HTTP is a subscription too: it takes the waiting request.
    poller = threading.Thread(target=rest_call, args=("oneway", "polled"))
    poller.start()
    emu.wait_event(waiting("polled"), timeout=10)
    status, _, polled = call(emu, "GET", f"/api/v1/{device_token}/rpc?timeout=10000")
    poller.join(30)
    assert status == 200 and json.loads(polled)["method"] == "polled" and answers["polled"] == (200, b"")


def test_unknown_rest_paths_and_methods(emu: EmulatorProcess) -> None:
    token = login(emu)["token"]
    status, _, body = call(emu, "GET", "/api/nothing/here", token=token)
    assert (status, error(body)["errorCode"]) == (404, 32)
    for path in ("/api/auth/login", "/api/auth/token"):
        status, _, body = call(emu, "GET", path)
        assert (status, error(body)) == (401, {"status": 401, "message": "Authentication method not supported",
                                               "errorCode": 10})
    status, _, body = call(emu, "PUT", "/api/device", {"name": "x"}, token=token)
    assert (status, error(body)) == (405, {"status": 405, "message": "Request method 'PUT' is not supported",
                                           "errorCode": 2})


@pytest.mark.parametrize("transport, refused", [("COAP", "mqtt"), ("MQTT", "coap")])
def test_a_profile_of_another_transport_refuses_the_device_there_and_http_never_checks(
        emu: EmulatorProcess, client: RestClient, transport: str, refused: str) -> None:
    profile = provisioning_profile(unique("transport"), unique("key"), "secret")
    profile.transport_type = transport
    profile = client.save_device_profile(profile)
    token = unique("tok")
    client.save_device(Device(name=unique("dev"), device_profile_id=profile.id), access_token=token)
    assert device_api(emu, f"{token}/telemetry", {"t": 1})[0] == 200
    mqtt5 = Paho(emu.ports["mqtt"], "c", token, protocol=mqtt.MQTTv5)
    try:
        refusal = int(mqtt5.rc.value)
    finally:
        mqtt5.client.loop_stop()
    coap = subprocess.run(["coap-client-notls", "-B", "5", "-m", "post", "-e", '{"t":2}',
                           f"coap://127.0.0.1:{emu.ports['coap']}/api/v1/{token}/telemetry"],
                          capture_output=True, text=True, timeout=30)
    if refused == "mqtt":  # CONNACK "server unavailable"
        assert refusal == 0x88 and "5.00" not in coap.stdout + coap.stderr
    else:
        assert refusal == 0 and "5.00" in coap.stdout + coap.stderr
