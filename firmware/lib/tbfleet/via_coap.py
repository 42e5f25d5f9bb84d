# ThingsBoard's device API over CoAP (UDP 5683): provisioning and telemetry, confirmable POSTs.
from micropython import const

from tbfleet import coap
from tbfleet.errors import BadAnswer, Refused, Rejected

_PROVISION = ("api", "v1", "provision")
_BAD_REQUEST = const(128)  # 4.00
_UNAUTHORIZED = const(129)  # 4.01


def _short(body):
    # The first words of a server's error body, for a log line.
    try:
        return body[:60].decode().strip()
    except UnicodeError:
        return "%d bytes" % len(body)


def _num(code):
    # 4.01 -> 401, the way people write CoAP codes
    return (code >> 5) * 100 + (code & 31)


class Link:
    def __init__(self, cfg):
        if cfg.tls:
            raise ValueError("CoAP over DTLS is not supported: set tls off for the coap transport")
        self._cfg = cfg
        self._client = None
        self._path = None

    def _post(self, path, body):
        if self._client is None:
            cfg = self._cfg
            self._client = coap.Client(cfg.host, cfg.port, int(cfg.timeout * 1000))
        return self._client.request(coap.POST, path, body, content_format=coap.JSON)

    def provision(self, request):
        code, body = self._post(_PROVISION, request)
        # 2.01 on SUCCESS and 4.00 with the JSON body on NOT_FOUND/FAILURE; servers before 3.2.2 answer 2.05.
        if code == coap.CREATED or code == coap.CONTENT or (code == _BAD_REQUEST and body):
            return body
        raise BadAnswer("provisioning answered CoAP %s: %s" % (coap.code_str(code), _short(body)))

    def open(self, creds):
        kind = creds.get("type")
        if kind != "ACCESS_TOKEN":
            raise ValueError("CoAP telemetry needs ACCESS_TOKEN credentials, not %s" % kind)
        if not creds.get("token"):
            raise ValueError("ACCESS_TOKEN credentials without a token")
        # Uri-Path options carry raw segments: the token needs no escaping
        self._path = ("api", "v1", creds["token"], "telemetry")

    def send_telemetry(self, payload):
        if self._path is None:
            raise ValueError("send_telemetry before open")
        code, body = self._post(self._path, payload)
        # 2.01 today; 2.03 (3.2, 3.2.1) and 2.04 from older servers
        if code == coap.CREATED or code == coap.VALID or code == coap.CHANGED:
            return
        if code == _UNAUTHORIZED:
            raise Refused(401, "unauthorized")
        raise Rejected(_num(code), _short(body) or coap.code_str(code))

    def close(self):
        self._path = None
        if self._client is not None:
            self._client.close()
            self._client = None
