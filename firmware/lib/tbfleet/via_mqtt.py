# ThingsBoard over MQTT: the provisioning session and the authenticated telemetry session, over the firmware's own
# compact MQTT 3.1.1 client (clean sessions, QoS 0 and 1, keep-alive, every wait bounded by a deadline).
# Client and adapter are one class in one module: on a board every module, class and function costs heap.
# Each packet is built whole in one buffer and leaves in one write: packets written in pieces stall on
# Nagle's algorithm and delayed ACKs (tens of ms per QoS 1 message).
# The endpoint, TLS, keep-alive and the deadline of each wait come from the device config (cfg: host, port, tls,
# keepalive, timeout), validated by tbfleet.config; keeping cfg instead of copies saves RAM.
# Topics and the provisioning user name are literals where they are used: a module-level name for each would be
# one more interned string for good.
import gc
import select
import time

from micropython import const

from tbfleet import BadAnswer, NoAnswer, Refused, Rejected, tcp

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
_T_PINGRESP = const(13)
# Bit t set for each of them (CONNACK, PUBLISH, PUBACK, SUBACK, UNSUBACK, PINGRESP): one test instead of a tuple.
_FROM_SERVER = const(0x2A1C)

_MAX_REMAINING = const(268435455)  # the largest remaining length four bytes can carry
_MAX_IN = const(16384)  # incoming packets above this are refused rather than allocated
_MAX_EVENTS = const(8)  # pushes and RPCs held for the device at most; more are acknowledged and dropped
# The packet buffer's first size: the connect burst (CONNECT, SUBSCRIBE, client attributes, attribute request and
# first telemetry, about 400 bytes) fits without regrowing packet by packet (bench: the application lifecycle needs
# 1.25 KB less heap than when it starts at 64 bytes).
_BUF_SIZE = const(512)


class Link:
    # First the MQTT client: a session opens with put_connect and handshake (the packets put between them leave
    # with the CONNECT: provision and open), then publish, listen, close; put, flush and wait are the packet-level
    # steps they are made of. Every PUBLISH the server sends goes to on_message(topic, payload); a QoS 1 PUBLISH is
    # acknowledged after it returns. Then ThingsBoard's Link API on top: provision, open, send. No connect of its
    # own, as each method costs heap for as long as the link is loaded (bench: MQTT application lifecycle 0.13 KB).

    def __init__(self, cfg):
        self.cfg = cfg
        self.ms = cfg.timeout * 1000  # for tcp.deadline: the time each network wait may take
        self.sock = None
        self.pid = 0  # the last packet id used
        self.buf = bytearray(_BUF_SIZE)  # every packet in and out; grows only when a bigger one comes
        self.out = 0  # bytes of packets put in buf and not sent yet
        # Set here, with the others: an instance's attributes are one table, grown (a new block) when full.
        self._last_tx = 0  # ticks_ms of the last write, for the keep-alive
        self.events = []  # (kind, RPC id, payload) of what the server sent: see on_message

    def put_connect(self, client_id, username, password):
        # Ends the session under way, if any, and puts a CONNECT (clean session) in self.buf: a string too long is
        # refused here, before any connection is made. None leaves a user name or password out, "" is sent as an
        # empty one. Packets put after it leave with it (see handshake).
        if password is not None and username is None:
            raise ValueError("password without user name")
        self.close()
        ka = self.cfg.keepalive
        flags = 0x02 | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
        self.put(_CONNECT, "MQTT", bytes((4, flags, ka >> 8, ka & 0xFF)), client_id, username, password)  # 4: 3.1.1

    def handshake(self, client_cert):
        # Opens the connection (TLS when cfg.tls, with the client certificate when client_cert) and writes the CONNECT
        # and the packets put after it in one go, without waiting for the CONNACK (MQTT 3.1.1 section 3.1.4 allows
        # it); then reads the CONNACK: Refused when it refuses the session.
        cfg = self.cfg
        try:
            ctx = None
            if cfg.tls:
                from tbfleet import tls  # only a board configured for TLS spends RAM on it

                ctx = tls.context(cfg, client_cert)
            at = tcp.deadline(self.ms)
            self.sock = tcp.connect(cfg.host, cfg.port, self.ms, ctx)
            self.flush(at)
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
        # then the socket is closed; packets put and not sent are dropped. Idempotent, never raises.
        self.out = 0
        sock = self.sock
        if sock is not None:
            if clean:
                try:
                    self.put(_DISCONNECT)
                    self.flush(tcp.deadline(self.ms))
                except Exception:
                    pass  # flush closed it then
            try:
                sock.close()
            except OSError:
                pass
            self.sock = None

    def publish(self, topic, payload, qos):
        # topic: str, payload: bytes. QoS 1 returns once its PUBACK arrived (packets arriving in between are
        # handled). A connection closed instead is Rejected: how an MQTT 3.1.1 server refuses a message (3.3.5).
        if not 0 <= qos <= 1:
            raise ValueError("bad qos %r" % qos)
        at = tcp.deadline(self.ms)
        self.put_publish(topic, payload, qos)
        self.flush(at)
        if qos:
            self.wait(at, _T_PUBACK, self.pid)

    def put_publish(self, topic, payload, qos):
        # Puts a PUBLISH; at QoS 1 with the next packet id (self.pid).
        pid = None
        if qos:
            self.pid = pid = self.pid % 65535 + 1
            pid = pid.to_bytes(2, "big")
        self.put(_PUBLISH | qos << 1, topic, pid, payload)

    def listen(self, ms=0):
        # Waits up to ms for the server, then handles every packet that has arrived (call it between sends). Once
        # half the keep-alive passed without a packet from us (so calling at least every keepalive/2 s is enough),
        # sends a PINGREQ and waits for its PINGRESP (other packets are handled meanwhile): NoAnswer, and the
        # connection closed, without one in time.
        if self.sock is not None:
            # tcp's poll object, not one of our own (bench: the application lifecycle needs 0.75 KB less heap).
            tcp.wait(self.sock, select.POLLIN, None).poll(ms)
        at = tcp.deadline(self.ms)
        while self.sock is None or tcp.wait(self.sock, select.POLLIN, None).poll(0):
            self.wait(at)  # also the one place that says we are not connected
        ka = self.cfg.keepalive
        if ka and time.ticks_diff(time.ticks_ms(), self._last_tx) >= ka * 500:
            at = tcp.deadline(self.ms)
            self.put(_PINGREQ)
            self.flush(at)
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
                if n > len(buf):
                    # A packet larger than the board can hold is refused before anything is allocated for it: a
                    # quarter of the free heap, as its payload is copied for on_message and then parsed, and the
                    # free heap is not one block.
                    gc.collect()
                    if n > _MAX_IN or n > gc.mem_free() // 4:
                        raise BadAnswer("too long: %d bytes" % n)
                    buf = self.buf = bytearray(n)
                if n:
                    tcp.read_exact(sock, memoryview(buf)[:n], at)
                qos = h >> 1 & 3  # 0 or 1, checked above
                if t == _T_PUBLISH:
                    # Where the payload starts: after the topic and, at QoS 1, the packet id (start >= 2, so a
                    # body under two bytes fails too, whatever buf holds).
                    start = 2 + (buf[0] << 8 | buf[1]) + 2 * qos
                    if start > n:
                        raise BadAnswer("bad packet 0x%02x" % h)
            except NoAnswer:
                left = time.ticks_diff(at, time.ticks_ms()) > 0  # the deadline not reached: the peer closed
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
                # Copied out through a memoryview: a slice of buf would be one more copy (bench: the application
                # lifecycle needs 0.25 KB less heap).
                mv = memoryview(buf)
                topic = bytes(mv[2 : start - 2 * qos])
                ack = buf[start - 2 : start]  # taken now: on_message may send packets through buf
                payload = bytes(mv[start:n])
                self.on_message(topic, payload)
                if qos:
                    self.put(_PUBACK, ack)
                    self.flush(tcp.deadline(self.ms))
            if not kind:
                return 0

    def put(self, first, *parts):
        # Builds one packet in self.buf behind those not sent yet: its first byte (type and flags), then the parts
        # that follow the remaining length: bytes-like as they are, str as an MQTT string (2-byte length, UTF-8), an
        # int as one byte, None left out. Checked before anything is written.
        n = 0
        for p in parts:
            if isinstance(p, str):
                size = len(p.encode())
                if size > 65535:
                    raise ValueError("too long: %d bytes" % size)
                n += 2 + size
            elif type(p) is int:
                n += 1
            elif p is not None:
                n += len(p)
        if n > _MAX_REMAINING:
            raise ValueError("too long: %d bytes" % n)
        buf = self.buf
        i = self.out
        if i + n + 5 > len(buf):
            self.buf = bytearray(i + n + 5)
            self.buf[:i] = buf[:i]
            buf = self.buf
        buf[i] = first
        i += 1
        while True:
            buf[i] = n & 0x7F | (0x80 if n > 0x7F else 0)
            i += 1
            n >>= 7
            if not n:
                break
        for p in parts:
            if isinstance(p, str):
                p = p.encode()
                buf[i] = len(p) >> 8
                buf[i + 1] = len(p) & 0xFF
                i += 2
            elif p is None:
                continue
            elif type(p) is int:
                buf[i] = p
                i += 1
                continue
            buf[i : i + len(p)] = p
            i += len(p)
        self.out = i

    def flush(self, at):
        # Writes the packets put in self.buf in one go. A failed write closes the connection (part of a packet may
        # be out).
        n = self.out
        self.out = 0
        sock = self.sock
        if sock is None:
            raise NoAnswer("not connected")
        try:
            tcp.write_all(sock, memoryview(self.buf)[:n], at)
        except NoAnswer:
            self.close(False)
            raise
        self._last_tx = time.ticks_ms()

    # -- ThingsBoard -----------------------------------------------------------------------------------------------

    def provision(self, request):
        # Pre-3.9 servers never answer a SUBSCRIBE in a provisioning session, and every version publishes
        # the answer unasked, so we only publish and then read whatever comes until the answer is there.
        self.events = []
        try:
            try:
                self.put_connect(self.cfg.device_name, "provision", None)
                self.handshake(False)
                at = tcp.deadline(self.ms)
                self.publish("/provision/request", request, 1)
            except (Refused, Rejected) as e:
                # ThingsBoard accepts every provisioning session and request: a refused session, or one closed
                # instead of a PUBACK, means it cannot serve us now.
                raise NoAnswer(e.args[1])
            while True:
                for kind, _, body in self.events:
                    if kind == "provision":
                        return body
                self.events = []  # nothing else has a place in a provisioning session
                self.wait(at)
        finally:
            self.close()

    def on_message(self, topic, payload):
        # An event: the provisioning answer ("provision"), or, in the device's own session, what tbfleet.Device
        # handles once the exchange under way is over (it may send in reply): a shared attributes push
        # ("attributes"), the answer to our attribute request ("current") or a server-side RPC ("rpc", with the id
        # from the topic).
        if topic == b"/provision/response":
            event = ("provision", None, payload)
        elif topic == b"v1/devices/me/attributes":
            event = ("attributes", None, payload)
        elif topic.startswith(b"v1/devices/me/attributes/response/"):
            event = ("current", None, payload)
        elif topic.startswith(b"v1/devices/me/rpc/request/") and topic[26:].isdigit():
            # Else not an id ThingsBoard gives: nothing to reply to. Checked rather than caught: an exception handler
            # would put this frame on the heap, under the exchange that received the RPC.
            event = ("rpc", int(topic[26:]), payload)
        else:
            return
        if len(self.events) < _MAX_EVENTS:
            self.events.append(event)

    def open(self, creds, burst):
        # Connects with saved credentials; Refused when the server refuses them. The SUBSCRIBE to shared attribute
        # pushes and RPC requests, the client attributes, the request for the current shared attributes and the
        # first telemetry leave with the CONNECT in one write: one round trip to the first PUBACK. burst: [hello,
        # first], JSON bytes, taken out of the list as they are put. (config refuses the device name "provision",
        # which would open a provisioning session.)
        kind = creds.get("type")
        self.events = []
        if kind == "MQTT_BASIC":
            # Empty means absent: ThingsBoard picks its lookup by which fields are present (reference 3.4).
            self.put_connect(creds.get("client_id") or "", creds.get("username") or None,
                             creds.get("password") or None)
        elif kind == "ACCESS_TOKEN":
            self.put_connect(self.cfg.device_name, creds["token"], None)
        elif kind == "X509_CERTIFICATE" and self.cfg.tls:
            self.put_connect(self.cfg.device_name, None, None)
        else:
            # An unknown type, or X509_CERTIFICATE without TLS: config refuses that pair, but credentials saved
            # under an earlier config may meet it.
            raise ValueError("can't use credentials type %r" % (kind,))
        self.pid = self.pid % 65535 + 1
        self.put(_SUBSCRIBE, self.pid.to_bytes(2, "big"),
                 "v1/devices/me/attributes", 1, "v1/devices/me/rpc/request/+", 1)  # each filter, then its QoS
        self.put_publish("v1/devices/me/attributes", burst.pop(0), 0)
        self.put_publish("v1/devices/me/attributes/request/1", b"{}", 0)
        self.put_publish("v1/devices/me/telemetry", burst.pop(0), self.cfg.qos)
        self.handshake(kind == "X509_CERTIFICATE")
        if self.cfg.qos:
            # The SUBACK and the attribute response, when they come first, are taken in passing (ThingsBoard
            # grants both filters).
            self.wait(tcp.deadline(self.ms), _T_PUBACK, self.pid)

    def send(self, payload, rid=None):
        # Telemetry (JSON bytes), or with rid the reply to server-side RPC rid. ThingsBoard answers a rejected
        # publish (unparsable payload, rate limit, size limit) by closing the connection instead of sending a
        # PUBACK: Rejected, so the caller can drop this message; a missing answer is NoAnswer. The caller closes
        # the link after either (tbfleet.Device does) and opens it again.
        if rid is None:
            self.listen()  # a connection the server already closed is NoAnswer here, before we blame this message
            topic = "v1/devices/me/telemetry"
        else:
            topic = "v1/devices/me/rpc/response/%d" % rid
        self.publish(topic, payload, self.cfg.qos)
