# A compact CoAP client (RFC 7252) over UDP: message encoding, confirmable requests with exponential
# retransmission, piggybacked and separate responses, duplicate detection. Every wait is a select.poll deadline.
import os
import select
import socket
import time

from micropython import const

from tbfleet.errors import BadAnswer, NoAnswer

CON = const(0)
NON = const(1)
ACK = const(2)
RST = const(3)

GET = const(1)
POST = const(2)
CREATED = const(65)  # 2.01
VALID = const(67)  # 2.03
CHANGED = const(68)  # 2.04
CONTENT = const(69)  # 2.05

URI_HOST = const(3)
URI_PATH = const(11)
CONTENT_FORMAT = const(12)
URI_QUERY = const(15)
JSON = const(50)

_RX = const(1152)  # largest datagram taken: ThingsBoard keeps payloads within 1024 bytes
_SEEN = const(8)  # separate responses remembered to recognise their retransmissions


def code_str(code):
    # 0x41 -> "2.01"
    return "%d.%02d" % (code >> 5, code & 31)


def _ext(v):
    # Option delta/length: the nibble and its extended bytes (RFC 7252 3.1).
    if v < 13:
        return v, b""
    if v < 269:
        return 13, bytes((v - 13,))
    return 14, bytes(((v - 269) >> 8, (v - 269) & 255))


def encode(mtype, code, mid, token=b"", options=(), payload=None):
    # options: (number, bytes) pairs in ascending number order, repeats allowed.
    if len(token) > 8:
        raise ValueError("CoAP token longer than 8 bytes")
    out = bytearray((0x40 | mtype << 4 | len(token), code, mid >> 8 & 255, mid & 255))
    out += token
    last = 0
    for num, val in options:
        if num < last:
            raise ValueError("CoAP options out of order")
        d, dx = _ext(num - last)
        n, nx = _ext(len(val))
        out.append(d << 4 | n)
        out += dx
        out += nx
        out += val
        last = num
    if payload:
        out.append(0xFF)
        out += payload
    return out


def uint(v):
    # An unsigned integer option value in the fewest bytes (0 is empty).
    n = 0
    while v >> 8 * n:
        n += 1
    return v.to_bytes(n, "big")


def _nib(buf, i, v):
    # Resolve an option nibble to its value; returns (value, next index).
    if v == 13:
        return buf[i] + 13, i + 1
    if v == 14:
        return (buf[i] << 8 | buf[i + 1]) + 269, i + 2
    if v == 15:
        raise BadAnswer("reserved CoAP option nibble")
    return v, i


def decode(buf):
    # (type, code, message id, token, [(number, bytes)], payload bytes); BadAnswer on a malformed message.
    n = len(buf)
    if n < 4 or buf[0] >> 6 != 1:
        raise BadAnswer("not a CoAP 1 message")
    tkl = buf[0] & 15
    if tkl > 8 or 4 + tkl > n:
        raise BadAnswer("bad CoAP token length")
    i = 4 + tkl
    opts = []
    num = 0
    try:
        while i < n and buf[i] != 0xFF:
            b = buf[i]
            d, i = _nib(buf, i + 1, b >> 4)
            ln, i = _nib(buf, i, b & 15)
            if i + ln > n:
                raise BadAnswer("CoAP option runs past the message")
            num += d
            opts.append((num, bytes(buf[i:i + ln])))
            i += ln
    except IndexError:
        raise BadAnswer("CoAP option header runs past the message")
    if i < n:
        i += 1
        if i == n:
            raise BadAnswer("CoAP payload marker without payload")
    code = buf[1]
    if code == 0 and (n > 4 or tkl):
        raise BadAnswer("empty CoAP message with content")
    return buf[0] >> 4 & 3, code, buf[2] << 8 | buf[3], bytes(buf[4:4 + tkl]), opts, bytes(buf[i:])


def _deadline(ms):
    # Own helper rather than tbfleet.tcp's: a CoAP-only board then never loads the TCP module.
    return time.ticks_add(time.ticks_ms(), ms)


def _rand(k):
    return int.from_bytes(os.urandom(k), "big")


class Client:
    # One UDP socket to one server; requests are made one at a time.
    def __init__(self, host, port, timeout_ms=10000, ack_timeout_ms=2000, random_factor=1.5, max_retransmit=4,
                 uri_host=False):
        self.host = host
        self.uri_host = uri_host  # send Uri-Host (costs bytes per message; ThingsBoard does not need it)
        self.port = port
        self.timeout_ms = timeout_ms  # wait for a separate response once the request was acknowledged
        self.ack_timeout_ms = ack_timeout_ms
        self.random_factor = random_factor
        self.max_retransmit = max_retransmit
        self.sock = None
        self._poller = None
        self._mid = _rand(2)
        self._seen = []

    def _open(self):
        if self.sock is None:
            try:
                addr = socket.getaddrinfo(self.host, self.port, 0, socket.SOCK_DGRAM)[0]
            except OSError as e:
                raise NoAnswer("cannot resolve %s: %s" % (self.host, e))
            s = socket.socket(addr[0], socket.SOCK_DGRAM)
            try:
                s.connect(addr[-1])
            except OSError as e:
                s.close()
                raise NoAnswer("cannot reach %s:%d: %s" % (self.host, self.port, e))
            self.sock = s
        if self._poller is None:
            # One per socket, made before any message's buffers: a poller per wait is garbage for every message,
            # and a long-lived object made among a message's buffers splits the free heap.
            self._poller = select.poll()
            self._poller.register(self.sock, select.POLLIN)
        return self.sock

    def close(self):
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None
            self._poller = None

    def _send(self, data):
        try:
            self.sock.send(data)
        except OSError as e:
            raise NoAnswer("send failed: %s" % e)

    def _recv(self, at):
        # One datagram before the deadline, or None at the deadline. recv, not readinto: a stream readinto
        # keeps reading until its buffer is full, which on UDP would block or join datagrams together.
        p = self._poller
        while True:
            left = max(0, time.ticks_diff(at, time.ticks_ms()))
            if not p.poll(left):
                if left == 0:
                    return None
                continue
            try:
                data = self.sock.recv(_RX)
            except OSError as e:
                if e.errno == 11:
                    continue
                # 111: an ICMP port unreachable came back, nobody listens there
                raise NoAnswer("receive failed: %s" % e)
            if data:
                return data

    def request(self, code, path, payload=None, query=(), content_format=None):
        # A confirmable request; path is "/a/b" or a sequence of raw segments (a segment may then hold "/").
        # Returns (response code, payload bytes).
        opts = []
        if self.uri_host:
            opts.append((URI_HOST, self.host.encode()))
        for seg in path.split("/") if isinstance(path, str) else path:
            if seg:
                opts.append((URI_PATH, seg.encode()))
        if content_format is not None:
            opts.append((CONTENT_FORMAT, uint(content_format)))
        for q in query:
            opts.append((URI_QUERY, q.encode()))
        self._open()
        self._mid = mid = (self._mid + 1) & 0xFFFF
        token = os.urandom(4)
        msg = encode(CON, code, mid, token, opts, payload)
        wait = int(self.ack_timeout_ms * (1 + (self.random_factor - 1) * _rand(1) / 255))
        sent = 0
        acked = False
        self._send(msg)
        at = _deadline(wait)
        while True:
            data = self._recv(at)
            if data is None:
                if acked:
                    raise NoAnswer("no separate response in %d ms" % self.timeout_ms)
                if sent == self.max_retransmit:
                    raise NoAnswer("no answer after %d transmissions" % (sent + 1))
                sent += 1
                wait *= 2
                self._send(msg)
                at = _deadline(wait)
                continue
            try:
                t, c, m, tok, _, body = decode(data)
            except BadAnswer:
                continue  # RFC 7252 4.2: a malformed message is silently ignored
            if t == ACK or t == RST:
                if m != mid:
                    continue  # late answer to an earlier exchange
                if t == RST:
                    raise NoAnswer("the server reset the request")
                if c == 0:
                    acked = True
                    at = _deadline(self.timeout_ms)
                    continue
                if tok == token:
                    return c, body
                continue
            if t == CON and m in self._seen:
                self._send(encode(ACK, 0, m))  # our ACK was lost: acknowledge again, do not process twice
                continue
            if tok != token or c < 64:
                if t == CON:
                    self._send(encode(RST, 0, m))
                continue
            if t == CON:
                self._send(encode(ACK, 0, m))
            self._seen.append(m)
            if len(self._seen) > _SEEN:
                self._seen.pop(0)
            return c, body
