# The board's config.json, validated field by field: a bad or missing field stops with one message naming it.
import json

from micropython import const

TRANSPORTS = ("mqtt", "http", "coap")
CREDENTIALS_TYPES = ("ACCESS_TOKEN", "MQTT_BASIC", "X509_CERTIFICATE")
SENSORS = ("uptime", "free_heap", "heap_used", "rssi", "mcu_temp")
LOG_LEVELS = ("debug", "info", "warn", "error")
_MAX_TEXT = const(256)


class ConfigError(ValueError):
    def __init__(self, field, message):
        super().__init__(field, message)
        self.field = field
        self.message = message

    def __str__(self):
        if self.field:
            return "config.json: %s: %s" % (self.field, self.message)
        return "config.json: " + self.message


class Config:
    pass


def _text(cfg, name, required=False):
    value = getattr(cfg, name)
    if value is None or value == "":
        if required:
            raise ConfigError(name, "required")
        setattr(cfg, name, None)
        return None
    if not isinstance(value, str):
        raise ConfigError(name, "must be a string")
    if len(value) > _MAX_TEXT:
        raise ConfigError(name, "longer than %d characters" % _MAX_TEXT)
    for ch in value:
        if ord(ch) < 32 or ord(ch) == 127:
            raise ConfigError(name, "contains a control character")
    return value


def _number(cfg, name, low, high, integer=False):
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ConfigError(name, "must be %s" % ("an integer" if integer else "a number"))
    if not low <= value <= high:
        raise ConfigError(name, "must be between %s and %s" % (low, high))
    return value


def _file(cfg, name, required):
    path = _text(cfg, name, required)
    if path is None:
        return None
    import os

    try:
        os.stat(path)
    except OSError:
        raise ConfigError(name, "no such file on the board: %s" % path)
    return path


def _choice(cfg, name, choices):
    value = getattr(cfg, name)
    if value not in choices:
        raise ConfigError(name, "must be one of %s" % ", ".join(str(c) for c in choices))
    return value


def validate(data):
    # Returns a Config with every field set (defaults filled in, device_name expanded).
    if not isinstance(data, dict):
        raise ConfigError(None, "must hold a JSON object")
    # The tables are built here, not at module level: a module-level name stays interned after config is unloaded.
    # Every field the file may hold, with its default; required fields default to None and are checked below.
    defaults = {
        "host": None,
        "port": None,
        "transport": "mqtt",
        "tls": False,
        "ca_file": None,
        "provision_key": None,
        "provision_secret": None,
        "device_name": "esp32-{uid}",
        "credentials_type": None,
        "token": None,
        "client_id": None,
        "username": None,
        "password": None,
        "cert_file": None,
        "key_file": None,
        "telemetry_interval": 60,
        "qos": 1,
        "timeout": 10,
        "keepalive": 60,
        "sensors": ("uptime", "free_heap", "rssi", "mcu_temp"),
        "wifi_ssid": None,
        "wifi_password": None,
        "log_level": "info",
    }
    # Fields that belong to one credentials type only.
    owners = {
        "token": "ACCESS_TOKEN",
        "client_id": "MQTT_BASIC",
        "username": "MQTT_BASIC",
        "password": "MQTT_BASIC",
        "cert_file": "X509_CERTIFICATE",
        "key_file": "X509_CERTIFICATE",
    }
    for name in data:
        if name not in defaults:
            raise ConfigError(name, "unknown field")
    cfg = Config()
    for name, default in defaults.items():
        value = data.get(name)
        setattr(cfg, name, default if value is None else value)

    _text(cfg, "host", True)
    _choice(cfg, "transport", TRANSPORTS)
    if not isinstance(cfg.tls, bool):
        raise ConfigError("tls", "must be true or false")
    if cfg.tls and cfg.transport == "coap":
        raise ConfigError("tls", "CoAP over DTLS is not supported; use mqtt or http for TLS")
    if cfg.port is None:
        ports = {"mqtt": (1883, 8883), "http": (8080, 443), "coap": (5683, 5684)}  # (plain, TLS)
        cfg.port = ports[cfg.transport][cfg.tls]
    _number(cfg, "port", 1, 65535, True)
    _file(cfg, "ca_file", False)
    if cfg.ca_file and not cfg.tls:
        raise ConfigError("ca_file", "given but tls is false")
    _text(cfg, "provision_key", True)
    _text(cfg, "provision_secret", True)

    name = _text(cfg, "device_name", True)
    if "{uid}" in name:
        from tbfleet import board

        name = name.replace("{uid}", board.uid())
    name = name.strip()
    if not name:
        raise ConfigError("device_name", "blank")
    if name == "provision":
        raise ConfigError("device_name", "'provision' is reserved by ThingsBoard for provisioning sessions")
    cfg.device_name = name

    ctype = cfg.credentials_type
    if ctype == "":
        ctype = cfg.credentials_type = None
    if ctype is not None:
        _choice(cfg, "credentials_type", CREDENTIALS_TYPES)
    for field, owner in owners.items():
        if data.get(field) not in (None, "") and owner != ctype:
            raise ConfigError(field, "only used with credentials_type %s" % owner)
    _check_credentials(cfg, ctype)

    _number(cfg, "telemetry_interval", 0, 86400 * 7)
    _choice(cfg, "qos", (0, 1))
    _number(cfg, "timeout", 0.1, 300)
    _number(cfg, "keepalive", 0, 65535, True)
    sensors = cfg.sensors
    if not isinstance(sensors, (list, tuple)):
        raise ConfigError("sensors", "must be a list of sensor names")
    for s in sensors:
        if s not in SENSORS:
            raise ConfigError("sensors", "unknown sensor %r (known: %s)" % (s, ", ".join(SENSORS)))
    if _text(cfg, "wifi_ssid") is None and _has_wifi():
        raise ConfigError("wifi_ssid", "required on a board with Wi-Fi")
    if cfg.wifi_password is not None and not isinstance(cfg.wifi_password, str):
        raise ConfigError("wifi_password", "must be a string")
    if cfg.wifi_password and not cfg.wifi_ssid:
        raise ConfigError("wifi_password", "given without wifi_ssid")
    _choice(cfg, "log_level", LOG_LEVELS)
    return cfg


def _check_credentials(cfg, ctype):
    if ctype == "ACCESS_TOKEN":
        _text(cfg, "token", True)
        return
    if ctype == "MQTT_BASIC":
        if cfg.transport != "mqtt":
            raise ConfigError("credentials_type", "MQTT_BASIC works only with transport mqtt; "
                              "HTTP and CoAP devices authenticate with an access token")
        client_id = _text(cfg, "client_id")
        username = _text(cfg, "username")
        password = _text(cfg, "password")
        # The server's own rules for MQTT_BASIC credentials, refused here rather than by a FAILURE later.
        if not client_id and not username:
            raise ConfigError("client_id", "client_id or username required for MQTT_BASIC")
        if password and not username:
            raise ConfigError("password", "needs a username (the server refuses a client id with a password alone)")
        if client_id == "provision" or username == "provision":
            raise ConfigError("client_id" if client_id == "provision" else "username",
                              "'provision' is reserved by ThingsBoard for provisioning sessions")
        return
    if ctype == "X509_CERTIFICATE":
        if cfg.transport != "mqtt":
            raise ConfigError("credentials_type", "X509_CERTIFICATE works only with transport mqtt "
                              "(a TLS client certificate); HTTP and CoAP devices use an access token")
        if not cfg.tls:
            raise ConfigError("tls", "must be true with credentials_type X509_CERTIFICATE")
        _file(cfg, "cert_file", True)
        _file(cfg, "key_file", True)


def _has_wifi():
    try:
        import network  # noqa: F401
    except ImportError:
        return False
    return True


def load(path="config.json"):
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        raise ConfigError(None, "cannot read %s (is the board deployed?)" % path)
    try:
        data = json.loads(text)
    except ValueError:
        raise ConfigError(None, "%s is not valid JSON" % path)
    return validate(data)
