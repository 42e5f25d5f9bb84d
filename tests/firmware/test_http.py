# The HTTP/1.1 client in via_http (send, then answer): exact request bytes and response parsing over a scripted TCP
# stream in place of tcp.connect.
from fakesock import FakeSocket, Stream
from httpclient import request
from mptest import eq, raises
from tbfleet import BadAnswer, NoAnswer, tcp


def serve(*pieces, close=True):
    # The next tcp.connect returns a socket that answers the request with pieces (each arriving as its own read);
    # returns that socket and the list of connect calls.
    def on_write(sock, data):
        for p in pieces:
            sock.feed(p)
        if close:
            sock.hang_up()
    sock = FakeSocket(on_write)
    calls = []

    def connect(host, port, timeout_ms, ssl_ctx=None):
        calls.append((host, port, timeout_ms, ssl_ctx))
        return sock
    tcp.connect = connect
    return sock, calls


def run(*pieces, close=True, limit=8192, ms=200, buf=None):
    serve(*pieces, close=close)
    return request("POST", "tb", 80, "/p", b"{}", None, ms, buf, limit)


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


def sent(method, host, port, path, body=None, ssl_ctx=None):
    # The bytes a request puts on the wire (answered with an empty 200).
    sock, _ = serve(OK)
    eq(request(method, host, port, path, body, ssl_ctx, 200), (200, b""))
    eq(len(sock.writes), 1)  # head and body leave in one write
    return sock.writes[0]


def test_post_request_bytes():
    eq(sent("POST", "tb.example", 8080, "/api/v1/provision", b'{"a":1}'),
       b"POST /api/v1/provision HTTP/1.1\r\nHost: tb.example:8080\r\nContent-Type: application/json\r\n"
       b"Content-Length: 7\r\nConnection: close\r\n\r\n{\"a\":1}")


def test_get_request_bytes_default_ports():
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    eq(sent("GET", "tb", 80, "/x"), b"GET /x HTTP/1.1\r\nHost: tb\r\nConnection: close\r\n\r\n")
    eq(sent("GET", "tb", 443, "/x", None, ctx), b"GET /x HTTP/1.1\r\nHost: tb\r\nConnection: close\r\n\r\n")
    assert b"Host: tb:80\r\n" in sent("GET", "tb", 80, "/x", None, ctx)
    assert b"Host: tb:443\r\n" in sent("GET", "tb", 443, "/x")


def test_a_request_larger_than_the_buffer_still_leaves_in_one_write():
    big = b'{"v":"' + b"x" * 300 + b'"}'
    for buf in (None, bytearray(7)):
        sock, _ = serve(OK)
        eq(request("POST", "tb", 80, "/p", big, None, 200, buf), (200, b""))
        eq(sock.writes, [b"POST /p HTTP/1.1\r\nHost: tb\r\nContent-Type: application/json\r\nContent-Length: 308\r\n"
                         b"Connection: close\r\n\r\n" + big])


def test_empty_body_has_zero_length():
    assert sent("POST", "tb", 80, "/x", b"").endswith(b"Content-Length: 0\r\nConnection: close\r\n\r\n")


def test_bad_request_fields_are_refused_before_connecting():
    _, calls = serve(OK)
    for args in (("POST", "tb", 80, "/a b"), ("POST", "tb", 80, "/a\r\nX: y"), ("POST", "", 80, "/"),
                 ("PO ST", "tb", 80, "/"), ("POST", "tb", 80, None)):
        e = raises(ValueError, request, *args)
        assert "bad HTTP request" in str(e), e
    eq(calls, [])


def test_content_length_in_pieces_with_bare_lf_and_header_case():
    eq(run(b"HTTP/1.1 200 OK\r\nconTENT-length:", b" 11\r\nX-A: b\n", b"\r\nhello", b" world", b"EXTRA",
           close=False), (200, b"hello world"))


def test_chunked_with_extensions_and_trailers():
    eq(run(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
           b"5;name=val\r\nhello\r\n", b"6\r\n world\r\n", b"A\r\n0123", b"456789\r\n",
           b"0\r\nX-Trailer: 1\r\nX-Other: 2\r\n\r\n", close=False), (200, b"hello world0123456789"))


def test_body_to_end_of_stream():
    eq(run(b"HTTP/1.0 500 Internal\r\nServer: x\r\n\r\n", b"part one,", b" part two"), (500, b"part one, part two"))


def test_a_caller_buffer_is_read_through_and_reused():
    # A buffer smaller than the head: lines and body are gathered over many fills of the same bytearray.
    buf = bytearray(7)
    for body in (b"hello world", b"again"):
        buf[:] = bytes(7)
        eq(run(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body, buf=buf), (200, body))
        assert any(buf), "the answer was not read through the caller's buffer"
    eq(len(buf), 7)


def test_status_without_reason_and_informational_skipped():
    eq(run(b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 401\r\nContent-Length: 0\r\n\r\n", close=False), (401, b""))


def test_no_content_has_no_body():
    eq(run(b"HTTP/1.1 204 No Content\r\n\r\n", close=False), (204, b""))


def test_connects_once_with_the_timeout_and_closes():
    sock, calls = serve(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    eq(request("POST", "tb", 8080, "/p", b"{}", timeout_ms=300), (200, b"ok"))
    eq(calls, [("tb", 8080, 300, None)])
    assert sock.closed


def test_garbage_status_line():
    for bad in (b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 2x0 OK\r\n\r\n", b"HTTP/1.1 20\r\n\r\n",
                b"HTTP/1.12000 OK\r\n\r\n", b"HTTP/1.1 200OK\r\n\r\n", b"\x00\x01\x02\r\n", b"\xff\xfe\r\n"):
        e = raises(BadAnswer, run, bad)
        assert "HTTP status" in str(e) or "HTTP line" in str(e), e


def test_bad_headers():
    for head in (b"no colon here", b": no name", b"Content-Length: -3", b"Content-Length: ten",
                 b"Content-Length:", b"X-Bytes: \xc3"):
        e = raises(BadAnswer, run, b"HTTP/1.1 200 OK\r\n" + head + b"\r\n\r\n")
        assert "bad HTTP" in str(e), e
    e = raises(BadAnswer, run, b"HTTP/1.1 200 OK\r\n" + b"X: " + b"y" * 600 + b"\r\n\r\n")
    assert "line larger than 512" in str(e), e
    e = raises(BadAnswer, run, b"HTTP/1.1 200 OK\r\n" + b"X: " + b"y" * 600)  # no line end in sight
    assert "line larger than 512" in str(e), e


def test_bad_chunks():
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    for bad in (b"zz\r\n", b"3\r\nabcX\r\n0\r\n\r\n", b"-1\r\n", b"\r\n"):
        e = raises(BadAnswer, run, head + bad)
        assert "bad HTTP chunk" in str(e), e


def test_oversize_answers():
    e = raises(BadAnswer, run, b"HTTP/1.1 200 OK\r\nContent-Length: 101\r\n\r\n", limit=100)
    assert "body larger than 100" in str(e), e
    chunk = b"40\r\n" + b"x" * 64 + b"\r\n"
    e = raises(BadAnswer, run, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 2, limit=100)
    assert "body larger than 100" in str(e), e
    e = raises(BadAnswer, run, b"HTTP/1.1 200 OK\r\n\r\n", b"y" * 60, b"y" * 60, limit=100)
    assert "body larger than 100" in str(e), e
    eq(run(b"HTTP/1.1 200 OK\r\n\r\n", b"y" * 100, limit=100), (200, b"y" * 100))
    eq(run(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b"y" * 100, limit=100), (200, b"y" * 100))


def test_closed_mid_answer():
    for cut in (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", b"HTTP/1.1 200 OK\r\nContent-",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", b""):
        e = raises(NoAnswer, run, cut)
        assert "closed" in str(e), e


def test_silent_server_hits_the_deadline():
    import time
    t0 = time.ticks_ms()
    e = raises(NoAnswer, run, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", close=False, ms=60)
    assert "in time" in str(e)
    took = time.ticks_diff(time.ticks_ms(), t0)
    assert 55 <= took < 500, took


def test_request_to_nobody_is_no_answer():
    raises(NoAnswer, request, "GET", "127.0.0.1", 1, "/", timeout_ms=300)


def test_endless_header_lines_or_1xx_answers_end_at_the_deadline():
    # A server that sends header lines, or 1xx answers, for 5 s: the exchange ends at its deadline (200 ms).
    for prefix, chunk in ((b"HTTP/1.1 200 OK\r\n", b"X-More: yes\r\n"), (b"", b"HTTP/1.1 102 Processing\r\n\r\n")):
        s = Stream(chunk, prefix)
        tcp.connect = lambda host, port, timeout_ms, ssl_ctx=None: s
        e = raises(NoAnswer, request, "POST", "tb", 80, "/p", b"{}", None, 200)
        eq(str(e), "no answer in time")
        assert s.served > 1 and s.closed, s.served
