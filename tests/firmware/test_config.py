# config.json validation: defaults, every field's checks, and one message naming the field.
import json

from mptest import eq, raises
from tbfleet import config
from tbfleet.config import ConfigError

BASE = {"host": "tb.example.com", "provision_key": "u7i8k9l0p1o2", "provision_secret": "z9x8c7v6b5n4"}


def cfg_with(**fields):
    data = dict(BASE)
    data.update(fields)
    return config.validate(data)


def refused(field, **fields):
    data = dict(BASE)
    data.update(fields)
    e = raises(ConfigError, config.validate, data)
    eq(e.field, field)
    assert str(e).startswith("config.json: %s: " % field), str(e)
    return e


def test_defaults():
    c = cfg_with()
    eq(c.transport, "mqtt")
    eq(c.port, 1883)
    eq(c.tls, False)
    eq(c.credentials_type, "ACCESS_TOKEN")  # with no token: the board chooses one (write-ahead)
    eq(c.telemetry_interval, 60)
    eq(c.qos, 1)
    eq(c.timeout, 10)
    eq(c.keepalive, 60)
    eq(list(c.sensors), ["uptime", "free_heap", "rssi", "mcu_temp"])
    eq(c.token, None)
    eq(c.wifi_ssid, None)
    assert c.device_name.startswith("esp32-") and len(c.device_name) == 18, c.device_name


def test_default_port_per_transport_and_tls():
    eq(cfg_with(transport="http").port, 8080)
    eq(cfg_with(transport="http", tls=True).port, 443)
    eq(cfg_with(transport="coap").port, 5683)
    eq(cfg_with(tls=True).port, 8883)
    eq(cfg_with(port=11883).port, 11883)


def test_uid_template_is_stable():
    a = cfg_with(device_name="greenhouse-{uid}").device_name
    b = cfg_with(device_name="greenhouse-{uid}").device_name
    eq(a, b)
    assert a.startswith("greenhouse-")


def test_required_fields():
    for field in ("host", "provision_key", "provision_secret"):
        data = dict(BASE)
        del data[field]
        e = raises(ConfigError, config.validate, data)
        eq(e.field, field)
        eq(e.message, "is required")
        eq(str(e), "config.json: %s: is required" % field)


def test_unknown_field_is_named():
    e = refused("hots", hots="x")
    eq(str(e), "config.json: hots: unknown field")
    # Named before any other fault: a misspelt field is why the right one seems missing.
    data = dict(BASE)
    data["provison_key"] = data.pop("provision_key")
    eq(raises(ConfigError, config.validate, data).field, "provison_key")


def test_null_or_empty_means_the_default():
    c = cfg_with(transport="", port=None, device_name="", token="", sensors=None)
    eq((c.transport, c.port, c.token), ("mqtt", 1883, None))
    assert c.device_name.startswith("esp32-"), c.device_name
    eq(list(c.sensors), ["uptime", "free_heap", "rssi", "mcu_temp"])


def test_types_and_ranges():
    eq(refused("port", port="1883").message, "must be an integer")
    eq(refused("port", port=70000).message, "must be in 1..65535")
    refused("port", port=True)
    refused("port", port=1883.0)
    eq(refused("transport", transport="amqp").message, "'amqp' is not one of [\"mqtt\", \"http\", \"coap\"]")
    eq(refused("tls", tls="yes").message, "'yes' is not one of [false, true]")
    refused("tls", tls=1)
    eq(refused("telemetry_interval", telemetry_interval=-1).message, "must be in 0..604800")
    eq(refused("telemetry_interval", telemetry_interval="60").message, "must be a number")
    refused("telemetry_interval", telemetry_interval=False)
    eq(cfg_with(telemetry_interval=0.5).telemetry_interval, 0.5)
    refused("qos", qos=2)
    refused("qos", qos=True)
    eq(refused("timeout", timeout=0).message, "must be in 0.1..300")
    refused("keepalive", keepalive=1.5)
    eq(refused("sensors", sensors="uptime").message, "must be a list")
    e = refused("sensors", sensors=["uptime", "humidity"])
    assert "'humidity' is not one of" in str(e), str(e)
    refused("sensors", sensors=[1])
    refused("log_level", log_level="loud")
    text = "must be printable text, at most 256 characters"
    eq(refused("host", host=42).message, text)
    eq(refused("host", host="tb\nexample").message, text)
    eq(refused("host", host="tb\x7fexample").message, text)
    eq(refused("host", host="t" * 257).message, text)
    eq(cfg_with(host="t" * 256).host, "t" * 256)
    eq(cfg_with(device_name="gewächshaus-7").device_name, "gewächshaus-7")  # printable is not only ASCII
    refused("device_name", device_name="  ")
    eq(refused("device_name", device_name="provision").message, "'provision' is reserved")


def test_access_token_is_the_default_and_its_token_optional():
    eq(cfg_with(credentials_type="ACCESS_TOKEN").token, None)  # the board chooses one
    eq(cfg_with(token="A1b2C3d4E5f6G7h8I9j0").token, "A1b2C3d4E5f6G7h8I9j0")


def test_server_generated_sends_no_credentials_type():
    for transport in ("mqtt", "http", "coap"):
        eq(cfg_with(credentials_type="SERVER_GENERATED", transport=transport).credentials_type, None)
    e = refused("token", credentials_type="SERVER_GENERATED", token="A1b2C3d4E5f6G7h8I9j0")
    eq(e.message, "only with credentials_type ACCESS_TOKEN")


def test_fields_of_another_credentials_type_are_refused():
    e = refused("token", credentials_type="MQTT_BASIC", token="A1b2C3d4E5f6G7h8I9j0")
    eq(e.message, "only with credentials_type ACCESS_TOKEN")
    refused("username", credentials_type="ACCESS_TOKEN", token="t", username="u")
    refused("cert_file", cert_file="cert.der")


def test_mqtt_basic_rules_follow_the_server():
    eq(cfg_with(credentials_type="MQTT_BASIC").client_id, None)  # the board chooses the whole triple
    eq(refused("password", credentials_type="MQTT_BASIC", client_id="pump-7", password="pw").message,
       "only with username")
    refused("client_id", credentials_type="MQTT_BASIC", client_id="provision")
    refused("username", credentials_type="MQTT_BASIC", username="provision")
    eq(cfg_with(credentials_type="MQTT_BASIC", username="pump").client_id, None)
    c = cfg_with(credentials_type="MQTT_BASIC", client_id="pump-7", username="pump", password="s3cret")
    eq((c.client_id, c.username, c.password), ("pump-7", "pump", "s3cret"))
    eq(cfg_with(credentials_type="MQTT_BASIC", client_id="pump-7").username, None)


def test_transport_credentials_combinations():
    e = refused("credentials_type", transport="http", credentials_type="MQTT_BASIC", username="u")
    assert "only with transport mqtt" in str(e)
    refused("credentials_type", transport="coap", credentials_type="X509_CERTIFICATE")
    assert "DTLS" in str(refused("tls", transport="coap", tls=True))
    refused("credentials_type", credentials_type="PSK")
    eq(cfg_with(transport="coap", credentials_type="ACCESS_TOKEN", token="t").transport, "coap")


def test_x509_needs_tls_and_files():
    e = refused("cert_file", credentials_type="X509_CERTIFICATE", tls=True, cert_file="c.der", key_file="k.der")
    eq(e.message, "no such file: c.der")
    for name in ("c.der", "k.der"):
        with open(name, "wb") as f:
            f.write(b"\x30\x82")
    eq(refused("tls", credentials_type="X509_CERTIFICATE", cert_file="c.der", key_file="k.der").message,
       "required with X509_CERTIFICATE")
    eq(refused("key_file", credentials_type="X509_CERTIFICATE", tls=True, cert_file="c.der").message,
       "required with X509_CERTIFICATE")
    c = cfg_with(credentials_type="X509_CERTIFICATE", tls=True, cert_file="c.der", key_file="k.der")
    eq(c.port, 8883)


def test_ca_file_must_exist_and_needs_tls():
    refused("ca_file", tls=True, ca_file="ca.der")
    with open("ca.der", "wb") as f:
        f.write(b"\x30")
    eq(refused("ca_file", ca_file="ca.der").message, "only with tls")
    eq(cfg_with(tls=True, ca_file="ca.der").ca_file, "ca.der")


def test_wifi_ssid_is_required_on_a_board_with_wifi():
    import sys

    sys.modules["network"] = sys
    try:
        eq(refused("wifi_ssid").message, "is required")
        eq(cfg_with(wifi_ssid="farm").wifi_ssid, "farm")
    finally:
        del sys.modules["network"]
    eq(cfg_with().wifi_ssid, None)


def test_wifi_password_without_ssid():
    eq(refused("wifi_password", wifi_password="hunter22").message, "only with wifi_ssid")
    eq(cfg_with(wifi_ssid="farm", wifi_password="hunter22").wifi_ssid, "farm")


def test_secret_is_not_in_error_messages():
    e = refused("token", provision_secret="z9x8c7v6b5n4", credentials_type="X509_CERTIFICATE", token="t")
    assert "z9x8c7v6b5n4" not in str(e)


def test_load_file_errors():
    e = raises(ConfigError, config.load, "config.json")
    eq((e.field, str(e)), (None, "config.json: cannot read config.json"))
    for text in ('{"host": "tb", ', "[1, 2]", "\xff\xfe"):
        with open("config.json", "w") as f:
            f.write(text)
        eq(str(raises(ConfigError, config.load)), "config.json: not a JSON object")
    with open("config.json", "w") as f:
        json.dump(BASE, f)
    eq(config.load().host, "tb.example.com")
