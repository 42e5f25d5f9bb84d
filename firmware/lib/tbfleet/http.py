# A compact HTTP/1.1 client: one request per connection (Connection: close), TLS through an ssl.SSLContext,
# and one deadline that bounds every wait of the exchange (the frozen requests module has neither).
from micropython import const

from tbfleet import tcp
from tbfleet.errors import BadAnswer, NoAnswer

MAX_BODY = const(8192)  # larger answers are refused: a provisioning answer with a certificate fits well inside
_LINE_MAX = const(512)  # status line, header line or chunk-size line
_HEAD_MAX = const(4096)  # all header lines together
RX = const(256)  # the default read buffer


class _Reader:
    # Buffered reads from the socket into one reused buffer, each bounded by the exchange's deadline.
    def __init__(self, sock, at, buf):
        self.sock = sock
        self.at = at
        self.buf = buf
        self.mv = memoryview(self.buf)
        self.i = 0
        self.n = 0

    def fill(self):
        # Returns the number of bytes now buffered; 0 at end of stream.
        self.i = 0
        self.n = tcp.read_some(self.sock, self.mv, self.at, True)
        return self.n

    def line(self):
        # One CRLF-terminated line without its CRLF (a bare LF is tolerated).
        out = bytearray()
        while True:
            if self.i == self.n and not self.fill():
                raise NoAnswer("connection closed inside the response head")
            j = self.buf.find(b"\n", self.i, self.n)
            end = self.n if j < 0 else j
            out += self.mv[self.i:end]
            self.i = end if j < 0 else j + 1
            if len(out) > _LINE_MAX:
                raise BadAnswer("HTTP line longer than %d bytes" % _LINE_MAX)
            if j >= 0:
                return out[:-1] if out[-1:] == b"\r" else out

    def take(self, size, out):
        # Append exactly size bytes to out.
        while size:
            if self.i == self.n and not self.fill():
                raise NoAnswer("connection closed inside the body")
            k = min(size, self.n - self.i)
            out += self.mv[self.i:self.i + k]
            self.i += k
            size -= k

    def rest(self, out, limit):
        # Append everything up to the end of the stream (a body framed by the close).
        while True:
            if self.i < self.n:
                out += self.mv[self.i:self.n]
                self.i = self.n
                if len(out) > limit:
                    raise BadAnswer("HTTP body larger than %d bytes" % limit)
            if not self.fill():
                return


def encode(method, host, port, path, body=None, tls=False):
    # The whole request (head and body) as one bytes object, so that it leaves in one write.
    for s in (method, host, path):
        if not s or " " in s or "\r" in s or "\n" in s:
            raise ValueError("bad HTTP request field %r" % s)
    if port != (443 if tls else 80):
        host = "%s:%d" % (host, port)
    head = "%s %s HTTP/1.1\r\nHost: %s\r\n" % (method, path, host)
    if body is not None:
        head += "Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
    head += "Connection: close\r\n\r\n"
    return head.encode() + body if body else head.encode()


def _status(line):
    # "HTTP/1.1 200 OK" -> 200
    if line[:7] != b"HTTP/1." or len(line) < 12 or line[8:9] != b" " or line[12:13] not in (b"", b" "):
        raise BadAnswer("not an HTTP status line: %r" % bytes(line[:40]))
    code = line[9:12]
    if not all(48 <= c <= 57 for c in code):
        raise BadAnswer("not an HTTP status code: %r" % bytes(code))
    return int(code)


def _head(r):
    # Status code, Content-Length (None when absent) and whether the body is chunked; 1xx answers are skipped.
    while True:
        status = _status(r.line())
        length = None
        chunked = False
        total = 0
        while True:
            h = r.line()
            if not h:
                break
            total += len(h)
            if total > _HEAD_MAX:
                raise BadAnswer("HTTP header larger than %d bytes" % _HEAD_MAX)
            c = h.find(b":")
            if c <= 0:
                raise BadAnswer("bad HTTP header line: %r" % bytes(h[:40]))
            name = bytes(h[:c]).lower()
            value = bytes(h[c + 1:]).strip()
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = -1
                if length < 0:
                    raise BadAnswer("bad Content-Length: %r" % value)
            elif name == b"transfer-encoding":
                chunked = value.lower().endswith(b"chunked")
        if status >= 200:
            return status, length, chunked


def _chunks(r, out, limit):
    while True:
        line = r.line()
        semi = line.find(b";")  # chunk extensions are ignored
        try:
            size = int(bytes(line if semi < 0 else line[:semi]).strip(), 16)
        except ValueError:
            raise BadAnswer("bad chunk size line: %r" % bytes(line[:40]))
        if size < 0 or len(out) + size > limit:
            raise BadAnswer("HTTP body larger than %d bytes" % limit)
        if size == 0:
            while r.line():  # trailer fields, up to the empty line
                pass
            return
        r.take(size, out)
        if r.line():
            raise BadAnswer("chunk not followed by CRLF")


def exchange(sock, request, at, limit=MAX_BODY, head_only=False, buf=None):
    # Send the encoded request in one write and read the answer; returns (status, body bytes). buf: a bytearray
    # to read through (a caller making many requests passes the same one; default a new one of 256 bytes).
    tcp.write_all(sock, request, at)
    r = _Reader(sock, at, buf or bytearray(RX))
    status, length, chunked = _head(r)
    out = bytearray()
    if head_only or status in (204, 304):
        pass
    elif chunked:
        _chunks(r, out, limit)
    elif length is not None:
        if length > limit:
            raise BadAnswer("HTTP body of %d bytes, larger than %d" % (length, limit))
        r.take(length, out)
    else:
        r.rest(out, limit)
    return status, bytes(out)


def request(method, host, port, path, body=None, ssl_ctx=None, timeout_ms=10000, limit=MAX_BODY, buf=None):
    # Connect (bounded by timeout_ms), then one deadline of timeout_ms for sending and the whole answer.
    req = encode(method, host, port, path, body, ssl_ctx is not None)
    sock = tcp.connect(host, port, timeout_ms, ssl_ctx)
    try:
        return exchange(sock, req, tcp.deadline(timeout_ms), limit, method == "HEAD", buf)
    finally:
        sock.close()
