# ThingsBoard device provisioning, independent of the transport: the request for each credentials type, and the
# answer turned into a typed outcome the application can act on.
import json

from tbfleet.errors import BadAnswer, NoAnswer

SUCCESS = "SUCCESS"
NOT_FOUND = "NOT_FOUND"  # wrong key or secret, or provisioning disabled on the profile
FAILURE = "FAILURE"  # device exists already, pre-provisioned device missing or already provisioned, bad credentials
NO_ANSWER = "NO_ANSWER"
BAD_ANSWER = "BAD_ANSWER"


class Outcome:
    def __init__(self, status, creds=None, message=""):
        self.status = status
        self.creds = creds  # the credentials record on SUCCESS
        self.message = message

    def __repr__(self):
        return "Outcome(%s, %s)" % (self.status, self.message)


def cert_b64(cert_file):
    # One-line base64 of the DER certificate: how ThingsBoard stores and returns X.509 credentials.
    import binascii

    with open(cert_file, "rb") as f:
        return binascii.b2a_base64(f.read()).strip().decode()


def cert_pem(cert_file):
    # The certificate as PEM text: what ThingsBoard expects in "hash" (it trims the markers and newlines itself).
    b64 = cert_b64(cert_file)
    lines = ["-----BEGIN CERTIFICATE-----"]
    for i in range(0, len(b64), 64):
        lines.append(b64[i : i + 64])
    lines.append("-----END CERTIFICATE-----")
    return "\n".join(lines) + "\n"


def request(cfg):
    req = {
        "deviceName": cfg.device_name,
        "provisionDeviceKey": cfg.provision_key,
        "provisionDeviceSecret": cfg.provision_secret,
    }
    ctype = cfg.credentials_type
    if ctype == "ACCESS_TOKEN":
        req["credentialsType"] = ctype
        req["token"] = cfg.token
    elif ctype == "MQTT_BASIC":
        req["credentialsType"] = ctype
        for key, value in (("clientId", cfg.client_id), ("username", cfg.username), ("password", cfg.password)):
            if value:
                req[key] = value
    elif ctype == "X509_CERTIFICATE":
        req["credentialsType"] = ctype
        req["hash"] = cert_pem(cfg.cert_file)
    return json.dumps(req).encode()


def _text(value):
    return "" if value is None else value


def _credentials(answer, cfg):
    # The record to save, or an Outcome(FAILURE) when the server issued credentials this board cannot use.
    ctype = answer.get("credentialsType", "ACCESS_TOKEN")
    value = answer.get("credentialsValue", answer.get("credentialsId"))
    if ctype == "ACCESS_TOKEN":
        if not isinstance(value, str) or not value:
            raise BadAnswer("SUCCESS without an access token")
        return {"type": ctype, "token": value}
    if ctype == "MQTT_BASIC":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise BadAnswer("MQTT_BASIC credentials are not a JSON object")
        if not isinstance(value, dict):
            raise BadAnswer("MQTT_BASIC credentials are not a JSON object")
        if cfg.transport != "mqtt":
            return Outcome(FAILURE, None, "the server issued MQTT_BASIC credentials, usable only over MQTT")
        return {
            "type": ctype,
            "client_id": _text(value.get("clientId")),
            "username": _text(value.get("userName", value.get("username"))),
            "password": _text(value.get("password")),
        }
    if ctype == "X509_CERTIFICATE":
        if not cfg.cert_file or cfg.transport != "mqtt":
            return Outcome(FAILURE, None, "the server holds an X.509 certificate for this device; "
                           "configure cert_file and key_file with transport mqtt and tls")
        if value is not None and value != cert_b64(cfg.cert_file):
            return Outcome(FAILURE, None, "the server holds another certificate for this device")
        return {"type": ctype}
    return Outcome(FAILURE, None, "the server issued %s credentials, which this firmware cannot use" % ctype)


def parse(body, cfg):
    # Outcome for the server's answer; BadAnswer when it is not a provisioning answer at all.
    try:
        answer = json.loads(body)
    except ValueError:
        raise BadAnswer("provisioning answer is not JSON")
    if not isinstance(answer, dict):
        raise BadAnswer("provisioning answer is not a JSON object")
    status = answer.get("status", answer.get("provisionDeviceStatus"))
    if status == SUCCESS:
        creds = _credentials(answer, cfg)
        if isinstance(creds, Outcome):
            return creds
        return Outcome(SUCCESS, creds)
    if status in (NOT_FOUND, FAILURE):
        return Outcome(status, None, _text(answer.get("errorMsg")))
    raise BadAnswer("provisioning answer has no known status")


def outcome(body, cfg, error=None):
    # The Outcome of one provisioning exchange, whichever way it ended: body is the answer, or error the NoAnswer or
    # BadAnswer the link raised instead. (The exchange itself is onboard's, so that this module is not in RAM
    # together with the transport.)
    if error is not None:
        return Outcome(NO_ANSWER if isinstance(error, NoAnswer) else BAD_ANSWER, None, str(error))
    try:
        return parse(body, cfg)
    except BadAnswer as e:
        return Outcome(BAD_ANSWER, None, str(e))
