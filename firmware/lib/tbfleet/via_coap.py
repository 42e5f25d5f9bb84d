# ThingsBoard's device API over CoAP (UDP 5683): provisioning and telemetry as confirmable POSTs of JSON, with the
# firmware's own compact RFC 7252 client: exponential retransmission, piggybacked and separate responses, duplicate
# detection, a select.poll deadline on every wait, the whole exchange bounded by cfg.timeout; observations (RFC 7641)
# of shared attributes and RPC. Client and adapter are one class; a request's message is built by _message, each
# datagram read by _parse, and what comes during a request is sorted out by Link._answer.
import os
import select
import socket
import time

from micropython import const

from tbfleet import BadAnswer, NoAnswer, Refused, Rejected

_ACK_TIMEOUT = const(2000)  # ms; each request stretches it by a random 1 to 1.5 (ACK_RANDOM_FACTOR)
_MAX_RETRANSMIT = const(4)
_SEEN = const(8)  # separate responses remembered to recognise their retransmissions
_RX = const(1152)  # largest datagram taken: ThingsBoard keeps payloads within 1024 bytes
# Telemetry answers carry nothing we use past an error's first 60 bytes. recv allocates its whole size for every
# datagram: a small one keeps the sending loop from needing a 1152-byte hole in the heap each message.
_RX_TELEMETRY = const(128)
_GET = const(1)
_POST = const(2)
_JSON = const(50)  # Content-Format application/json
_CREATED = const(65)  # 2.01
_VALID = const(67)  # 2.03
_CHANGED = const(68)  # 2.04
_CONTENT = const(69)  # 2.05
_BAD_REQUEST = const(128)  # 4.00
_UNAUTHORIZED = const(129)  # 4.01
_NOT_FOUND = const(132)  # 4.04


def _why(code, body):
    # (code as people write it, 4.01 -> 401; the first words of the server's error body, else the code as "4.01")
    try:
        text = body[:60].decode().strip()
    except UnicodeError:
        text = "%d bytes" % len(body)
    return (code >> 5) * 100 + (code & 31), text or "%d.%02d" % (code >> 5, code & 31)


def _message(code, mid, token, path, payload, fmt, query, observe):
    # A confirmable request as bytes to send: version 1, CON, the 4-byte token; the options in ascending number
    # order (Observe 0 when observe, the Uri-Path segments, Content-Format fmt unless None, the Uri-Query strings);
    # the payload after its marker.
    msg = bytearray((0x44, code, mid >> 8, mid & 255))
    msg += token
    opts = [(11, seg.encode()) for seg in path]  # Uri-Path
    if observe:
        opts.insert(0, (6, b""))  # Observe: 0, register
    if fmt is not None:
        opts.append((12, fmt.to_bytes((fmt > 0) + (fmt > 255), "big")))  # Content-Format: a minimal uint
    for q in query:
        opts.append((15, q.encode()))  # Uri-Query
    last = 0
    for num, val in opts:
        # Deltas between these option numbers stay below 13; a length of 13 or more takes one or two extension
        # bytes (RFC 7252 3.1).
        n = len(val)
        head = num - last << 4
        if n < 13:
            msg.append(head | n)
        elif n < 269:
            msg.append(head | 13)
            msg.append(n - 13)
        else:
            msg.append(head | 14)
            msg += (n - 269).to_bytes(2, "big")
        msg += val
        last = num
    if payload:
        msg.append(0xFF)
        msg = msg + payload  # one block of the final size: growing msg in place leaves holes behind
    return msg


def _parse(data):
    # (type, code, message id, token, payload) of a datagram, or None when it is malformed: a malformed message is
    # silently ignored (RFC 7252 4.2): bad header, token length over 8, reserved option nibble 15, an option or
    # token past the end, a payload marker with no payload, an empty message with content.
    n = len(data)
    if n < 4 or data[0] >> 6 != 1 or data[0] & 15 > 8:
        return None
    i = 4 + (data[0] & 15)
    tok = data[4:i]
    ok = True
    try:
        while ok and i < n and data[i] != 0xFF:
            d = data[i] >> 4
            ln = data[i] & 15
            ok = d != 15 and ln != 15
            i += 1 + (d == 13) + 2 * (d == 14)  # past the delta's extension: the number is not needed
            if ln == 13:
                ln = 13 + data[i]
                i += 1
            elif ln == 14:
                ln = 269 + (data[i] << 8 | data[i + 1])
                i += 2
            i += ln
    except IndexError:
        ok = False
    body = data[i + 1:]
    c = data[1]
    if not ok or i > n or i < n and not body or c == 0 and n > 4:
        return None
    return data[0] >> 4 & 3, c, data[2] << 8 | data[3], tok, body


class Link:
    # One UDP socket to the server, opened by the first request; requests are made one at a time.
    def __init__(self, cfg):
        if cfg.tls:
            raise ValueError("no DTLS")  # config.load refuses it already; a bare Link must not send in clear
        self.cfg = cfg
        self.ack_ms = _ACK_TIMEOUT
        self.sock = None
        self.poller = None
        self.mid = int.from_bytes(os.urandom(2), "big")
        self.seen = []
        self._path = None
        self.observing = {}  # token: the event kind its notifications are
        self.events = []  # (kind, None, payload) of notifications, for tbfleet.Device

    def provision(self, request):
        code, body = self.request(_POST, ("api", "v1", "provision"), request, _JSON)
        # 2.01 on SUCCESS and 4.00 with the JSON body on NOT_FOUND/FAILURE; servers before 3.2.2 answer 2.05.
        if code == _CREATED or code == _CONTENT or code == _BAD_REQUEST and body:
            return body
        raise BadAnswer("provisioning answered %d: %s" % _why(code, body))

    def open(self, creds, burst):
        # Sends the client attributes, fetches the current shared attributes (an event "current" for
        # tbfleet.Device) and sends the first telemetry (burst: [hello, first], JSON bytes, taken out of the list as
        # they leave).
        # Only ACCESS_TOKEN credentials hold a token: CoAP has no other way to authenticate without DTLS.
        if not creds.get("token"):
            raise ValueError("%s credentials without a token" % creds.get("type"))
        # Uri-Path options carry raw segments: the token needs no escaping
        self._path = ("api", "v1", creds["token"])
        self.events = []
        self.observing = {}
        self.post(("attributes",), burst.pop(0))
        # Observing the shared attributes answers with all of them ({} when none), then each change follows.
        for feature in ("attributes", "rpc"):
            code, body = self.request(_GET, self._path + (feature,), observe=feature)
            if code == _CONTENT and feature == "attributes":
                self.events.append((feature, None, body))
            elif code and code >> 5 != 2:  # 0: an empty ACK, the first notification to come
                self.check(code, body)
        self.send(burst.pop(0))

    def check(self, code, body):
        # 2.01 today; 2.03 (3.2, 3.2.1) and 2.04 from older servers
        if code == _CREATED or code == _VALID or code == _CHANGED:
            return
        if code == _UNAUTHORIZED:
            raise Refused(401, "unauthorized")
        raise Rejected(*_why(code, body))

    def post(self, path, payload):
        # path: the segments after the token.
        if self._path is None:
            raise ValueError("not open")
        self.check(*self.request(_POST, self._path + path, payload, _JSON, (), _RX_TELEMETRY))

    def send(self, payload, rid=None):
        # Telemetry (JSON bytes), or with rid the reply to server-side RPC rid.
        self.post(("telemetry",) if rid is None else ("rpc", str(rid)), payload)

    def listen(self, ms):
        # Waits up to ms for notifications of the observations (events) and takes them.
        if not self.sock:
            time.sleep_ms(ms)  # no observation without the socket: the next request makes one
            return
        at = time.ticks_add(time.ticks_ms(), ms)
        while self.sock and self.poller.poll(max(0, time.ticks_diff(at, time.ticks_ms()))):
            try:
                data = self.sock.recv(_RX)
            except OSError as e:
                if e.errno == 11:
                    continue
                self.close()
                raise NoAnswer("CoAP to %s:%d failed: %s" % (self.cfg.host, self.cfg.port, e))
            parsed = _parse(data)
            if parsed and not self._notified(*parsed) and parsed[0] == 0:
                self.sock.send(bytes((0x70, 0, data[2], data[3])))  # a CON not ours, or a ping: reset

    def _notified(self, kind, code, mid, token, body):
        # Takes a CON or NON of an observation (True): acknowledged, once (a retransmission is only acknowledged
        # again), its payload an event; a notification that is not 2.xx ends the observation (RFC 7641 3.2).
        event = self.observing.get(bytes(token))
        if kind > 1 or event is None:
            return False
        if kind == 0:
            self.sock.send(bytes((0x60, 0, mid >> 8, mid & 255)))
            if mid in self.seen:
                return True
            self.seen.append(mid)
            if len(self.seen) > _SEEN:
                self.seen.pop(0)
        if code >> 5 == 2:
            self.events.append((event, None, bytes(body)))
        else:
            self.observing.pop(bytes(token))
        return True

    def close(self):
        self._path = None
        self.observing = {}
        self._drop_socket()

    def _drop_socket(self):
        # On close() and on a socket error: the next request makes a new socket and poller.
        if self.sock:
            self.sock.close()
            self.sock = self.poller = None

    def request(self, code, path, payload=None, fmt=None, query=(), rx=_RX, observe=None):
        # A confirmable request. path: raw segments (one may hold "/"), query: "key=value" strings, fmt: the
        # Content-Format number or None, rx: the largest datagram taken (a longer one is cut). observe: the event
        # kind ("attributes", "rpc") of an observation this GET registers (RFC 7641): its notifications become
        # events, and an empty ACK ends the request (the response comes as the first notification).
        # Returns (response code, payload bytes), (0, b"") for that empty ACK; NoAnswer when none came.
        cfg = self.cfg
        try:
            if not self.sock:
                self._connect()
            self.mid = mid = (self.mid + 1) & 0xFFFF
            token = os.urandom(4)
            if observe:
                self.observing[bytes(token)] = observe
            msg = _message(code, mid, token, path, payload, fmt, query, observe)
            sock = self.sock
            wait = self.ack_ms + self.ack_ms * os.urandom(1)[0] // 510
            sent = 1
            acked = False
            sock.send(msg)
            now = time.ticks_ms()
            # The whole exchange, retransmissions and a separate response included, ends by cfg.timeout: whatever
            # arrives (duplicate empty ACKs, stray datagrams) does not extend it.
            end = time.ticks_add(now, int(cfg.timeout * 1000))
            at = time.ticks_add(now, wait)  # the next retransmission, once nothing is waiting to be read
            while True:
                now = time.ticks_ms()
                left = time.ticks_diff(end, now)
                if left <= 0:
                    raise NoAnswer("no %s in %s s" % ("separate response" if acked else "answer", cfg.timeout))
                if not acked:
                    left = max(0, min(left, time.ticks_diff(at, now)))
                if not self.poller.poll(left):
                    # Nothing came: retransmit when due, each time after twice the last wait (RFC 7252 4.2).
                    now = time.ticks_ms()
                    if acked or time.ticks_diff(at, now) > 0 or time.ticks_diff(end, now) <= 0:
                        continue  # not due yet, or the exchange is over (a poll that overslept)
                    if sent > _MAX_RETRANSMIT:
                        raise NoAnswer("no answer after %d transmissions" % sent)
                    sent += 1
                    wait *= 2
                    sock.send(msg)
                    at = time.ticks_add(now, wait)
                    continue
                # recv, not readinto: a stream readinto joins the datagrams that are waiting into one buffer.
                try:
                    data = sock.recv(rx)
                except OSError as e:
                    if e.errno == 11:
                        continue
                    raise
                answer = self._answer(data, mid, token)
                if answer is None:
                    continue
                if answer[0] or observe:
                    return answer
                # The empty ACK: the response follows separately, retransmission stops.
                acked = True
        except NoAnswer:
            raise
        except OSError as e:
            # 111: an ICMP port unreachable came back, nobody listens there. A new socket next time (the path
            # stays: the link is still open).
            self._drop_socket()
            raise NoAnswer("CoAP to %s:%d failed: %s" % (cfg.host, cfg.port, e))

    def _connect(self):
        # The socket to the server and its poller, both kept until _drop_socket.
        addr = socket.getaddrinfo(self.cfg.host, self.cfg.port, 0, socket.SOCK_DGRAM)[0]
        self.sock = socket.socket(addr[0], socket.SOCK_DGRAM)
        self.sock.connect(addr[-1])
        # Non-blocking: a readiness that turns out empty gives EAGAIN, never a wait without deadline.
        self.sock.setblocking(False)
        # One poller per socket, made before any message's buffers: a poller per wait is garbage for every
        # message, and a long-lived object made among a message's buffers splits the free heap.
        self.poller = select.poll()
        self.poller.register(self.sock, select.POLLIN)

    def _answer(self, data, mid, token):
        # Takes one datagram read while message mid (with token) waits for its answer. Returns that answer (code,
        # payload), (0, b"") for its empty ACK, or None for anything else: a late answer or garbage (ignored), a
        # duplicate (acknowledged again), a notification (taken by _notified), a stranger's CON (reset).
        parsed = _parse(data)
        if parsed is None:
            return None
        kind, c, m, tok, body = parsed
        if kind > 1:
            # ACK or RST, matched by message id: another id is a late answer to an earlier request.
            if m != mid:
                return None
            if kind == 3:
                raise NoAnswer("the server reset the request")
            if c == 0 or tok == token:  # the empty ACK, or the response piggybacked on the ACK
                return c, body
            return None
        # CON or NON: a separate response, matched by token, or a notification of an observation.
        if kind == 0 and m in self.seen:
            self.sock.send(bytes((0x60, 0, data[2], data[3])))  # our ACK was lost: ACK again, do not process
            return None
        if tok != token and self._notified(kind, c, m, tok, body):
            return None
        if tok != token or c < 64:
            if kind == 0:
                self.sock.send(bytes((0x70, 0, data[2], data[3])))  # not ours, or a ping: reset
            return None
        if kind == 0:
            self.sock.send(bytes((0x60, 0, data[2], data[3])))
        self.seen.append(m)
        if len(self.seen) > _SEEN:
            self.seen.pop(0)
        return c, body
