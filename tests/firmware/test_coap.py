# Byte-exact CoAP messages (RFC 7252 section 3): what the link sends, vectors computed by hand, and how it reads
# answers, including extended option deltas and lengths and every kind of malformed message.
# The encoder and decoder here are the tests' own, also used by test_coap_client and test_via_coap to play the
# server's side.
import select

from fakeudp import FakeUDP
from mptest import eq
from tbfleet import via_coap

CON, NON, ACK, RST = 0, 1, 2, 3
GET, POST = 1, 2
CREATED, VALID, CHANGED, CONTENT = 0x41, 0x43, 0x44, 0x45


def _ext(v):
    # Option delta/length: the nibble and its extension bytes.
    if v < 13:
        return v, b""
    if v < 269:
        return 13, bytes((v - 13,))
    return 14, bytes(((v - 269) >> 8, (v - 269) & 255))


def encode(mtype, code, mid, token=b"", options=(), payload=b""):
    # options: (number, bytes) pairs in ascending number order.
    out = bytearray((0x40 | mtype << 4 | len(token), code, mid >> 8 & 255, mid & 255)) + token
    last = 0
    for num, val in options:
        d, dx = _ext(num - last)
        n, nx = _ext(len(val))
        out += bytes((d << 4 | n,)) + dx + nx + val
        last = num
    if payload:
        out += b"\xff" + payload
    return bytes(out)


def _nib(buf, i, v):
    if v == 13:
        return buf[i] + 13, i + 1
    if v == 14:
        return (buf[i] << 8 | buf[i + 1]) + 269, i + 2
    return v, i


def decode(buf):
    # (type, code, message id, token, [(number, bytes)], payload) of a well-formed message.
    tkl = buf[0] & 15
    i = 4 + tkl
    opts = []
    num = 0
    while i < len(buf) and buf[i] != 0xFF:
        b = buf[i]
        d, i = _nib(buf, i + 1, b >> 4)
        ln, i = _nib(buf, i, b & 15)
        num += d
        opts.append((num, bytes(buf[i:i + ln])))
        i += ln
    body = bytes(buf[i + 1:])
    return buf[0] >> 4 & 3, buf[1], buf[2] << 8 | buf[3], bytes(buf[4:4 + tkl]), opts, body


class Cfg:
    host = "127.0.0.1"
    port = 5683
    tls = False
    timeout = 0.2


def link(on_send=None, timeout=0.2, sock=None):
    # A Link over a scripted UDP socket, its ACK_TIMEOUT shortened to 10 ms.
    cfg = Cfg()
    cfg.timeout = timeout
    lk = via_coap.Link(cfg)
    lk.ack_ms = 10
    lk.sock = sock or FakeUDP()
    lk.sock.on_send = on_send
    lk.poller = select.poll()
    lk.poller.register(lk.sock, select.POLLIN)
    return lk


def piggyback(code, body=b"", options=()):
    # A server that answers every CON request in its ACK.
    def answer(sock, data):
        t, _, mid, tok, _, _ = decode(data)
        if t == CON:
            sock.feed(encode(ACK, code, mid, tok, options, body))
    return answer


def test_post_with_uri_path_and_content_format():
    lk = link(piggyback(CREATED))
    lk.request(POST, ("api", "v1", "provision"), b'{"a":1}', 50)
    got = lk.sock.datagrams[0]
    mid, token = got[2:4], got[4:8]
    want = (b"\x44\x02" + mid + token  # ver 1, CON, TKL 4, POST
            + b"\xb3api"  # delta 11 (Uri-Path), length 3
            + b"\x02v1"  # delta 0, length 2
            + b"\x09provision"  # delta 0, length 9
            + b"\x11\x32"  # delta 1 (Content-Format), length 1, 50 = application/json
            + b'\xff{"a":1}')
    eq(got, want)


def test_uri_query_after_path_and_content_formats():
    lk = link(piggyback(CONTENT))
    lk.request(GET, ("attributes",), None, None, ("clientKeys=a",))
    eq(lk.sock.datagrams[0][8:], b"\xbaattributes" + b"\x4cclientKeys=a")  # no payload, no marker
    lk.request(GET, ("a",), None, 0, ("q",))
    eq(lk.sock.datagrams[1][8:], b"\xb1a" + b"\x10" + b"\x31q")  # text/plain: an empty uint
    lk.request(GET, ("a",), None, 300)
    eq(lk.sock.datagrams[2][8:], b"\xb1a" + b"\x12\x01\x2c")  # a two-byte uint


def test_option_lengths_crossing_13_and_269():
    lk = link(piggyback(CREATED))
    lk.request(POST, ("q" * 20, "r" * 300), b"x")
    got = lk.sock.datagrams[0]
    eq(got[8:11], b"\xbd\x07q")  # delta 11, length 20: nibble 13, 20 - 13 = 7
    eq(got[30:34], b"\x0e\x00\x1fr")  # delta 0, length 300: nibble 14, 300 - 269 = 31
    eq(len(got), 8 + 2 + 20 + 3 + 300 + 2)
    eq(decode(got)[4], [(11, b"q" * 20), (11, b"r" * 300)])


def test_long_payloads_both_ways():
    body = bytes(range(256)) * 4
    lk = link(piggyback(CONTENT, body))
    eq(lk.request(POST, ("t",), body), (CONTENT, body))
    got = lk.sock.datagrams[0]
    eq(got[8:11], b"\xb1t\xff")
    eq(len(got), 11 + 1024)


def test_answer_options_with_extended_deltas_and_lengths_are_skipped():
    # The extension bytes hold 0xff where a wrong skip would take them for the payload marker.
    opts = [(11, b"x"), (60, b""), (840, b"ab"), (841, b"L" * 20), (842, b"M" * 600)]
    # delta 49: nibble 13, one byte 49 - 13 = 36; delta 780: nibble 14, two bytes 780 - 269 = 0x01ff
    eq(encode(ACK, CREATED, 1, b"", opts)[4:11], b"\xb1x" + b"\xd0\x24" + b"\xe2\x01\xff")
    eq(encode(ACK, CREATED, 1, b"", [(0xFF + 269, b"")])[4:7], b"\xe0\x00\xff")
    lk = link(piggyback(CONTENT, b"body", [(0xFF + 269, b"")]))
    eq(lk.request(GET, ("a",)), (CONTENT, b"body"))
    lk = link(piggyback(CONTENT, b"body", opts))
    eq(lk.request(GET, ("a",)), (CONTENT, b"body"))


def test_piggybacked_created_with_text_plain():
    # ThingsBoard answers provisioning with 2.01 and Content-Format 0 (an empty uint option).
    def answer(sock, data):
        _, _, mid, tok, _, _ = decode(data)
        sock.feed(b"\x64\x41" + data[2:4] + tok + b"\xc0" + b'\xff{"status":"SUCCESS"}')
    eq(link(answer).request(POST, ("p",), b"{}"), (CREATED, b'{"status":"SUCCESS"}'))


def test_malformed_answers_are_ignored():
    # Each one would be the answer if it were well formed; the link waits for the good one that follows, and
    # sends nothing back for a malformed CON.
    bad = (lambda m, t: b"\x64\x41" + m,  # shorter than its token
           lambda m, t: b"\x64\x41" + m + t + b"\xff",  # payload marker without payload
           lambda m, t: b"\x64\x41" + m + t + b"\xf1x\xffno",  # reserved delta nibble 15
           lambda m, t: b"\x64\x41" + m + t + b"\x1fx\xffno",  # reserved length nibble 15
           lambda m, t: b"\x64\x41" + m + t + b"\xb5ab",  # option value past the end
           lambda m, t: b"\x64\x41" + m + t + b"\xd1",  # extended delta byte missing
           lambda m, t: b"\x64\x41" + m + t + b"\xbd",  # extended length byte missing
           lambda m, t: b"\x64\x41" + m + t + b"\xbe\x00",  # two-byte length cut short
           lambda m, t: b"\xa4\x41" + m + t + b"\xffno",  # version 2
           lambda m, t: b"\x69\x41" + m + t + b"12345\xffno",  # token length 9
           lambda m, t: b"\x74\x00" + m + t,  # empty RST with a token
           lambda m, t: b"\x44\x41\x12\x34" + t + b"\xff",  # a CON separate response, marker without payload
           lambda m, t: b"",
           lambda m, t: b"\x60\x00")
    for make in bad:
        def answer(sock, data):
            if len(sock.sent) == 1:
                _, _, mid, tok, _, _ = decode(data)
                sock.feed(make(data[2:4], tok))
                sock.feed(encode(ACK, CREATED, mid, tok, (), b"good"), 3)
        lk = link(answer)
        eq(lk.request(POST, ("x",), b"1"), (CREATED, b"good"))
        eq(len(lk.sock.sent), 1)
