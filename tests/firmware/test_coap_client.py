# The CoAP client's exchanges over a scripted UDP socket, with shortened timers (ACK_TIMEOUT 10 ms).
from fakeudp import FakeUDP
from mptest import eq, raises
from tbfleet import coap
from tbfleet.errors import NoAnswer


def client(on_send=None, factor=1.0, timeout_ms=200, max_retransmit=4):
    c = coap.Client("127.0.0.1", 5683, timeout_ms, 10, factor, max_retransmit)
    c.sock = FakeUDP(on_send)
    return c


def req(data):
    return coap.decode(data)


def piggyback(code, body=b""):
    def answer(sock, data):
        t, _, mid, tok, _, _ = req(data)
        if t == coap.CON:
            sock.feed(coap.encode(coap.ACK, code, mid, tok, (), body))
    return answer


def test_piggybacked_answer_and_request_bytes():
    c = client(piggyback(coap.CREATED, b"done"))
    eq(c.request(coap.POST, "/api/v1/T1/telemetry", b'{"t":1}', content_format=coap.JSON), (coap.CREATED, b"done"))
    eq(len(c.sock.sent), 1)
    t, code, _, tok, opts, body = req(c.sock.datagrams[0])
    eq((t, code, len(tok), body), (coap.CON, coap.POST, 4, b'{"t":1}'))
    eq(opts, [(11, b"api"), (11, b"v1"), (11, b"T1"), (11, b"telemetry"), (12, b"\x32")])


def test_segments_with_slash_and_query():
    c = client(piggyback(coap.CONTENT, b"{}"))
    c.request(coap.GET, ("api", "v1", "a/b", "attributes"), query=("clientKeys=x",))
    eq(req(c.sock.datagrams[0])[4], [(11, b"api"), (11, b"v1"), (11, b"a/b"), (11, b"attributes"),
                                     (15, b"clientKeys=x")])


def test_uri_host_only_when_asked():
    c = client(piggyback(coap.CONTENT))
    c.host = "tb.local"
    c.uri_host = True
    c.request(coap.GET, "/time")
    eq(req(c.sock.datagrams[0])[4], [(3, b"tb.local"), (11, b"time")])


def test_message_ids_increment_and_tokens_differ():
    c = client(piggyback(coap.CREATED))
    for _ in range(3):
        c.request(coap.POST, "/x", b"1")
    mids = [req(d)[2] for d in c.sock.datagrams]
    toks = [req(d)[3] for d in c.sock.datagrams]
    eq([(m - mids[0]) & 0xFFFF for m in mids], [0, 1, 2])
    assert toks[0] != toks[1] != toks[2], toks


def test_retransmission_backoff_then_no_answer():
    c = client()  # nobody answers
    e = raises(NoAnswer, c.request, coap.POST, "/x", b"1")
    assert "5 transmissions" in str(e), e
    times = [t for t, _ in c.sock.sent]
    eq(len(set(c.sock.datagrams)), 1)  # the same message (same id, same token) each time
    gaps = [b - a for a, b in zip(times, times[1:])]
    for gap, want in zip(gaps, (10, 20, 40, 80)):
        assert want <= gap < want + 60, gaps  # never early; the upper slack is for a loaded machine
    took = c.sock.now() - times[-1]
    assert 160 <= took < 260, took


def test_random_factor_stretches_first_timeout():
    c = client(factor=1.5, max_retransmit=1)
    raises(NoAnswer, c.request, coap.POST, "/x", b"1")
    gap = c.sock.sent[1][0] - c.sock.sent[0][0]
    assert 10 <= gap < 15 + 20, gap


def test_answer_after_retransmissions():
    def third_time(sock, data):
        if len(sock.sent) == 3:
            piggyback(coap.CREATED, b"late")(sock, data)
    c = client(third_time)
    eq(c.request(coap.POST, "/x", b"1"), (coap.CREATED, b"late"))
    eq(len(c.sock.sent), 3)


def separate(kind, delay=30, mid=0x7777, body=b"sep", ack_first=True):
    def answer(sock, data):
        t, _, rmid, tok, _, _ = req(data)
        if t != coap.CON or len(sock.sent) > 1:
            return
        if ack_first:
            sock.feed(coap.encode(coap.ACK, 0, rmid))
        sock.feed(coap.encode(kind, coap.CREATED, mid, tok, (), body), delay)
    return answer


def test_separate_confirmable_response_is_acknowledged():
    c = client(separate(coap.CON))
    eq(c.request(coap.POST, "/x", b"1"), (coap.CREATED, b"sep"))
    # the request once (the empty ACK stopped retransmission), then our ACK of the response
    eq(len(c.sock.sent), 2)
    eq(c.sock.datagrams[1], b"\x60\x00\x77\x77")


def test_separate_non_response_is_not_acknowledged():
    c = client(separate(coap.NON))
    eq(c.request(coap.POST, "/x", b"1"), (coap.CREATED, b"sep"))
    eq(len(c.sock.sent), 1)


def test_separate_response_before_the_empty_ack():
    c = client(separate(coap.CON, delay=0, ack_first=False))
    eq(c.request(coap.POST, "/x", b"1"), (coap.CREATED, b"sep"))
    eq(c.sock.datagrams[1], b"\x60\x00\x77\x77")


def test_separate_response_never_comes():
    def ack_only(sock, data):
        sock.feed(coap.encode(coap.ACK, 0, req(data)[2]))
    c = client(ack_only, timeout_ms=60)
    e = raises(NoAnswer, c.request, coap.POST, "/x", b"1")
    assert "separate" in str(e), e
    eq(len(c.sock.sent), 1)
    assert 55 <= c.sock.now() < 300, c.sock.now()


def test_duplicate_separate_response_is_acked_again_not_processed():
    state = {}

    def server(sock, data):
        t, _, rmid, tok, _, _ = req(data)
        if t != coap.CON:
            return
        if "first" not in state:
            state["first"] = coap.encode(coap.CON, coap.CREATED, 0x1111, tok, (), b"one")
            sock.feed(coap.encode(coap.ACK, 0, rmid))
            sock.feed(state["first"], 5)
        else:
            # our ACK of 0x1111 was "lost": the server retransmits it while the next exchange runs
            sock.feed(state["first"])
            sock.feed(coap.encode(coap.ACK, coap.CREATED, rmid, tok, (), b"two"), 5)
    c = client(server)
    eq(c.request(coap.POST, "/x", b"1"), (coap.CREATED, b"one"))
    eq(c.request(coap.POST, "/x", b"2"), (coap.CREATED, b"two"))
    acks = [d for d in c.sock.datagrams if d == b"\x60\x00\x11\x11"]
    eq(len(acks), 2)


def test_wrong_token_ignored_and_reset():
    def server(sock, data):
        t, _, rmid, tok, _, _ = req(data)
        if t != coap.CON:
            return
        wrong = bytes(b ^ 0xFF for b in tok)
        sock.feed(coap.encode(coap.ACK, coap.CREATED, rmid, wrong, (), b"bad piggyback"))
        sock.feed(coap.encode(coap.CON, coap.CREATED, 0x2222, wrong, (), b"bad separate"))
        sock.feed(coap.encode(coap.NON, coap.CREATED, 0x2223, wrong, (), b"bad non"))
        sock.feed(coap.encode(coap.CON, coap.CREATED, 0x2224, tok, (), b"good"), 5)
    c = client(server)
    eq(c.request(coap.POST, "/x", b"1"), (coap.CREATED, b"good"))
    eq(c.sock.datagrams[1:], [b"\x70\x00\x22\x22", b"\x60\x00\x22\x24"])


def test_stale_ack_and_garbage_ignored():
    def server(sock, data):
        t, _, rmid, tok, _, _ = req(data)
        sock.feed(b"\xff\xff")
        sock.feed(coap.encode(coap.ACK, coap.CREATED, (rmid + 100) & 0xFFFF, tok, (), b"stale"))
        sock.feed(coap.encode(coap.ACK, coap.CREATED, rmid, tok, (), b"fresh"), 3)
    c = client(server)
    eq(c.request(coap.POST, "/x", b"1"), (coap.CREATED, b"fresh"))


def test_reset_is_no_answer():
    def reset(sock, data):
        sock.feed(coap.encode(coap.RST, 0, req(data)[2]))
    e = raises(NoAnswer, client(reset).request, coap.POST, "/x", b"1")
    assert "reset" in str(e), e


def test_server_ping_gets_reset():
    def server(sock, data):
        t, _, rmid, tok, _, _ = req(data)
        if t == coap.CON:
            sock.feed(b"\x40\x00\x05\x05")  # CoAP ping: an empty CON
            sock.feed(coap.encode(coap.ACK, coap.CREATED, rmid, tok), 3)
    c = client(server)
    c.request(coap.POST, "/x", b"1")
    eq(c.sock.datagrams[1], b"\x70\x00\x05\x05")


def test_port_unreachable_is_no_answer():
    def refuse(sock, data):
        sock.refused = True
    e = raises(NoAnswer, client(refuse).request, coap.POST, "/x", b"1")
    assert "111" in str(e), e


def test_real_udp_port_unreachable():
    # A real socket towards a loopback UDP port nobody listens on (9, discard): the ICMP error ends it at once.
    c = coap.Client("127.0.0.1", 9, 100, 10, 1.0, 2)
    e = raises(NoAnswer, c.request, coap.POST, "/x", b"1")
    assert "receive failed" in str(e), e
    c.close()
    c.close()
    eq(c.sock, None)


def test_one_poller_per_socket():
    # Made once with the socket and reused by every wait, so a message leaves no poller behind.
    c = client(piggyback(coap.CREATED))
    c.request(coap.POST, "/api/v1/T1/telemetry", b"{}")
    p = c._poller
    assert p is not None
    c.request(coap.POST, "/api/v1/T1/telemetry", b"{}")
    assert c._poller is p
    c.close()
    assert c._poller is None and c.sock is None
