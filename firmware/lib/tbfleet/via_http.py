# ThingsBoard's device API over HTTP(S): provisioning and telemetry, one connection per request.
from tbfleet import errors, http


class Link:
    def __init__(self, cfg):
        self.cfg = cfg
        self.path = None
        self.buf = bytearray(256)  # every request is sent and read through it: one per request splits the free heap
        self.ctx = None
        if cfg.tls:
            from tbfleet import tls  # only a board configured for TLS spends RAM on it

            self.ctx = tls.context(cfg)

    def provision(self, request):
        cfg = self.cfg
        status, body = http.request("POST", cfg.host, cfg.port, "/api/v1/provision", request, self.ctx,
                                    int(cfg.timeout * 1000), self.buf)
        # ThingsBoard answers 200 for SUCCESS, NOT_FOUND and FAILURE alike: the caller reads "status".
        if status != 200:
            raise errors.BadAnswer("provisioning got HTTP %d: %r" % (status, body[:60]))
        return body

    def open(self, creds):
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
        self.path = path + "/telemetry"

    def send_telemetry(self, payload):
        if self.path is None:
            raise ValueError("HTTP needs a token; %s has none" % "the link")  # open was not called
        cfg = self.cfg
        status, body = http.request("POST", cfg.host, cfg.port, self.path, payload, self.ctx,
                                    int(cfg.timeout * 1000), self.buf)
        if status == 401:
            raise errors.Refused(401, "unauthorized")
        if status != 200:
            # 413 over the server's size limit, 500 for a payload it cannot parse: the server's own words say which
            try:
                text = body[:60].decode().strip()
            except UnicodeError:
                text = ""
            raise errors.Rejected(status, text or "HTTP %d" % status)

    def close(self):
        self.path = None
