# A whole HTTP request, made of via_http's two halves as a Link makes its own: the firmware has no such function
# (only a Link makes requests there), the tests of the HTTP client use it.
from tbfleet import tcp, via_http


def request(method, host, port, path, body=None, ssl_ctx=None, timeout_ms=10000, buf=None, limit=8192):
    # (status, body bytes) of the final answer to method path (body: JSON bytes, or None) at host:port: one deadline
    # of timeout_ms for connecting and sending, another for the answer.
    buf = buf or bytearray(256)
    sock = via_http.send(method, path, body, (host, port, ssl_ctx, timeout_ms, buf, ""))
    return via_http.answer(sock, tcp.deadline(timeout_ms), buf, limit)
