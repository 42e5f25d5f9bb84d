# A compact MQTT 3.1.1 client: clean sessions, QoS 0 and 1, keep-alive, every wait bounded by a deadline.
# Each packet is built whole in one buffer and leaves in one write: packets written in pieces stall on
# Nagle's algorithm and delayed ACKs (tens of ms per QoS 1 message).
# The endpoint, TLS, keep-alive and the deadline of each wait come from the device config (cfg: host, port, tls,
# keepalive, timeout), validated by tbfleet.config; keeping cfg instead of copies saves RAM.
import select
import time

from micropython import const

from tbfleet import tcp
from tbfleet.errors import BadAnswer, NoAnswer, Refused, Rejected

_CONNECT = const(0x10)
_PUBLISH = const(0x30)
_PUBACK = const(0x40)
_SUBSCRIBE = const(0x82)
_PINGREQ = const(0xC0)
_DISCONNECT = const(0xE0)

# Packet types (upper nibble) a server may send us.
_T_CONNACK = const(2)
_T_PUBLISH = const(3)
_T_PUBACK = const(4)
_T_SUBACK = const(9)
_T_PINGRESP = const(13)
# Bit t set for each of them (CONNACK, PUBLISH, PUBACK, SUBACK, UNSUBACK, PINGRESP): one test instead of a tuple.
_FROM_SERVER = const(0x2A1C)

_MAX_REMAINING = const(268435455)  # the largest remaining length four bytes can carry
_MAX_IN = const(16384)  # incoming packets above this are refused rather than allocated


class MQTTClient:
    # Subclasses (tbfleet.via_mqtt.Link) define on_message(topic, payload) to receive every PUBLISH the server
    # sends; a QoS 1 PUBLISH is acknowledged after it returns. Without it messages are acknowledged and dropped.
    # wait and send are the packet-level steps the operations are made of.
    on_message = None

    def __init__(self, cfg):
        self.cfg = cfg
        self.sock = None
        self.pid = 0  # the last packet id used
        self.buf = bytearray(64)  # every packet in and out; grows only when a bigger one comes

    def connect(self, client_id, username=None, password=None, client_cert=False):
        # Opens the connection (TLS when cfg.tls, with the client certificate when client_cert) and sends CONNECT
        # (clean session); Refused on a CONNACK refusal. None leaves a field out, "" is sent as an empty one.
        if password is not None and username is None:
            raise ValueError("password without user name")
        cfg = self.cfg
        ka = cfg.keepalive
        flags = 0x02 | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
        data = [_CONNECT, "MQTT", bytes((4, flags, ka >> 8, ka & 0xFF)), client_id]  # 4: protocol level 3.1.1
        for s in (username, password):
            if s is not None:
                data.append(s)
        self.send(data)  # a dry run: a string too long is refused before any connection is made
        ctx = None
        if cfg.tls:
            from tbfleet import tls  # only a board configured for TLS spends RAM on it

            ctx = tls.context(cfg, client_cert)
        self.close()
        ms = cfg.timeout * 1000
        at = tcp.deadline(ms)
        self.sock = tcp.connect(cfg.host, cfg.port, ms, ctx)
        self.poller = select.poll()
        self.poller.register(self.sock, select.POLLIN)
        try:
            self.send(data, at)
            n = self.wait(at, _T_CONNACK)
            code = self.buf[1]
            if n != 2 or code > 5:
                raise BadAnswer("bad packet 0x%02x" % 0x20)
            if code:
                # Return codes 1..5 (MQTT 3.1.1 section 3.2.2.3), in one string: one object instead of five.
                raise Refused(code, "unacceptable protocol version,identifier rejected,server unavailable,"
                                    "bad user name or password,not authorized".split(",")[code - 1])
        except Exception:
            self.close(False)
            raise

    def close(self, clean=True):
        # Ends the session: a DISCONNECT first when clean (not after a failure: the stream may be out of step),
        # then the socket is closed. Idempotent, never raises.
        if clean and self.sock is not None:
            try:
                self.send([_DISCONNECT], tcp.deadline(self.cfg.timeout * 1000))
            except Exception:
                pass
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None

    def publish(self, topic, payload, qos=0, retain=False):
        # topic: str, payload: bytes. QoS 1 returns once its PUBACK arrived (packets arriving in between are
        # handled). A connection closed instead is Rejected: how an MQTT 3.1.1 server refuses a message (3.3.5).
        if qos not in (0, 1):
            raise ValueError("bad qos %r" % qos)
        at = tcp.deadline(self.cfg.timeout * 1000)
        data = [_PUBLISH | qos << 1 | retain, topic, payload]
        if qos:
            self.pid = pid = self.pid % 65535 + 1
            data.insert(2, pid.to_bytes(2, "big"))
        self.send(data, at)
        if qos:
            self.wait(at, _T_PUBACK, pid)

    def subscribe(self, filters):
        # filters: a list of (topic filter, qos); returns the granted QoS codes. A refused filter (0x80) raises
        # Rejected(0x80, filter).
        if not filters:
            raise ValueError("no filters")
        self.pid = pid = self.pid % 65535 + 1
        data = [_SUBSCRIBE, pid.to_bytes(2, "big")]
        for f, q in filters:
            if q not in (0, 1):
                raise ValueError("bad qos %r" % q)
            data += (f, bytes((q,)))
        at = tcp.deadline(self.cfg.timeout * 1000)
        self.send(data, at)
        granted = list(self.buf[2 : self.wait(at, _T_SUBACK, pid)])
        if len(granted) != len(filters):
            self.close(False)
            raise BadAnswer("bad SUBACK")
        for k, g in enumerate(granted):
            if g == 0x80:
                raise Rejected(0x80, "refused %s" % filters[k][0])
        return granted

    def poll(self):
        # Call between sends: handles every packet that has arrived. Once half the keep-alive passed without a
        # packet from us (so calling at least every keepalive/2 s is enough), sends a PINGREQ and waits for its
        # PINGRESP (other packets are handled meanwhile): NoAnswer, and the connection closed, without one in time.
        at = tcp.deadline(self.cfg.timeout * 1000)
        while self.sock is None or self.poller.poll(0):
            self.wait(at)  # also the one place that says we are not connected
        ka = self.cfg.keepalive
        if ka and time.ticks_diff(time.ticks_ms(), self._last_tx) >= ka * 500:
            at = tcp.deadline(self.cfg.timeout * 1000)
            self.send([_PINGREQ], at)
            self.wait(at, _T_PINGRESP)

    def wait(self, at, kind=0, pid=-1):
        # Reads packets, each before the deadline `at` (a tcp.deadline value), until one of type `kind` (with packet
        # id `pid` unless -1) arrives; returns its remaining length, the packet being in self.buf. kind 0: returns
        # after any one packet. Every other packet is handled: PUBLISH goes to on_message (QoS 1 acknowledged),
        # stray acknowledgements (and CONNACKs, PINGRESPs) are dropped.
        while True:
            sock = self.sock
            if sock is None:
                raise NoAnswer("not connected")
            got = False  # whether this packet has begun to arrive
            try:
                tcp.wait(sock, select.POLLIN, at)
                got = True
                buf = self.buf
                tcp.read_exact(sock, memoryview(buf)[:2], at)  # every packet has at least two bytes
                h = buf[0]
                t = h >> 4
                # Only packet types a server sends (before the CONNACK nothing else), with valid flags; QoS 2 is
                # never asked for.
                if (not (1 << t) & (1 << _T_CONNACK if kind == _T_CONNACK else _FROM_SERVER)
                        or (h & 0x06 > 0x02 if t == _T_PUBLISH else h & 0x0F)):
                    raise BadAnswer("bad packet 0x%02x" % h)
                # The remaining length: 7 bits a byte, low bits first, the top bit set while more follow.
                b = buf[1]
                n = b & 0x7F
                shift = 7
                while b & 0x80:
                    if shift > 21:
                        raise BadAnswer("bad packet 0x%02x" % h)  # more than four length bytes
                    tcp.read_exact(sock, memoryview(buf)[:1], at)
                    b = buf[0]
                    n |= (b & 0x7F) << shift
                    shift += 7
                if n > _MAX_IN:
                    raise BadAnswer("too long: %d bytes" % n)
                if n > len(buf):
                    buf = self.buf = bytearray(n)
                if n:
                    tcp.read_exact(sock, memoryview(buf)[:n], at)
                qos = h >> 1 & 3
                if t == _T_PUBLISH:
                    # Where the payload starts: after the topic and, at QoS 1, the packet id.
                    start = 2 + (buf[0] << 8 | buf[1]) + (2 if qos else 0) if n >= 2 else n + 1
                    if start > n:
                        raise BadAnswer("bad packet 0x%02x" % h)
            except NoAnswer:
                left = tcp.remaining(at)
                if got or left or kind == _T_PINGRESP:
                    # Inside a packet, the peer closed, or no PINGRESP: the stream is out of step or gone. Silence
                    # before any other packet leaves the session in step and usable.
                    self.close(False)
                if left and kind == _T_PUBACK:
                    raise Rejected(None, "closed instead of PUBACK")
                raise
            except BadAnswer:
                self.close(False)
                raise
            if t == kind and (pid < 0 or n >= 2 and buf[0] << 8 | buf[1] == pid):
                return n
            if t == _T_PUBLISH:
                topic = bytes(buf[2 : start - 2 if qos else start])
                ack = [_PUBACK, buf[start - 2 : start]]  # taken now: on_message may send packets through buf
                payload = bytes(buf[start:n])
                if self.on_message:
                    self.on_message(topic, payload)
                if qos:
                    self.send(ack, tcp.deadline(self.cfg.timeout * 1000))
            if not kind:
                return 0

    def send(self, data, at=None):
        # Sends one packet, built whole in self.buf and written in one go. data: a list of its first byte (type
        # and flags), then the parts that follow the remaining length: bytes-like as they are, str as an MQTT
        # string (2-byte length, UTF-8), checked before anything is sent. A failed write closes the connection
        # (part of a packet may be out). Without a deadline `at` the packet is only built.
        n = 0
        for k in range(1, len(data)):
            p = data[k]
            if isinstance(p, str):
                p = p.encode()
                if len(p) > 65535:
                    raise ValueError("too long: %d bytes" % len(p))
                data[k] = p = len(p).to_bytes(2, "big") + p
            n += len(p)
        if n > _MAX_REMAINING:
            raise ValueError("too long: %d bytes" % n)
        buf = self.buf
        if n + 5 > len(buf):
            buf = self.buf = bytearray(n + 5)
        buf[0] = data[0]
        i = 1
        while True:
            buf[i] = n & 0x7F | (0x80 if n > 0x7F else 0)
            i += 1
            n >>= 7
            if not n:
                break
        for k in range(1, len(data)):
            p = data[k]
            buf[i : i + len(p)] = p
            i += len(p)
        if at is None:
            return
        sock = self.sock
        if sock is None:
            raise NoAnswer("not connected")
        try:
            tcp.write_all(sock, memoryview(buf)[:i], at)
        except NoAnswer:
            self.close(False)
            raise
        self._last_tx = time.ticks_ms()
