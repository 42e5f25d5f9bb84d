# ThingsBoard over MQTT: the provisioning session and the authenticated telemetry session.
from tbfleet import mqtt, tcp
from tbfleet.errors import NoAnswer, Refused, Rejected

# Topics and the provisioning user name are literals where they are used: a module-level name for each would be
# one more interned string for good.


class Link:
    def __init__(self, cfg):
        self._cfg = cfg
        self._client = None
        self._answer = None

    def _new_client(self, client_id, username, password=None, on_message=None, client_cert=False):
        # Without on_message, pushes (shared attributes, RPC) are consumed and acknowledged, not acted on.
        cfg = self._cfg
        ssl_ctx = None
        if cfg.tls:
            from tbfleet import tls  # only a board configured for TLS spends RAM on it

            ssl_ctx = tls.context(cfg, client_cert)
        elif client_cert:
            raise ValueError("X509_CERTIFICATE needs tls")
        return mqtt.MQTTClient(cfg.host, cfg.port, client_id, username, password, cfg.keepalive,
                               int(cfg.timeout * 1000), ssl_ctx, on_message)

    def provision(self, request):
        # Pre-3.9 servers never answer a SUBSCRIBE in a provisioning session, and every version publishes
        # the answer unasked, so we only publish and then read whatever comes until the answer is there.
        cfg = self._cfg
        self._answer = None
        c = self._new_client(cfg.device_name, "provision", None, self._on_provision)
        try:
            try:
                c.connect()
            except Refused as e:
                # ThingsBoard accepts every provisioning session; a refusal means it cannot serve us now.
                raise NoAnswer("provisioning refused: %s" % e.args[1])
            at = tcp.deadline(cfg.timeout * 1000)
            c.publish(b"/provision/request", request, 1)
            while self._answer is None:
                c.wait_msg(at)
            return self._answer
        finally:
            c.disconnect()

    def _on_provision(self, topic, payload):
        if topic == b"/provision/response":
            self._answer = payload

    def open(self, creds):
        # Connects with saved credentials; Refused when the server refuses them.
        cfg = self._cfg
        self.close()
        kind = creds.get("type")
        name = cfg.device_name
        if kind == "MQTT_BASIC":
            # Empty means absent: ThingsBoard picks its lookup by which fields are present (reference 3.4).
            c = self._new_client(creds.get("client_id") or "", creds.get("username") or None,
                                 creds.get("password") or None)
        elif name == "provision":
            raise ValueError("device_name 'provision' opens a provisioning session")
        elif kind == "ACCESS_TOKEN":
            c = self._new_client(name, creds["token"])
        elif kind == "X509_CERTIFICATE":
            c = self._new_client(name, None, client_cert=True)
        else:
            raise ValueError("unknown credentials type %r" % (kind,))
        c.connect()
        self._client = c

    def _live(self):
        c = self._client
        if c is None or c.sock is None:
            raise NoAnswer("not connected")
        return c

    def send_telemetry(self, payload):
        # ThingsBoard answers a rejected publish (unparsable payload, rate limit, size limit) by closing
        # the connection instead of sending a PUBACK: a close while we wait for the PUBACK is Rejected, so
        # the caller can drop this message; a missing answer is NoAnswer. Either way the link is closed
        # and the caller opens it again.
        c = self._live()
        try:
            c.poll()  # a connection the server already closed is NoAnswer here, before we blame this message
            try:
                c.publish(b"v1/devices/me/telemetry", payload, self._cfg.qos)
            except mqtt.Closed:
                if self._cfg.qos:
                    raise Rejected(None, "closed instead of PUBACK")
                raise
        except Exception:
            self.close()
            raise

    def poll(self):
        # Handles incoming packets and keep-alive between sends.
        self._live().poll()

    def close(self):
        if self._client is not None:
            self._client.disconnect()
            self._client = None
