"""The emulator's per-device rate limits (reference §8), hit with third-party clients over each transport: paho-mqtt
(3.1.1 and 5) and byte-level MQTT, urllib, aiocoap; the getSessionLimits RPC; the limits from the config file and the
command line. Every limit here refills one token per hour or slower, so that no refill happens during a test."""

from __future__ import annotations

import asyncio
import copy
import json
import queue
import subprocess
import sys
import urllib.error
import urllib.request

import aiocoap
import paho.mqtt.client as mqtt
import pytest

from emulator_fixtures import CONFIG, Paho, RawMqtt, connect_packet, emulator_process, mqtt_emulator
from host_tools.emulator import limits
from host_tools.emulator.state import ConfigError, EmulatorState
from support import ROOT

TOKEN = "preTokenValue0000001"  # CONFIG's pre-provisioned ACCESS_TOKEN device "pre-token"
TELEMETRY = "v1/devices/me/telemetry"


def with_limits(**profile: str) -> dict:
    config = copy.deepcopy(CONFIG)
    config["tenantProfile"] = {f"transportDevice{name}RateLimit": value for name, value in profile.items()}
    return config


def stored(emu, name: str = "pre-token") -> int:
    return len(emu.call(lambda state: state.telemetry(name)))


def test_limit_strings_are_capacity_seconds_pairs():
    assert limits.parse("200:1,6000:60") == [(200, 1), (6000, 60)]
    for bad in ("", "200", "200:", ":1", "0:1", "200:0", "200:1,", "200:1, 6000:60", "2.5:1", "-1:1"):
        with pytest.raises(limits.LimitSyntaxError):
            limits.parse(bad)


def test_bad_limits_in_the_config_are_named():
    for profile, message in [({"transportDeviceMsgRateLimit": "fast"}, "tenantProfile.transportDeviceMsgRateLimit: "
                                                                         "'fast' is not capacity:seconds"),
                             ({"transportDeviceMsgRateLimit": 5}, "must be a string"),
                             ({"transportTenantMsgRateLimit": "1:1"}, "unknown field 'transportTenantMsgRateLimit'"),
                             ([], "tenantProfile: must be an object")]:
        config = copy.deepcopy(CONFIG)
        config["tenantProfile"] = profile
        with pytest.raises(ConfigError, match=message):
            EmulatorState(config)


def test_a_bad_limit_on_the_command_line_is_refused_before_start():
    proc = subprocess.run([sys.executable, "-m", "host_tools", "emulator", "--config", "host_tools/emulator/demo.json",
                           "--telemetry-data-points-rate-limit", "10/s"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert "argument --telemetry-data-points-rate-limit: '10/s' is not capacity:seconds" in proc.stderr


def test_buckets_refill_greedily_and_every_pair_must_have_the_tokens():
    now = [0.0]
    bucket = limits.Bucket("2:10,3:60", clock=lambda: now[0])
    assert [bucket.try_consume() for _ in range(3)] == [True, True, False]
    now[0] = 5.0  # the first pair got one token back (2 per 10 s); the second still holds one of its three
    assert [bucket.try_consume() for _ in range(2)] == [True, False]
    now[0] = 60.0  # both full again (capped at their capacity)
    assert bucket.try_consume(2) and not bucket.try_consume(2)
    assert not limits.Bucket("5:60", clock=lambda: 0.0).try_consume(6)


def test_unset_limits_never_refuse():
    rate = limits.RateLimits({})
    assert all(rate.allow("d", points) is None for points in [0, 1, 10 ** 6] * 100)


def test_mqtt_telemetry_over_the_limit_closes_the_session_without_puback():
    with mqtt_emulator(with_limits(TelemetryMsg="2:3600")) as emu, Paho(emu.port, "c", TOKEN) as client:
        assert client.rc == 0
        assert [client.publish(TELEMETRY, json.dumps({"n": n})) for n in range(2)] == [0, 0]
        info = client.client.publish(TELEMETRY, '{"n":2}', qos=1)
        assert client.disconnected.wait(5)
        assert not info.is_published()  # no PUBACK came
        assert stored(emu) == 2
        assert any("rate limit: a message from 'pre-token' refused (telemetryMessages limit reached)" in e
                   for e in emu.events)


def test_mqtt5_data_points_over_the_limit_get_disconnect_0x83():
    with mqtt_emulator(with_limits(TelemetryDataPoints="5:3600")) as emu, \
            Paho(emu.port, "c", TOKEN, protocol=mqtt.MQTTv5) as client:
        assert client.publish(TELEMETRY, '{"a":1,"b":2,"c":3}') == 0
        info = client.client.publish(TELEMETRY, '[{"ts":1,"values":{"d":4}},{"ts":2,"values":{"e":5,"f":6}}]', qos=1)
        assert client.disconnected.wait(5)
        assert client.server_disconnect == 0x83
        assert not info.is_published()
        assert stored(emu) == 1


def test_attributes_with_keys_count_as_telemetry_and_requests_as_messages():
    with mqtt_emulator(with_limits(TelemetryMsg="1:3600", Msg="2:3600")) as emu:
        with Paho(emu.port, "c", TOKEN) as client:  # the session's opening took one message token
            assert client.publish("v1/devices/me/attributes", '{"fw":"v1"}') == 0  # the one telemetry token
            client.subscribe("v1/devices/me/attributes/response/+")  # no push: not counted
            assert client.publish("v1/devices/me/attributes/request/1", '{"clientKeys":"fw"}') == 0
            assert json.loads(client.message().payload) == {"client": {"fw": "v1"}}
            client.client.publish("v1/devices/me/attributes/request/2", '{"clientKeys":"fw"}', qos=1)
            assert client.disconnected.wait(5)


def test_mqtt_connect_over_the_messages_limit_is_refused_at_connack():
    with mqtt_emulator(with_limits(Msg="1:3600")) as emu:
        with Paho(emu.port, "c", TOKEN) as first:
            assert first.rc == 0
        with RawMqtt(emu.port) as raw:
            raw.send(connect_packet("c", TOKEN))
            assert raw.read_packet() == (0x20, b"\x00\x03")  # 3.1.1: server unavailable
            assert raw.closed_by_server()
        refused = Paho(emu.port, "c", TOKEN, protocol=mqtt.MQTTv5)
        with refused:
            assert refused.rc == 0x9F  # MQTT 5: connection rate exceeded


def test_push_subscriptions_over_the_limit_are_granted_but_get_no_pushes():
    with mqtt_emulator(with_limits(Msg="1:3600")) as emu, Paho(emu.port, "c", TOKEN) as client:
        assert client.subscribe("v1/devices/me/attributes") == [1]
        emu.call(lambda state: state.set_shared_attributes("pre-token", {"x": 1}))
        with pytest.raises(queue.Empty):
            client.message(timeout=0.5)
        assert client.subscribe("v1/devices/me/rpc/response/+") == [1]  # not a push: never counted


def test_get_session_limits_answers_the_tenant_profile_strings():
    with mqtt_emulator(with_limits(Msg="200:1,6000:60")) as emu, Paho(emu.port, "c", TOKEN) as client:
        client.subscribe("v1/devices/me/rpc/response/+")
        assert client.publish("v1/devices/me/rpc/request/7", '{"method":"getSessionLimits","params":{}}') == 0
        reply = client.message()
        assert reply.topic == "v1/devices/me/rpc/response/7"
        assert reply.payload == (b'{"maxPayloadSize":65536,"maxInflightMessages":100,"rateLimits":'
                                 b'{"messages":"200:1,6000:60","telemetryMessages":null,"telemetryDataPoints":null}}')


def test_get_session_limits_is_not_counted_and_unset_limits_are_null():
    with mqtt_emulator(with_limits(Msg="1:3600")) as emu, Paho(emu.port, "c", TOKEN) as client:
        client.subscribe("v1/devices/me/rpc/response/+")
        for request_id in (1, 2, 3):
            assert client.publish(f"v1/devices/me/rpc/request/{request_id}", '{"method":"getSessionLimits"}') == 0
            assert json.loads(client.message().payload)["rateLimits"] == {
                "messages": "1:3600", "telemetryMessages": None, "telemetryDataPoints": None}


def test_http_over_the_limits_is_500_with_an_empty_body():
    with emulator_process(CONFIG, "--telemetry-msg-rate-limit", "1:3600", "--msg-rate-limit", "1:3600") as emu:
        base = f"http://127.0.0.1:{emu.ports['http']}/api/v1/{TOKEN}"

        def call(path: str, body: bytes | None = None) -> tuple[int, bytes]:
            req = urllib.request.Request(base + path, data=body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    return resp.status, resp.read()
            except urllib.error.HTTPError as e:
                return e.code, e.read()

        assert call("/telemetry", b'{"t":1}')[0] == 200
        assert call("/telemetry", b'{"t":2}') == (500, b"")
        assert call("/attributes?clientKeys=a")[0] == 200
        assert call("/attributes?clientKeys=a") == (500, b"")
        assert len(emu.telemetry("pre-token")) == 1


def test_coap_over_the_limit_is_5_00():
    with emulator_process(CONFIG, "--telemetry-data-points-rate-limit", "3:3600") as emu:
        uri = f"coap://127.0.0.1:{emu.ports['coap']}/api/v1/{TOKEN}/telemetry"

        async def post(body: bytes) -> aiocoap.Message:
            ctx = await aiocoap.Context.create_client_context()
            try:
                return await asyncio.wait_for(
                    ctx.request(aiocoap.Message(code=aiocoap.POST, uri=uri, payload=body)).response, 20)
            finally:
                await ctx.shutdown()

        assert asyncio.run(post(b'{"a":1,"b":2}')).code == aiocoap.CREATED
        refused = asyncio.run(post(b'{"c":3,"d":4}'))
        assert refused.code == aiocoap.INTERNAL_SERVER_ERROR and refused.payload == b""
        assert asyncio.run(post(b'{"e":5}')).code == aiocoap.CREATED  # the third point was left
        assert len(emu.telemetry("pre-token")) == 2
