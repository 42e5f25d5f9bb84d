# ThingsBoard over MQTT: the provisioning session and the telemetry session, against a scripted socket.
import time

from fakesock import FakeSocket, Stream, scripted
from mptest import eq, raises
from test_mqtt import CONNACK_OK, client
from tbfleet import BadAnswer, NoAnswer, Refused, Rejected, tls

ANSWER = b'{"credentialsValue":"Xq3kT9vLm2RcW8pZa1Yb","credentialsType":"ACCESS_TOKEN","status":"SUCCESS"}'
TELEMETRY = b'{"ts":1732300000000,"values":{"uptime":42,"free_heap":81234}}'


class Cfg:
    # The attributes of tbfleet.config that the adapter reads.
    def __init__(self, **kw):
        self.host = "tb.local"
        self.port = 1883
        self.transport = "mqtt"
        self.tls = False
        self.ca_file = None
        self.cert_file = None
        self.key_file = None
        self.device_name = "esp32-a1b2c3"
        self.qos = 1
        self.timeout = 0.2
        self.keepalive = 60
        for k, v in kw.items():
            setattr(self, k, v)


def publish(topic, payload, pid=None):
    body = bytes([len(topic) >> 8, len(topic) & 0xFF]) + topic
    if pid is not None:
        body += bytes([pid >> 8, pid & 0xFF])
    body += payload
    head = 0x32 if pid is not None else 0x30
    return bytes([head, len(body)]) + body


HELLO = b'{"fw":"1"}'
# What open sends after the CONNECT, in the same write: SUBSCRIBE (packet id 1) to shared attribute pushes and RPC
# requests at QoS 1, the client attributes and the request for the current ones at QoS 0, the first telemetry at
# QoS 1 (packet id 2).
AFTER_CONNECT = (b"\x82\x3b\x00\x01\x00\x18v1/devices/me/attributes\x01\x00\x1bv1/devices/me/rpc/request/+\x01"
                 b"\x30\x24\x00\x18v1/devices/me/attributes" + HELLO
                 + b"\x30\x26\x00\x22v1/devices/me/attributes/request/1{}"
                 b"\x32\x58\x00\x17v1/devices/me/telemetry\x00\x02" + TELEMETRY)
OPENED = CONNACK_OK + b"\x40\x02\x00\x02"  # the CONNACK and the first telemetry's PUBACK


def link(sock, **kw):
    return client(sock, None, Cfg, **kw)


def open_link(lk, creds):
    burst = [HELLO, TELEMETRY]
    lk.open(creds, burst)
    eq(burst, [])  # taken out as they were put: neither is held while the link waits for the server


def no_subscribe(sock):
    assert not [w for w in sock.writes if w[0] == 0x82], sock.writes


def test_provision_reads_the_answer_after_other_packets():
    stray = publish(b"v1/devices/me/attributes", b'{"x":1}', 0x0101) + b"\xd0\x00"
    s = scripted(CONNACK_OK, b"\x40\x02\x00\x01" + stray + publish(b"/provision/response", ANSWER, 0x0102))
    lk = link(s)
    eq(lk.provision(b'{"provisionDeviceKey":"k"}'), ANSWER)
    eq(s.writes, [
        b"\x10\x23\x00\x04MQTT\x04\x82\x00\x3c\x00\x0cesp32-a1b2c3\x00\x09provision",
        b"\x32\x30\x00\x12/provision/request\x00\x01{\"provisionDeviceKey\":\"k\"}",
        b"\x40\x02\x01\x01",
        b"\x40\x02\x01\x02",
        b"\xe0\x00",
    ])
    assert s.closed
    eq(lk.seen, [("tb.local", 1883, 200, None)])


def test_provision_answer_before_puback_and_at_qos0():
    # A QoS 0 answer needs no PUBACK; it may even come before the PUBACK of the request.
    s = scripted(CONNACK_OK, publish(b"/provision/response", ANSWER) + b"\x40\x02\x00\x01")
    lk = link(s)
    eq(lk.provision(b"{}"), ANSWER)
    eq([w[0] for w in s.writes], [0x10, 0x32, 0xE0])


def test_provision_never_subscribes_and_gives_up_at_the_deadline():
    # A pre-3.9 server that acknowledges the request but never publishes an answer.
    s = scripted(CONNACK_OK, b"\x40\x02\x00\x01")
    lk = link(s, timeout=0.1)
    t0 = time.ticks_ms()
    e = raises(NoAnswer, lk.provision, b"{}")
    took = time.ticks_diff(time.ticks_ms(), t0)
    assert 90 <= took < 1000, took
    eq(str(e), "no answer in time")
    no_subscribe(s)
    eq(s.writes[-1], b"\xe0\x00")
    assert s.closed


def test_provision_connection_closed_by_server_is_no_answer():
    def close_after_request(sock, data):
        if data[0] == 0x10:
            sock.feed(CONNACK_OK)
        elif data[0] == 0x32:
            sock.feed(b"\x40\x02\x00\x01")
            sock.hang_up()

    s = FakeSocket(close_after_request)
    lk = link(s, timeout=5)
    t0 = time.ticks_ms()
    raises(NoAnswer, lk.provision, b"{}")
    assert time.ticks_diff(time.ticks_ms(), t0) < 1000


def test_provision_closed_instead_of_puback_is_no_answer():
    def close_on_request(sock, data):
        if data[0] == 0x10:
            sock.feed(CONNACK_OK)
        elif data[0] == 0x32:
            sock.hang_up()

    s = FakeSocket(close_on_request)
    e = raises(NoAnswer, link(s, timeout=5).provision, b"{}")
    assert not isinstance(e, Rejected)
    assert "instead of PUBACK" in str(e)
    assert s.closed


def test_provision_refused_session_is_no_answer():
    s = scripted(b"\x20\x02\x00\x03")
    e = raises(NoAnswer, link(s).provision, b"{}")
    eq(str(e), "server unavailable")
    eq(s.writes[1:], [])  # nothing more after the CONNECT, not even a DISCONNECT
    assert s.closed


def test_provision_garbage_is_bad_answer():
    s = scripted(CONNACK_OK, b"\x40\x02\x00\x01\xf0\x00")
    raises(BadAnswer, link(s).provision, b"{}")
    assert s.closed


def test_open_access_token_uses_device_name_and_no_password():
    s = scripted(OPENED)
    lk = link(s, keepalive=30)
    open_link(lk, {"type": "ACCESS_TOKEN", "token": "Xq3kT9vLm2RcW8pZa1Yb"})
    eq(s.writes, [b"\x10\x2e\x00\x04MQTT\x04\x82\x00\x1e\x00\x0cesp32-a1b2c3\x00\x14Xq3kT9vLm2RcW8pZa1Yb"
                  + AFTER_CONNECT])


def test_open_mqtt_basic_sends_the_three_fields():
    s = scripted(OPENED)
    open_link(link(s), {"type": "MQTT_BASIC", "client_id": "c1", "username": "u1", "password": "p1"})
    eq(s.writes, [b"\x10\x16\x00\x04MQTT\x04\xc2\x00\x3c\x00\x02c1\x00\x02u1\x00\x02p1" + AFTER_CONNECT])


def test_open_mqtt_basic_empty_fields_are_absent():
    s = scripted(OPENED)
    open_link(link(s), {"type": "MQTT_BASIC", "client_id": "c1", "username": "", "password": ""})
    eq(s.writes, [b"\x10\x0e\x00\x04MQTT\x04\x02\x00\x3c\x00\x02c1" + AFTER_CONNECT])
    s = scripted(OPENED)
    open_link(link(s), {"type": "MQTT_BASIC", "client_id": "", "username": "u1", "password": "p1"})
    eq(s.writes, [b"\x10\x14\x00\x04MQTT\x04\xc2\x00\x3c\x00\x00\x00\x02u1\x00\x02p1" + AFTER_CONNECT])
    s = scripted(OPENED)
    open_link(link(s), {"type": "MQTT_BASIC", "client_id": "c1", "username": "u1", "password": ""})
    eq(s.writes, [b"\x10\x12\x00\x04MQTT\x04\x82\x00\x3c\x00\x02c1\x00\x02u1" + AFTER_CONNECT])


def test_open_x509_uses_a_client_certificate_and_no_user_name():
    made = []

    def fake_context(cfg, client_cert=False):
        made.append(client_cert)
        return "client-cert-ctx" if client_cert else "server-only-ctx"

    tls.context = fake_context
    s = scripted(OPENED)
    lk = link(s, tls=True, port=8883)
    open_link(lk, {"type": "X509_CERTIFICATE"})
    eq(made, [True])
    eq(lk.seen, [("tb.local", 8883, 200, "client-cert-ctx")])
    eq(s.writes, [b"\x10\x18\x00\x04MQTT\x04\x02\x00\x3c\x00\x0cesp32-a1b2c3" + AFTER_CONNECT])


def test_open_refuses_x509_without_tls_and_unknown_types():
    for kind in ("X509_CERTIFICATE", "LWM2M_CREDENTIALS", None):
        s = scripted()
        e = raises(ValueError, open_link, link(s), {"type": kind})
        eq(str(e), "can't use credentials type %r" % (kind,))
        eq(s.writes, [])


def test_open_refused_credentials():
    s = scripted(b"\x20\x02\x00\x05")
    lk = link(s)
    e = raises(Refused, open_link, lk, {"type": "ACCESS_TOKEN", "token": "REVOKED_TOKEN_000000"})
    eq(e.args, (5, "not authorized"))
    raises(NoAnswer, lk.send, TELEMETRY)


def test_telemetry_qos1_and_qos0():
    s = scripted(OPENED, b"\x40\x02\x00\x03")
    lk = link(s)
    open_link(lk, {"type": "ACCESS_TOKEN", "token": "tok"})
    lk.send(TELEMETRY)
    eq(s.writes[1], b"\x32\x58\x00\x17v1/devices/me/telemetry\x00\x03" + TELEMETRY)
    lk.cfg.qos = 0
    lk.send(TELEMETRY)
    eq(s.writes[2], b"\x30\x56\x00\x17v1/devices/me/telemetry" + TELEMETRY)
    eq(len(s.writes), 3)


def test_close_instead_of_puback_is_rejected():
    s = scripted(OPENED)

    def reject(sock, data):
        if data[0] == 0x32:
            sock.hang_up()

    lk = link(s, timeout=5)
    open_link(lk, {"type": "ACCESS_TOKEN", "token": "tok"})
    s.on_write = reject
    e = raises(Rejected, lk.send, b'{"ts":1732300000000,"values":')
    assert "instead of PUBACK" in e.args[1]
    assert s.closed
    raises(NoAnswer, lk.send, TELEMETRY)


def test_connection_closed_before_sending_is_no_answer():
    s = scripted(OPENED)
    lk = link(s, timeout=5)
    open_link(lk, {"type": "ACCESS_TOKEN", "token": "tok"})
    s.hang_up()
    e = raises(NoAnswer, lk.send, TELEMETRY)
    eq(len(s.writes), 1)
    assert not isinstance(e, Rejected)


def test_missing_puback_is_no_answer():
    s = scripted(OPENED)
    lk = link(s, timeout=0.05)
    open_link(lk, {"type": "ACCESS_TOKEN", "token": "tok"})
    raises(NoAnswer, lk.send, TELEMETRY)


def test_poll_acknowledges_pushes_and_keeps_alive():
    s = scripted(OPENED, None, b"\xd0\x00")  # the PINGRESP answers the third write, the PINGREQ
    lk = link(s, keepalive=1)
    open_link(lk, {"type": "ACCESS_TOKEN", "token": "tok"})
    s.feed(publish(b"v1/devices/me/attributes", b'{"interval":5}', 7))
    lk.listen()
    eq(s.writes[1:], [b"\x40\x02\x00\x07"])
    time.sleep_ms(520)
    lk.listen()
    eq(s.writes[2:], [b"\xc0\x00"])
    eq(s.inbox, b"")


def test_close_disconnects_once_and_never_raises():
    s = scripted(OPENED)
    lk = link(s)
    open_link(lk, {"type": "ACCESS_TOKEN", "token": "tok"})
    lk.close()
    lk.close()
    eq(s.writes[1:], [b"\xe0\x00"])
    assert s.closed
    s2 = scripted(OPENED)
    lk = link(s2)
    open_link(lk, {"type": "ACCESS_TOKEN", "token": "tok"})
    s2.closed = True  # the socket is already dead: writing raises OSError
    lk.close()
    raises(NoAnswer, lk.listen)


def test_rpc_and_push_in_the_middle_of_a_qos1_exchange_wait_for_the_device():
    # The server sends an RPC and a shared attribute push before the PUBACK: both are acknowledged, the PUBACK still
    # ends the exchange, and the device gets them afterwards; its reply goes to rpc/response/{id}.
    rpc = publish(b"v1/devices/me/rpc/request/42", b'{"method":"setRelay","params":{"on":true}}', 0x0101)
    push = publish(b"v1/devices/me/attributes", b'{"target":22}', 0x0102)
    s = scripted(OPENED, rpc + push + b"\x40\x02\x00\x03", b"\x40\x02\x00\x04")
    lk = link(s)
    open_link(lk, {"type": "ACCESS_TOKEN", "token": "tok"})
    lk.send(TELEMETRY)
    eq(s.writes[2:], [b"\x40\x02\x01\x01", b"\x40\x02\x01\x02"])
    eq(lk.events, [("rpc", 42, b'{"method":"setRelay","params":{"on":true}}'), ("attributes", None, b'{"target":22}')])
    lk.send(b'{"on":true}', 42)
    eq(s.writes[4], b"\x32\x2c\x00\x1dv1/devices/me/rpc/response/42\x00\x04" + b'{"on":true}')


def test_attribute_response_is_the_current_attributes_and_other_topics_are_dropped():
    s = scripted(CONNACK_OK + publish(b"v1/devices/me/attributes/response/1", b'{"shared":{"a":1}}')
                 + publish(b"v1/devices/me/rpc/request/x", b"{}") + publish(b"v1/other", b"{}")
                 + b"\x40\x02\x00\x02")
    lk = link(s)
    open_link(lk, {"type": "ACCESS_TOKEN", "token": "tok"})
    eq(lk.events, [("current", None, b'{"shared":{"a":1}}')])


def test_events_beyond_eight_are_acknowledged_and_dropped():
    pushes = b"".join(publish(b"v1/devices/me/attributes", b'{"n":%d}' % i, 0x0200 + i) for i in range(10))
    s = scripted(OPENED, pushes + b"\x40\x02\x00\x03")
    lk = link(s)
    open_link(lk, {"type": "ACCESS_TOKEN", "token": "tok"})
    lk.send(TELEMETRY)
    eq(len(lk.events), 8)
    eq(len(s.writes), 2 + 10)


def test_provision_ends_at_the_deadline_while_the_server_streams_packets():
    # After the PUBACK the server streams PINGRESPs, or PUBLISHes on another topic, for 5 s: the provisioning
    # exchange must end at its deadline (0.2 s), not when the stream stops (then it would be "connection closed").
    for chunk in (b"\xd0\x00", publish(b"other/topic", b"x" * 40)):
        s = Stream(chunk, CONNACK_OK + b"\x40\x02\x00\x01")
        e = raises(NoAnswer, link(s).provision, b"{}")
        eq(str(e), "no answer in time")
        assert s.served > 1 and s.closed, s.served
