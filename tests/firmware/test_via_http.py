# The HTTP adapter's mapping of ThingsBoard answers, over a scripted TCP stream in place of tcp.connect.
from fakesock import FakeSocket
from mptest import eq, raises
from tbfleet import BadAnswer, NoAnswer, Refused, Rejected, tcp, via_http


class Cfg:
    host = "tb.local"
    port = 8080
    tls = False
    ca_file = None
    timeout = 0.2


def link_answering(*answers):
    # A Link whose connections answer in turn with answers; returns (link, list of request bytes).
    sent = []
    todo = list(answers)

    def connect(host, port, timeout_ms, ssl_ctx=None):
        eq((host, port, timeout_ms, ssl_ctx), ("tb.local", 8080, 200, None))
        reply = todo.pop(0)

        def on_write(sock, data):
            sent.append(data)
            sock.feed(reply)
            sock.hang_up()
        return FakeSocket(on_write)
    tcp.connect = connect
    return via_http.Link(Cfg()), sent


OK = b"HTTP/1.1 200 \r\nContent-Length: 0\r\n\r\n"
CURRENT = b'HTTP/1.1 200 \r\nContent-Length: 23\r\n\r\n{"shared":{"led":true}}'


def opened(token, *answers):
    # A Link opened with token (client attributes, the first telemetry and the current shared ones exchanged),
    # whose next connections answer with answers; returns (link, list of the requests after open's three).
    link, sent = link_answering(OK, OK, CURRENT, *answers)
    burst = [b'{"fw":"1"}', b'{"t":0}']
    link.open({"type": "ACCESS_TOKEN", "token": token}, burst)
    eq((len(sent), burst), (3, []))  # both taken out of the list as they were sent
    del sent[:]
    return link, sent


def test_open_sends_client_attributes_and_first_telemetry_then_gets_shared_ones():
    link, sent = link_answering(OK, OK, CURRENT)
    link.open({"type": "ACCESS_TOKEN", "token": "A1b2_C3"}, [b'{"fw":"1"}', b'{"t":0}'])
    eq(sent, [b"POST /api/v1/A1b2_C3/attributes HTTP/1.1\r\nHost: tb.local:8080\r\nContent-Type: application/json\r\n"
              b"Content-Length: 10\r\nConnection: close\r\n\r\n" b'{"fw":"1"}',
              b"POST /api/v1/A1b2_C3/telemetry HTTP/1.1\r\nHost: tb.local:8080\r\nContent-Type: application/json\r\n"
              b"Content-Length: 7\r\nConnection: close\r\n\r\n" b'{"t":0}',
              b"GET /api/v1/A1b2_C3/attributes HTTP/1.1\r\nHost: tb.local:8080\r\nConnection: close\r\n\r\n"])
    eq(link.events, [("current", None, b'{"shared":{"led":true}}')])


def test_provision_posts_and_returns_body_for_any_status():
    for body in (b'{"credentialsValue":"T","credentialsType":"ACCESS_TOKEN","status":"SUCCESS"}',
                 b'{"errorMsg":"Provision data was not found!","status":"NOT_FOUND"}',
                 b'{"errorMsg":"Failed to provision device!","status":"FAILURE"}'):
        link, sent = link_answering(b"HTTP/1.1 200 \r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        eq(link.provision(b'{"deviceName":"d"}'), body)
        assert sent[0].startswith(b"POST /api/v1/provision HTTP/1.1\r\nHost: tb.local:8080\r\n"), sent
        assert sent[0].endswith(b'\r\n\r\n{"deviceName":"d"}'), sent


def test_provision_non_200_is_bad_answer():
    link, _ = link_answering(b'HTTP/1.1 500 \r\nContent-Length: 24\r\n\r\n{"status":500,"message"}')
    e = raises(BadAnswer, link.provision, b"{}")
    assert "HTTP 500" in str(e) and "status" in str(e), e


def test_telemetry_path_and_ok():
    link, sent = opened("A1b2_C3", OK)
    link.send(b'{"t":21}')
    assert sent[0].startswith(b"POST /api/v1/A1b2_C3/telemetry HTTP/1.1\r\n"), sent


def test_token_is_one_escaped_path_segment():
    link, sent = opened("a/b c%\xe9", OK)
    link.send(b"{}")
    assert sent[0].startswith(b"POST /api/v1/a%2Fb%20c%25%C3%A9/telemetry HTTP/1.1"), sent


def test_telemetry_status_mapping():
    # 401: the token is revoked; any other status: the content was refused, in the server's own words if any.
    cases = ((b"HTTP/1.1 401 \r\nContent-Length: 0\r\n\r\n", Refused, (401, "unauthorized")),
             (b'HTTP/1.1 413 \r\nContent-Length: 43\r\n\r\n"Payload size exceeds the limit of 9 bytes" ',
              Rejected, (413, '"Payload size exceeds the limit of 9 bytes"')),
             (b"HTTP/1.1 500 \r\nContent-Length: 21\r\n\r\nExpected BEGIN_OBJECT", Rejected,
              (500, "Expected BEGIN_OBJECT")),
             (b"HTTP/1.1 500 \r\nContent-Length: 0\r\n\r\n", Rejected, (500, "HTTP 500")),
             (b"HTTP/1.1 403 \r\nContent-Length: 0\r\n\r\n", Rejected, (403, "HTTP 403")),
             (b"HTTP/1.1 500 \r\nContent-Length: 2\r\n\r\n\xff\xfe", Rejected, (500, "HTTP 500")),
             (b"HTTP/1.1 500 \r\nContent-Length: 80\r\n\r\n" + b"x" * 80, Rejected, (500, "x" * 60)))
    for reply, kind, args in cases:
        link, _ = opened("T", reply)
        eq(raises(kind, link.send, b"{}").args, args)


def test_no_answer_passes_through():
    link, _ = opened("T", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab")
    raises(NoAnswer, link.send, b"{}")


def test_open_refuses_other_credentials():
    link = via_http.Link(Cfg())
    e = raises(ValueError, link.open, {"type": "MQTT_BASIC", "client_id": "c", "username": "u", "password": "p"},
               [b"{}", b"{}"])
    assert "needs a token" in str(e) and "MQTT_BASIC" in str(e), e
    raises(ValueError, link.open, {"type": "X509_CERTIFICATE"}, [b"{}", b"{}"])
    raises(ValueError, link.open, {"type": "ACCESS_TOKEN", "token": ""}, [b"{}", b"{}"])
    e = raises(ValueError, link.send, b"{}")  # nothing was opened
    assert "not opened" in str(e), e


def test_close_forgets_token_and_is_idempotent():
    link, _ = opened("T")
    link.close()
    link.close()
    raises(ValueError, link.send, b"{}")


def test_after_close_a_provisioning_request_goes_to_the_provisioning_path_not_the_devices():
    link, sent = opened("T", b'HTTP/1.1 200 \r\nContent-Length: 2\r\n\r\n{}')
    link.close()
    eq(link.provision(b"{}"), b"{}")
    assert sent[0].startswith(b"POST /api/v1/provision HTTP/1.1\r\n"), sent


def test_tls_context_is_made_once_and_passed():
    import ssl
    cfg = Cfg()
    cfg.tls = True
    seen = []

    def connect(host, port, timeout_ms, ssl_ctx=None):
        seen.append(ssl_ctx)
        s = FakeSocket(lambda sock, d: (sock.feed(b"HTTP/1.1 200 \r\nContent-Length: 0\r\n\r\n"), sock.hang_up()))
        return s
    tcp.connect = connect
    link = via_http.Link(cfg)
    link.open({"type": "ACCESS_TOKEN", "token": "T"}, [b"{}", b"{}"])
    link.send(b"{}")
    assert isinstance(seen[0], ssl.SSLContext), seen
    assert all(ctx is seen[0] for ctx in seen), seen


def test_every_request_reads_through_the_links_one_buffer():
    # A buffer per request would split the free heap a little more on every message.
    sent, read = [], []

    def send(method, path, body, to):
        sent.append(to[4])
        return "socket"

    def answer(sock, at, buf, limit=8192):
        read.append(buf)
        return 200, b"{}"
    via_http.send = send
    via_http.answer = answer
    link = via_http.Link(Cfg())
    link.provision(b"{}")
    link.open({"type": "ACCESS_TOKEN", "token": "T"}, [b"{}", b"{}"])
    link.send(b"{}")
    link.send(b"{}", 7)
    eq((len(sent), len(read)), (6, 6))
    assert isinstance(sent[0], bytearray) and all(buf is sent[0] for buf in sent + read), (sent, read)


def test_listen_keeps_a_long_poll_of_rpc_and_one_of_attribute_updates_open():
    # Both polls are open side by side; an answer (200: an event; 408: nothing came) opens that poll again.
    rpc = b'{"id":7,"method":"setRelay","params":{"on":true}}'
    link, sent = opened("T", b"HTTP/1.1 200 \r\nContent-Length: %d\r\n\r\n" % len(rpc) + rpc,
                        b"HTTP/1.1 408 \r\nContent-Length: 0\r\n\r\n",
                        b"HTTP/1.1 408 \r\nContent-Length: 0\r\n\r\n", b"HTTP/1.1 408 \r\nContent-Length: 0\r\n\r\n")
    link.events.clear()
    link.listen(50)
    eq(sent, [b"GET /api/v1/T/rpc?timeout=20000 HTTP/1.1\r\nHost: tb.local:8080\r\nConnection: close\r\n\r\n",
              b"GET /api/v1/T/attributes/updates?timeout=20000 HTTP/1.1\r\nHost: tb.local:8080\r\nConnection: close"
              b"\r\n\r\n",
              b"GET /api/v1/T/rpc?timeout=20000 HTTP/1.1\r\nHost: tb.local:8080\r\nConnection: close\r\n\r\n",
              b"GET /api/v1/T/attributes/updates?timeout=20000 HTTP/1.1\r\nHost: tb.local:8080\r\nConnection: close"
              b"\r\n\r\n"])
    eq(link.events, [("rpc", None, rpc)])
    eq([feature for _, feature, _ in link.polls], ["/rpc", "/attributes/updates"])
    link.close()
    eq(link.polls, [])


def test_an_answer_that_came_after_its_polls_deadline_is_still_read():
    # A poll past its deadline is dropped as lost only when nothing came on it: an RPC that did come is taken.
    rpc = b'{"id":7,"method":"setRelay","params":{}}'
    link, sent = opened("T", b"HTTP/1.1 200 \r\nContent-Length: %d\r\n\r\n" % len(rpc) + rpc,
                        b"HTTP/1.1 408 \r\nContent-Length: 0\r\n\r\n", b"HTTP/1.1 408 \r\nContent-Length: 0\r\n\r\n",
                        b"HTTP/1.1 408 \r\nContent-Length: 0\r\n\r\n")
    link.events.clear()
    deadline = tcp.deadline
    tcp.deadline = lambda ms: deadline(-1 if ms > 20000 else ms)  # each poll's deadline has passed when it opens
    try:
        link.listen(50)
    finally:
        tcp.deadline = deadline
    eq(link.events, [("rpc", None, rpc)])


def test_a_poll_refused_as_unauthorized_is_refused():
    link, _ = opened("T", b"HTTP/1.1 401 \r\nContent-Length: 0\r\n\r\n", b"HTTP/1.1 408 \r\nContent-Length: 0\r\n\r\n")
    eq(raises(Refused, link.listen, 50).args, (401, "unauthorized"))
