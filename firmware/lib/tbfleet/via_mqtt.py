# ThingsBoard over MQTT: the provisioning session and the authenticated telemetry session.
# Link is the MQTT client itself (one object, one class less in RAM); poll and close are the client's.
from tbfleet import mqtt, tcp
from tbfleet.errors import NoAnswer, Refused

# Topics and the provisioning user name are literals where they are used: a module-level name for each would be
# one more interned string for good.


class Link(mqtt.MQTTClient):
    def provision(self, request):
        # Pre-3.9 servers never answer a SUBSCRIBE in a provisioning session, and every version publishes
        # the answer unasked, so we only publish and then read whatever comes until the answer is there.
        cfg = self.cfg
        self._answer = None
        try:
            try:
                self.connect(cfg.device_name, "provision")
            except Refused as e:
                # ThingsBoard accepts every provisioning session; a refusal means it cannot serve us now.
                raise NoAnswer(e.args[1])
            at = tcp.deadline(cfg.timeout * 1000)
            self.publish("/provision/request", request, 1)
            while self._answer is None:
                self.wait(at)
            return self._answer
        finally:
            self.close()

    def on_message(self, topic, payload):
        # Only the provisioning answer matters; pushes (shared attributes, RPC) in the device's own session are
        # acknowledged by the client and dropped.
        if topic == b"/provision/response":
            self._answer = payload

    def open(self, creds):
        # Connects with saved credentials; Refused when the server refuses them. (config refuses the device name
        # "provision", which would open a provisioning session instead.)
        kind = creds.get("type")
        name = self.cfg.device_name
        if kind == "MQTT_BASIC":
            # Empty means absent: ThingsBoard picks its lookup by which fields are present (reference 3.4).
            self.connect(creds.get("client_id") or "", creds.get("username") or None,
                         creds.get("password") or None)
        elif kind == "ACCESS_TOKEN":
            self.connect(name, creds["token"])
        elif kind == "X509_CERTIFICATE" and self.cfg.tls:
            self.connect(name, None, None, True)
        else:
            # An unknown type, or X509_CERTIFICATE without TLS: config refuses that pair, but credentials saved
            # under an earlier config may meet it.
            raise ValueError("can't use credentials type %r" % (kind,))

    def send_telemetry(self, payload):
        # ThingsBoard answers a rejected publish (unparsable payload, rate limit, size limit) by closing
        # the connection instead of sending a PUBACK: the client's Rejected, so the caller can drop this
        # message; a missing answer is NoAnswer. Either way the link is closed and the caller opens it again.
        try:
            self.poll()  # a connection the server already closed is NoAnswer here, before we blame this message
            self.publish("v1/devices/me/telemetry", payload, self.cfg.qos)
        except Exception:
            self.close()
            raise
