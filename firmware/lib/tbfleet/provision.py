# ThingsBoard device provisioning, independent of the transport: the request for each credentials type, and the
# answer turned into an outcome the application can act on.
import json


def _cert(cfg):
    # One-line base64 of the DER certificate: how ThingsBoard stores and returns X.509 credentials.
    import binascii

    with open(cfg.cert_file, "rb") as f:
        return binascii.b2a_base64(f.read()).strip().decode()


def request(cfg):
    req = {
        "deviceName": cfg.device_name,
        "provisionDeviceKey": cfg.provision_key,
        "provisionDeviceSecret": cfg.provision_secret,
    }
    ctype = cfg.credentials_type
    if ctype:
        req["credentialsType"] = ctype
    if ctype == "ACCESS_TOKEN":
        req["token"] = cfg.token
    elif ctype == "MQTT_BASIC":
        for key, value in (("clientId", cfg.client_id), ("username", cfg.username), ("password", cfg.password)):
            if value:
                req[key] = value
    elif ctype == "X509_CERTIFICATE":
        # The certificate as PEM text: what ThingsBoard expects in "hash" (it trims the markers and newlines itself).
        b64 = _cert(cfg)
        pem = "-----BEGIN CERTIFICATE-----\n"
        for i in range(0, len(b64), 64):
            pem += b64[i : i + 64] + "\n"
        req["hash"] = pem + "-----END CERTIFICATE-----\n"
    return json.dumps(req).encode()


def outcome(body, cfg, error=None):
    # (status, creds, message) of one provisioning exchange, whichever way it ended: body is the answer, or error
    # the NoAnswer or BadAnswer the link raised instead. status is the server's: SUCCESS (creds: the record to
    # save), NOT_FOUND (wrong key or secret, or provisioning disabled on the profile), FAILURE (device exists
    # already, pre-provisioned device missing or already provisioned, bad credentials, or credentials this board
    # cannot use; creds: those config.json gives, if any, as the device may have them already); or NO_ANSWER, or
    # BAD_ANSWER (what came back is no provisioning answer). (The exchange itself is app's, so that this module is
    # not in RAM together with the transport.)
    ctype = cfg.credentials_type
    own = None
    if ctype:
        own = {"type": ctype}
        for name in {"ACCESS_TOKEN": "token", "MQTT_BASIC": "client_id username password"}.get(ctype, "").split():
            own[name] = getattr(cfg, name) or ""
    if error is not None:
        from tbfleet import NoAnswer

        return "NO_ANSWER" if isinstance(error, NoAnswer) else "BAD_ANSWER", None, str(error)
    try:
        answer = json.loads(body)
    except (ValueError, MemoryError):  # invalid UTF-8 too; MemoryError: nested too deep for the heap
        answer = None
    status = answer.get("status", answer.get("provisionDeviceStatus")) if type(answer) is dict else None
    if status == "NOT_FOUND":
        return status, None, answer.get("errorMsg") or ""
    if status == "FAILURE":
        return status, own, answer.get("errorMsg") or ""
    if status != "SUCCESS":
        return "BAD_ANSWER", None, "not a provisioning answer"
    # Legacy servers answer with credentialsId, and without credentialsType for a token.
    kind = answer.get("credentialsType", "ACCESS_TOKEN")
    value = answer.get("credentialsValue", answer.get("credentialsId"))
    creds = {"type": kind}
    # Credentials this board cannot use: MQTT_BASIC over HTTP or CoAP, X.509 without a cert_file, other types.
    unusable = "the server issued %s credentials, unusable with this config" % kind
    if kind == "ACCESS_TOKEN":
        if type(value) is not str or not value:
            return "BAD_ANSWER", None, "SUCCESS without %s credentials" % kind
        creds["token"] = value
    elif kind == "MQTT_BASIC":
        if type(value) is str:
            try:
                value = json.loads(value)
            except ValueError:
                pass
        if type(value) is not dict:
            return "BAD_ANSWER", None, "SUCCESS without %s credentials" % kind
        if cfg.transport != "mqtt":
            return "FAILURE", own, unusable
        # Kept as the server gave them, but null as "" (a pre-provisioned device may have null parts).
        creds["client_id"] = value.get("clientId") or ""
        creds["username"] = value.get("userName", value.get("username")) or ""
        creds["password"] = value.get("password") or ""
    elif kind != "X509_CERTIFICATE" or not cfg.cert_file:
        return "FAILURE", own, unusable
    elif value is not None and value != _cert(cfg):
        return "FAILURE", own, "the server holds another certificate"
    return "SUCCESS", creds, ""
