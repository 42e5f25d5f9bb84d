# The CoAP link's mapping of ThingsBoard answers, over a scripted UDP socket.
from fakeudp import FakeUDP
from mptest import eq, raises
from test_coap import ACK, CHANGED, CON, CONTENT, CREATED, POST, VALID, Cfg, decode, encode, link
from tbfleet import BadAnswer, NoAnswer, Refused, Rejected, via_coap


def link_answering(code, body=b"", kind=ACK, sock=None):
    # A Link whose server answers every request with code and body (piggybacked, or separate when kind is CON).
    def on_send(sock, data):
        t, _, mid, tok, _, _ = decode(data)
        if t != CON:
            return
        if kind == ACK:
            sock.feed(encode(ACK, code, mid, tok, (), body))
        else:
            sock.feed(encode(ACK, 0, mid))
            sock.feed(encode(kind, code, 0x4000 + len(sock.sent), tok, (), body), 5)
    return link(on_send, sock=sock)


def opened(code, body=b"", kind=ACK, sock=None, token="T"):
    # A Link opened with token over a server that takes everything open sends, then answers every request with
    # code and body (as link_answering); lk.sock.sent holds only what came after open.
    lk = link_answering(code, body, kind, sock)
    script = lk.sock.on_send

    lk.sock.on_send = tb_server(lambda sock, data: sock.feed(encode(ACK, CREATED, decode(data)[2], decode(data)[3])))
    burst = [b'{"fw":"1"}', b'{"t":0}']
    lk.open({"type": "ACCESS_TOKEN", "token": token}, burst)
    eq(burst, [])  # both taken out of the list as they were sent
    lk.sock.on_send = script
    del lk.sock.sent[:]
    if isinstance(lk.sock, SizedUDP):
        del lk.sock.sizes[:]
    return lk


def tb_server(answer):
    # ThingsBoard at open: the attributes observation answered with the current ones, the RPC observation with an
    # empty ACK (its notifications come later); other requests go to answer (a link_answering script).
    def server(sock, data):
        t, c, mid, tok, opts, _ = decode(data)
        if c == 1 and opts[-1] == (11, b"attributes"):
            sock.feed(encode(ACK, CONTENT, mid, tok, ((6, b"\x01"),), b'{"led":true}'))
        elif c == 1:
            sock.feed(encode(ACK, 0, mid))
        else:
            answer(sock, data)
    return server


def test_open_sends_client_attributes_observes_attributes_and_rpc_and_sends_first_telemetry():
    lk = link_answering(CREATED)
    lk.sock.on_send = tb_server(lk.sock.on_send)
    lk.open({"type": "ACCESS_TOKEN", "token": "T"}, [b'{"fw":"1"}', b'{"t":0}'])
    eq([(m[0], m[1], m[4], m[5]) for m in sent(lk)],
       [(CON, POST, [(11, b"api"), (11, b"v1"), (11, b"T"), (11, b"attributes"), (12, b"\x32")], b'{"fw":"1"}'),
        (CON, 1, [(6, b""), (11, b"api"), (11, b"v1"), (11, b"T"), (11, b"attributes")], b""),
        (CON, 1, [(6, b""), (11, b"api"), (11, b"v1"), (11, b"T"), (11, b"rpc")], b""),
        (CON, POST, [(11, b"api"), (11, b"v1"), (11, b"T"), (11, b"telemetry"), (12, b"\x32")], b'{"t":0}')])
    eq(lk.events, [("attributes", None, b'{"led":true}')])


def test_notifications_while_listening_and_in_the_middle_of_a_request():
    lk = link_answering(CREATED)
    answer = lk.sock.on_send
    lk.sock.on_send = tb_server(answer)
    lk.open({"type": "ACCESS_TOKEN", "token": "T"}, [b"{}", b"{}"])
    attrs_token, rpc_token = sent(lk)[1][3], sent(lk)[2][3]
    lk.events.clear()
    rpc = b'{"id":5,"method":"setRelay","params":{"on":true}}'
    lk.sock.feed(encode(CON, CONTENT, 0x7001, rpc_token, ((6, b"\x02"), (12, b"\x32")), rpc))
    lk.sock.feed(encode(CON, CONTENT, 0x7001, rpc_token, ((6, b"\x02"), (12, b"\x32")), rpc), 5)  # again: ACK lost
    lk.listen(50)
    eq(lk.events, [("rpc", None, rpc)])
    eq([(m[0], m[2]) for m in sent(lk)[-2:]], [(ACK, 0x7001), (ACK, 0x7001)])  # acknowledged twice, taken once

    def push_first(sock, data):
        # An attributes notification (NON) arrives before the telemetry's answer.
        t, c, mid, tok, _, _ = decode(data)
        if t == CON:
            sock.feed(encode(1, CONTENT, 0x7002, attrs_token, ((6, b"\x03"),), b'{"target":22}'))
        answer(sock, data)
    lk.sock.on_send = push_first
    lk.send(b"{}")
    eq(lk.events[1:], [("attributes", None, b'{"target":22}')])
    lk.sock.feed(encode(CON, 0x84, 0x7003, rpc_token))  # 4.04: the observation ends
    lk.listen(20)
    eq(lk.observing.get(bytes(rpc_token)), None)
    eq(len(lk.events), 2)


def sent(lk):
    return [decode(d) for d in lk.sock.datagrams]


class SizedUDP(FakeUDP):
    # Records the size of each recv: the largest datagram the link takes.
    def __init__(self):
        super().__init__()
        self.sizes = []

    def recv(self, n):
        self.sizes.append(n)
        return super().recv(n)


def test_provision_success_created():
    body = b'{"credentialsValue":"T","credentialsType":"ACCESS_TOKEN","status":"SUCCESS"}'
    lk = link_answering(CREATED, body)
    eq(lk.provision(b'{"deviceName":"d"}'), body)
    t, code, _, _, opts, payload = sent(lk)[0]
    eq((t, code, payload), (CON, POST, b'{"deviceName":"d"}'))
    eq(opts, [(11, b"api"), (11, b"v1"), (11, b"provision"), (12, b"\x32")])


def test_provision_failure_bodies_come_with_4_00():
    body = b'{"errorMsg":"Provision data was not found!","status":"NOT_FOUND"}'
    eq(link_answering(0x80, body).provision(b"{}"), body)


def test_provision_old_servers_answer_2_05_and_separately():
    eq(link_answering(CONTENT, b'{"status":"FAILURE"}').provision(b"{}"), b'{"status":"FAILURE"}')
    eq(link_answering(CREATED, b'{"status":"SUCCESS"}', CON).provision(b"{}"), b'{"status":"SUCCESS"}')


def test_provision_takes_answers_up_to_1152_bytes():
    body = b'{"credentialsValue":"%s"}' % (b"t" * 1000)
    sock = SizedUDP()
    eq(link_answering(CREATED, body, sock=sock).provision(b"{}"), body)
    eq(sock.sizes, [1152])


def test_provision_bad_answers():
    e = raises(BadAnswer, link_answering(0x80).provision, b"garbage")
    eq(str(e), "provisioning answered 400: 4.00")
    e = raises(BadAnswer, link_answering(0xA0, b"transport error").provision, b"{}")
    assert "500: transport error" in str(e), e
    e = raises(BadAnswer, link_answering(0xA0, b"\xff\xfe").provision, b"{}")
    assert "500: 2 bytes" in str(e), e


def test_telemetry_path_and_success_codes():
    for code in (CREATED, VALID, CHANGED):
        lk = opened(code, token="a/b")
        lk.send(b'{"t":1}')
    eq(sent(lk)[0][4], [(11, b"api"), (11, b"v1"), (11, b"a/b"), (11, b"telemetry"), (12, b"\x32")])
    eq(sent(lk)[0][5], b'{"t":1}')


def test_telemetry_failures():
    cases = ((0x81, b"", Refused, (401, "unauthorized")),
             (0x80, b"", Rejected, (400, "4.00")),
             (0x8D, b"", Rejected, (413, "4.13")),
             (0xA0, b"rate limit ", Rejected, (500, "rate limit")),
             (0x84, b"", Rejected, (404, "4.04")),
             (0x42, b"", Rejected, (202, "2.02")))
    for code, body, kind, args in cases:
        lk = opened(code, body)
        eq(raises(kind, lk.send, b"{}").args, args)


def test_telemetry_takes_small_datagrams_and_cuts_long_error_bodies():
    # The answer is cut at 128 bytes by recv; the reason keeps the body's first 60 bytes either way.
    sock = SizedUDP()
    lk = opened(0xA0, b"x" * 59 + b"yzzzzzzz" * 40, sock=sock)
    eq(raises(Rejected, lk.send, b"{}").args, (500, "x" * 59 + "y"))
    eq(sock.sizes, [128])


def test_silence_is_no_answer():
    lk = opened(CREATED)
    lk.sock.on_send = None
    lk.cfg.timeout = 1  # the 5 transmissions take 310 to 465 ms
    raises(NoAnswer, lk.send, b"{}")
    eq(len(lk.sock.sent), 5)


def test_open_refuses_other_credentials_and_dtls():
    lk = via_coap.Link(Cfg())
    e = raises(ValueError, lk.open, {"type": "MQTT_BASIC", "client_id": "c", "username": "u", "password": "p"},
               [b"{}", b"{}"])
    eq(str(e), "MQTT_BASIC credentials without a token")
    e = raises(ValueError, lk.open, {"type": "X509_CERTIFICATE"}, [b"{}", b"{}"])
    eq(str(e), "X509_CERTIFICATE credentials without a token")
    e = raises(ValueError, lk.open, {"type": "ACCESS_TOKEN", "token": None}, [b"{}", b"{}"])
    eq(str(e), "ACCESS_TOKEN credentials without a token")
    raises(ValueError, lk.open, {"type": "ACCESS_TOKEN", "token": ""}, [b"{}", b"{}"])
    e = raises(ValueError, lk.send, b"{}")
    assert "open" in str(e), e
    cfg = Cfg()
    cfg.tls = True
    e = raises(ValueError, via_coap.Link, cfg)
    assert "DTLS" in str(e)


def test_close_releases_socket_and_is_idempotent():
    lk = link_answering(CREATED)
    sock = lk.sock
    lk.close()
    lk.close()
    assert sock.closed
    raises(ValueError, lk.send, b"{}")


def test_real_socket_to_nobody_is_no_answer():
    cfg = Cfg()
    cfg.port = 9
    lk = via_coap.Link(cfg)
    raises(NoAnswer, lk.provision, b"{}")
    lk.close()
