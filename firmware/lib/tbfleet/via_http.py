# ThingsBoard's device API over HTTP(S): provisioning and telemetry, with the firmware's own compact HTTP/1.1 client:
# one request per connection (Connection: close), TLS through an ssl.SSLContext, and one deadline that bounds every
# wait of the exchange (the frozen requests module has neither). Client and adapter are one module, and a request is
# two functions (send, answer): on a board every module, class and function costs heap, a long function does not.
import select
import time

from micropython import const

from tbfleet import BadAnswer, Refused, Rejected, tcp

_MAX_BODY = const(8192)  # larger answers are refused: a provisioning answer with a certificate fits well inside
_POLL_MS = const(20000)  # how long the server holds a long poll of RPC or attribute updates before 408
_LINE_MAX = const(512)  # status line, header line or chunk-size line: what the parser holds at most
# What the parser of the answer waits for next: a line (the status line, a header, a chunk's size, the empty line
# after a chunk's data, a trailer) or bytes (a chunk's data; a body framed by Content-Length or by the close).
_STATUS = const(0)
_HEADER = const(1)
_SIZE = const(2)
_CRLF = const(3)
_TRAILER = const(4)
_CHUNK = const(5)
_BODY = const(6)


def send(method, path, body, to):
    # The first half of a request: connects and sends method path (body: JSON bytes, or None for none); returns the
    # socket the answer comes on (answer, the second half). to: (host, port, ssl_ctx, timeout_ms, buf, base).
    # timeout_ms bounds connecting, the TLS handshake and sending. buf: a bytearray that the request is written
    # (when it fits) and the answer read through; a caller making many requests passes the same one, as a buffer
    # per request splits the free heap. base: the path's beginning, made safe by its maker (an open Link's is its
    # token's), which is not joined to each path: the head takes both (bench: HTTP application lifecycle 0.25 KB
    # less in some runs). The firmware has no whole-request function: only a Link makes requests, and each
    # function costs heap while the module is loaded (HTTP application lifecycle 0.3 KB).
    host, port, ssl_ctx, timeout_ms, buf, base = to
    for s in (method, host, path):
        if not s or " " in s or "\r" in s or "\n" in s:
            raise ValueError("bad HTTP %s: %r" % ("request", s))
    # MicroPython's bytes formatting takes str. The head is made in two parts, neither as large as a whole head.
    head = b"%s %s%s HTTP/1.1\r\nHost: %s%s\r\n" % (
        method, base, path, host, "" if port == (80 if ssl_ctx is None else 443) else ":%d" % port)
    tail = b"Connection: close\r\n\r\n" if body is None else (
        b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
    body = body or bytes()  # not b"": a bytes constant is a heap object while the module is loaded
    n = len(head) + len(tail)
    # The request leaves in one write (Nagle's algorithm would hold back a second). It goes through buf when it
    # fits: a block as large as the whole request is the one a busy heap most often lacks.
    mv = memoryview(buf if n + len(body) <= len(buf) else bytearray(n + len(body)))
    mv[:len(head)] = head
    mv[len(head):n] = tail
    mv[n:n + len(body)] = body
    at = tcp.deadline(timeout_ms)
    sock = tcp.connect(host, port, timeout_ms, ssl_ctx)
    try:
        tcp.write_all(sock, mv[:n + len(body)], at)
    except Exception:
        sock.close()
        raise
    return sock


def answer(sock, at, buf, limit=_MAX_BODY):
    # The second half of a request: (status, body bytes) of the final answer on sock, read through buf before the
    # deadline at, however the server sends it; the socket is closed.
    mv = memoryview(buf)
    try:
        # The answer is parsed where it was read, in buf: each byte is copied out once, to the line or the body,
        # where a copy of all that followed each line took blocks of up to 180 bytes (bench: the application
        # lifecycle over HTTP needed 254 B less).
        start = end = 0  # buf[start:end]: read and not parsed yet
        raw = bytearray()  # the line being read, up to its LF
        body = bytearray()  # the body as it arrives (a chunked one decoded)
        state = _STATUS
        # Each set from the answer before its state reads it. left: what is still to come of the body, or of the
        # chunk being read; -1 for a body that ends with the stream.
        status = left = 0
        while True:
            if state == _BODY:
                if left > limit or left < 0 and len(body) > limit:
                    raise BadAnswer("HTTP %s larger than %d bytes" % ("body", limit))
                if not left:
                    return status, bytes(body)  # bytes past Content-Length are not ours
            if start == end:
                # Only a body framed by the close may end with the stream.
                end = tcp.read_some(sock, mv, at, state == _BODY and left < 0)
                if not end:
                    return status, bytes(body)
                start = 0
            if state == _BODY or state == _CHUNK:
                n = end - start if left < 0 else min(left, end - start)
                body += mv[start:start + n]
                start += n
                if left > 0:
                    left -= n
                if state == _CHUNK and not left:
                    state = _CRLF
            else:
                j = buf.find(10, start, end)  # LF
                n = end if j < 0 else j  # the end of what buf holds of the line
                if len(raw) + n - start > _LINE_MAX:
                    raise BadAnswer("HTTP %s larger than %d bytes" % ("line", _LINE_MAX))
                raw += mv[start:n]
                start = n
                if j >= 0:
                    start = j + 1
                    n = len(raw) - 1 if raw and raw[-1] == 13 else len(raw)  # CRLF, or a bare LF
                    try:
                        line = str(memoryview(raw)[:n], "utf-8")
                    except UnicodeError:
                        raise BadAnswer("bad HTTP %s: %r" % ("line", bytes(raw)))
                    raw[:] = bytes()  # emptied in place, its room kept for the next line
                    if state == _STATUS:
                        # "HTTP/1.1 200 OK" or "HTTP/1.1 200": the code ends the line or a space follows it
                        if (len(line) < 12 or line[:7] != "HTTP/1." or line[8] != " " or line[12:13] not in " "
                                or not line[9:12].isdigit()):
                            raise BadAnswer("bad HTTP %s: %r" % ("status", line))
                        status = int(line[9:12])
                        left = -1  # no Content-Length: the body ends with the stream
                        chunked = False
                        state = _HEADER
                    elif state == _HEADER:
                        if line:
                            n = line.find(":")
                            name = line[:n].lower()
                            value = line[n + 1:].strip()
                            if n <= 0 or name == "content-length" and not value.isdigit():
                                raise BadAnswer("bad HTTP %s: %r" % ("header", line))
                            if name == "content-length":
                                left = int(value)
                            elif name == "transfer-encoding":
                                chunked = value.lower().endswith("chunked")
                        elif status < 200:
                            state = _STATUS  # 1xx: the answer's head follows
                        elif status == 204:
                            return status, bytes()  # none
                        else:
                            state = _SIZE if chunked else _BODY
                    elif state == _SIZE:
                        try:
                            left = int(line.split(";")[0], 16)  # chunk extensions are ignored
                        except ValueError:
                            left = -1
                        if left < 0:
                            raise BadAnswer("bad HTTP %s: %r" % ("chunk", line))
                        if len(body) + left > limit:
                            raise BadAnswer("HTTP %s larger than %d bytes" % ("body", limit))
                        state = _CHUNK if left else _TRAILER
                    elif state == _CRLF:
                        if line:
                            raise BadAnswer("bad HTTP %s: %r" % ("chunk", line))
                        state = _SIZE
                    elif not line:  # the empty line after the trailer fields
                        return status, bytes(body)
    finally:
        sock.close()


class Link:
    def __init__(self, cfg):
        self.polls = []  # [socket, feature, deadline] of each long poll open
        self.poller = None  # made by listen: none while open runs its exchanges (bench: HTTP 137 B less)
        self.buf = bytearray(256)  # every request is sent and read through it: one per request splits the free heap
        ctx = None
        if cfg.tls:
            from tbfleet import tls  # only a board configured for TLS spends RAM on it

            ctx = tls.context(cfg)
        # Where each request goes, as send takes it: in one argument, so that exchange keeps within 11 slots and
        # its frame off the heap (bench: HTTP application lifecycle 0.15-0.3 KB less). Its base path (to[5]) is the
        # device's while the link is open, empty otherwise: open and close set it.
        self.ms = int(cfg.timeout * 1000)  # the time each network wait may take
        self.to = (cfg.host, cfg.port, ctx, self.ms, self.buf, "")

    def provision(self, payload):
        # On a link not open (the base path is empty then).
        sock = send("POST", "/api/v1/provision", payload, self.to)
        status, body = answer(sock, tcp.deadline(self.ms), self.buf)
        # ThingsBoard answers 200 for SUCCESS, NOT_FOUND and FAILURE alike: the caller reads "status".
        if status != 200:
            raise BadAnswer("HTTP %d: %r" % (status, body[:60]))
        return body

    def open(self, creds, burst):
        # Sends the client attributes and the first telemetry (burst: [hello, first], JSON bytes, taken out of the
        # list as they leave), and fetches the current shared attributes (an event "current" for tbfleet.Device).
        token = creds.get("token")  # only an ACCESS_TOKEN record has one
        if not token:
            raise ValueError("HTTP needs a token; %s has none" % creds.get("type"))
        # Percent-encode all but RFC 3986 unreserved characters, so that the token is always one path segment.
        path = "/api/v1/"
        for c in token.encode():
            if 48 <= c <= 57 or 65 <= c <= 90 or 97 <= c <= 122 or chr(c) in "-._~":
                path += chr(c)
            else:
                path += "%%%02X" % c
        self.to = self.to[:5] + (path,)
        self.events = []
        self.exchange("POST", "/attributes", burst.pop(0))
        self.send(burst.pop(0))
        # After the telemetry, which then leaves one request earlier (bench: 2 requests up to the first telemetry, not
        # 3), and the attributes are not held while it is sent.
        body = self.exchange("GET", "/attributes", None)
        self.events.append(("current", None, body))

    def exchange(self, method, feature, body):
        # The body of the answer to one request to feature of this device (after its path); Refused or Rejected
        # unless the server answered 200.
        if not self.to[5]:
            raise ValueError("HTTP link not opened")
        # send and answer, not request: one frame fewer on the heap under every exchange (bench: HTTP 0.5 KB). The
        # answer's deadline starts once send returned.
        status, body = answer(send(method, feature, body, self.to), tcp.deadline(self.ms), self.buf)
        self.check(status, body)
        return body

    def check(self, status, body):
        if status == 401:
            raise Refused(401, "unauthorized")
        if status != 200:
            # 413 over the server's size limit, 500 for a payload it cannot parse: the server's own words say which
            try:
                text = body[:60].decode().strip()
            except UnicodeError:
                text = ""
            raise Rejected(status, text or "HTTP %d" % status)

    def send(self, payload, rid=None):
        # Telemetry (JSON bytes), or with rid the reply to server-side RPC rid.
        self.exchange("POST", "/telemetry" if rid is None else "/rpc/%d" % rid, payload)

    def listen(self, ms):
        # Keeps a long poll open on rpc and one on attributes/updates (ThingsBoard answers each when something
        # comes for the device, 408 when the poll's timeout passed) and waits up to ms for either: a poll open while
        # the other answers keeps an RPC from waiting for an attribute poll. What they bring becomes an event.
        if not self.polls:
            self.poller = select.poll()
            self.poll("/rpc")
            self.poll("/attributes/updates")
        ready = self.poller.poll(ms)
        for poll in list(self.polls):
            sock, feature, at = poll
            due = time.ticks_diff(time.ticks_ms(), at) > 0
            readable = False
            for s, _ in ready:
                if s is sock:
                    readable = True
            if not (due or readable):
                continue
            self.polls.remove(poll)
            self.poller.unregister(sock)
            if not readable:
                sock.close()  # the server never answered: a connection lost without a word
            else:
                status, body = answer(sock, tcp.deadline(self.ms), self.buf)
                if status == 200:
                    self.events.append(("rpc" if feature == "/rpc" else "attributes", None, body))
                elif status != 408:  # 408: nothing came in time
                    self.check(status, body)
            self.poll(feature)

    def poll(self, feature):
        # Opens a long poll of feature, answered within _POLL_MS by the server.
        sock = send("GET", "%s?timeout=%d" % (feature, _POLL_MS), None, self.to)
        self.polls.append([sock, feature, tcp.deadline(_POLL_MS + self.ms)])
        self.poller.register(sock, select.POLLIN)

    def close(self):
        self.to = self.to[:5] + ("",)
        for sock, _, _ in self.polls:
            self.poller.unregister(sock)
            sock.close()
        self.polls = []
