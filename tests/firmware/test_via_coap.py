# The CoAP adapter's mapping of ThingsBoard answers, over a scripted UDP socket.
from fakeudp import FakeUDP
from mptest import eq, raises
from tbfleet import coap, via_coap
from tbfleet.errors import BadAnswer, NoAnswer, Refused, Rejected


class Cfg:
    host = "127.0.0.1"
    port = 5683
    tls = False
    timeout = 0.1


def link_answering(code, body=b"", kind=coap.ACK):
    # A Link whose server answers every request with code and body (piggybacked, or separate when kind is CON).
    link = via_coap.Link(Cfg())

    def on_send(sock, data):
        t, _, mid, tok, _, _ = coap.decode(data)
        if t != coap.CON:
            return
        if kind == coap.ACK:
            sock.feed(coap.encode(coap.ACK, code, mid, tok, (), body))
        else:
            sock.feed(coap.encode(coap.ACK, 0, mid))
            sock.feed(coap.encode(kind, code, 0x4000 + len(sock.sent), tok, (), body), 5)
    link._client = coap.Client(Cfg.host, Cfg.port, 100, 10, 1.0, 1)
    link._client.sock = FakeUDP(on_send)
    return link


def sent(link):
    return [coap.decode(d) for d in link._client.sock.datagrams]


def test_provision_success_created():
    body = b'{"credentialsValue":"T","credentialsType":"ACCESS_TOKEN","status":"SUCCESS"}'
    link = link_answering(coap.CREATED, body)
    eq(link.provision(b'{"deviceName":"d"}'), body)
    t, code, _, _, opts, payload = sent(link)[0]
    eq((t, code, payload), (coap.CON, coap.POST, b'{"deviceName":"d"}'))
    eq(opts, [(11, b"api"), (11, b"v1"), (11, b"provision"), (12, b"\x32")])


def test_provision_failure_bodies_come_with_4_00():
    body = b'{"errorMsg":"Provision data was not found!","status":"NOT_FOUND"}'
    eq(link_answering(0x80, body).provision(b"{}"), body)


def test_provision_old_servers_answer_2_05_and_separately():
    eq(link_answering(coap.CONTENT, b'{"status":"FAILURE"}').provision(b"{}"), b'{"status":"FAILURE"}')
    eq(link_answering(coap.CREATED, b'{"status":"SUCCESS"}', coap.CON).provision(b"{}"), b'{"status":"SUCCESS"}')


def test_provision_bad_answers():
    e = raises(BadAnswer, link_answering(0x80).provision, b"garbage")
    assert "4.00" in str(e), e
    e = raises(BadAnswer, link_answering(0xA0, b"transport error").provision, b"{}")
    assert "5.00" in str(e) and "transport error" in str(e), e


def test_telemetry_path_and_success_codes():
    for code in (coap.CREATED, coap.VALID, coap.CHANGED):
        link = link_answering(code)
        link.open({"type": "ACCESS_TOKEN", "token": "a/b"})
        link.send_telemetry(b'{"t":1}')
    eq(sent(link)[0][4], [(11, b"api"), (11, b"v1"), (11, b"a/b"), (11, b"telemetry"), (12, b"\x32")])


def test_telemetry_failures():
    cases = ((0x81, b"", Refused, (401, "unauthorized")),
             (0x80, b"", Rejected, (400, "4.00")),
             (0x8D, b"", Rejected, (413, "4.13")),
             (0xA0, b"rate limit", Rejected, (500, "rate limit")),
             (0x84, b"", Rejected, (404, "4.04")))
    for code, body, kind, args in cases:
        link = link_answering(code, body)
        link.open({"type": "ACCESS_TOKEN", "token": "T"})
        eq(raises(kind, link.send_telemetry, b"{}").args, args)


def test_silence_is_no_answer():
    link = via_coap.Link(Cfg())
    link._client = coap.Client(Cfg.host, Cfg.port, 100, 10, 1.0, 1)
    link._client.sock = FakeUDP()
    link.open({"type": "ACCESS_TOKEN", "token": "T"})
    raises(NoAnswer, link.send_telemetry, b"{}")


def test_open_refuses_other_credentials_and_dtls():
    link = via_coap.Link(Cfg())
    e = raises(ValueError, link.open, {"type": "MQTT_BASIC", "client_id": "c", "username": "u", "password": "p"})
    assert "ACCESS_TOKEN" in str(e) and "MQTT_BASIC" in str(e)
    raises(ValueError, link.open, {"type": "ACCESS_TOKEN", "token": None})
    raises(ValueError, link.send_telemetry, b"{}")
    cfg = Cfg()
    cfg.tls = True
    e = raises(ValueError, via_coap.Link, cfg)
    assert "DTLS" in str(e)


def test_close_releases_socket_and_is_idempotent():
    link = link_answering(coap.CREATED)
    sock = link._client.sock
    link.close()
    link.close()
    assert sock.closed
    raises(ValueError, link.send_telemetry, b"{}")


def test_real_socket_to_nobody_is_no_answer():
    link = via_coap.Link(Cfg())
    link._cfg.port = 9
    raises(NoAnswer, link.provision, b"{}")
    link.close()
