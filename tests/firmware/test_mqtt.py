# The MQTT 3.1.1 client, byte for byte against a scripted socket.
import time

from fakesock import scripted
from mptest import eq, raises
from tbfleet import mqtt, tcp
from tbfleet.errors import BadAnswer, NoAnswer, Refused, Rejected

CONNACK_OK = b"\x20\x02\x00\x00"




def client(sock, cid="dev-1", user=None, pw=None, **kw):
    seen = []

    def fake_connect(host, port, timeout_ms, ssl_ctx=None):
        seen.append((host, port, timeout_ms, ssl_ctx))
        return sock

    tcp.connect = fake_connect
    kw.setdefault("timeout_ms", 200)
    c = mqtt.MQTTClient("tb.example", 1883, cid, user, pw, **kw)
    c.seen = seen
    return c


def connected(*replies, **kw):
    s = scripted(CONNACK_OK, *replies)
    c = client(s, **kw)
    c.connect()
    return c, s


def elapsed_ms(fn, *args):
    t0 = time.ticks_ms()
    e = raises(NoAnswer, fn, *args)
    return e, time.ticks_diff(time.ticks_ms(), t0)


def test_connect_with_username_and_password():
    s = scripted(CONNACK_OK)
    c = client(s, "dev-1", "alice", "s3cret", keepalive=60)
    c.connect()
    eq(c.seen, [("tb.example", 1883, 200, None)])
    eq(s.writes, [b"\x10\x20\x00\x04MQTT\x04\xc2\x00\x3c\x00\x05dev-1\x00\x05alice\x00\x06s3cret"])
    assert c.sock is not None


def test_connect_with_username_only():
    s = scripted(CONNACK_OK)
    client(s, "esp32-a1", "A1_TEST_TOKEN", keepalive=30).connect()
    eq(s.writes, [b"\x10\x23\x00\x04MQTT\x04\x82\x00\x1e\x00\x08esp32-a1\x00\x0dA1_TEST_TOKEN"])


def test_connect_without_username_or_password():
    s = scripted(CONNACK_OK)
    client(s, "dev-1", keepalive=0).connect()
    eq(s.writes, [b"\x10\x11\x00\x04MQTT\x04\x02\x00\x00\x00\x05dev-1"])


def test_connect_with_empty_client_id_and_empty_password_present():
    # None is absent; an empty string is sent as a present, zero-length field.
    s = scripted(CONNACK_OK)
    client(s, "", "user", "", keepalive=60).connect()
    eq(s.writes, [b"\x10\x14\x00\x04MQTT\x04\xc2\x00\x3c\x00\x00\x00\x04user\x00\x00"])


def test_password_without_user_name_is_refused_locally():
    e = raises(ValueError, mqtt.MQTTClient, "h", 1883, "dev", None, "pw")
    assert "password" in str(e)
    e = raises(ValueError, mqtt.MQTTClient, "h", 1883, "dev", keepalive=65536)
    assert "keepalive" in str(e)
    e = raises(ValueError, mqtt.MQTTClient, "h", 1883, "dev", "u" * 65536)
    assert "too long" in str(e)


def test_connack_refusals_have_names():
    names = {
        1: "unacceptable protocol version",
        2: "identifier rejected",
        3: "server unavailable",
        4: "bad user name or password",
        5: "not authorized",
    }
    for code, name in names.items():
        s = scripted(b"\x20\x02\x00" + bytes([code]))
        c = client(s, "dev", "WRONG_TOKEN")
        e = raises(Refused, c.connect)
        eq(e.args, (code, name))
        assert s.closed and c.sock is None


def test_connack_unknown_code_is_bad_answer():
    s = scripted(b"\x20\x02\x00\x06")
    raises(BadAnswer, client(s).connect)
    assert s.closed


def test_first_packet_not_connack_is_bad_answer():
    s = scripted(b"\x30\x05\x00\x01ab\x00")
    raises(BadAnswer, client(s).connect)
    assert s.closed


def test_silent_server_is_no_answer_at_the_deadline():
    s = scripted()
    c = client(s, timeout_ms=60)
    e, took = elapsed_ms(c.connect)
    assert not isinstance(e, mqtt.Closed)
    assert 50 <= took < 1000, took
    assert s.closed


def test_server_closing_before_connack_is_closed():
    s = scripted()
    s.hang_up()
    c = client(s, timeout_ms=5000)
    e, took = elapsed_ms(c.connect)
    assert isinstance(e, mqtt.Closed)
    assert took < 1000, took


def test_publish_qos0_bytes_in_one_write():
    c, s = connected()
    c.publish("v1/devices/me/telemetry", b'{"t":21.5}')
    eq(s.writes[1:], [b"\x30\x23\x00\x17v1/devices/me/telemetry{\"t\":21.5}"])


def test_publish_qos0_retain_flag():
    c, s = connected()
    c.publish(b"a/b", b"x", 0, True)
    eq(s.writes[1], b"\x31\x06\x00\x03a/bx")


def test_publish_qos1_bytes_and_puback():
    c, s = connected(b"\x40\x02\x00\x01")
    c.publish(b"v1/devices/me/telemetry", b'{"t":21.5}', 1)
    eq(s.writes[1:], [b"\x32\x25\x00\x17v1/devices/me/telemetry\x00\x01{\"t\":21.5}"])
    eq(s.inbox, b"")


def test_packet_ids_count_up_and_wrap_past_65535():
    c, s = connected(b"\x40\x02\x00\x01", b"\x40\x02\x00\x02")
    c.publish(b"t", b"1", 1)
    c.publish(b"t", b"2", 1)
    eq([w[5:7] for w in s.writes[1:]], [b"\x00\x01", b"\x00\x02"])
    c._pid = 65534
    eq([c._next_pid(), c._next_pid(), c._next_pid()], [65535, 1, 2])


def test_puback_found_among_interleaved_packets():
    got = []
    # Before our PUBACK: a stale PUBACK, a PINGRESP, a QoS 1 PUBLISH (id 0x1234) and a QoS 0 PUBLISH.
    between = (b"\x40\x02\x00\x07" + b"\xd0\x00"
               + b"\x32\x24\x00\x18v1/devices/me/attributes\x12\x34{\"fw\":1}"
               + b"\x30\x0c\x00\x03rpc{\"m\":2}"
               + b"\x40\x02\x00\x01")
    c, s = connected(between, on_message=lambda t, p: got.append((t, p)))
    c.publish(b"v1/devices/me/telemetry", b"{}", 1)
    eq(got, [(b"v1/devices/me/attributes", b'{"fw":1}'), (b"rpc", b'{"m":2}')])
    # Our PUBLISH, then the PUBACK of the incoming QoS 1 message, each in its own single write.
    eq(s.writes[2:], [b"\x40\x02\x12\x34"])
    eq(s.inbox, b"")


def test_puback_never_comes_is_no_answer():
    # Nothing of a packet was read, so the session stays usable: the late PUBACK is dropped as stale.
    c, s = connected(None, b"\x40\x02\x00\x01\x40\x02\x00\x02", timeout_ms=60)
    e, took = elapsed_ms(c.publish, b"t", b"x", 1)
    assert not isinstance(e, mqtt.Closed)
    assert 50 <= took < 1000, took
    assert c.sock is not None
    c.publish(b"t", b"y", 1)
    eq(s.inbox, b"")


def test_deadline_inside_a_packet_closes_the_connection():
    c, s = connected(b"\x40\x02\x00", timeout_ms=60)
    raises(NoAnswer, c.publish, b"t", b"x", 1)
    assert s.closed and c.sock is None


def test_close_instead_of_puback_is_closed():
    c, s = connected(None, timeout_ms=5000)
    s.hang_up()
    e, took = elapsed_ms(c.publish, b"v1/devices/me/telemetry", b"not json", 1)
    assert isinstance(e, mqtt.Closed)
    assert took < 1000, took
    assert s.closed


def encoded_len(n):
    buf = bytearray(4)
    return bytes(buf[: mqtt._put_len(buf, 0, n)])


def test_remaining_length_encoding_boundaries():
    eq(encoded_len(0), b"\x00")
    eq(encoded_len(127), b"\x7f")
    eq(encoded_len(128), b"\x80\x01")
    eq(encoded_len(16383), b"\xff\x7f")
    eq(encoded_len(16384), b"\x80\x80\x01")
    eq(encoded_len(2097151), b"\xff\xff\x7f")
    eq(encoded_len(2097152), b"\x80\x80\x80\x01")
    eq(encoded_len(268435455), b"\xff\xff\xff\x7f")


def test_publish_header_at_length_boundaries():
    # Topic "t" (3 bytes with its length), QoS 0: remaining length = 3 + payload.
    c, s = connected()
    for size, head in ((127, b"\x30\x7f"), (128, b"\x30\x80\x01"), (16383, b"\x30\xff\x7f"),
                       (16384, b"\x30\x80\x80\x01")):
        c.publish(b"t", b"p" * (size - 3))
        w = s.writes[-1]
        eq(w[: len(head) + 3], head + b"\x00\x01t")
        eq(len(w), len(head) + size)


def test_incoming_publish_at_length_boundaries():
    got = []
    c, s = connected(on_message=lambda t, p: got.append(p))
    for size, head in ((127, b"\x30\x7f"), (128, b"\x30\x80\x01"), (16383, b"\x30\xff\x7f"),
                       (16384, b"\x30\x80\x80\x01")):
        s.feed(head + b"\x00\x01t" + b"q" * (size - 3))
        c.poll()
        eq(len(got.pop()), size - 3)


def test_out_and_read_buffers_are_reused():
    c, s = connected(b"\x40\x02\x00\x01", b"\x40\x02\x00\x02")
    out, rbuf = c._out, c._rbuf
    c.publish(b"t", b"a" * 20, 1)
    c.publish(b"t", b"b" * 30, 1)
    assert c._out is out and c._rbuf is rbuf
    s.feed(b"\x30\x80\x01\x00\x01t" + b"z" * 125)
    c.poll()
    assert c._rbuf is not rbuf and len(c._rbuf) == 128


def test_subscribe_bytes_and_granted_codes():
    c, s = connected(b"\x90\x04\x00\x01\x01\x00")
    granted = c.subscribe([("v1/devices/me/attributes", 1), ("v1/devices/me/rpc/request/+", 0)])
    eq(granted, [1, 0])
    eq(s.writes[1], b"\x82\x3b\x00\x01\x00\x18v1/devices/me/attributes\x01"
                    b"\x00\x1bv1/devices/me/rpc/request/+\x00")


def test_subscribe_refused_filter_is_rejected():
    c, s = connected(b"\x90\x03\x00\x01\x80")
    e = raises(Rejected, c.subscribe, [("nope/#", 1)])
    eq(e.args[0], 0x80)
    assert "nope/#" in e.args[1]
    assert c.sock is not None


def test_subscribe_without_suback_is_no_answer():
    # Pre-3.9 ThingsBoard ignores a SUBSCRIBE in a provisioning session: the wait must end.
    c, s = connected(b"\xd0\x00", timeout_ms=60)
    e, took = elapsed_ms(c.subscribe, [("/provision/response", 1)])
    assert 50 <= took < 1000, took


def test_ping_bytes_and_pingresp():
    c, s = connected(b"\xd0\x00")
    c.ping()
    eq(s.writes[1:], [b"\xc0\x00"])


def test_poll_acknowledges_incoming_qos1_publish():
    got = []
    c, s = connected(on_message=lambda t, p: got.append((t, p)))
    s.feed(b"\x32\x2e\x00\x1cv1/devices/me/rpc/request/42\xbe\xef{\"method\":\"x\"}")
    c.poll()
    eq(got, [(b"v1/devices/me/rpc/request/42", b'{"method":"x"}')])
    eq(s.writes[1:], [b"\x40\x02\xbe\xef"])


def test_poll_sends_pingreq_when_keepalive_is_due():
    c, s = connected(b"\xd0\x00", keepalive=1)
    c.poll()
    eq(len(s.writes), 1)  # nothing due yet
    time.sleep_ms(520)
    c.poll()
    eq(s.writes[1:], [b"\xc0\x00"])
    c.poll()  # consumes the PINGRESP fed after the PINGREQ
    eq(len(s.writes), 2)
    assert c._ping_due is None


def test_poll_without_pingresp_is_no_answer():
    c, s = connected(None, None, keepalive=1, timeout_ms=50)
    time.sleep_ms(510)
    c.poll()
    time.sleep_ms(60)
    raises(NoAnswer, c.poll)
    assert s.closed


def test_poll_sees_a_closed_connection():
    c, s = connected()
    s.hang_up()
    e = raises(NoAnswer, c.poll)
    assert isinstance(e, mqtt.Closed)
    assert c.sock is None


def test_disconnect_bytes_and_close_idempotent():
    c, s = connected()
    c.disconnect()
    eq(s.writes[1:], [b"\xe0\x00"])
    assert s.closed
    c.disconnect()
    c.close()
    eq(len(s.writes), 2)


def garbage_case(data, **kw):
    c, s = connected(**kw)
    s.feed(data)
    e = raises(BadAnswer, c.poll)
    assert s.closed and c.sock is None
    return str(e)


def test_bad_packet_types_are_bad_answer():
    for first in (b"\x00", b"\x10", b"\x50", b"\x62", b"\x70", b"\x82", b"\xa2", b"\xc0", b"\xe0", b"\xf0"):
        eq(garbage_case(first + b"\x00"), "bad packet 0x%02x" % first[0])


def test_bad_flags_and_qos_are_bad_answer():
    eq(garbage_case(b"\x41\x02\x00\x01"), "bad packet 0x41")
    eq(garbage_case(b"\x34\x05\x00\x01t\x00\x01"), "bad packet 0x34")
    eq(garbage_case(b"\x36\x05\x00\x01t\x00\x01"), "bad packet 0x36")


def test_remaining_length_over_four_bytes_is_bad_answer():
    assert "4 bytes" in garbage_case(b"\x30\xff\xff\xff\xff\x01", max_packet=1 << 30)


def test_packet_over_the_limit_is_bad_answer():
    eq(garbage_case(b"\x30\x81\x01", max_packet=128), "packet of 129 bytes > max_packet")


def test_publish_shorter_than_its_topic_is_bad_answer():
    eq(garbage_case(b"\x30\x03\x00\x09a"), "bad packet 0x30")
    eq(garbage_case(b"\x32\x04\x00\x01t\x00"), "bad packet 0x32")
    eq(garbage_case(b"\x30\x01\x00"), "bad packet 0x30")


def test_stray_connack_and_unsuback_are_dropped():
    c, s = connected()
    s.feed(b"\x20\x02\x00\x00\xb0\x02\x00\x09")
    c.poll()
    eq(s.inbox, b"")
    assert c.sock is not None


def test_every_packet_is_one_write():
    c, s = connected(b"\x40\x02\x00\x01", b"\x90\x03\x00\x02\x01", b"\xd0\x00")
    c.publish(b"v1/devices/me/telemetry", b'{"ts":1732300000000,"values":{"uptime":5}}', 1)
    c.subscribe([("v1/devices/me/attributes", 1)])
    c.ping()
    c.disconnect()
    eq([w[0] for w in s.writes], [0x10, 0x32, 0x82, 0xC0, 0xE0])
    eq([len(w) for w in s.writes], [19, 71, 31, 2, 2])


def test_operations_after_close_are_no_answer():
    c, s = connected()
    c.close()
    raises(NoAnswer, c.publish, b"t", b"x")
    raises(NoAnswer, c.poll)


def test_bad_qos_is_value_error():
    c, s = connected()
    raises(ValueError, c.publish, b"t", b"x", 2)
    raises(ValueError, c.subscribe, [("t", 2)])
    raises(ValueError, c.subscribe, [])
    raises(ValueError, c.publish, b"t" * 65536, b"x")
    eq(len(s.writes), 1)
