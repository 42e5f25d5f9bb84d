# Provisioning requests per credentials type and every kind of answer, as ThingsBoard sends them.
import json

from mptest import eq
from tbfleet import BadAnswer, NoAnswer, config, provision

KEY = "u7i8k9l0p1o2"
SECRET = "z9x8c7v6b5n4"
# The start of a DER certificate: long enough to need two PEM lines (the server never parses it).
CERT_B64 = (
    "MIIBfjCCASOgAwIBAgIUJ0Cq3yq8rD2o2QW3hWb0c0pB5bQwCgYIKoZIzj0EAwIwFDESMBAGA1UEAwwJc2Vuc29yLTAxMB4XDTI2MDEwMTAw"
    "MDAwMFoXDTM2MDEwMTAwMDAwMFowFDESMBAGA1UEAwwJc2Vuc29yLTAxMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE"
)


def cfg_with(**fields):
    data = {"host": "127.0.0.1", "provision_key": KEY, "provision_secret": SECRET, "device_name": "greenhouse-7"}
    data.update(fields)
    return config.validate(data)


def x509_cfg():
    import binascii

    with open("cert.der", "wb") as f:
        f.write(binascii.a2b_base64(CERT_B64))
    with open("key.der", "wb") as f:
        f.write(b"\x30\x77")
    return cfg_with(credentials_type="X509_CERTIFICATE", tls=True, cert_file="cert.der", key_file="key.der")


def test_request_without_credentials_lets_the_server_generate_a_token():
    eq(json.loads(provision.request(cfg_with())),
       {"deviceName": "greenhouse-7", "provisionDeviceKey": KEY, "provisionDeviceSecret": SECRET})


def test_request_access_token():
    req = json.loads(provision.request(cfg_with(credentials_type="ACCESS_TOKEN", token="Gh7TkN0aQ1bC2dE3fG4h")))
    eq(req["credentialsType"], "ACCESS_TOKEN")
    eq(req["token"], "Gh7TkN0aQ1bC2dE3fG4h")


def test_request_mqtt_basic_uses_lowercase_username_and_omits_absent_parts():
    req = json.loads(provision.request(cfg_with(credentials_type="MQTT_BASIC", client_id="gh-7", username="gh")))
    eq(req["credentialsType"], "MQTT_BASIC")
    eq((req["clientId"], req["username"]), ("gh-7", "gh"))
    assert "password" not in req and "userName" not in req


def test_request_x509_sends_the_certificate_as_pem_in_hash():
    req = json.loads(provision.request(x509_cfg()))
    eq(req["credentialsType"], "X509_CERTIFICATE")
    pem = req["hash"]
    lines = pem.strip().split("\n")
    eq(lines[0], "-----BEGIN CERTIFICATE-----")
    eq(lines[-1], "-----END CERTIFICATE-----")
    assert all(len(line) <= 64 for line in lines)
    eq("".join(lines[1:-1]), CERT_B64)


def parse(body, cfg):
    return provision.outcome(body, cfg)


def test_success_access_token():
    o = parse(b'{"credentialsValue":"Xx9Yy8Zz7Ww6Vv5Uu4Tt","credentialsType":"ACCESS_TOKEN",'
              b'"status":"SUCCESS"}', cfg_with())
    eq(o, ("SUCCESS", {"type": "ACCESS_TOKEN", "token": "Xx9Yy8Zz7Ww6Vv5Uu4Tt"}, ""))


def test_success_mqtt_basic_nested_object_with_userName():
    body = (b'{"credentialsValue":{"clientId":"gh-7","userName":"gh","password":""},'
            b'"credentialsType":"MQTT_BASIC","status":"SUCCESS"}')
    o = parse(body, cfg_with(credentials_type="MQTT_BASIC", client_id="gh-7", username="gh"))
    eq(o[1], {"type": "MQTT_BASIC", "client_id": "gh-7", "username": "gh", "password": ""})
    # The legacy form: the credentials as a JSON string, with "username".
    body = (b'{"credentialsValue":"{\\"clientId\\":\\"gh-7\\",\\"username\\":\\"gh\\",\\"password\\":\\"pw\\"}",'
            b'"credentialsType":"MQTT_BASIC","status":"SUCCESS"}')
    eq(parse(body, cfg_with())[1], {"type": "MQTT_BASIC", "client_id": "gh-7", "username": "gh", "password": "pw"})


def test_success_mqtt_basic_with_nulls_from_a_pre_provisioned_device():
    body = (b'{"credentialsValue":{"clientId":null,"userName":"gh","password":"pw"},"credentialsType":"MQTT_BASIC",'
            b'"status":"SUCCESS"}')
    eq(parse(body, cfg_with())[1]["client_id"], "")


def test_mqtt_basic_answer_is_unusable_over_http():
    body = (b'{"credentialsValue":{"clientId":"a","userName":"b","password":"c"},"credentialsType":"MQTT_BASIC",'
            b'"status":"SUCCESS"}')
    eq(parse(body, cfg_with(transport="http")),
       ("FAILURE", None, "the server issued MQTT_BASIC credentials, unusable with this config"))
    # With its own credentials configured, the board gets those back to try.
    own = parse(body, cfg_with(transport="http", credentials_type="ACCESS_TOKEN", token="Own0Token"))
    eq(own[:2], ("FAILURE", {"type": "ACCESS_TOKEN", "token": "Own0Token"}))


def test_success_x509_checks_the_certificate_is_ours():
    cfg = x509_cfg()
    ok = parse(('{"credentialsValue":"%s","credentialsType":"X509_CERTIFICATE","status":"SUCCESS"}'
                % CERT_B64).encode(), cfg)
    eq(ok, ("SUCCESS", {"type": "X509_CERTIFICATE"}, ""))
    other = parse(b'{"credentialsValue":"MIIBother","credentialsType":"X509_CERTIFICATE","status":"SUCCESS"}', cfg)
    eq(other, ("FAILURE", {"type": "X509_CERTIFICATE"}, "the server holds another certificate"))


def test_x509_answer_without_a_certificate_configured():
    o = parse(b'{"credentialsValue":"MIIB","credentialsType":"X509_CERTIFICATE","status":"SUCCESS"}', cfg_with())
    eq(o[:2], ("FAILURE", None))


def test_lwm2m_answer_is_a_failure_not_a_crash():
    o = parse(b'{"credentialsType":"LWM2M_CREDENTIALS","status":"SUCCESS"}', cfg_with())
    eq(o, ("FAILURE", None, "the server issued LWM2M_CREDENTIALS credentials, unusable with this config"))


def test_not_found_and_failure_carry_the_server_message():
    o = parse(b'{"errorMsg":"Provision data was not found!","status":"NOT_FOUND"}', cfg_with())
    eq(o, ("NOT_FOUND", None, "Provision data was not found!"))
    o = parse(b'{"errorMsg":"Failed to provision device!","status":"FAILURE"}', cfg_with())
    eq(o, ("FAILURE", None, "Failed to provision device!"))
    o = parse(b'{"errorMsg":"Failed to provision device!","status":"FAILURE"}',
              cfg_with(credentials_type="MQTT_BASIC", client_id="gh-7"))
    eq(o[1], {"type": "MQTT_BASIC", "client_id": "gh-7", "username": "", "password": ""})
    eq(parse(b'{"status":"NOT_FOUND"}', cfg_with()), ("NOT_FOUND", None, ""))


def test_legacy_keys_are_tolerated():
    o = parse(b'{"deviceId":"3b5c","credentialsType":"ACCESS_TOKEN","credentialsId":"Legacy0Token1",'
              b'"provisionDeviceStatus":"SUCCESS"}', cfg_with())
    eq(o[1], {"type": "ACCESS_TOKEN", "token": "Legacy0Token1"})
    eq(parse(b'{"credentialsValue":"NoType0Token","status":"SUCCESS"}', cfg_with())[1]["token"], "NoType0Token")


def test_garbage_answers():
    for body in (b"", b"<html>502</html>", b"[]", b'"SUCCESS"', b'{"status":"MAYBE"}', b"{}",
                 b'{"status":"SUCCESS","credentialsType":"ACCESS_TOKEN"}',
                 b'{"status":"SUCCESS","credentialsType":"ACCESS_TOKEN","credentialsValue":42}',
                 b'{"status":"SUCCESS","credentialsType":"MQTT_BASIC","credentialsValue":"nope"}'):
        eq((body, parse(body, cfg_with())[:2]), (body, ("BAD_ANSWER", None)))


class Link:
    def __init__(self, answer=None, error=None):
        self.answer = answer
        self.error = error
        self.sent = None
        self.closed = False

    def provision(self, request):
        self.sent = request
        if self.error:
            raise self.error
        return self.answer

    def close(self):
        self.closed = True


def Device(link):
    # app.Device over a link passed in: the exchange closes it but leaves it in place (not the device's to drop).
    from tbfleet import app

    return app.Device(cfg_with(), link)


def onboard(device):
    # (credentials or None, ms to wait or None) of one onboarding step.
    wait = device.onboard()
    return device.creds, wait


OK = b'{"credentialsValue":"T0k3n","credentialsType":"ACCESS_TOKEN","status":"SUCCESS"}'


def test_provision_turns_every_ending_into_an_outcome():
    eq(provision.outcome(OK, cfg_with()), ("SUCCESS", {"type": "ACCESS_TOKEN", "token": "T0k3n"}, ""))
    eq(provision.outcome(None, cfg_with(), NoAnswer("no answer in time")), ("NO_ANSWER", None, "no answer in time"))
    eq(provision.outcome(b"\x00\xff", cfg_with())[0], "BAD_ANSWER")
    eq(provision.outcome(None, cfg_with(), BadAnswer("junk")), ("BAD_ANSWER", None, "junk"))


def test_one_exchange_per_attempt_and_the_link_dropped_however_it_ended():
    from tbfleet import store

    link = Link(OK)
    device = Device(link)
    creds, wait = onboard(device)
    eq((creds["token"], device.unsaved, wait), ("T0k3n", False, None))
    eq(store.load()["token"], "T0k3n")  # saved before it is used
    assert link.closed and device.link is link and json.loads(link.sent)["deviceName"] == "greenhouse-7"
    eq(onboard(Device(Link(error=AssertionError("no exchange"))))[0]["token"], "T0k3n")  # saved
    store.discard("provisioning again")
    for error in (NoAnswer("no answer in time"), BadAnswer("junk")):
        link = Link(error=error)
        device = Device(link)
        creds, wait = onboard(device)
        assert creds is None and wait > 0
        assert link.closed and device.link is link
    link = Link(b"\x00\xff")
    creds, wait = onboard(Device(link))
    assert creds is None and wait > 0
    assert link.closed
