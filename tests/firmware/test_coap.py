# Byte-exact CoAP message encoding and decoding (RFC 7252 section 3), vectors computed by hand.
from mptest import eq, raises
from tbfleet import coap
from tbfleet.errors import BadAnswer

TOKEN = b"\x01\x02\x03\x04"


def test_post_with_uri_path_and_content_format():
    opts = [(11, b"api"), (11, b"v1"), (11, b"provision"), (12, coap.uint(50))]
    got = coap.encode(coap.CON, coap.POST, 0x1234, TOKEN, opts, b'{"a":1}')
    want = (b"\x44\x02\x12\x34" + TOKEN  # ver 1, CON, TKL 4, POST, mid
            + b"\xb3api"  # delta 11 (Uri-Path), length 3
            + b"\x02v1"  # delta 0, length 2
            + b"\x09provision"  # delta 0, length 9
            + b"\x11\x32"  # delta 1 (Content-Format), length 1, 50 = application/json
            + b'\xff{"a":1}')
    eq(bytes(got), want)
    eq(coap.decode(got), (coap.CON, 2, 0x1234, TOKEN, opts, b'{"a":1}'))


def test_uri_query_after_path():
    got = coap.encode(coap.CON, coap.GET, 1, b"", [(11, b"attributes"), (15, b"clientKeys=a")])
    eq(bytes(got), b"\x40\x01\x00\x01" + b"\xbaattributes" + b"\x4cclientKeys=a")


def test_option_delta_crossing_13_and_269():
    opts = [(11, b"x"), (60, b""), (400, b"ab")]
    got = coap.encode(coap.NON, coap.GET, 0xFFFF, b"", opts)
    want = (b"\x50\x01\xff\xff"
            + b"\xb1x"  # delta 11
            + b"\xd0\x24"  # delta 49: nibble 13, one byte 49 - 13 = 36
            + b"\xe2\x00\x47ab")  # delta 340: nibble 14, two bytes 340 - 269 = 71
    eq(bytes(got), want)
    eq(coap.decode(got)[4], opts)


def test_option_lengths_crossing_13_and_269():
    v20 = b"q" * 20
    v300 = b"r" * 300
    got = coap.encode(coap.CON, coap.POST, 2, b"", [(11, v20), (11, v300)])
    eq(bytes(got[:7]), b"\x40\x02\x00\x02\xbd\x07q")  # length 20: nibble 13, 20 - 13 = 7
    eq(bytes(got[26:30]), b"\x0e\x00\x1fr")  # length 300: nibble 14, 300 - 269 = 31
    eq(len(got), 4 + 2 + 20 + 3 + 300)
    eq(coap.decode(got)[4], [(11, v20), (11, v300)])


def test_long_payload():
    body = bytes(range(256)) * 4
    got = coap.encode(coap.CON, coap.POST, 7, b"\xaa", [(11, b"t")], body)
    eq(bytes(got[:8]), b"\x41\x02\x00\x07\xaa\xb1t\xff")
    eq(len(got), 8 + 1024)
    eq(coap.decode(got)[5], body)


def test_empty_ack_and_rst():
    eq(bytes(coap.encode(coap.ACK, 0, 0xBEEF)), b"\x60\x00\xbe\xef")
    eq(bytes(coap.encode(coap.RST, 0, 7)), b"\x70\x00\x00\x07")
    eq(coap.decode(b"\x60\x00\xbe\xef"), (coap.ACK, 0, 0xBEEF, b"", [], b""))
    eq(coap.decode(b"\x70\x00\x00\x07"), (coap.RST, 0, 7, b"", [], b""))


def test_piggybacked_created_with_text_plain():
    # ThingsBoard answers provisioning with 2.01 and Content-Format 0 (an empty uint option).
    msg = b"\x64\x41\x12\x34" + TOKEN + b"\xc0" + b'\xff{"status":"SUCCESS"}'
    eq(coap.decode(msg), (coap.ACK, coap.CREATED, 0x1234, TOKEN, [(12, b"")], b'{"status":"SUCCESS"}'))
    eq(coap.code_str(coap.CREATED), "2.01")
    eq(coap.code_str(0x81), "4.01")


def test_decode_accepts_memoryview():
    buf = bytearray(b"\x60\x44\x00\x09" + b"\xff" + b"ok" + b"junk")
    eq(coap.decode(memoryview(buf)[:7]), (coap.ACK, coap.CHANGED, 9, b"", [], b"ok"))


def test_uint():
    eq(coap.uint(0), b"")
    eq(coap.uint(50), b"\x32")
    eq(coap.uint(300), b"\x01\x2c")


def test_malformed_messages():
    for bad in (b"\x40\x01\x00",  # shorter than the header
                b"\x80\x01\x00\x01",  # version 2
                b"\x49\x01\x00\x01" + b"t" * 9,  # token length 9
                b"\x44\x01\x00\x01ab",  # token cut short
                b"\x40\x01\x00\x01\xff",  # payload marker without payload
                b"\x40\x01\x00\x01\xf1x",  # reserved delta nibble 15
                b"\x40\x01\x00\x01\x1fx",  # reserved length nibble 15
                b"\x40\x01\x00\x01\xb5ab",  # option value past the end
                b"\x40\x01\x00\x01\xd1",  # extended delta byte missing
                b"\x61\x00\x00\x01t"):  # empty message with a token
        raises(BadAnswer, coap.decode, bad)


def test_encode_refuses_bad_input():
    raises(ValueError, coap.encode, coap.CON, 1, 1, b"123456789")
    raises(ValueError, coap.encode, coap.CON, 1, 1, b"", [(12, b""), (11, b"a")])
