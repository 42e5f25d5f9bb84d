# The MQTT 3.1.1 client (the MQTT half of tbfleet.via_mqtt.Link), byte for byte against a scripted socket.
import time

from fakesock import scripted
from mptest import eq, raises
from tbfleet import BadAnswer, NoAnswer, Refused, Rejected, tcp, via_mqtt

CONNACK_OK = b"\x20\x02\x00\x00"


class Cfg:
    # The attributes of tbfleet.config that the client reads.
    def __init__(self, **kw):
        self.host = "tb.example"
        self.port = 1883
        self.tls = False
        self.keepalive = 60
        self.timeout = 0.2
        for k, v in kw.items():
            setattr(self, k, v)


def client(sock, on_message=None, config=Cfg, **kw):
    # A Link over sock (config(**kw) its cfg); every tcp.connect it makes is recorded in .seen.
    seen = []

    def fake_connect(host, port, timeout_ms, ssl_ctx=None):
        seen.append((host, port, timeout_ms, ssl_ctx))
        return sock

    tcp.connect = fake_connect
    c = via_mqtt.Link(config(**kw))
    c.seen = seen
    if on_message:
        c.on_message = on_message
    return c


def connect(c, client_id, username, password, client_cert):
    # Opens a session as Link.provision does: the CONNECT put, then the handshake (connection, write, CONNACK).
    c.put_connect(client_id, username, password)
    c.handshake(client_cert)


def connected(*replies, **kw):
    s = scripted(CONNACK_OK, *replies)
    c = client(s, **kw)
    connect(c, "dev-1", None, None, False)
    return c, s


def elapsed_ms(fn, *args):
    t0 = time.ticks_ms()
    e = raises(NoAnswer, fn, *args)
    return e, time.ticks_diff(time.ticks_ms(), t0)


def test_connect_with_username_and_password():
    s = scripted(CONNACK_OK)
    c = client(s, keepalive=60)
    connect(c, "dev-1", "alice", "s3cret", False)
    eq(c.seen, [("tb.example", 1883, 200, None)])
    eq(s.writes, [b"\x10\x20\x00\x04MQTT\x04\xc2\x00\x3c\x00\x05dev-1\x00\x05alice\x00\x06s3cret"])
    assert c.sock is not None


def test_connect_with_username_only():
    s = scripted(CONNACK_OK)
    connect(client(s, keepalive=30), "esp32-a1", "A1_TEST_TOKEN", None, False)
    eq(s.writes, [b"\x10\x23\x00\x04MQTT\x04\x82\x00\x1e\x00\x08esp32-a1\x00\x0dA1_TEST_TOKEN"])


def test_connect_without_username_or_password():
    s = scripted(CONNACK_OK)
    connect(client(s, keepalive=0), "dev-1", None, None, False)
    eq(s.writes, [b"\x10\x11\x00\x04MQTT\x04\x02\x00\x00\x00\x05dev-1"])


def test_connect_with_empty_client_id_and_empty_password_present():
    # None is absent; an empty string is sent as a present, zero-length field.
    s = scripted(CONNACK_OK)
    connect(client(s, keepalive=60), "", "user", "", False)
    eq(s.writes, [b"\x10\x14\x00\x04MQTT\x04\xc2\x00\x3c\x00\x00\x00\x04user\x00\x00"])


def test_bad_connect_fields_are_refused_before_connecting():
    s = scripted(CONNACK_OK)
    c = client(s)
    e = raises(ValueError, connect, c, "dev", None, "pw", False)
    assert "password" in str(e)
    e = raises(ValueError, connect, c, "dev", "u" * 65536, None, False)
    eq(str(e), "too long: 65536 bytes")
    # The limit is on UTF-8 bytes, not characters: 32768 two-byte characters are one byte too many.
    e = raises(ValueError, connect, c, "dev", "\u00e9" * 32768, None, False)
    eq(str(e), "too long: 65536 bytes")
    eq(s.writes, [])
    connect(c, "dev", "\u00e9" * 32767, None, False)
    eq(len(s.writes[0]), 1 + 3 + 10 + 5 + 2 + 65534)


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
        c = client(s)
        e = raises(Refused, connect, c, "dev", "WRONG_TOKEN", None, False)
        eq(e.args, (code, name))
        assert s.closed and c.sock is None


def test_connack_unknown_code_or_bad_length_is_bad_answer():
    for connack in (b"\x20\x02\x00\x06", b"\x20\x03\x00\x00\x00"):
        s = scripted(connack)
        c = client(s)
        e = raises(BadAnswer, connect, c, "dev", None, None, False)
        eq(str(e), "bad packet 0x20")
        assert s.closed and c.sock is None


def test_first_packet_not_connack_is_bad_answer():
    got = []
    s = scripted(b"\x32\x07\x00\x01ab\x00\x01x")
    raises(BadAnswer, connect, client(s, on_message=lambda t, p: got.append(t)), "dev", None, None, False)
    assert s.closed
    eq(got, [])
    eq(len(s.writes), 1)  # not acknowledged either


def test_silent_server_is_no_answer_at_the_deadline():
    s = scripted()
    c = client(s, timeout=0.06)
    e, took = elapsed_ms(connect, c, "dev", None, None, False)
    eq(str(e), "no answer in time")
    assert 50 <= took < 1000, took
    assert s.closed and c.sock is None


def test_server_closing_before_connack_is_no_answer_at_once():
    s = scripted()
    s.hang_up()
    c = client(s, timeout=5)
    e, took = elapsed_ms(connect, c, "dev", None, None, False)
    eq(str(e), "connection closed")
    assert took < 1000, took
    assert s.closed


def test_reconnecting_ends_the_old_session_cleanly():
    first = scripted(CONNACK_OK)
    c = client(first)
    connect(c, "dev", None, None, False)
    second = scripted(CONNACK_OK)
    client(second)  # the next tcp.connect returns the second socket
    connect(c, "dev", None, None, False)
    eq(first.writes[1:], [b"\xe0\x00"])
    assert first.closed and c.sock is second


def test_a_failed_connect_leaves_nothing_to_send():
    # The CONNECT is put before the connection is made; when none can be made, it must not leave with the next packet.
    c = client(None)

    def refused(host, port, timeout_ms, ssl_ctx=None):
        raise NoAnswer("cannot connect")

    tcp.connect = refused
    raises(NoAnswer, connect, c, "dev", None, None, False)
    eq(c.out, 0)
    s = scripted(CONNACK_OK)
    client(s)
    connect(c, "dev", None, None, False)
    eq(s.writes, [b"\x10\x0f\x00\x04MQTT\x04\x02\x00\x3c\x00\x03dev"])


def test_the_link_polls_with_the_poll_object_of_its_waits():
    # One poll object per connection (tcp's), not one of the link's besides.
    c, s = connected(b"\x40\x02\x00\x01")
    poller = tcp._poller
    c.listen(0)
    c.publish("t", b"x", 1)
    c.listen()
    assert tcp._poller is poller and tcp._polled is s


def test_publish_qos0_bytes_in_one_write():
    c, s = connected()
    c.publish("v1/devices/me/telemetry", b'{"t":21.5}', 0)
    eq(s.writes[1:], [b"\x30\x23\x00\x17v1/devices/me/telemetry{\"t\":21.5}"])


def test_publish_qos1_bytes_and_puback():
    c, s = connected(b"\x40\x02\x00\x01")
    c.publish("v1/devices/me/telemetry", b'{"t":21.5}', 1)
    eq(s.writes[1:], [b"\x32\x25\x00\x17v1/devices/me/telemetry\x00\x01{\"t\":21.5}"])
    eq(s.inbox, b"")


def test_packet_ids_count_up_and_wrap_past_65535():
    c, s = connected(b"\x40\x02\x00\x01", b"\x40\x02\x00\x02")
    c.publish("t", b"1", 1)
    c.publish("t", b"2", 1)
    eq([w[5:7] for w in s.writes[1:]], [b"\x00\x01", b"\x00\x02"])
    c.pid = 65534
    for want in (b"\xff\xff", b"\x00\x01", b"\x00\x02"):
        s.on_write = None
        s.feed(b"\x40\x02" + want)
        c.publish("t", b"x", 1)
        eq(s.writes[-1][5:7], want)
    eq(s.inbox, b"")


def test_puback_found_among_interleaved_packets():
    got = []
    # Before our PUBACK: a stale PUBACK, a PINGRESP, a QoS 1 PUBLISH (id 0x1234) and a QoS 0 PUBLISH.
    between = (b"\x40\x02\x00\x07" + b"\xd0\x00"
               + b"\x32\x24\x00\x18v1/devices/me/attributes\x12\x34{\"fw\":1}"
               + b"\x30\x0c\x00\x03rpc{\"m\":2}"
               + b"\x40\x02\x00\x01")
    c, s = connected(between, on_message=lambda t, p: got.append((t, p)))
    c.publish("v1/devices/me/telemetry", b"{}", 1)
    eq(got, [(b"v1/devices/me/attributes", b'{"fw":1}'), (b"rpc", b'{"m":2}')])
    # Our PUBLISH, then the PUBACK of the incoming QoS 1 message, each in its own single write.
    eq(s.writes[2:], [b"\x40\x02\x12\x34"])
    eq(s.inbox, b"")


def test_puback_never_comes_is_no_answer():
    # Nothing of a packet was read, so the session stays usable: the late PUBACK is dropped as stale.
    c, s = connected(None, b"\x40\x02\x00\x01\x40\x02\x00\x02", timeout=0.06)
    e, took = elapsed_ms(c.publish, "t", b"x", 1)
    eq(str(e), "no answer in time")
    assert 50 <= took < 1000, took
    assert c.sock is not None
    c.publish("t", b"y", 1)
    eq(s.inbox, b"")


def test_deadline_inside_a_packet_closes_the_connection():
    c, s = connected(b"\x40\x02\x00", timeout=0.06)
    raises(NoAnswer, c.publish, "t", b"x", 1)
    assert s.closed and c.sock is None


def test_close_instead_of_puback_is_rejected():
    # MQTT 3.1.1 section 3.3.5: a server that will not take a QoS 1 message closes the connection.
    c, s = connected(None, timeout=5)
    s.hang_up()
    t0 = time.ticks_ms()
    e = raises(Rejected, c.publish, "v1/devices/me/telemetry", b"not json", 1)
    assert time.ticks_diff(time.ticks_ms(), t0) < 1000
    eq(e.args, (None, "closed instead of PUBACK"))
    assert s.closed and c.sock is None


def test_a_close_seen_elsewhere_is_no_answer():
    c, s = connected(timeout=5)
    s.hang_up()
    c.publish("t", b"x", 0)  # QoS 0: the write still succeeds and nothing is awaited
    e = raises(NoAnswer, c.listen)
    eq(str(e), "connection closed")
    assert s.closed and c.sock is None


def test_publish_header_at_length_boundaries():
    # Topic "t" (3 bytes with its length), QoS 0: remaining length = 3 + payload.
    c, s = connected()
    for size, head in ((127, b"\x30\x7f"), (128, b"\x30\x80\x01"), (16383, b"\x30\xff\x7f"),
                       (16384, b"\x30\x80\x80\x01")):
        c.publish("t", b"p" * (size - 3), 0)
        w = s.writes[-1]
        eq(w[: len(head) + 3], head + b"\x00\x01t")
        eq(len(w), len(head) + size)


class Huge:
    # A part whose length alone is over what four length bytes can carry.
    def __len__(self):
        return 268435453


def test_packet_over_four_length_bytes_is_refused_before_sending():
    c, s = connected()
    e = raises(ValueError, c.publish, "t", Huge(), 0)
    eq(str(e), "too long: 268435456 bytes")
    eq(len(s.writes), 1)


def test_incoming_publish_at_length_boundaries():
    got = []
    c, s = connected(on_message=lambda t, p: got.append(p))
    for size, head in ((127, b"\x30\x7f"), (128, b"\x30\x80\x01"), (16383, b"\x30\xff\x7f"),
                       (16384, b"\x30\x80\x80\x01")):
        s.feed(head + b"\x00\x01t" + b"q" * (size - 3))
        c.listen()
    eq([len(p) for p in got], [124, 125, 16380, 16381])


def test_one_buffer_for_every_packet_grows_only_when_needed():
    c, s = connected(b"\x40\x02\x00\x01", b"\x40\x02\x00\x02")
    buf = c.buf
    eq(len(buf), 512)
    c.publish("t", b"a" * 200, 1)
    c.publish("t", b"b" * 300, 1)
    assert c.buf is buf
    s.feed(b"\x30\x84\x04\x00\x01t" + b"z" * 513)
    c.listen()
    assert c.buf is not buf and len(c.buf) == 516
    buf = c.buf
    c.publish("t", b"c" * 500, 0)
    assert c.buf is buf
    c.publish("t", b"c" * 600, 0)
    assert c.buf is not buf and len(c.buf) == 3 + 600 + 5


def test_poll_acknowledges_incoming_qos1_publish():
    got = []
    c, s = connected(on_message=lambda t, p: got.append((t, p)))
    s.feed(b"\x32\x2e\x00\x1cv1/devices/me/rpc/request/42\xbe\xef{\"method\":\"x\"}")
    c.listen()
    eq(got, [(b"v1/devices/me/rpc/request/42", b'{"method":"x"}')])
    eq(s.writes[1:], [b"\x40\x02\xbe\xef"])


def test_pushes_nobody_waits_for_are_acknowledged_and_dropped():
    c, s = connected()
    s.feed(b"\x32\x06\x00\x01t\x00\x09x" + b"\x30\x04\x00\x01ty")
    c.listen()
    eq(s.writes[1:], [b"\x40\x02\x00\x09"])
    eq(s.inbox, b"")


def test_poll_pings_when_half_the_keepalive_passed():
    c, s = connected(b"\xd0\x00", keepalive=1)
    c.listen()
    eq(len(s.writes), 1)  # nothing due yet
    time.sleep_ms(520)
    c.listen()  # PINGREQ, and its PINGRESP (fed after the PINGREQ) read in the same call
    eq(s.writes[1:], [b"\xc0\x00"])
    eq(s.inbox, b"")
    c.listen()
    eq(len(s.writes), 2)  # the PINGREQ counts as a packet from us: the next is half a keep-alive away


def test_keepalive_zero_never_pings():
    c, s = connected(keepalive=0)
    c._last_tx = time.ticks_add(time.ticks_ms(), -100000)
    c.listen()
    eq(len(s.writes), 1)


def test_ping_handles_other_packets_until_the_pingresp():
    got = []
    c, s = connected(b"\x30\x04\x00\x01tx\xd0\x00", keepalive=1, on_message=lambda t, p: got.append(p))
    time.sleep_ms(510)
    c.listen()
    eq(got, [b"x"])
    eq(s.inbox, b"")


def test_poll_without_pingresp_is_no_answer_and_closes():
    c, s = connected(None, keepalive=1, timeout=0.05)
    time.sleep_ms(510)
    e, took = elapsed_ms(c.listen)
    assert 40 <= took < 1000, took
    assert s.closed and c.sock is None
    eq(s.writes[1:], [b"\xc0\x00"])


def test_poll_sees_a_closed_connection():
    c, s = connected()
    s.hang_up()
    raises(NoAnswer, c.listen)
    assert s.closed and c.sock is None


def test_close_sends_disconnect_once_and_is_idempotent():
    c, s = connected()
    c.close()
    eq(s.writes[1:], [b"\xe0\x00"])
    assert s.closed
    c.close()
    c.close(False)
    eq(len(s.writes), 2)


def test_close_never_raises_on_a_dead_socket():
    c, s = connected()
    s.closed = True  # writing raises OSError now
    c.close()
    assert c.sock is None


def garbage_case(data, **kw):
    c, s = connected(**kw)
    s.feed(data)
    e = raises(BadAnswer, c.listen)
    assert s.closed and c.sock is None
    return str(e)


def test_bad_packet_types_are_bad_answer():
    for first in (b"\x00", b"\x10", b"\x50", b"\x62", b"\x70", b"\x82", b"\xa2", b"\xc0", b"\xe0", b"\xf0"):
        eq(garbage_case(first + b"\x00"), "bad packet 0x%02x" % first[0])


def test_bad_type_is_refused_before_its_body_is_awaited():
    # A junk header announcing a long body: refused at once, not after waiting for the body.
    t0 = time.ticks_ms()
    eq(garbage_case(b"\xf0\x7f", timeout=5), "bad packet 0xf0")
    assert time.ticks_diff(time.ticks_ms(), t0) < 1000


def test_bad_flags_and_qos_are_bad_answer():
    eq(garbage_case(b"\x41\x02\x00\x01"), "bad packet 0x41")
    eq(garbage_case(b"\x34\x05\x00\x01t\x00\x01"), "bad packet 0x34")
    eq(garbage_case(b"\x36\x05\x00\x01t\x00\x01"), "bad packet 0x36")


def test_remaining_length_over_four_bytes_is_bad_answer():
    eq(garbage_case(b"\x30\xff\xff\xff\xff\x01"), "bad packet 0x30")


def test_packet_over_the_limit_is_bad_answer():
    eq(garbage_case(b"\x30\x81\x80\x01"), "too long: 16385 bytes")
    eq(garbage_case(b"\x30\xff\xff\xff\x7f"), "too long: 268435455 bytes")


def test_publish_shorter_than_its_topic_is_bad_answer():
    eq(garbage_case(b"\x30\x03\x00\x09a"), "bad packet 0x30")
    eq(garbage_case(b"\x32\x04\x00\x01t\x00"), "bad packet 0x32")
    eq(garbage_case(b"\x30\x01\x00"), "bad packet 0x30")


def test_stray_connack_unsuback_and_pingresp_are_dropped():
    c, s = connected()
    s.feed(b"\x20\x02\x00\x00\xb0\x02\x00\x09\xd0\x00")
    c.listen()
    eq(s.inbox, b"")
    assert c.sock is not None
    eq(len(s.writes), 1)


def test_every_packet_is_one_write():
    c, s = connected(b"\x40\x02\x00\x01", b"\xd0\x00", keepalive=1)
    c.publish("v1/devices/me/telemetry", b'{"ts":1732300000000,"values":{"uptime":5}}', 1)
    time.sleep_ms(510)
    c.listen()
    c.close()
    eq([w[0] for w in s.writes], [0x10, 0x32, 0xC0, 0xE0])
    eq([len(w) for w in s.writes], [19, 71, 2, 2])


def test_operations_after_close_are_no_answer():
    c, s = connected()
    c.close()
    for fn, args in ((c.publish, ("t", b"x", 0)), (c.listen, ()), (c.wait, (0,))):
        eq(str(raises(NoAnswer, fn, *args)), "not connected")


def test_bad_arguments_are_value_errors():
    c, s = connected()
    raises(ValueError, c.publish, "t", b"x", 2)
    raises(ValueError, c.publish, "t" * 65536, b"x", 0)
    eq(len(s.writes), 1)
