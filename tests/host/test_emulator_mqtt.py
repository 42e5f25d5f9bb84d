"""The emulator's MQTT transport against reference §3 and §6, with paho-mqtt 2.x and exact bytes on raw sockets."""

from __future__ import annotations

import json
import socket
import struct
import time

import pytest

from emulator_fixtures import ALLOW_KEY, ALLOW_SECRET, CHECK_KEY, CHECK_SECRET, DISABLED_KEY, DISABLED_SECRET, \
    Paho, RawMqtt, connect_packet, mqtt_emulator, mqtt_packet, mqtt_string, publish_packet, subscribe_packet

FAILURE = {"errorMsg": "Failed to provision device!", "status": "FAILURE"}
NOT_FOUND = {"errorMsg": "Provision data was not found!", "status": "NOT_FOUND"}
CONNACK_OK = (0x20, b"\x00\x00")


def provision_request(key: str = ALLOW_KEY, secret: str = ALLOW_SECRET, **fields: object) -> bytes:
    return json.dumps({**fields, "provisionDeviceKey": key, "provisionDeviceSecret": secret}).encode()


def raw_provision(port: int, body: bytes, client_id: str = "provision", username: str | None = None
                  ) -> tuple[bytes, tuple]:
    """Provision over a raw socket; return (PUBACK body, response publish) after checking their order."""
    with RawMqtt(port) as c:
        c.send(connect_packet(client_id, username, "ignored" if username else None))
        assert c.read_packet() == CONNACK_OK
        c.send(publish_packet("/provision/request", body, qos=1, packet_id=7))
        first, puback = c.read_packet()
        assert first == 0x40, "PUBACK comes before the response"
        return puback, c.read_publish()


# ---------------------------------------------------------------- provisioning session (§3.2, §3.3)

@pytest.mark.parametrize("fields, expected", [
    ({"deviceName": "tok", "credentialsType": "ACCESS_TOKEN", "token": "mqttToken1"},
     {"credentialsValue": "mqttToken1", "credentialsType": "ACCESS_TOKEN", "status": "SUCCESS"}),
    ({"deviceName": "basic", "credentialsType": "MQTT_BASIC", "clientId": "cid", "username": "usr",
      "password": "pwd"},
     {"credentialsValue": {"clientId": "cid", "userName": "usr", "password": "pwd"}, "credentialsType": "MQTT_BASIC",
      "status": "SUCCESS"}),
    ({"deviceName": "cert", "credentialsType": "X509_CERTIFICATE",
      "hash": "-----BEGIN CERTIFICATE-----\nQUJD\n-----END CERTIFICATE-----\n"},
     {"credentialsValue": "QUJD", "credentialsType": "X509_CERTIFICATE", "status": "SUCCESS"}),
])
def test_paho_provisions_every_credentials_type_without_subscribing(fields, expected):
    with mqtt_emulator() as emu, Paho(emu.port, "provision", "provision", "any password") as c:
        assert c.rc == 0
        c.publish("/provision/request", provision_request(**fields))
        msg = c.message()
        assert msg.topic == "/provision/response" and msg.qos == 1
        assert msg.payload == json.dumps(expected, separators=(",", ":")).encode()


def test_paho_generated_token_then_telemetry_like_the_sample_script():
    # seeds/002 and 004: username "provision", subscribe to /provision/response, publish, then a new session
    with mqtt_emulator() as emu:
        with Paho(emu.port, "", "provision", "") as c:
            assert c.subscribe("/provision/response") == [1]
            c.publish("/provision/request", provision_request(deviceName="DEVICE_NAME"), qos=0)
            answer = json.loads(c.message().payload)
        assert answer["status"] == "SUCCESS" and answer["credentialsType"] == "ACCESS_TOKEN"
        assert len(answer["credentialsValue"]) == 20
        with Paho(emu.port, "", answer["credentialsValue"]) as d:
            assert d.rc == 0
            d.publish("v1/devices/me/telemetry", json.dumps({"temperature": 22.5}))
        assert emu.call(lambda s: s.telemetry("DEVICE_NAME"))[0]["values"] == {"temperature": 22.5}


@pytest.mark.parametrize("key, secret, fields, expected", [
    (ALLOW_KEY, "wrong", {"deviceName": "x"}, NOT_FOUND),
    ("unknown", ALLOW_SECRET, {"deviceName": "x"}, NOT_FOUND),
    (DISABLED_KEY, DISABLED_SECRET, {"deviceName": "x"}, NOT_FOUND),
    (ALLOW_KEY, ALLOW_SECRET, {"deviceName": "pre-token"}, FAILURE),
    (ALLOW_KEY, ALLOW_SECRET, {"deviceName": "x", "credentialsType": "MQTT_BASIC", "password": "p"}, FAILURE),
    (CHECK_KEY, CHECK_SECRET, {"deviceName": "nobody"}, FAILURE),
])
def test_error_answers_over_mqtt(key, secret, fields, expected):
    with mqtt_emulator() as emu:
        puback, (topic, payload, qos, _) = raw_provision(emu.port, provision_request(key, secret, **fields))
        assert puback == b"\x00\x07" and topic == "/provision/response" and qos == 1
        assert payload == json.dumps(expected, separators=(",", ":")).encode()


@pytest.mark.parametrize("name, expected", [
    ("pre-token", {"credentialsValue": "preTokenValue0000001", "credentialsType": "ACCESS_TOKEN",
                   "status": "SUCCESS"}),
    ("pre-basic", {"credentialsValue": {"clientId": "pre-client", "userName": "pre-user", "password": "pre-pass"},
                   "credentialsType": "MQTT_BASIC", "status": "SUCCESS"}),
])
def test_pre_provisioned_over_mqtt_and_second_attempt_by_version(name, expected):
    body = provision_request(CHECK_KEY, CHECK_SECRET, deviceName=name)
    with mqtt_emulator() as emu:
        assert json.loads(raw_provision(emu.port, body)[1][1]) == expected
        assert json.loads(raw_provision(emu.port, body)[1][1]) == FAILURE
    with mqtt_emulator(server_version=(4, 2, 1)) as emu:
        assert json.loads(raw_provision(emu.port, body)[1][1]) == expected
        assert json.loads(raw_provision(emu.port, body, username="provision", client_id="c")[1][1]) == expected


def test_provision_by_username_with_other_client_id_and_session_present_flag():
    with mqtt_emulator() as emu, RawMqtt(emu.port) as c:
        c.send(connect_packet("some-client", "provision", "pw", clean=False))
        assert c.read_packet() == (0x20, b"\x01\x00")


def test_response_uses_granted_qos_and_goes_only_to_the_requester():
    with mqtt_emulator() as emu, RawMqtt(emu.port) as a, RawMqtt(emu.port) as b:
        for c in (a, b):
            c.send(connect_packet("provision"))
            assert c.read_packet() == CONNACK_OK
        a.send(subscribe_packet(1, ("/provision/response", 0)))
        assert a.read_packet() == (0x90, b"\x00\x01\x00")
        a.send(publish_packet("/provision/request", provision_request(deviceName="only-a"), qos=0))
        topic, payload, qos, packet_id = a.read_publish()
        assert (topic, qos, packet_id) == ("/provision/response", 0, 0)
        assert json.loads(payload)["status"] == "SUCCESS"
        assert b.silent(0.3)


def test_session_closes_after_the_configured_delay_not_before():
    with mqtt_emulator(provision_close_after=0.6) as emu, RawMqtt(emu.port) as c:
        c.send(connect_packet("provision"))
        c.read_packet()
        c.send(publish_packet("/provision/request", provision_request(deviceName="slow")))
        c.read_packet()
        c.read_publish()
        started = time.monotonic()
        c.send(mqtt_packet(0xC0))  # still open: PINGREQ answered
        assert c.read_packet() == (0xD0, b"")
        assert c.closed_by_server(3)
        assert 0.45 < time.monotonic() - started < 2.0


def test_hundred_concurrent_provisioning_clients_each_get_their_own_answer():
    with mqtt_emulator() as emu:
        clients = [RawMqtt(emu.port, timeout=10) for _ in range(100)]
        try:
            for c in clients:
                c.send(connect_packet("provision"))
            for c in clients:
                assert c.read_packet() == CONNACK_OK
            for i, c in enumerate(clients):
                c.send(publish_packet("/provision/request", provision_request(deviceName=f"many-{i}"), qos=1,
                                      packet_id=i + 1))
            tokens = set()
            for i, c in enumerate(clients):
                assert c.read_packet() == (0x40, struct.pack("!H", i + 1))
                answer = json.loads(c.read_publish()[1])
                assert answer["status"] == "SUCCESS"
                tokens.add(answer["credentialsValue"])
                assert c.silent(0.01)
            assert len(tokens) == 100
            names = emu.call(lambda s: {d.name: d.credentials_value for d in map(s.device, [f"many-{i}" for i in
                                                                                           range(100)])})
            assert set(names.values()) == tokens
        finally:
            for c in clients:
                c.sock.close()


def test_subscribe_in_provisioning_session_by_version():
    with mqtt_emulator() as emu, RawMqtt(emu.port) as c:
        c.send(connect_packet("provision"))
        c.read_packet()
        c.send(subscribe_packet(3, ("/provision/response", 1), ("v1/devices/me/attributes", 1)))
        assert c.read_packet() == (0x90, b"\x00\x03\x01\x80")
        c.send(mqtt_packet(0xA2, b"\x00\x04" + mqtt_string("/provision/response")))
        assert c.read_packet() == (0xB0, b"\x00\x04")
    with mqtt_emulator(server_version=(3, 8)) as emu, RawMqtt(emu.port) as c:
        c.send(connect_packet("provision"))
        c.read_packet()
        c.send(subscribe_packet(3, ("/provision/response", 1)))
        assert c.silent(0.3), "no SUBACK before 3.9"
        c.send(publish_packet("/provision/request", provision_request(deviceName="old")))
        assert c.read_packet()[0] == 0x40
        assert json.loads(c.read_publish()[1])["status"] == "SUCCESS"


@pytest.mark.parametrize("version, puback", [((4, 3), True), ((3, 7), True), ((3, 6), False)])
def test_publish_to_another_topic_in_provisioning_session(version, puback):
    with mqtt_emulator(server_version=version) as emu, RawMqtt(emu.port) as c:
        c.send(connect_packet("provision"))
        c.read_packet()
        c.send(publish_packet("/provision", provision_request(deviceName="x"), packet_id=9))
        if puback:
            assert c.read_packet() == (0x40, b"\x00\x09")
        assert c.closed_by_server()
        assert emu.call(lambda s: s.device("x")) is None


@pytest.mark.parametrize("body, puback", [(b"not json at all", False), (b"[1]", False),
                                          (b'{"provisionDeviceKey":"k"}', True),
                                          (provision_request(deviceName="x", credentialsType="PSK"), True)])
def test_unparsable_provisioning_request_closes(body, puback):
    with mqtt_emulator() as emu, RawMqtt(emu.port) as c:
        c.send(connect_packet("provision"))
        c.read_packet()
        c.send(publish_packet("/provision/request", body, packet_id=5))
        if puback:
            assert c.read_packet() == (0x40, b"\x00\x05")
        assert c.closed_by_server()


# ---------------------------------------------------------------- authenticated sessions (§3.4-3.6)

@pytest.mark.parametrize("client_id, username, password, device", [
    ("dev-1", "preTokenValue0000001", None, "pre-token"),
    ("dev-2", "preTokenValue0000001", "ignored", "pre-token"),
    ("pre-client", "pre-user", "pre-pass", "pre-basic"),
    ("free-client", "up-user", "up-pass", "pre-userpass"),
    ("only-client", None, None, "pre-clientonly"),
])
def test_paho_connects_with_every_credentials_mode_and_sends_telemetry(client_id, username, password, device):
    with mqtt_emulator() as emu:
        with Paho(emu.port, client_id, username, password) as c:
            assert c.rc == 0
            c.publish("v1/devices/me/telemetry", b'{"x":1}')
            # PUBACK only after storing: the record is there as soon as publish returns
            assert emu.call(lambda s: s.telemetry(device))[0]["values"] == {"x": 1}
        assert any(f"device {device!r} connected" in e for e in emu.events)


@pytest.mark.parametrize("client_id, username, password, code", [
    ("c", "wrongToken", None, 5),
    ("c", "wrongToken", "", 5),
    ("pre-client", "pre-user", "wrong", 5),
    ("unknown-client", None, None, 2),
    ("", None, None, 5),
])
def test_refused_connack_codes(client_id, username, password, code):
    with mqtt_emulator() as emu, RawMqtt(emu.port) as c:
        c.send(connect_packet(client_id, username, password))
        assert c.read_packet() == (0x20, bytes([0, code]))
        assert c.closed_by_server()
        assert not any("wrongToken" in e or "wrong" == e for e in emu.events)


def test_refusals_before_3_5_are_always_5_and_paho_sees_the_refusal():
    with mqtt_emulator(server_version=(3, 4)) as emu, RawMqtt(emu.port) as c:
        c.send(connect_packet("unknown-client"))
        assert c.read_packet() == (0x20, b"\x00\x05")
    with mqtt_emulator() as emu:
        client = Paho(emu.port, "c", "wrongToken")
        try:
            assert client.rc.is_failure and client.rc.getName() == "Not authorized"
        finally:
            client.client.loop_stop()


def test_mqtt_31_accepted_and_mqtt_5_refused_before_3_5():
    body = mqtt_string("MQTT") + bytes([5, 0x82]) + b"\x00\x3c\x00" + mqtt_string("c") + \
        mqtt_string("preTokenValue0000001")
    with mqtt_emulator(server_version=(3, 4)) as emu:
        with RawMqtt(emu.port) as c:
            c.send(mqtt_packet(0x10, body))
            assert c.read_packet() == (0x20, b"\x00\x84\x00")
            assert c.closed_by_server()
    with mqtt_emulator() as emu:
        with RawMqtt(emu.port) as c:
            c.send(connect_packet("c", "preTokenValue0000001", protocol="MQIsdp", level=3))
            assert c.read_packet() == CONNACK_OK
        with RawMqtt(emu.port) as c:
            c.send(mqtt_packet(0x10, body))
            assert c.read_packet() == (0x20, b"\x00\x00\x00")
        # Netty's decoder refuses an unknown protocol name or level and ThingsBoard closes: no CONNACK 0x01.
        for protocol, level in (("MQTT", 7), ("MQTT", 3), ("MQIsdp", 4), ("MQTX", 4)):
            with RawMqtt(emu.port) as c:
                c.send(connect_packet("c", "preTokenValue0000001", protocol=protocol, level=level))
                with pytest.raises(ConnectionError):
                    c.read_packet()


def test_a_refused_connack_carries_session_present_as_not_clean_session():
    with mqtt_emulator() as emu:
        for level, refused in ((4, b"\x01\x05"), (5, b"\x01\x86\x00")):
            with RawMqtt(emu.port) as c:
                c.send(connect_packet("c", "wrongToken", clean=False, level=level))
                assert c.read_packet() == (0x20, refused)


def device_session(emu, client_id: str = "d") -> RawMqtt:
    c = RawMqtt(emu.port)
    c.send(connect_packet(client_id, "preTokenValue0000001"))
    assert c.read_packet() == CONNACK_OK
    return c


@pytest.mark.parametrize("payload, records", [
    (b'{"a":1,"b":"x"}', 1),
    (b'{"ts":1700000000000,"values":{"a":1}}', 1),
    (b'[{"ts":1700000000000,"values":{"a":1}},{"b":2.5}]', 2),
])
def test_telemetry_shapes_are_stored(payload, records):
    with mqtt_emulator() as emu, device_session(emu) as c:
        c.send(publish_packet("v1/devices/me/telemetry", payload, packet_id=2))
        assert c.read_packet() == (0x40, b"\x00\x02")
        c.send(publish_packet("v2/t", b'{"short":true}', qos=0))
        c.send(mqtt_packet(0xC0))
        assert c.read_packet() == (0xD0, b"")
        stored = emu.call(lambda s: s.telemetry("pre-token"))
        assert len(stored) == records + 1 and stored[-1]["values"] == {"short": True}


@pytest.mark.parametrize("topic, payload", [("v1/devices/me/telemetry", b"42"),
                                            ("v1/devices/me/telemetry", b"{broken"),
                                            ("v1/devices/me/attributes", b"[1]"),
                                            ("v1/devices/me/attributes/request/1", b""),
                                            ("v1/devices/me/attributes/request/abc", b"{}"),
                                            ("v1/devices/me/rpc/response/xyz", b"{}")])
def test_unparsable_payload_on_known_topic_closes_without_puback(topic, payload):
    with mqtt_emulator() as emu, device_session(emu) as c:
        c.send(publish_packet(topic, payload, packet_id=3))
        assert c.closed_by_server()
        assert emu.call(lambda s: s.telemetry("pre-token")) == []


def test_unknown_topic_is_acknowledged_not_processed_and_session_kept():
    with mqtt_emulator() as emu, device_session(emu) as c:
        for i, topic in enumerate(["v1/devices/me/unknown", "/provision/request", "v1/devices/me/claim"], 1):
            c.send(publish_packet(topic, b"{}", packet_id=i))
            assert c.read_packet() == (0x40, struct.pack("!H", i))
        c.send(publish_packet("v1/devices/me/telemetry", b'{"still":1}', packet_id=9))
        assert c.read_packet() == (0x40, b"\x00\x09")
        c.send(publish_packet("v1/devices/me/claim", b"[1]", packet_id=10))  # JsonConverter refuses it
        assert c.closed_by_server()


def test_subscribe_filters_match_exactly():
    with mqtt_emulator() as emu, device_session(emu) as c:
        c.send(subscribe_packet(4, ("v1/devices/me/attributes", 1), ("v1/devices/me/#", 1),
                                ("v1/devices/me/rpc/request/+", 2), ("v1/devices/me/attributes/response/+", 0),
                                ("v1/devices/me/rpc/request/#", 1)))
        assert c.read_packet() == (0x90, b"\x00\x04\x01\x80\x01\x00\x80")


def test_attribute_upload_request_and_response():
    with mqtt_emulator() as emu, device_session(emu) as c:
        c.send(publish_packet("v1/devices/me/attributes", b'{"fw":"v2","ok":true}', packet_id=1))
        assert c.read_packet() == (0x40, b"\x00\x01")
        emu.call(lambda s: s.set_shared_attributes("pre-token", {"interval": 10, "mode": "eco"}))
        c.send(publish_packet("v1/devices/me/attributes/request/5", b'{"clientKeys":"fw","sharedKeys":"interval"}',
                              packet_id=2))
        assert c.read_packet() == (0x40, b"\x00\x02")
        topic, payload, qos, _ = c.read_publish()
        assert topic == "v1/devices/me/attributes/response/5" and qos == 1
        assert json.loads(payload) == {"client": {"fw": "v2"}, "shared": {"interval": 10}}
        c.send(subscribe_packet(1, ("v1/devices/me/attributes/response/+", 0)))
        c.read_packet()
        c.send(publish_packet("v1/devices/me/attributes/request/6", b"{}", qos=0))
        topic, payload, qos, _ = c.read_publish()
        assert topic == "v1/devices/me/attributes/response/6" and qos == 0
        assert json.loads(payload) == {"client": {"fw": "v2", "ok": True}, "shared": {"interval": 10, "mode": "eco"}}


@pytest.mark.parametrize("request_body, answer", [
    (b'{"clientKeys":""}', {"client": {"fw": "v2", "ok": True}, "shared": {"interval": 10}}),
    (b'{"clientKeys":"","sharedKeys":"interval"}', {"shared": {"interval": 10}}),
    (b'{"clientKeys":"fw,,ok,"}', {"client": {"fw": "v2", "ok": True}}),
    (b'{"clientKeys":","}', {}),
])
def test_attribute_request_key_lists_follow_the_http_rule(request_body, answer):
    with mqtt_emulator() as emu, device_session(emu) as c:
        c.send(publish_packet("v1/devices/me/attributes", b'{"fw":"v2","ok":true}', qos=0))
        emu.call(lambda s: s.set_shared_attributes("pre-token", {"interval": 10}))
        c.send(publish_packet("v1/devices/me/attributes/request/3", request_body, qos=0))
        topic, payload, _, _ = c.read_publish()
        assert topic == "v1/devices/me/attributes/response/3" and json.loads(payload) == answer


def test_paho_shared_attribute_pushes_and_server_rpc():
    with mqtt_emulator() as emu, Paho(emu.port, "d", "preTokenValue0000001") as c:
        emu.call(lambda s: s.set_shared_attributes("pre-token", {"before": 1}))
        assert c.subscribe("v1/devices/me/attributes") == [1]
        assert c.subscribe("v1/devices/me/rpc/request/+") == [1]
        assert c.messages.empty(), "current values are not sent on subscribe"
        emu.call(lambda s: s.set_shared_attributes("pre-token", {"interval": 30}))
        msg = c.message()
        assert (msg.topic, json.loads(msg.payload), msg.qos) == ("v1/devices/me/attributes", {"interval": 30}, 1)
        emu.call(lambda s: s.delete_shared_attributes("pre-token", ["interval"]))
        assert json.loads(c.message().payload) == {"deleted": ["interval"]}
        rpc_id = emu.call(lambda s: s.send_rpc("pre-token", "setLed", {"on": True}))
        msg = c.message()
        assert msg.topic == f"v1/devices/me/rpc/request/{rpc_id}"
        assert json.loads(msg.payload) == {"method": "setLed", "params": {"on": True}}
        c.publish(f"v1/devices/me/rpc/response/{rpc_id}", b'{"led":"on"}')
        assert emu.call(lambda s: s.rpc_replies("pre-token")) == {rpc_id: {"led": "on"}}


def test_v2_short_subscriptions_get_pushes_and_answers_in_the_v2_style():
    with mqtt_emulator() as emu, device_session(emu) as c:
        c.send(subscribe_packet(1, ("v2/a", 0), ("v2/r/req/+", 1)))
        assert c.read_packet() == (0x90, b"\x00\x01\x00\x01")
        emu.call(lambda s: s.set_shared_attributes("pre-token", {"interval": 5}))
        topic, payload, qos, _ = c.read_publish()
        assert (topic, json.loads(payload), qos) == ("v2/a", {"interval": 5}, 0)
        rpc_id = emu.call(lambda s: s.send_rpc("pre-token", "blink", {"n": 2}))
        topic, payload, qos, _ = c.read_publish()
        assert (topic, json.loads(payload), qos) == (f"v2/r/req/{rpc_id}", {"method": "blink", "params": {"n": 2}}, 1)
        c.send(publish_packet("v2/a/req/7", b'{"sharedKeys":"interval"}', qos=0))
        topic, payload, qos, _ = c.read_publish()
        assert (topic, json.loads(payload), qos) == ("v2/a/res/7", {"shared": {"interval": 5}}, 1)
        c.send(publish_packet(f"v2/r/res/{rpc_id}", b'{"done":true}', packet_id=8))
        assert c.read_packet() == (0x40, b"\x00\x08")
        assert emu.call(lambda s: s.rpc_replies("pre-token")) == {rpc_id: {"done": True}}


def test_the_latest_attribute_subscription_picks_the_push_style():
    with mqtt_emulator() as emu, device_session(emu) as c:
        c.send(subscribe_packet(1, ("v2/a", 1), ("v1/devices/me/attributes", 1)))
        c.read_packet()
        emu.call(lambda s: s.set_shared_attributes("pre-token", {"a": 1}))
        assert c.read_publish()[0] == "v1/devices/me/attributes"
        c.send(subscribe_packet(2, ("v2/a", 1)))
        c.read_packet()
        emu.call(lambda s: s.set_shared_attributes("pre-token", {"a": 2}))
        assert c.read_publish()[:2] == ("v2/a", b'{"a":2}')
        assert c.silent(0.2), "one push per change, in one style"


def test_pushes_need_a_subscription():
    with mqtt_emulator() as emu, device_session(emu) as c:
        emu.call(lambda s: s.set_shared_attributes("pre-token", {"a": 1}))
        emu.call(lambda s: s.send_rpc("pre-token", "m", {}))
        assert c.silent(0.3)


def test_deleted_device_session_is_closed():
    with mqtt_emulator() as emu, device_session(emu) as c:
        assert emu.call(lambda s: s.delete_device("pre-token"))
        assert c.closed_by_server()
        with RawMqtt(emu.port) as again:
            again.send(connect_packet("d", "preTokenValue0000001"))
            assert again.read_packet() == (0x20, b"\x00\x05")


def test_disconnect_closes_and_pingreq_answers():
    with mqtt_emulator() as emu, device_session(emu) as c:
        c.send(mqtt_packet(0xC0))
        assert c.read_packet() == (0xD0, b"")
        c.send(mqtt_packet(0xE0))
        assert c.closed_by_server()
        assert _eventually(lambda: any("disconnected" in e for e in emu.events))


def _eventually(check, within: float = 2.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return False


def test_packet_limit_is_65536_bytes():
    with mqtt_emulator() as emu, device_session(emu) as c:
        topic = "v1/devices/me/telemetry"
        filler = 65536 - 2 - len(topic) - 2 - len('{"v":""}')
        payload = json.dumps({"v": "x" * filler}, separators=(",", ":")).encode()
        c.send(publish_packet(topic, payload, packet_id=1))
        assert c.read_packet() == (0x40, b"\x00\x01")
        c.send(publish_packet(topic, payload + b" ", packet_id=2))
        assert c.closed_by_server()
        assert len(emu.call(lambda s: s.telemetry("pre-token"))) == 1


def test_second_connect_and_packets_before_connect_close():
    with mqtt_emulator() as emu:
        with device_session(emu) as c:
            c.send(connect_packet("again", "preTokenValue0000001"))
            assert c.closed_by_server()
        with RawMqtt(emu.port) as c:
            c.send(publish_packet("v1/devices/me/telemetry", b"{}"))
            assert c.closed_by_server()
        with socket.create_connection(("127.0.0.1", emu.port), timeout=3) as s:
            s.sendall(connect_packet("c", "preTokenValue0000001")[:1] + b"\x02\x00\x00")
            # remaining length 2 cannot hold a CONNECT: malformed
            assert s.recv(10) == b""
