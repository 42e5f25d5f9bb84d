"""The emulator's CoAP device API (reference section 5), checked with real third-party clients: aiocoap's client,
libcoap's `coap-client-notls`, and raw datagrams built and decoded by aiocoap for the message-layer cases.

Each test gets its own emulator (EmulatorState + CoAP endpoint on an asyncio loop in a thread, port 0); state is
inspected on that loop thread, where its SQLite connection lives.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import secrets
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import aiocoap
import pytest
from aiocoap import numbers

from emulator_fixtures import emulator_process, make_cert_pem, one_line, strategy_config
from host_tools.emulator import coap
from host_tools.emulator.state import EmulatorState

CREATED, VALID, CONTENT = numbers.codes.Code.CREATED, numbers.codes.Code.VALID, numbers.codes.Code.CONTENT
BAD_REQUEST, UNAUTHORIZED = numbers.codes.Code.BAD_REQUEST, numbers.codes.Code.UNAUTHORIZED
BAD_OPTION, NOT_FOUND = numbers.codes.Code.BAD_OPTION, numbers.codes.Code.NOT_FOUND
NOT_FOUND_JSON = '{"errorMsg":"Provision data was not found!","status":"NOT_FOUND"}'
FAILURE_JSON = '{"errorMsg":"Failed to provision device!","status":"FAILURE"}'
TOKEN = "preTokenValue0000001"


class Emulator:
    """An EmulatorState plus the CoAP endpoint, served by an asyncio loop in a thread."""

    def __init__(self, config: dict, version: tuple[int, ...] = (4, 3), separate: bool = False,
                 ack_timeout: float = 2.0, **options: int):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.events: list[str] = []
        self.state: EmulatorState = self.call(lambda _: EmulatorState(config, server_version=version,
                                                                      events=self.events.append))
        self.port = self._run(coap.start(self.state, "127.0.0.1", 0, separate=separate, ack_timeout=ack_timeout,
                                         **options))
        self.uri = f"coap://127.0.0.1:{self.port}/api/v1"

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def call(self, fn: Callable[[EmulatorState | None], Any]) -> Any:
        """fn(state) on the loop thread."""
        async def job() -> Any:
            return fn(getattr(self, "state", None))
        return self._run(job())

    def telemetry(self, name: str) -> list[dict]:
        return self.call(lambda s: s.telemetry(name))

    def close(self) -> None:
        self._run(coap.stop())
        self.call(lambda s: s.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def config(secret: str, cert_pem: str) -> dict:
    return strategy_config(secret, cert_pem)


@pytest.fixture
def emu(config: dict) -> Iterator[Emulator]:
    e = Emulator(config)
    try:
        yield e
    finally:
        e.close()


def request(uri: str, code: Any = aiocoap.POST, payload: bytes = b"", mtype: Any = aiocoap.CON,
            **options: Any) -> aiocoap.Message:
    """One request with aiocoap's client; the response message."""
    async def go() -> aiocoap.Message:
        ctx = await aiocoap.Context.create_client_context()
        try:
            tuning = aiocoap.Unreliable if mtype == aiocoap.NON else aiocoap.Reliable
            msg = aiocoap.Message(code=code, uri=uri, payload=payload, transport_tuning=tuning)
            for name, value in options.items():
                setattr(msg.opt, name, value)
            return await asyncio.wait_for(ctx.request(msg).response, 10)
        finally:
            await ctx.shutdown()
    return asyncio.run(go())


def provision_body(secret: str, key: str = "allow-key", **fields: Any) -> bytes:
    return json.dumps({"provisionDeviceKey": key, "provisionDeviceSecret": secret, **fields}).encode()


# --- provisioning with aiocoap ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, expected", [
    ({}, None),
    ({"credentialsType": "ACCESS_TOKEN", "token": "coapToken1"}, "coapToken1"),
    ({"credentialsType": "MQTT_BASIC", "clientId": "c1", "username": "u1", "password": "p1"},
     {"clientId": "c1", "userName": "u1", "password": "p1"}),
    ({"credentialsType": "MQTT_BASIC", "username": "u2"}, {"clientId": "", "userName": "u2", "password": ""}),
])
@pytest.mark.parametrize("mtype", [aiocoap.CON, aiocoap.NON])
def test_provision_allow_create_is_2_01_with_the_json_as_text(emu: Emulator, secret: str, fields: dict,
                                                              expected: Any, mtype: Any) -> None:
    resp = request(f"{emu.uri}/provision", payload=provision_body(secret, deviceName="dev", **fields), mtype=mtype)
    assert resp.code == CREATED and resp.opt.content_format == 0
    answer = json.loads(resp.payload)
    assert list(answer) == ["credentialsValue", "credentialsType", "status"] and answer["status"] == "SUCCESS"
    if expected is None:
        assert answer["credentialsType"] == "ACCESS_TOKEN"
        assert len(answer["credentialsValue"]) == 20 and answer["credentialsValue"].isalnum()
    else:
        assert answer["credentialsValue"] == expected


def test_provision_x509_over_coap_returns_the_one_line_certificate(emu: Emulator, secret: str) -> None:
    pem = make_cert_pem("dev-x")
    resp = request(f"{emu.uri}/provision", payload=provision_body(
        secret, deviceName="dev-x", credentialsType="X509_CERTIFICATE", hash=pem))
    assert resp.code == CREATED
    assert resp.payload.decode() == json.dumps({"credentialsValue": one_line(pem),
                                                "credentialsType": "X509_CERTIFICATE", "status": "SUCCESS"},
                                               separators=(",", ":"))


@pytest.mark.parametrize("name", ["pre-token", "pre-basic", "pre-x509"])
def test_provision_pre_provisioned_then_again_is_4_00_failure(emu: Emulator, secret: str, cert_pem: str,
                                                              name: str) -> None:
    body = provision_body(secret, "check-key", deviceName=name)
    first = request(f"{emu.uri}/provision", payload=body)
    assert first.code == CREATED
    stored = {"pre-token": TOKEN, "pre-x509": one_line(cert_pem),
              "pre-basic": {"clientId": "pre-client", "userName": "pre-user", "password": "pre-pass"}}[name]
    assert json.loads(first.payload)["credentialsValue"] == stored
    second = request(f"{emu.uri}/provision", payload=body)
    assert (second.code, second.payload.decode(), second.opt.content_format) == (BAD_REQUEST, FAILURE_JSON, 0)


@pytest.mark.parametrize("key, wrong_secret", [("nope", False), ("allow-key", True), ("off-key", False)])
def test_provision_not_found_is_4_00_with_the_json(emu: Emulator, secret: str, key: str,
                                                   wrong_secret: bool) -> None:
    resp = request(f"{emu.uri}/provision",
                   payload=provision_body(secret + "x" if wrong_secret else secret, key, deviceName="n"))
    assert (resp.code, resp.payload.decode(), resp.opt.content_format) == (BAD_REQUEST, NOT_FOUND_JSON, 0)


def test_provision_existing_device_under_allow_create_is_4_00_failure(emu: Emulator, secret: str) -> None:
    resp = request(f"{emu.uri}/provision", payload=provision_body(secret, deviceName="pre-token"))
    assert (resp.code, resp.payload.decode()) == (BAD_REQUEST, FAILURE_JSON)


@pytest.mark.parametrize("body", [b"junk", b"[]", b'{"provisionDeviceKey":"k"}', b""])
def test_provision_unparsable_is_4_00_without_payload(emu: Emulator, body: bytes) -> None:
    resp = request(f"{emu.uri}/provision", payload=body)
    assert (resp.code, resp.payload) == (BAD_REQUEST, b"")


def test_server_3_2_1_answers_2_05_for_every_provisioning_outcome_and_2_03_for_telemetry(
        config: dict, secret: str) -> None:
    emu = Emulator(config, version=(3, 2, 1))
    try:
        ok = request(f"{emu.uri}/provision", payload=provision_body(secret, deviceName="old", token="oldToken"))
        bad = request(f"{emu.uri}/provision", payload=provision_body(secret, "nope"))
        assert (ok.code, json.loads(ok.payload)["status"]) == (CONTENT, "SUCCESS")
        assert (bad.code, bad.payload.decode()) == (CONTENT, NOT_FOUND_JSON)
        assert request(f"{emu.uri}/oldToken/telemetry", payload=b'{"a":1}').code == VALID
        # 3.2.1 also predates the piggyback delay: the answer came as a separate response, which aiocoap handled.
        assert [t["values"] for t in emu.telemetry("old")] == [{"a": 1}]
    finally:
        emu.close()


# --- telemetry, attributes, errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mtype", [aiocoap.CON, aiocoap.NON])
def test_telemetry_is_2_01_without_payload_and_stored(emu: Emulator, mtype: Any) -> None:
    resp = request(f"{emu.uri}/{TOKEN}/telemetry", payload=b'[{"a":1},{"ts":1700000000000,"values":{"b":2}}]',
                   mtype=mtype)
    assert (resp.code, resp.payload) == (CREATED, b"")
    assert [t["values"] for t in emu.telemetry("pre-token")] == [{"a": 1}, {"b": 2}]


@pytest.mark.parametrize("path, code, payload", [
    ("wrongToken/telemetry", UNAUTHORIZED, b'{"a":1}'),
    ("wrongToken/attributes", UNAUTHORIZED, b'{"a":1}'),
    (f"{TOKEN}/telemetry", BAD_REQUEST, b'{"a":'),
    (f"{TOKEN}/telemetry", BAD_REQUEST, b"17"),
    (f"{TOKEN}/attributes", BAD_REQUEST, b"[1]"),
    (f"{TOKEN}/nothing", BAD_REQUEST, b"{}"),
    ("", BAD_REQUEST, b"{}"),
    ("telemetry", UNAUTHORIZED, b"{}"),
])
def test_error_answers(emu: Emulator, path: str, code: Any, payload: bytes) -> None:
    resp = request(f"{emu.uri}/{path}".rstrip("/"), payload=payload)
    assert resp.code == code
    assert emu.telemetry("pre-token") == []


def test_paths_outside_the_api_are_4_04_and_other_methods_4_05(emu: Emulator) -> None:
    assert request(f"coap://127.0.0.1:{emu.port}/fw/{TOKEN}", code=aiocoap.GET).code == NOT_FOUND
    assert request(f"{emu.uri}/{TOKEN}/telemetry", code=aiocoap.PUT, payload=b"{}").code == \
        numbers.codes.Code.METHOD_NOT_ALLOWED


def test_get_on_telemetry_is_4_00(emu: Emulator) -> None:
    assert request(f"{emu.uri}/{TOKEN}/telemetry", code=aiocoap.GET).code == BAD_REQUEST


def test_attributes_upload_then_get_is_2_05_json_or_4_04(emu: Emulator) -> None:
    assert request(f"{emu.uri}/{TOKEN}/attributes", code=aiocoap.GET).code == NOT_FOUND
    assert request(f"{emu.uri}/{TOKEN}/attributes", payload=b'{"fw":"v1","n":3}').code == CREATED
    emu.call(lambda s: s.set_shared_attributes("pre-token", {"interval": 10}))
    resp = request(f"{emu.uri}/{TOKEN}/attributes", code=aiocoap.GET)
    assert (resp.code, resp.opt.content_format) == (CONTENT, 50)
    assert json.loads(resp.payload) == {"client": {"fw": "v1", "n": 3}, "shared": {"interval": 10}}
    resp = request(f"{emu.uri}/{TOKEN}/attributes?clientKeys=fw&sharedKeys=interval", code=aiocoap.GET)
    assert json.loads(resp.payload) == {"client": {"fw": "v1"}, "shared": {"interval": 10}}
    resp = request(f"{emu.uri}/{TOKEN}/attributes?sharedKeys=interval", code=aiocoap.GET, content_format=0)
    assert (json.loads(resp.payload), resp.opt.content_format) == ({"shared": {"interval": 10}}, 0)
    assert request(f"{emu.uri}/{TOKEN}/attributes?clientKeys=none", code=aiocoap.GET).code == NOT_FOUND


def test_rpc_reply_is_2_01_and_recorded(emu: Emulator) -> None:
    rpc_id = emu.call(lambda s: s.send_rpc("pre-token", "reboot", {}))
    assert request(f"{emu.uri}/{TOKEN}/rpc/{rpc_id}", payload=b'{"ok":true}').code == CREATED
    assert emu.call(lambda s: s.rpc_replies("pre-token")) == {rpc_id: {"ok": True}}
    assert request(f"{emu.uri}/{TOKEN}/rpc/x", payload=b"{}").code == BAD_REQUEST


# --- observe ------------------------------------------------------------------------------------------------------

def test_observe_shared_attributes_gets_current_values_then_pushes_then_ends_on_delete(emu: Emulator) -> None:
    emu.call(lambda s: s.set_shared_attributes("pre-token", {"a": 1}))

    async def go() -> list[Any]:
        ctx = await aiocoap.Context.create_client_context()
        try:
            msg = aiocoap.Message(code=aiocoap.GET, uri=f"{emu.uri}/{TOKEN}/attributes", observe=0)
            req = ctx.request(msg)
            first = await asyncio.wait_for(req.response, 5)
            seen: list[Any] = [(first.code, json.loads(first.payload))]
            await asyncio.to_thread(emu.call, lambda s: s.set_shared_attributes("pre-token", {"b": "x"}))
            note = await asyncio.wait_for(req.observation.__aiter__().__anext__(), 5)
            seen.append((note.code, json.loads(note.payload)))
            await asyncio.to_thread(emu.call, lambda s: s.delete_shared_attributes("pre-token", ["a"]))
            note = await asyncio.wait_for(req.observation.__aiter__().__anext__(), 5)
            seen.append((note.code, json.loads(note.payload)))
            await asyncio.to_thread(emu.call, lambda s: s.delete_device("pre-token"))
            try:
                await asyncio.wait_for(req.observation.__aiter__().__anext__(), 5)
            except StopAsyncIteration:
                seen.append("ended")  # the 4.04 notification ended the observation
            return seen
        finally:
            await ctx.shutdown()

    assert asyncio.run(go()) == [(CONTENT, {"a": 1}), (CONTENT, {"b": "x"}), (CONTENT, {"deleted": ["a"]}),
                                 "ended"]


# --- message layer with raw datagrams ------------------------------------------------------------------------------

class Udp:
    """A raw UDP peer of the emulator's CoAP port."""

    def __init__(self, port: int):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.connect(("127.0.0.1", port))

    def send(self, data: bytes) -> None:
        self.sock.send(data)

    def recv(self, timeout: float = 2.0) -> bytes | None:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(65536)
        except TimeoutError:
            return None

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def udp(emu: Emulator) -> Iterator[Udp]:
    u = Udp(emu.port)
    try:
        yield u
    finally:
        u.close()


def wire(code: Any, mtype: Any, mid: int, token: bytes = b"", payload: bytes = b"", path: str = "",
         extra: tuple[int, bytes] | None = None, observe: int | None = None) -> bytes:
    """A datagram built by aiocoap with the message-layer fields a test needs to control."""
    msg = aiocoap.Message(code=code, payload=payload)
    msg.mtype, msg.mid, msg.token = mtype, mid, token
    if path:
        msg.opt.uri_path = tuple(path.split("/"))
    if observe is not None:
        msg.opt.observe = observe
    if extra is not None:
        msg.opt.add_option(aiocoap.optiontypes.OpaqueOption(*extra))
    return msg.encode()


def raw(code: Any, path: str, payload: bytes = b"", mtype: Any = aiocoap.CON, mid: int = 0x1234,
        token: bytes = b"\x01\x02", extra: tuple[int, bytes] | None = None) -> bytes:
    return wire(code, mtype, mid, token, payload, path, extra)


def empty(mtype: Any, mid: int) -> bytes:
    return wire(numbers.codes.Code.EMPTY, mtype, mid)


def served(emu: Emulator) -> bool:
    return request(f"{emu.uri}/{TOKEN}/telemetry", payload=b'{"alive":1}').code == CREATED


@pytest.mark.parametrize("mtype", [aiocoap.CON, aiocoap.NON])
def test_duplicate_message_id_is_answered_from_the_cache_and_processed_once(emu: Emulator, udp: Udp,
                                                                            mtype: Any) -> None:
    datagram = raw(aiocoap.POST, f"api/v1/{TOKEN}/telemetry", b'{"n":1}', mtype=mtype)
    udp.send(datagram)
    first = udp.recv()
    udp.send(datagram)
    assert udp.recv() == first
    answer = aiocoap.Message.decode(first)
    assert answer.code == CREATED and answer.token == b"\x01\x02"
    assert answer.mtype == (aiocoap.ACK if mtype == aiocoap.CON else aiocoap.NON)
    assert len(emu.telemetry("pre-token")) == 1


def test_same_message_id_from_another_endpoint_is_a_new_request(emu: Emulator, udp: Udp) -> None:
    datagram = raw(aiocoap.POST, f"api/v1/{TOKEN}/telemetry", b'{"n":1}')
    udp.send(datagram)
    assert udp.recv() is not None
    other = Udp(emu.port)
    try:
        other.send(datagram)
        assert other.recv() is not None
    finally:
        other.close()
    assert len(emu.telemetry("pre-token")) == 2


def test_separate_mode_sends_an_empty_ack_then_a_con_response_until_acked(config: dict) -> None:
    emu = Emulator(config, separate=True, ack_timeout=0.2)
    udp = Udp(emu.port)
    try:
        datagram = raw(aiocoap.POST, f"api/v1/{TOKEN}/telemetry", b'{"n":1}', mid=0x0101, token=b"tk")
        udp.send(datagram)
        ack_bytes = udp.recv()
        ack = aiocoap.Message.decode(ack_bytes)
        assert (ack.mtype, ack.code, ack.mid, ack.token, ack.payload) == (aiocoap.ACK, numbers.codes.Code.EMPTY,
                                                                          0x0101, b"", b"")
        response_bytes = udp.recv()
        response = aiocoap.Message.decode(response_bytes)
        assert (response.mtype, response.code, response.token) == (aiocoap.CON, CREATED, b"tk")
        # Not acknowledged: the same CON comes again (after ACK_TIMEOUT), then an ACK stops it.
        assert udp.recv(2) == response_bytes
        # A duplicate of the request gets the empty ACK again, and is not processed twice.
        udp.send(datagram)
        assert udp.recv() == ack_bytes
        udp.send(empty(aiocoap.ACK, response.mid))
        assert udp.recv(0.8) is None
        assert len(emu.telemetry("pre-token")) == 1
        # NON requests get a NON response and no empty ACK.
        udp.send(raw(aiocoap.POST, f"api/v1/{TOKEN}/telemetry", b'{"n":2}', mtype=aiocoap.NON, mid=0x0102))
        non = aiocoap.Message.decode(udp.recv())
        assert (non.mtype, non.code) == (aiocoap.NON, CREATED)
        # aiocoap's client copes with the separate path.
        assert request(f"{emu.uri}/{TOKEN}/telemetry", payload=b'{"n":3}').code == CREATED
    finally:
        udp.close()
        emu.close()


def test_server_3_3_always_answers_separately(config: dict) -> None:
    emu = Emulator(config, version=(3, 3))
    u = Udp(emu.port)
    try:
        u.send(raw(aiocoap.POST, f"api/v1/{TOKEN}/telemetry", b'{"n":1}'))
        assert aiocoap.Message.decode(u.recv()).code == numbers.codes.Code.EMPTY
        response = aiocoap.Message.decode(u.recv())
        assert (response.mtype, response.code) == (aiocoap.CON, CREATED)
        u.send(empty(aiocoap.ACK, response.mid))
    finally:
        u.close()
        emu.close()


def test_rst_to_a_notification_ends_the_observation(emu: Emulator, udp: Udp) -> None:
    udp.send(wire(aiocoap.GET, aiocoap.CON, 7, b"ob", path=f"api/v1/{TOKEN}/attributes", observe=0))
    first = aiocoap.Message.decode(udp.recv())
    assert (first.code, first.opt.observe, first.payload) == (CONTENT, 1, b"{}")
    emu.call(lambda s: s.set_shared_attributes("pre-token", {"k": 1}))
    note = aiocoap.Message.decode(udp.recv())
    assert (note.mtype, note.code, note.token, json.loads(note.payload)) == (aiocoap.CON, CONTENT, b"ob", {"k": 1})
    udp.send(empty(aiocoap.RST, note.mid))
    udp.recv(0.1)
    emu.call(lambda s: s.set_shared_attributes("pre-token", {"k": 2}))
    assert udp.recv(0.5) is None


def test_an_unacknowledged_notification_is_retransmitted_then_the_observation_dropped(config: dict) -> None:
    emu = Emulator(config, ack_timeout=0.05)
    udp = Udp(emu.port)
    try:
        udp.send(wire(aiocoap.GET, aiocoap.CON, 8, b"ob", path=f"api/v1/{TOKEN}/attributes", observe=0))
        assert aiocoap.Message.decode(udp.recv()).opt.observe == 1
        emu.call(lambda s: s.set_shared_attributes("pre-token", {"k": 1}))
        copies = []
        while (data := udp.recv(1.5)) is not None:
            copies.append(data)
        assert len(copies) == 5 and len(set(copies)) == 1  # the first send plus MAX_RETRANSMIT (4) copies
        emu.call(lambda s: s.set_shared_attributes("pre-token", {"k": 2}))
        assert udp.recv(0.3) is None
    finally:
        udp.close()
        emu.close()


def test_observe_rpc_side_by_side_with_attributes_then_cancel(emu: Emulator, udp: Udp) -> None:
    # The RPC observation's request gets only its (empty) ACK; each RPC then comes as a notification with its id.
    udp.send(wire(aiocoap.GET, aiocoap.CON, 9, b"at", path=f"api/v1/{TOKEN}/attributes", observe=0))
    assert aiocoap.Message.decode(udp.recv()).opt.observe == 1
    udp.send(wire(aiocoap.GET, aiocoap.CON, 10, b"rp", path=f"api/v1/{TOKEN}/rpc", observe=0))
    ack = aiocoap.Message.decode(udp.recv())
    assert (ack.mtype, ack.code, ack.mid, ack.payload) == (aiocoap.ACK, numbers.codes.Code.EMPTY, 10, b"")
    rpc_id = emu.call(lambda s: s.send_rpc("pre-token", "setRelay", {"on": True}))
    note = aiocoap.Message.decode(udp.recv())
    assert (note.mtype, note.code, note.token) == (aiocoap.CON, CONTENT, b"rp") and note.opt.observe >= 2
    assert json.loads(note.payload) == {"id": rpc_id, "method": "setRelay", "params": {"on": True}}
    udp.send(empty(aiocoap.ACK, note.mid))
    emu.call(lambda s: s.set_shared_attributes("pre-token", {"k": 1}))
    note = aiocoap.Message.decode(udp.recv())
    assert (note.token, json.loads(note.payload)) == (b"at", {"k": 1})
    udp.send(empty(aiocoap.ACK, note.mid))
    udp.send(wire(aiocoap.GET, aiocoap.CON, 11, b"rp", path=f"api/v1/{TOKEN}/rpc", observe=1))
    assert aiocoap.Message.decode(udp.recv()).mid == 11
    emu.call(lambda s: s.send_rpc("pre-token", "setRelay", {"on": False}))
    assert udp.recv(0.3) is None


@pytest.mark.parametrize("code, feature", [(aiocoap.GET, "rpc"), (aiocoap.POST, "rpc")])
def test_features_the_emulator_does_not_emulate_say_5_01(emu: Emulator, code: Any, feature: str) -> None:
    resp = request(f"{emu.uri}/{TOKEN}/{feature}", code=code, payload=b"{}" if code == aiocoap.POST else b"")
    assert resp.code == numbers.codes.Code.NOT_IMPLEMENTED and feature.encode() in resp.payload


@pytest.mark.parametrize("payload, code", [(b'{"secretKey":"k","durationMs":60000}', "CREATED"), (b"", "CREATED"),
                                           (b"[1]", "BAD_REQUEST"), (b"{bad", "BAD_REQUEST")])
def test_a_claim_is_accepted_as_thingsboard_answers_it(emu: Emulator, payload: bytes, code: str) -> None:
    resp = request(f"{emu.uri}/{TOKEN}/claim", code=aiocoap.POST, payload=payload)
    assert resp.code == getattr(numbers.codes.Code, code) and resp.payload == b""


@pytest.mark.parametrize("datagram", [
    b"\x40\x02\x12",  # shorter than a header
    b"\x80\x02\x12\x34",  # version 2
    b"\x59\x02\x12\x34" + b"t" * 9,  # malformed NON: token length 9
    b"\x52\x02\x12\x34tk\xff",  # malformed NON: payload marker without payload
    b"\x70\x00\x12\x34",  # RST nobody waits for
    b"\x60\x00\x12\x34",  # ACK nobody waits for
])
def test_unreadable_malformed_non_and_stray_datagrams_are_ignored(emu: Emulator, udp: Udp, datagram: bytes) -> None:
    udp.send(datagram)
    assert udp.recv(0.3) is None
    assert served(emu)


@pytest.mark.parametrize("datagram", [
    b"\x49\x02\x12\x34" + b"t" * 9,  # token length 9
    b"\x42\x02\x12\x34tk\xff",  # payload marker without payload
    b"\x42\x02\x12\x34tk\xf1x",  # option delta 15
    b"\x42\x02\x12\x34tk\xb9api",  # option value runs past the end
    b"\x40\x00\x12\x34",  # CON ping
    b"\x42\x45\x12\x34tk",  # a response sent to the server as CON
    b"\x41\x00\x12\x34t",  # empty message with a token
])
def test_malformed_con_is_rejected_with_a_matching_rst(emu: Emulator, udp: Udp, datagram: bytes) -> None:
    udp.send(datagram)
    rst = aiocoap.Message.decode(udp.recv())
    assert (rst.mtype, rst.code, rst.mid, rst.token) == (aiocoap.RST, numbers.codes.Code.EMPTY, 0x1234, b"")
    assert served(emu)


def test_unknown_critical_option_is_4_02_and_elective_is_ignored(emu: Emulator, udp: Udp) -> None:
    udp.send(raw(aiocoap.POST, f"api/v1/{TOKEN}/telemetry", b'{"a":1}', extra=(2049, b"x")))  # critical
    assert aiocoap.Message.decode(udp.recv()).code == BAD_OPTION
    udp.send(raw(aiocoap.POST, f"api/v1/{TOKEN}/telemetry", b'{"a":2}', mid=0x2222, extra=(2048, b"x")))
    assert aiocoap.Message.decode(udp.recv()).code == CREATED
    assert [t["values"] for t in emu.telemetry("pre-token")] == [{"a": 2}]


def test_oversized_datagram_is_dropped_and_the_server_keeps_serving(emu: Emulator, udp: Udp) -> None:
    udp.send(raw(aiocoap.POST, f"api/v1/{TOKEN}/telemetry", json.dumps({"x": "y" * 3000}).encode()))
    assert udp.recv(0.3) is None
    udp.send(raw(aiocoap.POST, f"api/v1/{TOKEN}/telemetry", json.dumps({"x": "y" * 1500}).encode(), mid=9))
    assert aiocoap.Message.decode(udp.recv()).code == CREATED
    assert served(emu)


def test_random_datagrams_never_stop_the_server(emu: Emulator, udp: Udp) -> None:
    rng = random.Random(7252)
    for _ in range(500):
        udp.send(bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64))))
    while udp.recv(0.2) is not None:
        pass
    assert served(emu)
    assert emu.telemetry("pre-token") == [{"ts": emu.telemetry("pre-token")[0]["ts"], "values": {"alive": 1}}]


# --- libcoap's coap-client -----------------------------------------------------------------------------------------

def coap_client(out_dir: Path, *args: str) -> tuple[list[str], str]:
    """Run coap-client-notls: (response codes it logged with -v 6, the payload it received, via -o)."""
    out = out_dir / f"coap-out-{secrets.token_hex(4)}"
    proc = subprocess.run(["coap-client-notls", "-B", "5", "-v", "6", "-o", str(out), *args], capture_output=True,
                          text=True, timeout=20)
    assert proc.returncode == 0, proc.stderr
    codes = re.findall(r"^v:1 t:\w+ c:(\d\.\d\d) ", proc.stdout, re.MULTILINE)
    payload = out.read_text() if out.exists() else proc.stderr
    return codes, payload


@pytest.mark.parametrize("separate", [False, True])
def test_coap_client_provisions_from_a_file_and_sends_telemetry(config: dict, secret: str, tmp_path: Path,
                                                                separate: bool) -> None:
    emu = Emulator(config, separate=separate, ack_timeout=0.3)
    try:
        # The secret goes in a file, never on argv; the device token is a throwaway made up for this test.
        device_token = secrets.token_hex(8)
        body = tmp_path / "provision.json"
        body.write_bytes(provision_body(secret, deviceName="libcoap", token=device_token))
        codes, payload = coap_client(tmp_path, "-m", "post", "-f", str(body), f"{emu.uri}/provision")
        assert codes == ["2.01"]
        assert json.loads(payload) == {"credentialsValue": device_token, "credentialsType": "ACCESS_TOKEN",
                                       "status": "SUCCESS"}
        codes, payload = coap_client(tmp_path, "-m", "post", "-f", str(body), f"{emu.uri}/provision")
        assert codes == ["4.00"] and FAILURE_JSON in payload
        for flags in ((), ("-N",)):
            codes, _ = coap_client(tmp_path, *flags, "-m", "post", "-e", '{"temp":20}',
                                   f"{emu.uri}/{device_token}/telemetry")
            assert codes == ["2.01"]
        assert len(emu.telemetry("libcoap")) == 2
        assert coap_client(tmp_path, "-m", "post", "-e", "{}", f"{emu.uri}/{device_token}x/telemetry")[0] == \
            ["4.01"]
        assert coap_client(tmp_path, f"{emu.uri}/{device_token}/attributes")[0] == ["4.04"]
    finally:
        emu.close()


# --- through the real CLI -----------------------------------------------------------------------------------------

def test_cli_emulator_serves_coap_with_separate_responses_and_an_old_version(config: dict, secret: str) -> None:
    with emulator_process(config, "--coap-separate", "--server-version", "3.2.1") as proc:
        uri = f"coap://127.0.0.1:{proc.ports['coap']}/api/v1"
        resp = request(f"{uri}/provision", payload=provision_body(secret, deviceName="cli", token="cliToken"))
        assert (resp.code, json.loads(resp.payload)["status"]) == (CONTENT, "SUCCESS")
        assert request(f"{uri}/cliToken/telemetry", payload=b'{"a":1}').code == VALID
