"""MQTT 5 as ThingsBoard 3.5+ serves it (reference §3.5, §9; docs/thingsboard-notes.md "MQTT 5"), with paho-mqtt
in MQTT 5 mode for the reason codes and raw bytes where the exact packets matter."""

from __future__ import annotations

import json
import struct

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from emulator_fixtures import ALLOW_KEY, ALLOW_SECRET, Paho, RawMqtt, connect_packet, mqtt_emulator, mqtt_packet, \
    mqtt_string, publish_packet

TOKEN = "preTokenValue0000001"
CONNACK_OK_5 = (0x20, b"\x00\x00\x00")


def paho5(port: int, client_id: str = "d5", username: str | None = TOKEN, password: str | None = None,
          **kwargs) -> Paho:
    return Paho(port, client_id, username, password, protocol=mqtt.MQTTv5, **kwargs)


def connect5(client_id: str = "raw5", username: str | None = TOKEN, password: str | None = None,
             properties: bytes = b"\x00") -> bytes:
    """An MQTT 5 CONNECT (clean start, keep-alive 60) with the raw property list `properties`."""
    flags = 0x02 | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    body = mqtt_string("MQTT") + bytes([5, flags]) + struct.pack("!H", 60) + properties + mqtt_string(client_id)
    if username is not None:
        body += mqtt_string(username)
    if password is not None:
        body += mqtt_string(password)
    return mqtt_packet(0x10, body)


def publish5(topic: str, payload: bytes, packet_id: int = 0, properties: bytes = b"\x00") -> bytes:
    """An MQTT 5 PUBLISH, QoS 1 when `packet_id` is given, else QoS 0."""
    ident = struct.pack("!H", packet_id) if packet_id else b""
    return mqtt_packet(0x32 if packet_id else 0x30, mqtt_string(topic) + ident + properties + payload)


def session5(port: int, **kwargs) -> RawMqtt:
    c = RawMqtt(port)
    c.send(connect5(**kwargs))
    assert c.read_packet() == CONNACK_OK_5
    return c


# ---------------------------------------------------------------- CONNACK

@pytest.mark.parametrize("client_id, username, password, reason", [
    ("c", "wrongToken", None, 0x86),        # a wrong access token: bad user name or password
    ("unknown-client", None, None, 0x85),   # client id only, unknown: client identifier not valid
    ("", None, None, 0x87),                 # nothing to go by: not authorized
])
def test_refused_connect_gets_the_reason_and_then_a_disconnect(client_id, username, password, reason):
    with mqtt_emulator() as emu:
        with RawMqtt(emu.port) as c:
            c.send(connect5(client_id, username, password))
            assert c.read_packet() == (0x20, bytes([0, reason, 0]))
            assert c.read_packet() == (0xE0, bytes([reason, 0]))
            assert c.closed_by_server()
        client = paho5(emu.port, client_id, username, password)
        try:
            assert client.rc.value == reason
        finally:
            client.client.loop_stop()


def test_before_3_7_a_refused_mqtt_5_connect_is_closed_without_a_disconnect():
    with mqtt_emulator(server_version=(3, 6)) as emu, RawMqtt(emu.port) as c:
        c.send(connect5("c", "wrongToken"))
        assert c.read_packet() == (0x20, b"\x00\x86\x00")
        assert c.closed_by_server()


def test_accepted_connect_with_properties_and_a_will():
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 30
    props.ReceiveMaximum = 10
    props.MaximumPacketSize = 100000
    props.UserProperty = ("firmware", "1.0")
    with mqtt_emulator() as emu:
        client = Paho(emu.port, "d5", TOKEN, protocol=mqtt.MQTTv5, properties=props)
        with client:
            assert client.rc.value == 0
            assert client.publish("v1/devices/me/telemetry", '{"t":1}') == 0
        assert [e["values"] for e in emu.call(lambda s: s.telemetry("pre-token"))] == [{"t": 1}]
        with RawMqtt(emu.port) as c:
            will_props = b"\x05\x18\x00\x00\x00\x05"  # will delay interval 5
            body = mqtt_string("MQTT") + bytes([5, 0x86]) + struct.pack("!H", 60) + b"\x00" + mqtt_string("w") + \
                will_props + mqtt_string("last/will") + mqtt_string("bye") + mqtt_string(TOKEN)
            c.send(mqtt_packet(0x10, body))
            assert c.read_packet() == CONNACK_OK_5


# ---------------------------------------------------------------- PUBACK, SUBACK, UNSUBACK

def test_puback_reason_codes():
    with mqtt_emulator() as emu, paho5(emu.port) as client:
        assert client.publish("v1/devices/me/telemetry", '{"temperature":21}') == 0
        assert client.publish("v1/devices/me/unknown", "{}") == 0x90          # topic name invalid, kept open
        assert client.publish("v1/devices/me/telemetry", "not json") == 0x99  # payload format invalid, kept open
        assert client.publish("v1/devices/me/attributes/request/1", "[1]") == 0x99
        assert client.publish("v1/devices/me/rpc/request/1", '{"method":"getTime","params":{}}') == 0
        assert client.publish("v1/devices/me/attributes", '{"fw":"1.0"}') == 0
        assert not client.disconnected.is_set()
        telemetry = emu.call(lambda s: s.telemetry("pre-token"))
        assert [e["values"] for e in telemetry] == [{"temperature": 21}]


def test_bad_payload_at_qos_0_gets_disconnect_0x99():
    with mqtt_emulator() as emu, session5(emu.port) as c:
        c.send(publish5("v1/devices/me/telemetry", b"not json"))
        assert c.read_packet() == (0xE0, b"\x99\x00")
        assert c.closed_by_server()


def test_suback_and_unsuback_reason_codes():
    with mqtt_emulator() as emu, paho5(emu.port) as client:
        assert client.subscribe("v1/devices/me/attributes", 1) == [1]
        assert client.subscribe("v1/devices/me/#", 1) == [0x8F]
        assert client.subscribe("v1/devices/me/rpc/request/+", 0) == [0]
        assert client.unsubscribe("v1/devices/me/attributes", "never/subscribed") == [0x00, 0x11]
    with mqtt_emulator() as emu, session5(emu.port) as c:
        c.send(mqtt_packet(0x82, b"\x00\x07\x00" + mqtt_string("v2/a") + b"\x01" + mqtt_string("x/#") + b"\x01"))
        assert c.read_packet() == (0x90, b"\x00\x07\x00\x01\x8f")
        c.send(mqtt_packet(0xA2, b"\x00\x08\x00" + mqtt_string("v2/a")))
        assert c.read_packet() == (0xB0, b"\x00\x08\x00\x00")


def test_pushes_reach_an_mqtt_5_client():
    with mqtt_emulator() as emu, paho5(emu.port) as client:
        assert client.subscribe("v1/devices/me/attributes", 1) == [1]
        assert client.subscribe("v1/devices/me/rpc/request/+", 1) == [1]
        emu.call(lambda s: s.set_shared_attributes("pre-token", {"mode": "eco"}))
        msg = client.message()
        assert (msg.topic, json.loads(msg.payload), msg.qos) == ("v1/devices/me/attributes", {"mode": "eco"}, 1)
        rpc_id = emu.call(lambda s: s.send_rpc("pre-token", "ping", {"n": 1}))
        msg = client.message()
        assert msg.topic == f"v1/devices/me/rpc/request/{rpc_id}"
        assert json.loads(msg.payload) == {"method": "ping", "params": {"n": 1}}
        assert client.publish(f"v1/devices/me/rpc/response/{rpc_id}", '{"pong":1}') == 0
        assert client.publish("v1/devices/me/attributes/request/4", '{"sharedKeys":"mode"}') == 0
        msg = client.message()
        assert (msg.topic, json.loads(msg.payload)) == ("v1/devices/me/attributes/response/4",
                                                        {"shared": {"mode": "eco"}})
        assert emu.call(lambda s: s.rpc_replies("pre-token")) == {rpc_id: {"pong": 1}}


# ---------------------------------------------------------------- DISCONNECT

def test_client_disconnect_is_answered_with_disconnect_0():
    with mqtt_emulator() as emu, session5(emu.port) as c:
        c.send(b"\xe0\x00")
        assert c.read_packet() == (0xE0, b"")
        assert c.closed_by_server()
    with mqtt_emulator() as emu, session5(emu.port) as c:
        c.send(b"\xe0\x07\x04\x05\x11\x00\x00\x00\x00")  # reason 4 (with will), session expiry 0
        assert c.read_packet() == (0xE0, b"")


def test_deleted_device_gets_disconnect_0x98():
    with mqtt_emulator() as emu, paho5(emu.port) as client:
        emu.call(lambda s: s.delete_device("pre-token"))
        assert client.disconnected.wait(5)
        assert client.server_disconnect == 0x98


def test_inactive_session_gets_disconnect_0xa0():
    with mqtt_emulator(inactivity_timeout=0.3) as emu, session5(emu.port) as c:
        assert c.read_packet() == (0xE0, b"\xa0\x00")
        assert c.closed_by_server()


# ---------------------------------------------------------------- properties

def test_publish_properties_are_parsed_and_ignored():
    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = "application/json"
    props.PayloadFormatIndicator = 1
    props.MessageExpiryInterval = 60
    props.UserProperty = [("a", "1"), ("b", "2")]
    props.CorrelationData = b"\x00\x01"
    props.ResponseTopic = "my/replies"
    with mqtt_emulator() as emu, paho5(emu.port) as client:
        assert client.publish("v1/devices/me/telemetry", '{"p":1}', properties=props) == 0
        assert [e["values"] for e in emu.call(lambda s: s.telemetry("pre-token"))] == [{"p": 1}]


@pytest.mark.parametrize("properties", [
    b"\x02\x7f\x00",              # identifier 0x7f does not exist
    b"\x30\x02\x00\x00\x00\x01",  # a list longer than the packet
    b"\x03\x26\x00\x40",          # a user property whose key runs past the packet
    b"\x80\x80\x80\x80\x01",      # a list length longer than 4 bytes
])
def test_a_bad_property_list_is_a_malformed_packet(properties):
    with mqtt_emulator() as emu, session5(emu.port) as c:
        c.send(publish5("v1/devices/me/telemetry", b'{"x":1}', 1, properties))
        assert c.read_packet() == (0xE0, b"\x81\x00")
        assert c.closed_by_server()
        assert emu.call(lambda s: s.telemetry("pre-token")) == []


def test_a_bad_property_in_connect_closes_without_an_answer():
    with mqtt_emulator() as emu, RawMqtt(emu.port) as c:
        c.send(connect5(properties=b"\x02\x7f\x00"))
        with pytest.raises(ConnectionError):
            c.read_packet()


def test_a_publish_topic_with_a_wildcard_is_a_malformed_packet():
    with mqtt_emulator() as emu:
        with session5(emu.port) as c:
            c.send(publish5("v1/devices/me/+", b"{}", 1))
            assert c.read_packet() == (0xE0, b"\x81\x00")
            assert c.closed_by_server()
        with RawMqtt(emu.port) as c:
            c.send(connect_packet("d", TOKEN) + publish_packet("v1/devices/#", b"{}"))
            assert c.read_packet() == (0x20, b"\x00\x00")
            assert c.closed_by_server()


def test_subscription_options_as_netty_reads_them():
    with mqtt_emulator() as emu, session5(emu.port) as c:
        # no-local, retain-as-published and retain handling 2 pass; QoS is the low two bits
        c.send(mqtt_packet(0x82, b"\x00\x01\x00" + mqtt_string("v2/a") + bytes([0x2D])))
        assert c.read_packet() == (0x90, b"\x00\x01\x00\x01")
        c.send(mqtt_packet(0x82, b"\x00\x02\x00" + mqtt_string("v2/a") + bytes([0x31])))  # retain handling 3
        assert c.read_packet() == (0xE0, b"\x81\x00")


# ---------------------------------------------------------------- provisioning

def test_provisioning_over_mqtt_5():
    with mqtt_emulator() as emu, paho5(emu.port, "provision", "provision") as client:
        assert client.rc.value == 0
        assert client.subscribe("/provision/response", 1) == [1]
        assert client.subscribe("/provision/other", 1) == [0x8F]
        request = {"deviceName": "v5-dev", "provisionDeviceKey": ALLOW_KEY, "provisionDeviceSecret": ALLOW_SECRET}
        assert client.publish("/provision/request", json.dumps(request)) == 0
        answer = json.loads(client.message().payload)
        assert answer["status"] == "SUCCESS" and answer["credentialsType"] == "ACCESS_TOKEN"


def test_provisioning_session_refusals():
    with mqtt_emulator() as emu:
        with session5(emu.port, client_id="provision", username=None) as c:
            c.send(publish5("v1/devices/me/telemetry", b"{}", 3))
            assert c.read_packet() == (0x40, b"\x00\x03\x90\x00")
            assert c.read_packet() == (0xE0, b"\x90\x00")
            assert c.closed_by_server()
        with session5(emu.port, client_id="provision", username=None) as c:
            c.send(publish5("/provision/request", b"\x01not json", 4))
            assert c.read_packet() == (0x40, b"\x00\x04\x99\x00")   # the session goes on
            c.send(b"\xc0\x00")
            assert c.read_packet() == (0xD0, b"")
        with session5(emu.port, client_id="provision", username=None) as c:
            c.send(publish5("/provision/request", b'{"deviceName":"x"}', 5))  # no key or secret
            assert c.read_packet() == (0x40, b"\x00\x05\x83\x00")
            assert c.read_packet() == (0xE0, b"\x83\x00")
    with mqtt_emulator(server_version=(3, 6)) as emu:
        with session5(emu.port, client_id="provision", username=None) as c:
            c.send(publish5("v1/devices/me/telemetry", b"{}", 3))
            assert c.closed_by_server()


def test_v2_json_topics_are_served_as_thingsboard_forces_json_on_them():
    with mqtt_emulator() as emu, Paho(emu.port, "d", "preTokenValue0000001", protocol=mqtt.MQTTv5) as c:
        assert c.subscribe("v2/a/j") == [1] and c.subscribe("v2/r/req/j/+") == [1]
        assert c.subscribe("v2/a/res/j/+") == [1] and c.subscribe("v2/r/res/j/+") == [1]
        assert c.publish("v2/t/j", b'{"jt":1}') == 0 and c.publish("v2/a/j", b'{"ja":2}') == 0
        assert c.publish("v2/t/j", b"not json") == 0x99
        assert c.publish("v2/tj", b'{"x":1}') == 0x90, "not a ThingsBoard topic"
        assert emu.call(lambda s: s.latest_telemetry("pre-token"))["jt"][1] == 1
        c.publish("v2/a/req/j/3", b'{"clientKeys":"ja"}')
        msg = c.message()
        assert (msg.topic, json.loads(msg.payload)) == ("v2/a/res/j/3", {"client": {"ja": 2}})
        emu.call(lambda s: s.set_shared_attributes("pre-token", {"k": 1}))
        msg = c.message()
        assert (msg.topic, json.loads(msg.payload)) == ("v2/a/j", {"k": 1})
        rpc_id = emu.call(lambda s: s.send_rpc("pre-token", "m", {}))
        assert c.message().topic == f"v2/r/req/j/{rpc_id}"
        assert c.publish(f"v2/r/res/j/{rpc_id}", b'{"ok":1}') == 0
        assert emu.call(lambda s: s.rpc_replies("pre-token")) == {rpc_id: {"ok": 1}}


def test_the_gateway_api_of_a_device_that_is_no_gateway_gets_no_puback_and_the_session_goes_on():
    with mqtt_emulator() as emu, Paho(emu.port, "d", "preTokenValue0000001", protocol=mqtt.MQTTv5) as c:
        assert c.subscribe("v1/gateway/rpc") == [1] and c.subscribe("v1/gateway/attributes/response") == [1]
        info = c.client.publish("v1/gateway/telemetry", b'{"dev":[{"a":1}]}', qos=1)
        assert c.publish("v1/devices/me/telemetry", b'{"after":1}') == 0
        assert not info.is_published(), "no PUBACK for the gateway topic"
        assert "after" in emu.call(lambda s: s.latest_telemetry("pre-token"))
