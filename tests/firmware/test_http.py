# The HTTP/1.1 client: exact request bytes and response parsing over a scripted TCP stream.
from fakesock import FakeSocket
from mptest import eq, raises
from tbfleet import http, tcp
from tbfleet.errors import BadAnswer, NoAnswer


def answer(*pieces, close=True):
    # A socket that answers the request with pieces (each arriving as its own read).
    def on_write(sock, data):
        for p in pieces:
            sock.feed(p)
        if close:
            sock.hang_up()
    return FakeSocket(on_write)


def run(sock, limit=http.MAX_BODY, ms=200):
    return http.exchange(sock, http.encode("POST", "tb", 80, "/p", b"{}"), tcp.deadline(ms), limit)


def test_post_request_bytes():
    eq(http.encode("POST", "tb.example", 8080, "/api/v1/provision", b'{"a":1}'),
       b"POST /api/v1/provision HTTP/1.1\r\nHost: tb.example:8080\r\nContent-Type: application/json\r\n"
       b"Content-Length: 7\r\nConnection: close\r\n\r\n{\"a\":1}")


def test_get_request_bytes_default_ports():
    eq(http.encode("GET", "tb", 80, "/x"), b"GET /x HTTP/1.1\r\nHost: tb\r\nConnection: close\r\n\r\n")
    eq(http.encode("GET", "tb", 443, "/x", tls=True), b"GET /x HTTP/1.1\r\nHost: tb\r\nConnection: close\r\n\r\n")
    assert b"Host: tb:80\r\n" in http.encode("GET", "tb", 80, "/x", tls=True)


def test_empty_body_has_zero_length():
    assert http.encode("POST", "tb", 80, "/x", b"").endswith(b"Content-Length: 0\r\nConnection: close\r\n\r\n")


def test_bad_request_fields():
    for args in (("POST", "tb", 80, "/a b"), ("POST", "tb", 80, "/a\r\nX: y"), ("POST", "", 80, "/"),
                 ("PO ST", "tb", 80, "/")):
        e = raises(ValueError, http.encode, *args)
        assert "bad HTTP request field" in str(e)


def test_request_leaves_in_one_write():
    s = answer(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    eq(run(s), (200, b""))
    eq(len(s.writes), 1)
    assert s.writes[0].endswith(b"\r\n\r\n{}")


def test_content_length_in_pieces_with_bare_lf_and_header_case():
    s = answer(b"HTTP/1.1 200 OK\r\nconTENT-length:", b" 11\r\nX-A: b\n", b"\r\nhello", b" world", b"EXTRA",
               close=False)
    eq(run(s), (200, b"hello world"))


def test_chunked_with_extensions_and_trailers():
    s = answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
               b"5;name=val\r\nhello\r\n", b"6\r\n world\r\n", b"A\r\n0123456789\r\n",
               b"0\r\nX-Trailer: 1\r\nX-Other: 2\r\n\r\n", close=False)
    eq(run(s), (200, b"hello world0123456789"))


def test_body_to_end_of_stream():
    s = answer(b"HTTP/1.0 500 Internal\r\nServer: x\r\n\r\n", b"part one,", b" part two")
    eq(run(s), (500, b"part one, part two"))


def test_a_caller_buffer_is_read_through_and_reused():
    # A buffer smaller than the head: lines and body are gathered over many fills of the same bytearray.
    buf = bytearray(7)
    req = http.encode("POST", "tb", 80, "/p", b"{}")
    for body in (b"hello world", b"again"):
        buf[:] = bytes(7)
        s = answer(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        eq(http.exchange(s, req, tcp.deadline(200), http.MAX_BODY, False, buf), (200, body))
        assert any(buf), "the answer was not read through the caller's buffer"
    eq(len(buf), 7)


def test_status_without_reason_and_informational_skipped():
    s = answer(b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 401\r\nContent-Length: 0\r\n\r\n", close=False)
    eq(run(s), (401, b""))


def test_no_content_has_no_body():
    s = answer(b"HTTP/1.1 204 No Content\r\n\r\n", close=False)
    eq(run(s), (204, b""))


def test_garbage_status_line():
    for bad in (b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 2x0 OK\r\n\r\n", b"HTTP/1.1 20\r\n\r\n",
                b"HTTP/1.12000 OK\r\n\r\n", b"\x00\x01\x02\r\n"):
        e = raises(BadAnswer, run, answer(bad))
        assert "HTTP status" in str(e), e


def test_bad_headers():
    raises(BadAnswer, run, answer(b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n"))
    raises(BadAnswer, run, answer(b"HTTP/1.1 200 OK\r\nContent-Length: -3\r\n\r\n"))
    raises(BadAnswer, run, answer(b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n"))
    raises(BadAnswer, run, answer(b"HTTP/1.1 200 OK\r\n" + b"X: " + b"y" * 600 + b"\r\n\r\n"))
    raises(BadAnswer, run, answer(b"HTTP/1.1 200 OK\r\n" + b"X: 1234567890\r\n" * 400 + b"\r\n"))


def test_bad_chunks():
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    raises(BadAnswer, run, answer(head + b"zz\r\n"))
    raises(BadAnswer, run, answer(head + b"3\r\nabcX\r\n0\r\n\r\n"))
    raises(BadAnswer, run, answer(head + b"-1\r\n"))


def test_oversize_answers():
    e = raises(BadAnswer, run, answer(b"HTTP/1.1 200 OK\r\nContent-Length: 101\r\n\r\n"), 100)
    assert "101" in str(e)
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"40\r\n" + b"x" * 64 + b"\r\n" * 2
    raises(BadAnswer, run, answer(chunked), 100)
    raises(BadAnswer, run, answer(b"HTTP/1.1 200 OK\r\n\r\n", b"y" * 60, b"y" * 60), 100)
    eq(run(answer(b"HTTP/1.1 200 OK\r\n\r\n", b"y" * 100), 100), (200, b"y" * 100))


def test_closed_mid_answer():
    e = raises(NoAnswer, run, answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"))
    assert "closed inside the body" in str(e)
    raises(NoAnswer, run, answer(b"HTTP/1.1 200 OK\r\nContent-"))
    raises(NoAnswer, run, answer())


def test_silent_server_hits_the_deadline():
    import time
    s = answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", close=False)
    t0 = time.ticks_ms()
    e = raises(NoAnswer, run, s, http.MAX_BODY, 60)
    assert "in time" in str(e)
    took = time.ticks_diff(time.ticks_ms(), t0)
    assert 55 <= took < 500, took


def test_request_connects_and_closes():
    s = answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    calls = []
    real = tcp.connect

    def connect(host, port, timeout_ms, ssl_ctx=None):
        calls.append((host, port, timeout_ms, ssl_ctx))
        return s
    tcp.connect = connect
    try:
        eq(http.request("POST", "tb", 8080, "/p", b"{}", timeout_ms=300), (200, b"ok"))
    finally:
        tcp.connect = real
    eq(calls, [("tb", 8080, 300, None)])
    assert s.closed


def test_request_to_nobody_is_no_answer():
    raises(NoAnswer, http.request, "GET", "127.0.0.1", 1, "/", timeout_ms=300)
