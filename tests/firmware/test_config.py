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
    eq(c.credentials_type, None)
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
        eq(e.message, "required")


def test_unknown_field_is_named():
    e = refused("hots", hots="x")
    assert "unknown field" in str(e)


def test_types_and_ranges():
    refused("port", port="1883")
    refused("port", port=70000)
    refused("port", port=True)
    refused("transport", transport="amqp")
    refused("tls", tls="yes")
    refused("telemetry_interval", telemetry_interval=-1)
    refused("telemetry_interval", telemetry_interval="60")
    refused("qos", qos=2)
    refused("timeout", timeout=0)
    refused("keepalive", keepalive=1.5)
    refused("sensors", sensors="uptime")
    e = refused("sensors", sensors=["uptime", "humidity"])
    assert "humidity" in str(e)
    refused("log_level", log_level="loud")
    refused("host", host=42)
    refused("host", host="tb\nexample")
    refused("device_name", device_name="  ")
    refused("device_name", device_name="provision")


def test_access_token_needs_token():
    e = refused("token", credentials_type="ACCESS_TOKEN")
    eq(e.message, "required")
    eq(cfg_with(credentials_type="ACCESS_TOKEN", token="A1b2C3d4E5f6G7h8I9j0").token, "A1b2C3d4E5f6G7h8I9j0")


def test_fields_of_another_credentials_type_are_refused():
    e = refused("token", token="A1b2C3d4E5f6G7h8I9j0")
    assert "ACCESS_TOKEN" in str(e)
    refused("username", credentials_type="ACCESS_TOKEN", token="t", username="u")
    refused("cert_file", cert_file="cert.der")


def test_mqtt_basic_rules_follow_the_server():
    refused("client_id", credentials_type="MQTT_BASIC")
    refused("password", credentials_type="MQTT_BASIC", client_id="pump-7", password="pw")
    refused("client_id", credentials_type="MQTT_BASIC", client_id="provision")
    c = cfg_with(credentials_type="MQTT_BASIC", client_id="pump-7", username="pump", password="s3cret")
    eq((c.client_id, c.username, c.password), ("pump-7", "pump", "s3cret"))
    eq(cfg_with(credentials_type="MQTT_BASIC", client_id="pump-7").username, None)


def test_transport_credentials_combinations():
    e = refused("credentials_type", transport="http", credentials_type="MQTT_BASIC", username="u")
    assert "only with transport mqtt" in str(e)
    refused("credentials_type", transport="coap", credentials_type="X509_CERTIFICATE")
    refused("tls", transport="coap", tls=True)
    eq(cfg_with(transport="coap", credentials_type="ACCESS_TOKEN", token="t").transport, "coap")


def test_x509_needs_tls_and_files():
    refused("tls", credentials_type="X509_CERTIFICATE", cert_file="c.der", key_file="k.der")
    e = refused("cert_file", credentials_type="X509_CERTIFICATE", tls=True, cert_file="c.der", key_file="k.der")
    assert "no such file" in str(e)
    for name in ("c.der", "k.der"):
        with open(name, "wb") as f:
            f.write(b"\x30\x82")
    c = cfg_with(credentials_type="X509_CERTIFICATE", tls=True, cert_file="c.der", key_file="k.der")
    eq(c.port, 8883)


def test_ca_file_must_exist_and_needs_tls():
    refused("ca_file", tls=True, ca_file="ca.der")
    with open("ca.der", "wb") as f:
        f.write(b"\x30")
    refused("ca_file", ca_file="ca.der")
    eq(cfg_with(tls=True, ca_file="ca.der").ca_file, "ca.der")


def test_wifi_password_without_ssid():
    refused("wifi_password", wifi_password="hunter22")
    eq(cfg_with(wifi_ssid="farm", wifi_password="hunter22").wifi_ssid, "farm")


def test_secret_is_not_in_error_messages():
    e = refused("token", provision_secret="z9x8c7v6b5n4", token="t")
    assert "z9x8c7v6b5n4" not in str(e)


def test_load_file_errors():
    e = raises(ConfigError, config.load, "config.json")
    assert "cannot read" in str(e)
    with open("config.json", "w") as f:
        f.write('{"host": "tb", ')
    e = raises(ConfigError, config.load)
    assert "not valid JSON" in str(e)
    with open("config.json", "w") as f:
        f.write("[1, 2]")
    assert "JSON object" in str(raises(ConfigError, config.load))
    with open("config.json", "w") as f:
        json.dump(BASE, f)
    eq(config.load().host, "tb.example.com")
