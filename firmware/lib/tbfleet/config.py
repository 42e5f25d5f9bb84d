# The board's config.json, checked against one table of fields: a bad or missing field stops with one message
# naming it, and combinations the server cannot serve are refused with the reason.
import json

from micropython import const

# The sensors telemetry knows; host_tools.boards checks each board's list against it.
SENSORS = ("uptime", "free_heap", "heap_used", "rssi", "mcu_temp")
_MAX_TEXT = const(256)
# How the table in validate checks a field.
_REQUIRED = const(0)  # text that must be there
_TEXT = const(1)  # text
_FILE = const(2)  # text naming a file on the board
_INTEGER = const(3)  # an integer in a range
_NUMBER = const(4)  # a number in a range
_CHOICE = const(5)  # one of ... (of the same type)
_LIST = const(6)  # a list of SENSORS
_OBJECT = const(7)  # a JSON object, free-form: the user's own settings


class ConfigError(ValueError):
    # field: the config.json field at fault (None: the file as a whole); message: what is wrong with it.
    def __init__(self, field, message):
        super().__init__("config.json: %s: %s" % (field, message) if field else "config.json: " + message)
        self.field = field
        self.message = message


class Config:
    # One attribute per field of the table in validate, set there. Declared for lint's API check, which reads them as
    # cfg's fields; MicroPython ignores annotations without a value (they cost no RAM).
    host: str
    transport: str
    tls: bool
    port: int
    ca_file: str | None
    provision_key: str
    provision_secret: str
    device_name: str
    credentials_type: str | None
    token: str | None
    client_id: str | None
    username: str | None
    password: str | None
    cert_file: str | None
    key_file: str | None
    telemetry_interval: float
    qos: int
    timeout: float
    keepalive: int
    sensors: list
    wifi_ssid: str | None
    wifi_password: str | None
    log_level: str
    app: dict
    chosen: bool  # not a field: set by onboard once token (or the MQTT_BASIC triple) holds what the board chose


def validate(data):
    # A Config with every field set (null or "" leaves a field at its default; device_name expanded).
    if type(data) is not dict:
        raise ConfigError(None, "not a JSON object")
    # (name, default, kind, ...) in the order checked; kind is one of the numbers above, followed by what it takes:
    # for text or a file, optionally a field it is used only with (a password only with a username: the server
    # refuses a client id with a password alone); for a number the lowest and highest allowed; for a choice the
    # values allowed. Built here, not at module level: it takes RAM only while a config is checked.
    fields = (
        ("host", None, _REQUIRED),
        ("transport", "mqtt", _CHOICE, "mqtt", "http", "coap"),
        ("tls", False, _CHOICE, False, True),
        ("port", None, _INTEGER, 1, 65535),
        ("ca_file", None, _FILE, "tls"),
        ("provision_key", None, _REQUIRED),
        ("provision_secret", None, _REQUIRED),
        ("device_name", "esp32-{uid}", _REQUIRED),
        ("credentials_type", "ACCESS_TOKEN", _CHOICE, "ACCESS_TOKEN", "MQTT_BASIC", "X509_CERTIFICATE",
         "SERVER_GENERATED"),
        ("token", None, _TEXT),
        ("client_id", None, _TEXT),
        ("username", None, _TEXT),
        ("password", None, _TEXT, "username"),
        ("cert_file", None, _FILE),
        ("key_file", None, _FILE),
        ("telemetry_interval", 60, _NUMBER, 0, 604800),
        ("qos", 1, _INTEGER, 0, 1),
        ("timeout", 10, _NUMBER, 0.1, 300),
        ("keepalive", 60, _INTEGER, 0, 65535),
        ("sensors", ["uptime", "free_heap", "rssi", "mcu_temp"], _LIST),
        ("wifi_ssid", None, _TEXT),
        ("wifi_password", None, _TEXT, "wifi_ssid"),
        ("log_level", "info", _CHOICE, "debug", "info", "warn", "error"),
        ("app", {}, _OBJECT),
    )
    cfg = Config()
    cfg.chosen = False
    rest = dict(data)
    for name, default, *_ in fields:
        value = rest.pop(name, None)
        setattr(cfg, name, default if value is None or value == "" else value)
    # Any field left is one this firmware does not have: named before any other fault, as it is likely a typo.
    for name in rest:
        raise ConfigError(name, "unknown field")
    import os

    # The fields that belong to one credentials type.
    owners = {"token": "ACCESS_TOKEN", "client_id": "MQTT_BASIC", "username": "MQTT_BASIC", "password": "MQTT_BASIC",
              "cert_file": "X509_CERTIFICATE", "key_file": "X509_CERTIFICATE"}
    ctype = cfg.credentials_type
    for name, _, kind, *allowed in fields:
        value = getattr(cfg, name)
        if value is None:
            if kind == _REQUIRED:
                raise ConfigError(name, "is required")
        elif kind <= _FILE:
            if type(value) is not str or len(value) > _MAX_TEXT or min(value.encode()) < 32 or "\x7f" in value:
                raise ConfigError(name, "must be printable text, at most %d characters" % _MAX_TEXT)
            if owners.get(name, ctype) != ctype:
                raise ConfigError(name, "only with credentials_type %s" % owners[name])
            if allowed and not getattr(cfg, allowed[0]):
                raise ConfigError(name, "only with %s" % allowed[0])
            if kind == _FILE:
                try:
                    os.stat(value)
                except OSError:
                    raise ConfigError(name, "no such file: " + value)
        elif kind <= _NUMBER:
            if type(value) is not int and (kind == _INTEGER or type(value) is not float):
                raise ConfigError(name, "must be an integer" if kind == _INTEGER else "must be a number")
            if not allowed[0] <= value <= allowed[1]:
                raise ConfigError(name, "must be in %g..%g" % tuple(allowed))
        elif kind == _OBJECT:
            if type(value) is not dict:
                raise ConfigError(name, "must be a JSON object")
        else:
            if kind == _LIST:
                if type(value) is not list:
                    raise ConfigError(name, "must be a list")
                allowed = SENSORS
            for item in value if kind == _LIST else (value,):
                if item not in allowed or type(item) is not type(allowed[0]):
                    raise ConfigError(name, "%r is not one of %s" % (item, json.dumps(allowed)))

    transport = cfg.transport
    tls = cfg.tls
    if tls and transport == "coap":
        raise ConfigError("tls", "not with coap (no DTLS)")
    if (ctype == "MQTT_BASIC" or ctype == "X509_CERTIFICATE") and transport != "mqtt":
        raise ConfigError("credentials_type", "%s works only with transport mqtt: HTTP and CoAP take tokens" %
                          ctype)
    if ctype == "SERVER_GENERATED":
        cfg.credentials_type = None  # what provisioning sends for a token the server generates: no type
    # What X.509 needs. (A token or MQTT_BASIC triple that config.json does not give, the board chooses itself.)
    needs = "tls cert_file key_file" if ctype == "X509_CERTIFICATE" else ""
    for name in needs.split():
        if not getattr(cfg, name):
            raise ConfigError(name, "required with %s" % ctype)
    try:
        import network  # noqa: F401 - only boards with Wi-Fi have it

        if not cfg.wifi_ssid:
            raise ConfigError("wifi_ssid", "is required")
    except ImportError:
        pass
    if cfg.port is None:
        # The server's ports for each transport, plain and with TLS.
        cfg.port = {"mqtt": 8883, "http": 443}[transport] if tls else {"mqtt": 1883, "http": 8080, "coap": 5683}[
            transport]

    name = cfg.device_name
    if "{uid}" in name:
        from tbfleet import board

        name = name.replace("{uid}", board.uid())
    name = cfg.device_name = name.strip()
    if not name:
        raise ConfigError("device_name", "is required")
    # ThingsBoard keeps the name "provision" for its provisioning sessions.
    for name in "device_name client_id username".split():
        if getattr(cfg, name) == "provision":
            raise ConfigError(name, "'provision' is reserved")
    return cfg


def load(path="config.json"):
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError:
        raise ConfigError(None, "cannot read " + path)
    except ValueError:
        data = None  # not JSON: refused as not an object
    return validate(data)
