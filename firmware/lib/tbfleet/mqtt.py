# A compact MQTT 3.1.1 client: clean sessions, QoS 0 and 1, keep-alive, every wait bounded by a deadline.
# Each packet is built whole in a buffer and leaves in one write: packets written in pieces stall on
# Nagle's algorithm and delayed ACKs (tens of ms per QoS 1 message).
import select
import time

from micropython import const

from tbfleet import tcp
from tbfleet.errors import BadAnswer, NoAnswer, Refused, Rejected

_CONNECT = const(0x10)
_PUBLISH = const(0x30)
_PUBACK = const(0x40)
_SUBSCRIBE = const(0x82)

# Packet types (upper nibble) a server may send us.
_T_CONNACK = const(2)
_T_PUBLISH = const(3)
_T_PUBACK = const(4)
_T_SUBACK = const(9)
_T_UNSUBACK = const(11)
_T_PINGRESP = const(13)

_MAX_REMAINING = const(268435455)  # the largest remaining length four bytes can carry
_FIRST_READ_SIZE = const(64)



class Closed(NoAnswer):
    # The peer ended the connection before the deadline (EOF, reset), as opposed to never answering.
    pass


def _put_len(buf, pos, n):
    # Writes n as an MQTT variable-length integer at buf[pos]; returns the position after it.
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            buf[pos] = b | 0x80
            pos += 1
        else:
            buf[pos] = b
            return pos + 1


def _len_size(n):
    return 1 if n < 128 else 2 if n < 16384 else 3 if n < 2097152 else 4


def _put_str(buf, pos, s):
    n = len(s)
    buf[pos] = n >> 8
    buf[pos + 1] = n & 0xFF
    buf[pos + 2 : pos + 2 + n] = s
    return pos + 2 + n


def _utf8(s):
    # str to UTF-8 bytes (bytes and None pass), checked before anything is sent.
    b = s.encode() if isinstance(s, str) else s
    if b is not None and len(b) > 65535:
        raise ValueError("MQTT string too long")
    return b


class MQTTClient:
    # on_message(topic: bytes, payload: bytes) is called for every PUBLISH the server sends; a QoS 1 PUBLISH
    # is acknowledged after it returns. timeout_ms bounds each network wait. max_packet caps incoming packets.
    def __init__(self, host, port, client_id, username=None, password=None, keepalive=60, timeout_ms=10000,
                 ssl_ctx=None, on_message=None, max_packet=16384):
        if password is not None and username is None:
            raise ValueError("password needs a user name")
        if not 0 <= keepalive <= 65535:
            raise ValueError("keepalive not in 0..65535")
        self.host = host
        self.port = port
        self._ident = (_utf8(client_id), _utf8(username), _utf8(password))
        self.keepalive = keepalive
        self.timeout_ms = timeout_ms
        self._ssl_ctx = ssl_ctx
        self.on_message = on_message
        self.max_packet = max_packet
        self.sock = None
        self._poller = None
        self._pid = 0
        self._last_tx = 0
        self._ping_due = None  # deadline for the PINGRESP of a PINGREQ sent by poll()
        self._rbuf = bytearray(_FIRST_READ_SIZE)  # grows only when a bigger packet arrives
        self._out = bytearray(_FIRST_READ_SIZE)  # outgoing PUBLISH packets, grows likewise
        self._ack = bytearray(4)  # PUBACK template for incoming QoS 1 messages
        self._ack[0] = _PUBACK
        self._ack[1] = 2

    # -- connection ------------------------------------------------------------------------------------

    def connect(self):
        # Opens the connection and sends CONNECT (clean session); Refused on a CONNACK refusal.
        self.close()
        at = tcp.deadline(self.timeout_ms)
        self.sock = tcp.connect(self.host, self.port, self.timeout_ms, self._ssl_ctx)
        self._poller = select.poll()
        self._poller.register(self.sock, select.POLLIN)
        self._ping_due = None
        cid, user, pw = self._ident
        flags = 0x02
        size = 10 + 2 + len(cid)
        if user is not None:
            flags |= 0x80
            size += 2 + len(user)
        if pw is not None:
            flags |= 0x40
            size += 2 + len(pw)
        pkt = bytearray(1 + _len_size(size) + size)
        pkt[0] = _CONNECT
        i = _put_len(pkt, 1, size)
        i = _put_str(pkt, i, b"MQTT")
        pkt[i] = 4  # protocol level 3.1.1
        pkt[i + 1] = flags
        pkt[i + 2] = self.keepalive >> 8
        pkt[i + 3] = self.keepalive & 0xFF
        i = _put_str(pkt, i + 4, cid)
        if user is not None:
            i = _put_str(pkt, i, user)
        if pw is not None:
            _put_str(pkt, i, pw)
        self._send(pkt, at)
        try:
            h, n = self._read_packet(at)
            if h != 0x20 or n != 2:
                raise BadAnswer("CONNACK expected")
            code = self._rbuf[1]
        except Exception:
            self.close()
            raise
        if code:
            self.close()
            if code <= 5:
                # CONNACK return codes 1..5 (MQTT 3.1.1 section 3.2.2.3).
                raise Refused(code, ("unacceptable protocol version", "identifier rejected", "server unavailable",
                                     "bad user name or password", "not authorized")[code - 1])
            raise BadAnswer("CONNACK code %d" % code)

    def disconnect(self):
        # Clean DISCONNECT, then close; never raises.
        if self.sock is not None:
            try:
                tcp.write_all(self.sock, b"\xe0\x00", tcp.deadline(self.timeout_ms))  # DISCONNECT
            except Exception:
                pass
        self.close()

    def close(self):
        if self.sock is not None:
            try:
                self.sock.close()
            except Exception:
                pass
            self.sock = None
            self._poller = None

    # -- operations ------------------------------------------------------------------------------------

    def publish(self, topic, payload, qos=0, retain=False):
        # QoS 1 returns once the matching PUBACK arrived; packets arriving in between are handled.
        if qos not in (0, 1):
            raise ValueError("QoS must be 0 or 1")
        topic = _utf8(topic)
        size = 2 + len(topic) + len(payload) + (2 if qos else 0)
        if size > _MAX_REMAINING:
            raise ValueError("payload too large")
        total = 1 + _len_size(size) + size
        if total > len(self._out):
            self._out = bytearray(total)
        out = self._out
        out[0] = _PUBLISH | (qos << 1) | (1 if retain else 0)
        i = _put_str(out, _put_len(out, 1, size), topic)
        if qos:
            pid = self._next_pid()
            out[i] = pid >> 8
            out[i + 1] = pid & 0xFF
            i += 2
        out[i:total] = payload
        at = tcp.deadline(self.timeout_ms)
        self._send(memoryview(out)[:total], at)
        if qos:
            self._await(_T_PUBACK, pid, at)

    def subscribe(self, filters):
        # filters: a list of (topic filter, qos); returns the granted QoS codes. A refused filter (0x80)
        # raises Rejected(0x80, filter).
        body = 2
        enc = []
        for f, q in filters:
            if q not in (0, 1):
                raise ValueError("QoS must be 0 or 1")
            b = _utf8(f)
            enc.append((b, q))
            body += 3 + len(b)
        if not enc:
            raise ValueError("no topic filters")
        pkt = bytearray(1 + _len_size(body) + body)
        pkt[0] = _SUBSCRIBE
        i = _put_len(pkt, 1, body)
        pid = self._next_pid()
        pkt[i] = pid >> 8
        pkt[i + 1] = pid & 0xFF
        i += 2
        for b, q in enc:
            i = _put_str(pkt, i, b)
            pkt[i] = q
            i += 1
        at = tcp.deadline(self.timeout_ms)
        self._send(pkt, at)
        n = self._await(_T_SUBACK, pid, at)
        granted = list(self._rbuf[2:n])
        if len(granted) != len(enc):
            self.close()
            raise BadAnswer("SUBACK mismatch")
        for k, g in enumerate(granted):
            if g == 0x80:
                raise Rejected(0x80, "subscription refused: %s" % filters[k][0])
        return granted

    def ping(self):
        # PINGREQ, then wait for the PINGRESP (other packets handled meanwhile).
        at = tcp.deadline(self.timeout_ms)
        self._send(b"\xc0\x00", at)  # PINGREQ
        self._await(_T_PINGRESP, None, at)
        self._ping_due = None

    def poll(self):
        # Call between sends: handles every packet that has arrived, and sends a PINGREQ once half the
        # keep-alive passed without a packet from us (so calling at least every keepalive/2 s is enough).
        # A PINGREQ answered by nothing within timeout_ms is NoAnswer at the next poll.
        self._need_sock()
        while True:
            ready = self._poller.poll(0)
            if not ready:
                break
            if ready[0][1] & select.POLLIN:
                self._handle(*self._read_packet(tcp.deadline(self.timeout_ms)))
            else:
                self.close()
                raise Closed("connection closed")
        if self._ping_due is not None:
            if tcp.remaining(self._ping_due) == 0:
                self.close()
                raise NoAnswer("no answer in time")
        elif self.keepalive and time.ticks_diff(time.ticks_ms(), self._last_tx) >= self.keepalive * 500:
            self._send(b"\xc0\x00", tcp.deadline(self.timeout_ms))  # PINGREQ
            self._ping_due = tcp.deadline(self.timeout_ms)

    def wait_msg(self, at):
        # Waits for one packet until the deadline `at` (a tcp.deadline value) and handles it.
        self._handle(*self._read_packet(at))

    # -- internals -------------------------------------------------------------------------------------

    def _next_pid(self):
        self._pid = self._pid % 65535 + 1
        return self._pid

    def _need_sock(self):
        if self.sock is None:
            raise NoAnswer("not connected")

    def _send(self, data, at):
        self._need_sock()
        try:
            tcp.write_all(self.sock, data, at)
        except NoAnswer:
            self._fail(at)
        self._last_tx = time.ticks_ms()

    def _fail(self, at):
        # A failed read or write leaves the stream in an unknown state: close it and say why.
        self.close()
        if tcp.remaining(at):
            raise Closed("connection closed")
        raise NoAnswer("no answer in time")

    def _read_packet(self, at):
        # Reads one whole packet into self._rbuf; returns (first header byte, remaining length).
        self._need_sock()
        buf = self._rbuf
        try:
            tcp.wait(self.sock, select.POLLIN, at)
        except NoAnswer:
            if tcp.remaining(at):
                self._fail(at)
            raise  # nothing of a packet read yet: the session is still in step and usable
        try:
            tcp.read_exact(self.sock, memoryview(buf)[:2], at)  # every packet has at least two bytes
            h = buf[0]
            t = h >> 4
            # Only packet types a server sends, with valid flags; QoS 2 is never asked for.
            if (t not in (_T_CONNACK, _T_PUBLISH, _T_PUBACK, _T_SUBACK, _T_UNSUBACK, _T_PINGRESP)
                    or (h & 0x0F if t != _T_PUBLISH else h & 0x06 > 0x02)):
                raise BadAnswer("bad packet 0x%02x" % h)
            n = buf[1] & 0x7F
            shift = 7
            more = buf[1] & 0x80
            while more:
                if shift > 21:
                    raise BadAnswer("length over 4 bytes")
                tcp.read_exact(self.sock, memoryview(buf)[:1], at)
                n |= (buf[0] & 0x7F) << shift
                shift += 7
                more = buf[0] & 0x80
            if n > self.max_packet:
                raise BadAnswer("packet of %d bytes > max_packet" % n)
            if n > len(buf):
                buf = self._rbuf = bytearray(n)
            if n:
                tcp.read_exact(self.sock, memoryview(buf)[:n], at)
        except BadAnswer:
            self.close()
            raise
        except NoAnswer:
            self._fail(at)
        return h, n

    def _await(self, kind, pid, at):
        # Reads packets until one of `kind` (with packet id `pid`, if given) arrives; returns its length.
        while True:
            h, n = self._read_packet(at)
            t = h >> 4
            if t == kind and (pid is None or (n >= 2 and (self._rbuf[0] << 8 | self._rbuf[1]) == pid)):
                return n
            self._handle(h, n)

    def _handle(self, h, n):
        # A packet nobody waits for: PUBLISH goes to on_message (QoS 1 acknowledged), PINGRESP ends a
        # pending keep-alive, stray acknowledgements (and CONNACKs) are dropped.
        t = h >> 4
        buf = self._rbuf
        if t == _T_PINGRESP:
            self._ping_due = None
        elif t == _T_PUBLISH:
            qos = (h >> 1) & 3
            start = 2 + (buf[0] << 8 | buf[1]) + (2 if qos else 0) if n >= 2 else n + 1
            if start > n:
                self.close()
                raise BadAnswer("bad packet 0x%02x" % h)
            topic = bytes(buf[2 : start - 2 if qos else start])
            pid = buf[start - 2] << 8 | buf[start - 1]
            payload = bytes(buf[start:n])
            if self.on_message:
                self.on_message(topic, payload)
            if qos:
                # Filled only now: on_message may itself have acknowledged other messages.
                self._ack[2] = pid >> 8
                self._ack[3] = pid & 0xFF
                self._send(self._ack, tcp.deadline(self.timeout_ms))

