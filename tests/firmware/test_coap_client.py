# The CoAP exchanges over a scripted UDP socket, with shortened timers (ACK_TIMEOUT 10 ms).
from mptest import eq, raises
from test_coap import ACK, CON, CONTENT, CREATED, GET, NON, POST, RST, decode, encode, link, piggyback
from tbfleet import NoAnswer, via_coap


def test_piggybacked_answer():
    lk = link(piggyback(CREATED, b"done"))
    eq(lk.request(POST, ("api", "v1", "T1", "telemetry"), b'{"t":1}', 50), (CREATED, b"done"))
    eq(len(lk.sock.sent), 1)
    t, code, _, tok, opts, body = decode(lk.sock.datagrams[0])
    eq((t, code, len(tok), body), (CON, POST, 4, b'{"t":1}'))
    eq(opts, [(11, b"api"), (11, b"v1"), (11, b"T1"), (11, b"telemetry"), (12, b"\x32")])


def test_segments_hold_slashes_and_query():
    lk = link(piggyback(CONTENT, b"{}"))
    lk.request(GET, ("api", "v1", "a/b", "attributes"), None, None, ("clientKeys=x",))
    eq(decode(lk.sock.datagrams[0])[4], [(11, b"api"), (11, b"v1"), (11, b"a/b"), (11, b"attributes"),
                                         (15, b"clientKeys=x")])


def test_message_ids_increment_and_tokens_differ():
    lk = link(piggyback(CREATED))
    for _ in range(3):
        lk.request(POST, ("x",), b"1")
    mids = [decode(d)[2] for d in lk.sock.datagrams]
    toks = [decode(d)[3] for d in lk.sock.datagrams]
    eq([(m - mids[0]) & 0xFFFF for m in mids], [0, 1, 2])
    assert toks[0] != toks[1] != toks[2], toks


def test_retransmission_backoff_then_no_answer():
    lk = link(timeout=1)  # nobody answers; the 5 transmissions take 310 to 465 ms, within the timeout
    e = raises(NoAnswer, lk.request, POST, ("x",), b"1")
    assert "5 transmissions" in str(e), e
    times = [t for t, _ in lk.sock.sent]
    eq(len(set(lk.sock.datagrams)), 1)  # the same message (same id, same token) each time
    gaps = [b - a for a, b in zip(times, times[1:])]
    # ACK_TIMEOUT (10 ms here) times a random 1 to 1.5, doubled per retransmission: never early; the upper slack
    # is for a loaded machine.
    for gap, want in zip(gaps, (10, 20, 40, 80)):
        assert want <= gap < want * 3 // 2 + 60, gaps
    took = lk.sock.now() - times[-1]
    assert 160 <= took < 240 + 60, took


class FixedRandom:
    # Stands in for os in via_coap: urandom(1), the random factor's byte, gives a chosen value.
    def __init__(self, byte):
        import os

        self.byte = byte
        self.os = os

    def urandom(self, n):
        return bytes((self.byte,)) if n == 1 else self.os.urandom(n)


def test_random_factor_stretches_the_first_timeout_by_up_to_half():
    import os

    def answer_second(sock, data):
        if len(sock.sent) == 2:
            piggyback(CREATED)(sock, data)
    firsts = []
    try:
        for byte in (0, 255):
            via_coap.os = FixedRandom(byte)
            lk = link(answer_second, timeout=1)
            lk.ack_ms = 200
            lk.request(POST, ("x",), b"1")
            firsts.append(lk.sock.sent[1][0] - lk.sock.sent[0][0])
    finally:
        via_coap.os = os
    assert 200 <= firsts[0] < 300, firsts  # factor 1: never early, the slack is for a loaded machine
    assert 300 <= firsts[1] < 400, firsts  # factor 1.5


def test_answer_after_retransmissions():
    def third_time(sock, data):
        if len(sock.sent) == 3:
            piggyback(CREATED, b"late")(sock, data)
    lk = link(third_time)
    eq(lk.request(POST, ("x",), b"1"), (CREATED, b"late"))
    eq(len(lk.sock.sent), 3)


def separate(kind, delay=30, mid=0x7777, body=b"sep", ack_first=True):
    def answer(sock, data):
        t, _, rmid, tok, _, _ = decode(data)
        if t != CON or len(sock.sent) > 1:
            return
        if ack_first:
            sock.feed(encode(ACK, 0, rmid))
        sock.feed(encode(kind, CREATED, mid, tok, (), body), delay)
    return answer


def test_separate_confirmable_response_is_acknowledged():
    lk = link(separate(CON))
    eq(lk.request(POST, ("x",), b"1"), (CREATED, b"sep"))
    # the request once (the empty ACK stopped retransmission), then our ACK of the response
    eq(len(lk.sock.sent), 2)
    eq(lk.sock.datagrams[1], b"\x60\x00\x77\x77")


def test_separate_non_response_is_not_acknowledged():
    lk = link(separate(NON))
    eq(lk.request(POST, ("x",), b"1"), (CREATED, b"sep"))
    eq(len(lk.sock.sent), 1)


def test_separate_response_before_the_empty_ack():
    lk = link(separate(CON, delay=0, ack_first=False))
    eq(lk.request(POST, ("x",), b"1"), (CREATED, b"sep"))
    eq(lk.sock.datagrams[1], b"\x60\x00\x77\x77")


def test_separate_response_never_comes():
    def ack_only(sock, data):
        sock.feed(encode(ACK, 0, decode(data)[2]))
    lk = link(ack_only, timeout=0.06)
    e = raises(NoAnswer, lk.request, POST, ("x",), b"1")
    assert "separate" in str(e), e
    eq(len(lk.sock.sent), 1)
    assert 55 <= lk.sock.now() < 300, lk.sock.now()


def test_the_whole_exchange_ends_by_the_timeout_retransmissions_included():
    # ACK_TIMEOUT 50 ms: transmissions at 0, 50-75, 150-225 ms, and the exchange ends at the timeout (200 ms)
    # before the fourth is due (350-525 ms); with timeout 3 s and ACK_TIMEOUT 2 s it ran 63 to 93 s.
    lk = link(timeout=0.2)
    lk.ack_ms = 50
    e = raises(NoAnswer, lk.request, POST, ("x",), b"1")
    eq(str(e), "no answer in 0.2 s")
    assert len(lk.sock.sent) <= 3, lk.sock.sent
    assert lk.sock.sent[-1][0] - lk.sock.sent[0][0] < 200, lk.sock.sent  # nothing sent past the timeout


def test_duplicate_empty_acks_do_not_extend_the_wait_for_the_separate_response():
    # The server ACKs every transmission and then keeps sending the same empty ACK every 10 ms, for 20 times the
    # timeout: the exchange must end by the timeout, not when the duplicates stop.
    def dripping_acks(sock, data):
        if len(sock.sent) == 1:
            mid = decode(data)[2]
            for k in range(200):
                sock.feed(encode(ACK, 0, mid), 10 * k)
    lk = link(dripping_acks, timeout=0.1)
    e = raises(NoAnswer, lk.request, POST, ("x",), b"1")
    eq(str(e), "no separate response in 0.1 s")
    eq(len(lk.sock.sent), 1)
    assert lk.sock.inbox, "waited until the duplicate ACKs stopped"


def test_stray_datagrams_do_not_extend_the_exchange():
    # Garbage every 5 ms for 2 s keeps the socket readable: the exchange still ends by the timeout.
    def flood(sock, data):
        if len(sock.sent) == 1:
            for k in range(400):
                sock.feed(b"\x00garbage", 5 * k)
    lk = link(flood, timeout=0.3)
    lk.ack_ms = 50
    e = raises(NoAnswer, lk.request, POST, ("x",), b"1")
    eq(str(e), "no answer in 0.3 s")
    assert lk.sock.inbox, "waited until the garbage stopped"


def test_duplicate_separate_response_is_acked_again_not_processed():
    state = {}

    def server(sock, data):
        t, _, rmid, tok, _, _ = decode(data)
        if t != CON:
            return
        if "first" not in state:
            state["first"] = encode(CON, CREATED, 0x1111, tok, (), b"one")
            sock.feed(encode(ACK, 0, rmid))
            sock.feed(state["first"], 5)
        else:
            # our ACK of 0x1111 was "lost": the server retransmits it while the next exchange runs
            sock.feed(state["first"])
            sock.feed(encode(ACK, CREATED, rmid, tok, (), b"two"), 5)
    lk = link(server)
    eq(lk.request(POST, ("x",), b"1"), (CREATED, b"one"))
    eq(lk.request(POST, ("x",), b"2"), (CREATED, b"two"))
    acks = [d for d in lk.sock.datagrams if d == b"\x60\x00\x11\x11"]
    eq(len(acks), 2)


def test_only_the_last_eight_separate_responses_are_remembered():
    n = [0]

    def server(sock, data):
        t, _, rmid, tok, _, _ = decode(data)
        if t == CON:
            n[0] += 1
            sock.feed(encode(ACK, 0, rmid))
            sock.feed(encode(CON, CREATED, 0x3000 + n[0], tok, (), b"%d" % n[0]))
    lk = link(server)
    for i in range(1, 11):
        eq(lk.request(POST, ("x",), b"1"), (CREATED, b"%d" % i))
    eq(lk.seen, [0x3000 + i for i in range(3, 11)])


def test_wrong_token_ignored_and_reset():
    def server(sock, data):
        t, _, rmid, tok, _, _ = decode(data)
        if t != CON:
            return
        wrong = bytes(b ^ 0xFF for b in tok)
        sock.feed(encode(ACK, CREATED, rmid, wrong, (), b"bad piggyback"))
        sock.feed(encode(CON, CREATED, 0x2222, wrong, (), b"bad separate"))
        sock.feed(encode(NON, CREATED, 0x2223, wrong, (), b"bad non"))
        sock.feed(encode(CON, CREATED, 0x2224, tok, (), b"good"), 5)
    lk = link(server)
    eq(lk.request(POST, ("x",), b"1"), (CREATED, b"good"))
    eq(lk.sock.datagrams[1:], [b"\x70\x00\x22\x22", b"\x60\x00\x22\x24"])


def test_stale_ack_and_garbage_ignored():
    def server(sock, data):
        t, _, rmid, tok, _, _ = decode(data)
        sock.feed(b"\xff\xff")
        sock.feed(encode(ACK, CREATED, (rmid + 100) & 0xFFFF, tok, (), b"stale"))
        sock.feed(encode(RST, 0, (rmid - 1) & 0xFFFF))
        sock.feed(encode(ACK, CREATED, rmid, tok, (), b"fresh"), 3)
    lk = link(server)
    eq(lk.request(POST, ("x",), b"1"), (CREATED, b"fresh"))


def test_reset_is_no_answer():
    def reset(sock, data):
        sock.feed(encode(RST, 0, decode(data)[2]))
    e = raises(NoAnswer, link(reset).request, POST, ("x",), b"1")
    assert "reset" in str(e), e


def test_server_ping_gets_reset():
    def server(sock, data):
        t, _, rmid, tok, _, _ = decode(data)
        if t == CON:
            sock.feed(b"\x40\x00\x05\x05")  # CoAP ping: an empty CON
            sock.feed(encode(ACK, CREATED, rmid, tok), 3)
    lk = link(server)
    lk.request(POST, ("x",), b"1")
    eq(lk.sock.datagrams[1], b"\x70\x00\x05\x05")


def test_port_unreachable_is_no_answer_and_the_next_request_opens_a_new_socket():
    def refuse(sock, data):
        sock.refused = True
    lk = link(refuse)
    lk._path = ("api", "v1", "T")  # opened
    e = raises(NoAnswer, lk.request, POST, ("x",), b"1")
    assert "127.0.0.1:5683" in str(e) and "111" in str(e), e
    eq((lk.sock, lk.poller), (None, None))
    eq(lk._path, ("api", "v1", "T"))  # still open: only the socket went


def test_real_udp_port_unreachable():
    # A real socket towards a loopback UDP port nobody listens on (9, discard): the ICMP error ends it at once.
    from test_coap import Cfg

    cfg = Cfg()
    cfg.port = 9
    lk = via_coap.Link(cfg)
    lk.ack_ms = 10
    e = raises(NoAnswer, lk.request, POST, ("x",), b"1")
    assert "127.0.0.1:9" in str(e), e
    lk.close()
    lk.close()
    eq(lk.sock, None)


def test_unresolvable_host_is_no_answer():
    from test_coap import Cfg

    cfg = Cfg()
    cfg.host = "no such host.invalid"
    e = raises(NoAnswer, via_coap.Link(cfg).request, POST, ("x",), b"1")
    assert "no such host.invalid" in str(e), e


def test_one_poller_per_socket():
    # Kept with the socket and reused by every wait, so a message leaves no poller behind.
    lk = link(piggyback(CREATED))
    p = lk.poller
    lk.request(POST, ("x",), b"{}")
    lk.request(POST, ("x",), b"{}")
    assert lk.poller is p
    lk.close()
    assert lk.poller is None and lk.sock is None
