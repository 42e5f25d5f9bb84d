"""The emulator's HTTP device API and inspection API, driven by the stdlib's real HTTP clients (urllib, http.client).

Each test gets its own emulator: an EmulatorState and the HTTP server on an asyncio loop in a thread, port 0.
Expected answers are those of reference section 4 (docs/thingsboard-device-api.md).
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from emulator_fixtures import emulator_process, make_cert_pem, one_line, strategy_config
from host_tools.emulator import http as tbhttp
from host_tools.emulator.state import EmulatorState

NOT_FOUND = {"errorMsg": "Provision data was not found!", "status": "NOT_FOUND"}
FAILURE = {"errorMsg": "Failed to provision device!", "status": "FAILURE"}


class Emulator:
    """An EmulatorState plus the HTTP server, served by an asyncio loop in a thread."""

    def __init__(self, config: dict, version: tuple[int, ...] = (4, 3), **options: float):
        self.events: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.state = self.run(self._state(config, version))
        self.port = self.run(tbhttp.start(self.state, "127.0.0.1", 0, **options))

    async def _state(self, config: dict, version: tuple[int, ...]) -> EmulatorState:
        return EmulatorState(config, server_version=version, events=self.events.append)

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def close(self) -> None:
        self.run(tbhttp.stop())
        self.run(self._close_state())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    async def _close_state(self) -> None:
        self.state.close()

    def request(self, method: str, path: str, body: bytes | str | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """One request on a fresh http.client connection: (status, headers lower-cased, body)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def provision(self, request: dict, accept: str | None = None) -> tuple[int, str, str]:
        """POST /api/v1/provision with urllib, as the docs' sample scripts do: (status, content type, text)."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/api/v1/provision",
                                     data=json.dumps(request).encode(), method="POST")
        if accept:
            req.add_header("Accept", accept)
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.status, resp.headers.get("Content-Type"), resp.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("Content-Type"), e.read().decode()

    def inspect(self, path: str) -> Any:
        status, _, body = self.request("GET", "/emulator/devices" + path)
        assert status == 200, (status, body)
        return json.loads(body)


@pytest.fixture
def config(secret: str, cert_pem: str) -> dict:
    return strategy_config(secret, cert_pem,
                           {"name": "elsewhere", "profile": "allow", "credentialsType": "ACCESS_TOKEN",
                            "credentialsValue": "elsewhereToken000001"})


@pytest.fixture
def emu(config: dict) -> Iterator[Emulator]:
    e = Emulator(config, header_timeout=0.5, body_timeout=0.5, write_timeout=0.5)
    try:
        yield e
    finally:
        e.close()


def ordered(text: str) -> list[tuple[str, Any]]:
    """The JSON object's items in wire order (to check the server's key order)."""
    return json.loads(text, object_pairs_hook=list)


def provision_body(secret: str, key: str = "allow-key", **fields: Any) -> dict:
    return {"provisionDeviceKey": key, "provisionDeviceSecret": secret, **fields}


# --- provisioning: ALLOW_CREATE_NEW_DEVICES -----------------------------------------------------------------------

def test_provision_without_credentials_gets_a_generated_token_that_works(emu: Emulator, secret: str) -> None:
    status, ctype, text = emu.provision(provision_body(secret, deviceName="dev-a"))
    assert (status, ctype) == (200, "text/plain;charset=UTF-8")
    keys = [k for k, _ in ordered(text)]
    assert keys == ["credentialsValue", "credentialsType", "status"]
    answer = json.loads(text)
    token = answer["credentialsValue"]
    assert answer["credentialsType"] == "ACCESS_TOKEN" and answer["status"] == "SUCCESS"
    assert len(token) == 20 and token.isalnum()
    device = next(d for d in emu.inspect("") if d["name"] == "dev-a")
    assert device["provisionState"] == "provisioned" and device["credentialsValue"] == token
    assert emu.request("POST", f"/api/v1/{token}/telemetry", b'{"temp":21.5}')[0] == 200
    assert [t["values"] for t in emu.inspect("/dev-a/telemetry")] == [{"temp": 21.5}]


def test_provision_without_a_name_creates_a_random_20_character_name(emu: Emulator, secret: str) -> None:
    status, _, text = emu.provision(provision_body(secret))
    assert status == 200 and json.loads(text)["status"] == "SUCCESS"
    created = [d["name"] for d in emu.inspect("") if d["profile"] == "allow" and d["name"] != "elsewhere"]
    assert len(created) == 1 and len(created[0]) == 20 and created[0].isalnum()


def test_provision_access_token_supplied_by_the_device(emu: Emulator, secret: str) -> None:
    status, _, text = emu.provision(provision_body(secret, deviceName="dev-t", credentialsType="ACCESS_TOKEN",
                                                   token="myOwnToken"))
    assert status == 200
    assert text == '{"credentialsValue":"myOwnToken","credentialsType":"ACCESS_TOKEN","status":"SUCCESS"}'
    assert emu.request("POST", "/api/v1/myOwnToken/attributes", b'{"fw":"v1.0"}')[0] == 200
    assert emu.inspect("/dev-t/attributes")["client"] == {"fw": "v1.0"}


def test_provision_mqtt_basic_returns_a_nested_object_with_username_spelled_userName(
        emu: Emulator, secret: str) -> None:
    status, _, text = emu.provision(provision_body(secret, deviceName="dev-b", credentialsType="MQTT_BASIC",
                                                   clientId="cid", username="user", password="pw"),
                                    accept="application/json")
    assert status == 200
    assert ordered(text) == [("credentialsValue", [("clientId", "cid"), ("userName", "user"), ("password", "pw")]),
                             ("credentialsType", "MQTT_BASIC"), ("status", "SUCCESS")]


def test_provision_mqtt_basic_without_client_id_and_user_name_fails(emu: Emulator, secret: str) -> None:
    status, _, text = emu.provision(provision_body(secret, deviceName="dev-b", credentialsType="MQTT_BASIC",
                                                   password="pw"))
    assert (status, ordered(text)) == (200, list(FAILURE.items()))


def test_provision_x509_returns_the_one_line_certificate(emu: Emulator, secret: str) -> None:
    pem = make_cert_pem("dev-x")
    status, ctype, text = emu.provision(provision_body(secret, deviceName="dev-x",
                                                       credentialsType="X509_CERTIFICATE", hash=pem),
                                        accept="application/json")
    assert (status, ctype) == (200, "application/json")
    assert ordered(text) == [("credentialsValue", one_line(pem)), ("credentialsType", "X509_CERTIFICATE"),
                             ("status", "SUCCESS")]
    base64.b64decode(json.loads(text)["credentialsValue"], validate=True)


def test_provision_an_existing_name_under_allow_create_fails(emu: Emulator, secret: str) -> None:
    assert emu.provision(provision_body(secret, deviceName="elsewhere"))[2] == json.dumps(FAILURE,
                                                                                         separators=(",", ":"))
    assert emu.provision(provision_body(secret, deviceName="pre-token"))[2] == \
        '{"errorMsg":"Failed to provision device!","status":"FAILURE"}'


def test_provision_a_token_that_another_device_has_fails(emu: Emulator, secret: str) -> None:
    _, _, text = emu.provision(provision_body(secret, deviceName="dup", token="elsewhereToken000001"))
    assert json.loads(text) == FAILURE


# --- provisioning: CHECK_PRE_PROVISIONED_DEVICES and version options ----------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("pre-token", "preTokenValue0000001"),
    ("pre-basic", {"clientId": "pre-client", "userName": "pre-user", "password": "pre-pass"}),
    ("pre-x509", None),
])
def test_provision_pre_provisioned_returns_the_stored_credentials_once(
        emu: Emulator, secret: str, cert_pem: str, name: str, expected: Any) -> None:
    # Supplied credentials are ignored on this path: the device's own come back.
    status, _, text = emu.provision(provision_body(secret, "check-key", deviceName=name, token="ignoredToken"))
    assert status == 200
    answer = json.loads(text)
    assert answer["status"] == "SUCCESS"
    assert answer["credentialsValue"] == (one_line(cert_pem) if expected is None else expected)
    assert next(d for d in emu.inspect("") if d["name"] == name)["provisionState"] == "provisioned"
    # 4.2.1.1 and later refuse a second attempt.
    assert json.loads(emu.provision(provision_body(secret, "check-key", deviceName=name))[2]) == FAILURE


def test_provision_pre_provisioned_again_succeeds_on_4_2_1(config: dict, secret: str) -> None:
    emu = Emulator(config, version=(4, 2, 1))
    try:
        first = emu.provision(provision_body(secret, "check-key", deviceName="pre-token"))[2]
        second = emu.provision(provision_body(secret, "check-key", deviceName="pre-token"))[2]
        assert first == second == \
            '{"credentialsValue":"preTokenValue0000001","credentialsType":"ACCESS_TOKEN","status":"SUCCESS"}'
    finally:
        emu.close()


@pytest.mark.parametrize("name", ["nobody", "elsewhere"])
def test_provision_pre_provisioned_unknown_or_other_profile_fails(emu: Emulator, secret: str, name: str) -> None:
    assert json.loads(emu.provision(provision_body(secret, "check-key", deviceName=name))[2]) == FAILURE


@pytest.mark.parametrize("key, secret_of", [
    ("no-such-key", lambda s: s),
    ("allow-key", lambda s: s + "x"),
    ("check-key", lambda s: s.upper()),
    ("off-key", lambda s: s),
    ("", lambda s: s),
])
def test_provision_not_found_is_200_with_the_exact_json(emu: Emulator, secret: str, key: str,
                                                        secret_of: Any) -> None:
    status, _, text = emu.provision(provision_body(secret_of(secret), key, deviceName="n"))
    assert (status, text) == (200, '{"errorMsg":"Provision data was not found!","status":"NOT_FOUND"}')
    assert "n" not in {d["name"] for d in emu.inspect("")}


def test_provision_blank_device_name_fails(emu: Emulator, secret: str) -> None:
    assert json.loads(emu.provision(provision_body(secret, deviceName="   "))[2]) == FAILURE


# --- provisioning: unparsable requests -----------------------------------------------------------------------------

@pytest.mark.parametrize("body, message", [
    (b"not json", "Can't parse value: not json"),
    (b"[1,2]", "Can't parse value: [1,2]"),
    (b'{"provisionDeviceKey":"k"}', 'Failed to find the field provisionDeviceSecret in JSON body '
                                    '{"provisionDeviceKey":"k"}!'),
    (b'{"provisionDeviceKey":"k","provisionDeviceSecret":"s","credentialsType":"PSK"}',
     "No enum constant org.thingsboard.server.common.data.security.DeviceCredentialsType.PSK"),
])
def test_provision_unparsable_body_is_500_with_the_error_json(emu: Emulator, body: bytes, message: str) -> None:
    before = int(time.time() * 1000)
    status, headers, raw = emu.request("POST", "/api/v1/provision", body)
    assert (status, headers["content-type"]) == (500, "application/json")
    items = ordered(raw.decode())
    assert [k for k, _ in items] == ["status", "message", "errorCode", "timestamp"]
    answer = dict(items)
    assert (answer["status"], answer["message"], answer["errorCode"]) == (500, message, 2)
    assert before <= answer["timestamp"] <= int(time.time() * 1000)


def test_provision_without_a_body_is_400_error_code_31(emu: Emulator) -> None:
    status, _, raw = emu.request("POST", "/api/v1/provision", b"")
    answer = json.loads(raw)
    assert (status, answer["status"], answer["errorCode"]) == (400, 400, 31)
    assert answer["message"] == "Required request body is missing"


def test_provision_with_get_is_405(emu: Emulator) -> None:
    status, _, raw = emu.request("GET", "/api/v1/provision")
    assert status == 405 and json.loads(raw)["message"] == "Request method 'GET' is not supported"


# --- device endpoints ----------------------------------------------------------------------------------------------

TOKEN = "preTokenValue0000001"


@pytest.mark.parametrize("body, stored", [
    (b'{"a":1,"b":"2.5","c":true,"d":null}', [{"a": 1, "b": 2.5, "c": True}]),
    (b'{"ts":1700000000000,"values":{"a":1}}', [{"a": 1}]),
    (b'[{"a":1},{"ts":1700000000001,"values":{"b":2}}]', [{"a": 1}, {"b": 2}]),
])
def test_telemetry_shapes_are_accepted_with_200_and_an_empty_body(emu: Emulator, body: bytes,
                                                                    stored: list) -> None:
    status, headers, raw = emu.request("POST", f"/api/v1/{TOKEN}/telemetry", body,
                                       {"Content-Type": "application/json"})
    assert (status, raw, headers["content-length"]) == (200, b"", "0")
    assert [t["values"] for t in emu.inspect("/pre-token/telemetry")] == stored


def test_telemetry_with_ts_keeps_the_device_timestamp(emu: Emulator) -> None:
    emu.request("POST", f"/api/v1/{TOKEN}/telemetry", b'{"ts":1700000000000,"values":{"a":1}}')
    assert emu.inspect("/pre-token/telemetry") == [{"ts": 1700000000000, "values": {"a": 1}}]


@pytest.mark.parametrize("path", ["telemetry", "attributes"])
def test_unknown_token_is_401_with_an_empty_body(emu: Emulator, path: str) -> None:
    assert emu.request("POST", f"/api/v1/wrongToken/{path}", b'{"a":1}')[::2] == (401, b"")
    assert emu.request("GET", "/api/v1/wrongToken/attributes")[::2] == (401, b"")


def test_mqtt_basic_credentials_are_no_http_token(emu: Emulator) -> None:
    assert emu.request("POST", "/api/v1/pre-user/telemetry", b'{"a":1}')[0] == 401


@pytest.mark.parametrize("path, body", [
    ("telemetry", b'{"a":'), ("telemetry", b"42"), ("telemetry", b"[1,2]"),
    ("attributes", b"[{}]"), ("attributes", b"{bad"), ("rpc/1", b"{bad"),
])
def test_bad_json_is_500_with_the_parser_message(emu: Emulator, path: str, body: bytes) -> None:
    status, headers, raw = emu.request("POST", f"/api/v1/{TOKEN}/{path}", body)
    assert status == 500 and raw and headers["content-type"].startswith("text/plain")
    assert emu.inspect("/pre-token/telemetry") == []


@pytest.mark.parametrize("path, body, message", [
    ("telemetry", b"42", "Can't parse value: 42"), ("telemetry", b'[{"a":1}, "x"]', 'Can\'t parse value: "x"'),
    ("attributes", b'[{"a": 1}]', 'Can\'t parse value: [{"a":1}]'),
])
def test_a_body_of_the_wrong_shape_is_500_with_json_converters_message(emu: Emulator, path: str, body: bytes,
                                                                         message: str) -> None:
    assert emu.request("POST", f"/api/v1/{TOKEN}/{path}", body)[::2] == (500, message.encode())


def test_empty_telemetry_body_is_400(emu: Emulator) -> None:
    assert emu.request("POST", f"/api/v1/{TOKEN}/telemetry", b"")[0] == 400


def test_attributes_upload_and_get_by_keys(emu: Emulator) -> None:
    assert emu.request("POST", f"/api/v1/{TOKEN}/attributes", b'{"fw":"v1.0","model":"esp32"}')[0] == 200
    assert emu.request("POST", "/emulator/devices/pre-token/attributes/shared", b'{"interval":5}')[0] == 200
    def get(query: str) -> Any:
        status, headers, raw = emu.request("GET", f"/api/v1/{TOKEN}/attributes{query}")
        assert (status, headers["content-type"]) == (200, "application/json")
        return json.loads(raw)
    assert get("") == {"client": {"fw": "v1.0", "model": "esp32"}, "shared": {"interval": 5}}
    assert get("?clientKeys=fw") == {"client": {"fw": "v1.0"}}
    assert get("?clientKeys=fw,model&sharedKeys=interval") == {"client": {"fw": "v1.0", "model": "esp32"},
                                                                "shared": {"interval": 5}}
    assert get("?sharedKeys=nothing") == {}


def test_attributes_get_is_empty_object_when_nothing_is_stored(emu: Emulator) -> None:
    assert emu.request("GET", f"/api/v1/{TOKEN}/attributes")[::2] == (200, b"{}")


@pytest.mark.parametrize("body, answer", [(b'{"secretKey":"k","durationMs":60000}', (200, b"")), (b"", (200, b"")),
                                          (b"5", (500, b"Can't parse value: 5"))])
def test_a_claim_is_accepted_as_thingsboard_answers_it(emu: Emulator, body: bytes, answer: tuple) -> None:
    assert emu.request("POST", f"/api/v1/{TOKEN}/claim", body)[::2] == answer
    assert emu.request("POST", "/api/v1/wrongToken/claim", body)[0] == 401


@pytest.mark.parametrize("path, body", [("rpc", b'{"method":"getTime","params":{}}')])
def test_client_side_rpc_is_501_not_emulated(emu: Emulator, path: str, body: bytes) -> None:
    status, headers, raw = emu.request("POST", f"/api/v1/{TOKEN}/{path}", body)
    assert (status, raw) == (501, f"{path} is not emulated over HTTP".encode())
    assert headers["content-type"].startswith("text/plain")
    assert emu.request("POST", f"/api/v1/wrongToken/{path}", body)[0] == 401


@pytest.mark.parametrize("path", [f"/api/v1/{TOKEN}/nothing", f"/api/v1/{TOKEN}", "/api/v1"])
def test_unknown_paths_are_404_without_echoing_the_token(emu: Emulator, path: str) -> None:
    status, _, raw = emu.request("POST", path, b"{}")
    assert status == 404 and json.loads(raw)["errorCode"] == 32 and TOKEN not in raw.decode()


# --- payload limits (PayloadSizeFilter: header only) ---------------------------------------------------------------

def raw_exchange(port: int, data: bytes, timeout: float = 5) -> bytes:
    """Send `data` on a raw socket, half-close, and return everything the server sends until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


@pytest.mark.parametrize("path, limit", [
    (f"/api/v1/{TOKEN}/telemetry", 52428800),
    ("/api/v1/unknownToken/attributes", 52428800),
    ("/api/v1/provision", 52428800),
    (f"/api/v1/{TOKEN}/rpc/1", 65536),
])
def test_content_length_over_the_limit_is_413_without_reading_the_body(emu: Emulator, path: str,
                                                                       limit: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", emu.port, timeout=5)
    conn.putrequest("POST", path)
    conn.putheader("Content-Length", str(limit + 1))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413
    assert json.loads(resp.read()) == f"Payload size exceeds the limit of {limit} bytes"
    conn.close()


def test_rpc_reply_at_the_limit_is_accepted_and_a_chunked_one_over_it_is_413(emu: Emulator) -> None:
    rpc_id = json.loads(emu.request("POST", "/emulator/devices/pre-token/rpc", b'{"method":"m"}')[2])["id"]
    body = b'"' + b"a" * 65534 + b'"'
    assert emu.request("POST", f"/api/v1/{TOKEN}/rpc/{rpc_id}", body)[0] == 200
    conn = http.client.HTTPConnection("127.0.0.1", emu.port, timeout=5)
    conn.request("POST", f"/api/v1/{TOKEN}/rpc/{rpc_id}", body=iter([body, b"xx"]), encode_chunked=True)
    resp = conn.getresponse()
    assert (resp.status, json.loads(resp.read())) == (413, "Payload size exceeds the limit of 65536 bytes")
    conn.close()


def test_chunked_telemetry_body_is_reassembled(emu: Emulator) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", emu.port, timeout=5)
    conn.request("POST", f"/api/v1/{TOKEN}/telemetry", body=iter([b'{"te', b'mp":', b"7}"]), encode_chunked=True)
    assert conn.getresponse().status == 200
    conn.close()
    assert [t["values"] for t in emu.inspect("/pre-token/telemetry")] == [{"temp": 7}]


# --- connections ---------------------------------------------------------------------------------------------------

def test_keep_alive_serves_many_requests_on_one_connection(emu: Emulator) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", emu.port, timeout=5)
    conn.connect()
    sock = conn.sock
    for i in range(5):
        conn.request("POST", f"/api/v1/{TOKEN}/telemetry", body=json.dumps({"i": i}))
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read() == b""
    assert conn.sock is sock
    conn.close()
    assert [t["values"]["i"] for t in emu.inspect("/pre-token/telemetry")] == list(range(5))


def test_pipelined_requests_are_answered_in_order_and_connection_close_is_honoured(emu: Emulator) -> None:
    one = f"POST /api/v1/{TOKEN}/telemetry HTTP/1.1\r\nHost: x\r\nContent-Length: 7\r\n\r\n{{\"a\":1}}"
    unknown = "POST /api/v1/nope/telemetry HTTP/1.1\r\nHost: x\r\nContent-Length: 7\r\n\r\n{\"a\":1}"
    last = "GET /api/v1/nope/attributes HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answer = raw_exchange(emu.port, (one + unknown + last).encode())
    assert [line.split(b" ")[1] for line in answer.split(b"\r\n") if line.startswith(b"HTTP/1.1")] == \
        [b"200", b"401", b"401"]


def test_http_1_0_closes_after_the_answer(emu: Emulator) -> None:
    with socket.create_connection(("127.0.0.1", emu.port), timeout=5) as s:
        s.sendall(b"GET /emulator/devices HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200 OK\r\n") and b"Connection: close" in data


# --- long polls and RPC --------------------------------------------------------------------------------------------

def test_attribute_updates_long_poll_gets_the_shared_change(emu: Emulator) -> None:
    with ThreadPoolExecutor(1) as pool:
        poll = pool.submit(emu.request, "GET", f"/api/v1/{TOKEN}/attributes/updates?timeout=5000")
        time.sleep(0.2)
        assert emu.request("POST", "/emulator/devices/pre-token/attributes/shared", b'{"led":"on"}')[0] == 200
        status, _, raw = poll.result(5)
    assert (status, json.loads(raw)) == (200, {"led": "on"})


def test_attribute_updates_long_poll_reports_deletions(emu: Emulator) -> None:
    emu.request("POST", "/emulator/devices/pre-token/attributes/shared", b'{"led":"on","x":1}')
    with ThreadPoolExecutor(1) as pool:
        poll = pool.submit(emu.request, "GET", f"/api/v1/{TOKEN}/attributes/updates?timeout=5000")
        time.sleep(0.2)
        assert emu.request("DELETE", "/emulator/devices/pre-token/attributes/shared?keys=led")[0] == 200
        assert poll.result(5)[::2] == (200, b'{"deleted":["led"]}')
    assert emu.inspect("/pre-token/attributes")["shared"] == {"x": 1}


@pytest.mark.parametrize("path", ["attributes/updates", "rpc"])
def test_long_poll_times_out_with_408(emu: Emulator, path: str) -> None:
    start = time.monotonic()
    assert emu.request("GET", f"/api/v1/{TOKEN}/{path}?timeout=150")[::2] == (408, b"")
    assert 0.14 <= time.monotonic() - start < 2


def test_server_rpc_over_long_poll_and_the_reply_is_recorded(emu: Emulator) -> None:
    with ThreadPoolExecutor(1) as pool:
        poll = pool.submit(emu.request, "GET", f"/api/v1/{TOKEN}/rpc?timeout=5000")
        time.sleep(0.2)
        status, _, raw = emu.request("POST", "/emulator/devices/pre-token/rpc",
                                     b'{"method":"setLed","params":{"on":true}}')
        assert status == 200
        rpc_id = json.loads(raw)["id"]
        status, _, raw = poll.result(5)
    assert status == 200
    assert ordered(raw.decode()) == [("id", rpc_id), ("method", "setLed"), ("params", [("on", True)])]
    assert emu.request("POST", f"/api/v1/{TOKEN}/rpc/{rpc_id}", b'{"done":true}')[::2] == (200, b"")
    assert emu.inspect("/pre-token/rpc") == {str(rpc_id): {"done": True}}


def test_rpc_reply_with_a_non_numeric_id_is_400(emu: Emulator) -> None:
    assert emu.request("POST", f"/api/v1/{TOKEN}/rpc/abc", b"{}")[0] == 400


def test_deleting_the_device_ends_its_long_poll_with_403_and_its_token(emu: Emulator) -> None:
    with ThreadPoolExecutor(1) as pool:
        poll = pool.submit(emu.request, "GET", f"/api/v1/{TOKEN}/rpc?timeout=5000")
        time.sleep(0.2)
        assert emu.request("DELETE", "/emulator/devices/pre-token")[0] == 200
        assert poll.result(5)[::2] == (403, b"Device was deleted!")
    assert emu.request("POST", f"/api/v1/{TOKEN}/telemetry", b'{"a":1}')[0] == 401
    assert "pre-token" not in {d["name"] for d in emu.inspect("")}


# --- inspection API ------------------------------------------------------------------------------------------------

def test_inspection_lists_devices_with_their_credentials(emu: Emulator, cert_pem: str) -> None:
    devices = {d["name"]: d for d in emu.inspect("")}
    assert set(devices) == {"pre-token", "pre-basic", "pre-x509", "elsewhere"}
    basic = devices["pre-basic"]
    assert list(basic) == ["name", "profile", "credentialsType", "credentialsValue", "provisionState",
                           "createdTime"]
    assert basic["credentialsValue"] == {"clientId": "pre-client", "userName": "pre-user", "password": "pre-pass"}
    assert basic["provisionState"] is None
    assert devices["pre-x509"]["credentialsValue"] == one_line(cert_pem)
    assert emu.inspect("/pre-basic") == basic


def test_inspection_attributes_has_three_scopes(emu: Emulator, secret: str) -> None:
    emu.provision(provision_body(secret, "check-key", deviceName="pre-token"))
    emu.request("POST", f"/api/v1/{TOKEN}/attributes", b'{"fw":"v2"}')
    emu.request("POST", "/emulator/devices/pre-token/attributes/shared", b'{"s":[1,2]}')
    assert emu.inspect("/pre-token/attributes") == {"client": {"fw": "v2"}, "shared": {"s": [1, 2]},
                                                     "server": {"provisionState": "provisioned"}}


@pytest.mark.parametrize("method, path, body", [
    ("GET", "/emulator/devices/ghost", None),
    ("GET", "/emulator/devices/ghost/telemetry", None),
    ("GET", "/emulator/devices/ghost/attributes", None),
    ("POST", "/emulator/devices/ghost/attributes/shared", b'{"a":1}'),
    ("POST", "/emulator/devices/ghost/rpc", b'{"method":"m"}'),
    ("DELETE", "/emulator/devices/ghost", None),
])
def test_inspection_unknown_device_is_404_naming_it(emu: Emulator, method: str, path: str,
                                                    body: bytes | None) -> None:
    status, _, raw = emu.request(method, path, body)
    assert (status, json.loads(raw)) == (404, {"error": "no device named 'ghost'"})


@pytest.mark.parametrize("path, body, word", [
    ("attributes/shared", b"[1]", "JSON object"),
    ("attributes/shared", b"{}", "JSON object"),
    ("rpc", b'{"params":1}', "method"),
    ("rpc", b"nonsense", "method"),
])
def test_inspection_bad_bodies_are_400_saying_what_is_wrong(emu: Emulator, path: str, body: bytes,
                                                            word: str) -> None:
    status, _, raw = emu.request("POST", f"/emulator/devices/pre-token/{path}", body)
    assert status == 400 and word in json.loads(raw)["error"]


def test_inspection_names_are_percent_decoded(emu: Emulator, secret: str) -> None:
    emu.provision(provision_body(secret, deviceName="room 1/a"))
    assert emu.inspect("/room%201%2Fa")["name"] == "room 1/a"


def test_tokens_never_reach_the_log(emu: Emulator, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG", logger="host_tools.emulator.http")
    emu.request("POST", f"/api/v1/{TOKEN}/telemetry", b'{"a":1}')
    emu.request("POST", f"/api/v1/{TOKEN}/nothing", b'{"a":1}')
    emu.request("GET", f"/api/v1/{TOKEN}")
    assert caplog.records and all(TOKEN not in r.getMessage() for r in caplog.records)
    assert all(TOKEN not in e for e in emu.events)


# --- robustness: a misbehaving client costs one connection, never the server ---------------------------------------

def served(emu: Emulator) -> bool:
    return emu.request("GET", "/emulator/devices")[0] == 200


@pytest.mark.parametrize("garbage", [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(40)) + b"\r\n\r\n",
    b"GARBAGE\r\n\r\n",
    b"GET /x HTTP/9.9\r\n\r\n",
    b"GET noslash HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
    b"POST /api/v1/t/telemetry HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
    b"POST /api/v1/t/telemetry HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"POST /api/v1/t/telemetry HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
])
def test_garbage_requests_get_an_error_status_and_the_server_keeps_serving(emu: Emulator, garbage: bytes) -> None:
    answer = raw_exchange(emu.port, garbage)
    assert answer.split(b" ")[1] in (b"400", b"505"), answer
    assert served(emu)


def test_unsupported_transfer_encoding_is_501(emu: Emulator) -> None:
    answer = raw_exchange(emu.port, b"POST /api/v1/t/telemetry HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 501 ")


def test_oversized_request_head_is_400(emu: Emulator) -> None:
    head = b"GET /emulator/devices HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
    assert raw_exchange(emu.port, head).startswith(b"HTTP/1.1 400 ")
    assert served(emu)


def test_slowloris_is_cut_at_the_header_deadline_while_others_are_served(emu: Emulator) -> None:
    with socket.create_connection(("127.0.0.1", emu.port), timeout=5) as slow:
        start = time.monotonic()
        closed = False
        for byte in b"GET /emulator/devices HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
            try:
                slow.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            time.sleep(0.02)
            if time.monotonic() - start > 0.2:
                assert served(emu)
            if time.monotonic() - start > 2:
                break
        slow.settimeout(2)
        if not closed:
            assert slow.recv(100) == b""
        assert time.monotonic() - start < 2.5


def test_half_open_connection_is_closed_after_the_header_deadline(emu: Emulator) -> None:
    with socket.create_connection(("127.0.0.1", emu.port), timeout=5) as idle:
        start = time.monotonic()
        assert served(emu)
        assert idle.recv(100) == b""
        assert 0.4 <= time.monotonic() - start < 2


def test_body_shorter_than_content_length_is_cut_at_the_body_deadline(emu: Emulator) -> None:
    with socket.create_connection(("127.0.0.1", emu.port), timeout=5) as s:
        s.sendall(f"POST /api/v1/{TOKEN}/telemetry HTTP/1.1\r\nContent-Length: 100\r\n\r\n{{".encode())
        start = time.monotonic()
        assert s.recv(100) == b""
        assert time.monotonic() - start < 2
    assert emu.inspect("/pre-token/telemetry") == []


def test_a_client_that_stops_reading_is_dropped_and_others_are_served(emu: Emulator) -> None:
    big = json.dumps({"blob": "x" * 1_000_000}).encode()
    assert emu.request("POST", f"/api/v1/{TOKEN}/telemetry", big)[0] == 200
    request = b"GET /emulator/devices/pre-token/telemetry HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.socket() as stuck:
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.connect(("127.0.0.1", emu.port))
        stuck.sendall(request * 40)  # 40 MB of answers that it never reads
        time.sleep(0.2)
        start = time.monotonic()
        assert served(emu)
        assert time.monotonic() - start < 1
        # The server gives up on it after its write deadline: reading now ends in EOF or a reset, not 40 MB.
        time.sleep(1.0)
        stuck.settimeout(2)
        received = 0
        try:
            while chunk := stuck.recv(1 << 20):
                received += len(chunk)
        except ConnectionResetError:
            pass
        assert received < 40_000_000


# --- through the real CLI -----------------------------------------------------------------------------------------

def test_cli_emulator_serves_http_provisioning_and_inspection_on_4_2_1(config: dict, secret: str) -> None:
    with emulator_process(config, "--server-version", "4.2.1") as proc:
        base = f"http://127.0.0.1:{proc.ports['http']}"
        body = json.dumps(provision_body(secret, "check-key", deviceName="pre-token")).encode()
        for _ in range(2):  # 4.2.1 still lets a pre-provisioned device provision again
            with urllib.request.urlopen(urllib.request.Request(f"{base}/api/v1/provision", data=body),
                                        timeout=5) as resp:
                assert json.loads(resp.read())["credentialsValue"] == TOKEN
        with urllib.request.urlopen(f"{base}/emulator/devices", timeout=5) as resp:
            devices = {d["name"]: d for d in json.loads(resp.read())}
        assert devices["pre-token"]["provisionState"] == "provisioned"
        proc.wait_event("provisioned device 'pre-token' over http")
        assert all(secret not in line for line in proc.events)
