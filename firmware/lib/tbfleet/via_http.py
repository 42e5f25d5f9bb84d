# ThingsBoard's device API over HTTP(S): provisioning and telemetry, one connection per request.
from tbfleet import http
from tbfleet.errors import BadAnswer, Refused, Rejected

_SAFE = b"-._~"


def quote(s):
    # Percent-encode everything but RFC 3986 unreserved characters, so a token is always one path segment.
    out = []
    for c in s.encode():
        if 48 <= c <= 57 or 65 <= c <= 90 or 97 <= c <= 122 or c in _SAFE:
            out.append(chr(c))
        else:
            out.append("%%%02X" % c)
    return "".join(out)


def short(body):
    # The first words of a server's error body, for a log line.
    try:
        return body[:60].decode().strip()
    except UnicodeError:
        return "%d bytes" % len(body)


class Link:
    def __init__(self, cfg):
        self._cfg = cfg
        self._ctx = None
        self._path = None
        self._rx = bytearray(http.RX)  # every request reads through it: a buffer per request splits the free heap

    def _post(self, path, body):
        cfg = self._cfg
        if cfg.tls and self._ctx is None:
            from tbfleet import tls  # only a board configured for TLS spends RAM on it

            self._ctx = tls.context(cfg)
        return http.request("POST", cfg.host, cfg.port, path, body, self._ctx, int(cfg.timeout * 1000),
                            http.MAX_BODY, self._rx)

    def provision(self, request):
        # ThingsBoard answers 200 for SUCCESS, NOT_FOUND and FAILURE alike: the caller reads "status".
        status, body = self._post("/api/v1/provision", request)
        if status != 200:
            raise BadAnswer("provisioning answered HTTP %d: %s" % (status, short(body)))
        return body

    def open(self, creds):
        kind = creds.get("type")
        if kind != "ACCESS_TOKEN":
            raise ValueError("HTTP telemetry needs ACCESS_TOKEN credentials, not %s" % kind)
        if not creds.get("token"):
            raise ValueError("ACCESS_TOKEN credentials without a token")
        self._path = "/api/v1/%s/telemetry" % quote(creds["token"])

    def send_telemetry(self, payload):
        if self._path is None:
            raise ValueError("send_telemetry before open")
        status, body = self._post(self._path, payload)
        if status == 200:
            return
        if status == 401:
            raise Refused(401, "unauthorized")
        if status == 413:
            raise Rejected(413, "payload too large")
        if status == 500:
            raise Rejected(500, short(body) or "server error")
        raise Rejected(status, "HTTP %d" % status)

    def close(self):
        self._path = None
