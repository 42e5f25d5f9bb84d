"""The emulator's provisioning logic, credential rules and stored data, against reference §1, §2, §3.4-3.5, §6, §7."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
import sqlite3
import uuid

import pytest

from emulator_fixtures import ALLOW_KEY, ALLOW_SECRET, CHECK_KEY, CHECK_SECRET, CONFIG, DISABLED_KEY, \
    DISABLED_SECRET
from host_tools.emulator.state import ConfigError, EmulatorState, PayloadError, RequestError, \
    cert_trim_newlines, load_config, parse_keys, parse_version, sha3_hex

FAILURE = {"errorMsg": "Failed to provision device!", "status": "FAILURE"}
NOT_FOUND = {"errorMsg": "Provision data was not found!", "status": "NOT_FOUND"}
PEM = ("-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\r\nAbCd+/EfGh==\n-----END CERTIFICATE-----\n")


def make(version: tuple[int, ...] = (4, 3), config: dict | None = None) -> tuple[EmulatorState, list[str]]:
    events: list[str] = []
    return EmulatorState(config or CONFIG, server_version=version, events=events.append), events


def req(key: str = ALLOW_KEY, secret: str = ALLOW_SECRET, **fields: object) -> bytes:
    return json.dumps({**fields, "provisionDeviceKey": key, "provisionDeviceSecret": secret}).encode()


def test_success_with_generated_token_has_exact_key_order_and_provision_state():
    state, events = make()
    answer = state.provision(req(deviceName="dev-a"), "http")
    assert list(answer) == ["credentialsValue", "credentialsType", "status"]
    assert answer["status"] == "SUCCESS" and answer["credentialsType"] == "ACCESS_TOKEN"
    assert re.fullmatch(r"[A-Za-z0-9]{20}", answer["credentialsValue"])
    dev = state.device("dev-a")
    assert dev.profile == "allow" and dev.credentials_id == answer["credentialsValue"]
    assert state.attributes("dev-a")["server"] == {"provisionState": "provisioned"}
    assert state.device_by_token(answer["credentialsValue"]).name == "dev-a"
    assert any("provisioned device 'dev-a'" in e for e in events)
    assert not any(answer["credentialsValue"] in e for e in events)


def test_empty_name_gets_twenty_random_alphanumerics():
    state, _ = make()
    state.provision(req(), "mqtt")
    state.provision(req(), "mqtt")
    names = [d["name"] for d in state.devices() if d["profile"] == "allow" and d["name"] != "other-profile"]
    assert len(names) == 2 and names[0] != names[1]
    assert all(re.fullmatch(r"[A-Za-z0-9]{20}", n) for n in names)


def test_name_is_trimmed_and_blank_name_fails():
    state, _ = make()
    assert state.provision(req(deviceName="  spaced  "), "http")["status"] == "SUCCESS"
    assert state.device("spaced") is not None
    assert state.provision(req(deviceName="   "), "http") == FAILURE


def test_access_token_supplied_and_token_without_type():
    state, _ = make()
    a = state.provision(req(deviceName="t1", credentialsType="ACCESS_TOKEN", token="myToken1"), "mqtt")
    assert a == {"credentialsValue": "myToken1", "credentialsType": "ACCESS_TOKEN", "status": "SUCCESS"}
    b = state.provision(req(deviceName="t2", token="myToken2"), "mqtt")
    assert b["credentialsValue"] == "myToken2"


def test_access_token_type_with_other_field_but_no_token_fails():
    state, _ = make()
    assert state.provision(req(deviceName="t3", credentialsType="ACCESS_TOKEN", username="u"), "http") == FAILURE
    assert state.device("t3") is None


def test_duplicate_credentials_fail():
    state, _ = make()
    assert state.provision(req(deviceName="d1", token="dupToken"), "http")["status"] == "SUCCESS"
    assert state.provision(req(deviceName="d2", token="dupToken"), "http") == FAILURE
    assert state.provision(req(deviceName="d3", token="preTokenValue0000001"), "http") == FAILURE


def test_existing_device_under_allow_create_fails_even_in_another_profile():
    state, events = make()
    assert state.provision(req(deviceName="pre-token"), "coap") == FAILURE
    assert state.provision(req(deviceName="other-profile"), "coap") == FAILURE
    assert any("already exists" in e for e in events)


@pytest.mark.parametrize("fields, stored, cid", [
    ({"clientId": "c1", "username": "u1", "password": "p1"}, {"clientId": "c1", "userName": "u1", "password": "p1"},
     hashlib.sha3_256(b"c1|u1").hexdigest()),
    ({"username": "u2", "password": "p2"}, {"clientId": "", "userName": "u2", "password": "p2"}, "u2"),
    ({"clientId": "c3"}, {"clientId": "c3", "userName": "", "password": ""}, hashlib.sha3_256(b"c3").hexdigest()),
])
def test_mqtt_basic_is_nested_with_username_and_ids_follow_the_sha3_rules(fields, stored, cid):
    state, _ = make()
    answer = state.provision(req(deviceName="b", credentialsType="MQTT_BASIC", **fields), "mqtt")
    assert answer == {"credentialsValue": stored, "credentialsType": "MQTT_BASIC", "status": "SUCCESS"}
    assert list(answer["credentialsValue"]) == ["clientId", "userName", "password"]
    assert state.device("b").credentials_id == cid


@pytest.mark.parametrize("fields", [
    {"password": "p"},                                   # neither client id nor user name
    {"clientId": "c", "password": "p"},                  # password with client id only
    {"clientId": "c\x01", "username": "u"},              # control character
    {"clientId": "c", "username": "u", "password": "p\n"},
])
def test_invalid_mqtt_basic_combinations_fail(fields):
    state, _ = make()
    assert state.provision(req(deviceName="bad", credentialsType="MQTT_BASIC", **fields), "http") == FAILURE
    assert state.device("bad") is None


def test_x509_hash_is_trimmed_and_hashed_without_validation():
    state, _ = make()
    answer = state.provision(req(deviceName="x", credentialsType="X509_CERTIFICATE", hash=PEM), "http")
    assert answer == {"credentialsValue": "MIIBszCCAVmgAwIBAgIUAbCd+/EfGh==", "credentialsType": "X509_CERTIFICATE",
                      "status": "SUCCESS"}
    assert state.device("x").credentials_id == hashlib.sha3_256(b"MIIBszCCAVmgAwIBAgIUAbCd+/EfGh==").hexdigest()
    assert state.provision(req(deviceName="y", credentialsType="X509_CERTIFICATE", hash="testHash"),
                           "mqtt")["credentialsValue"] == "testHash"


def test_x509_lookup_hashes_base64_of_der():
    state, _ = make()
    der = b"\x30\x82\x01\x00 not really a certificate"
    b64 = base64.b64encode(der).decode()
    state.provision(req(deviceName="x", credentialsType="X509_CERTIFICATE", hash=b64), "http")
    assert state.device_by_x509(der).name == "x"
    assert state.device_by_x509(der + b"x") is None


def test_cert_trim_keeps_other_whitespace():
    assert cert_trim_newlines("-----BEGIN CERTIFICATE-----\r\nA B\n-----END CERTIFICATE-----") == "A B"
    assert sha3_hex("ab\n") == hashlib.sha3_256(b"ab").hexdigest()


@pytest.mark.parametrize("key, secret", [
    ("", ALLOW_SECRET), (ALLOW_KEY, ""), ("no-such-key", "x"), (ALLOW_KEY, "wrong"), (CHECK_KEY, "wrong"),
    (DISABLED_KEY, DISABLED_SECRET), (ALLOW_KEY, ALLOW_SECRET.upper()),
])
def test_not_found_cases(key, secret):
    state, _ = make()
    assert state.provision(req(key, secret, deviceName="n"), "http") == NOT_FOUND
    assert state.device("n") is None


def test_blank_name_is_checked_before_the_key():
    state, _ = make()
    assert state.provision(req("no-such-key", "x", deviceName=" "), "http") == FAILURE


@pytest.mark.parametrize("name, expected", [
    ("pre-token", {"credentialsValue": "preTokenValue0000001", "credentialsType": "ACCESS_TOKEN",
                   "status": "SUCCESS"}),
    ("pre-basic", {"credentialsValue": {"clientId": "pre-client", "userName": "pre-user", "password": "pre-pass"},
                   "credentialsType": "MQTT_BASIC", "status": "SUCCESS"}),
])
def test_pre_provisioned_returns_existing_credentials_and_ignores_supplied_ones(name, expected):
    state, _ = make()
    answer = state.provision(req(CHECK_KEY, CHECK_SECRET, deviceName=name, token="ignored"), "mqtt")
    assert answer == expected and list(answer) == list(expected)
    assert state.attributes(name)["server"] == {"provisionState": "provisioned"}


def test_pre_provisioned_missing_device_or_other_profile_fails():
    state, _ = make()
    assert state.provision(req(CHECK_KEY, CHECK_SECRET, deviceName="nobody"), "http") == FAILURE
    assert state.provision(req(CHECK_KEY, CHECK_SECRET, deviceName="other-profile"), "http") == FAILURE


@pytest.mark.parametrize("version, second", [((4, 3), FAILURE), ((4, 2, 1, 1), FAILURE), ((4, 2, 1), "SUCCESS"),
                                             ((3, 2), "SUCCESS")])
def test_reprovisioning_depends_on_version(version, second):
    state, _ = make(version)
    body = req(CHECK_KEY, CHECK_SECRET, deviceName="pre-token")
    assert state.provision(body, "http")["status"] == "SUCCESS"
    answer = state.provision(body, "http")
    assert (answer if second == FAILURE else answer["status"]) == second


def test_other_provision_state_value_fails_in_every_version():
    for version in ((3, 2), (4, 3)):
        state, _ = make(version)
        state._set_attributes("pre-token", "server", {"provisionState": "pending"})
        assert state.provision(req(CHECK_KEY, CHECK_SECRET, deviceName="pre-token"), "http") == FAILURE


@pytest.mark.parametrize("body, message", [
    (b"[1,2]", "Can't parse value: [1,2]"),
    (b"not json", "Can't parse value: not json"),
    (b'{"provisionDeviceSecret":"s"}', 'Failed to find the field provisionDeviceKey in JSON body '
                                       '{"provisionDeviceSecret":"s"}!'),
    (b'{"provisionDeviceKey":"k"}', 'Failed to find the field provisionDeviceSecret in JSON body '
                                    '{"provisionDeviceKey":"k"}!'),
    (b'{"provisionDeviceKey":"k","provisionDeviceSecret":"s","credentialsType":"PSK"}',
     "No enum constant org.thingsboard.server.common.data.security.DeviceCredentialsType.PSK"),
    (b'{"provisionDeviceKey":"k","provisionDeviceSecret":"s","credentialsType":""}',
     "No enum constant org.thingsboard.server.common.data.security.DeviceCredentialsType."),
])
def test_unparsable_requests_raise_with_the_server_message(body, message):
    state, _ = make()
    with pytest.raises(RequestError) as info:
        state.provision(body, "http")
    assert str(info.value) == message
    assert info.value.json_object == body.startswith(b"{")


def test_secrets_never_in_events():
    state, events = make()
    state.provision(req(deviceName="s1", credentialsType="MQTT_BASIC", clientId="cc", username="uu",
                        password="topsecretpw"), "mqtt")
    state.provision(req(ALLOW_KEY, "wrong-secret-value", deviceName="s2"), "mqtt")
    state.authenticate_mqtt("cc", "uu", "topsecretpw")
    text = "\n".join(events)
    assert "topsecretpw" not in text and ALLOW_SECRET not in text and "wrong-secret-value" not in text


# ---------------------------------------------------------------- MQTT credential checks (§3.4, §3.5)

@pytest.mark.parametrize("client_id, username, password, device", [
    ("anything", "preTokenValue0000001", None, "pre-token"),        # token as username, password ignored
    ("anything", "preTokenValue0000001", "whatever", "pre-token"),
    ("pre-client", "pre-user", "pre-pass", "pre-basic"),            # all three
    ("any-client", "up-user", "up-pass", "pre-userpass"),           # user name + password, client id free
    ("only-client", None, None, "pre-clientonly"),                  # client id only
    ("only-client", "", None, "pre-clientonly"),
])
def test_authenticate_accepts(client_id, username, password, device):
    state, _ = make()
    found, code = state.authenticate_mqtt(client_id, username, password)
    assert code == 0 and found.name == device


@pytest.mark.parametrize("client_id, username, password, reason", [
    ("c", "wrongToken", None, 0x86),           # exactly one of user/password present
    ("c", "wrongToken", "", 0x86),             # all three present (umqtt's empty password)
    ("pre-client", "pre-user", "bad", 0x86),   # password mismatch
    ("any-client", "up-user", "bad", 0x86),
    ("unknown-client", None, None, 0x85),      # no username, client id set
    ("", None, None, 0x87),                    # nothing at all -> not authorized
    ("", "u", "p", 0x86),                      # an empty client id still counts as present
    ("c", None, "p", 0x86),
])
def test_authenticate_refusals(client_id, username, password, reason):
    """MQTT 5 CONNACK reasons (3.1.1 gets 5 for 0x86 and 0x87, 2 for 0x85)."""
    state, _ = make()
    assert state.authenticate_mqtt(client_id, username, password) == (None, reason)


def test_before_3_5_refusals_are_always_not_authorized():
    state, _ = make((3, 4))
    assert state.authenticate_mqtt("unknown-client", None, None) == (None, 0x87)


# ---------------------------------------------------------------- telemetry, attributes, RPC (§6)

def test_telemetry_shapes_and_value_typing():
    state, events = make()
    dev = state.device("pre-token")
    assert state.post_telemetry(dev, b'{"t":21.5,"n":3,"s":"x","b":true,"num":"42","nil":null,"o":{"a":1}}') == 1
    assert state.post_telemetry(dev, b'{"ts":1700000000000,"values":{"h":40}}') == 1
    assert state.post_telemetry(dev, b'[{"ts":1700000000001,"values":{"a":1}},{"b":2}]') == 2
    rows = state.telemetry("pre-token")
    assert rows[0]["values"] == {"t": 21.5, "n": 3, "s": "x", "b": True, "num": 42, "o": {"a": 1}}
    assert rows[1] == {"ts": 1700000000000, "values": {"h": 40}}
    assert rows[2] == {"ts": 1700000000001, "values": {"a": 1}} and rows[3]["values"] == {"b": 2}
    assert any("telemetry from 'pre-token'" in e for e in events)


@pytest.mark.parametrize("text, stored", [
    ("12", 12), ("-7", -7), ("007", 7), ("-3.5", -3.5), (".5", 0.5), ("9223372036854775807", 2 ** 63 - 1),
    ("9223372036854775808", "9223372036854775808"), ("1_000", "1_000"), (" 12 ", " 12 "), ("12\n", "12\n"),
    ("\u0661\u0662", 12), ("\u0661.\u0665", "\u0661.\u0665"), ("+5", "+5"), ("1e3", "1e3"), ("1.", "1."), ("-", "-"),
    ("1.2.3", "1.2.3"), ("0x10", "0x10"), ("NaN", "NaN"), ("Infinity", "Infinity"), ("", ""),
])
def test_number_strings_are_cast_as_thingsboard_casts_them(text, stored):
    # NumberUtils.isParsable gates it; Long.parseLong takes any decimal digits, Double.parseDouble ASCII ones only.
    state, _ = make()
    state.post_telemetry(state.device("pre-token"), json.dumps({"v": text}).encode())
    value = state.telemetry("pre-token")[0]["values"]["v"]
    assert value == stored and type(value) is type(stored)


@pytest.mark.parametrize("body", [b"42", b"[1,2]", b'"s"', b"{bad", b"", b'{"ts":"x","values":{}}',
                                  b'{"ts":1,"values":5}', b"\xff"])
def test_bad_telemetry_raises_payload_error(body):
    state, _ = make()
    with pytest.raises(PayloadError):
        state.post_telemetry(state.device("pre-token"), body)
    assert state.telemetry("pre-token") == []


def test_attributes_upload_request_and_shared_pushes():
    state, _ = make()
    dev = state.device("pre-token")
    state.post_attributes(dev, b'{"fw":"v1.0","n":1}')
    with pytest.raises(PayloadError):
        state.post_attributes(dev, b'[{"a":1}]')
    pushes: list[tuple[str, object]] = []
    handle = state.listen("pre-token", lambda kind, data: pushes.append((kind, data)))
    state.set_shared_attributes("pre-token", {"interval": 5})
    assert state.get_attributes(dev, None, None) == {"client": {"fw": "v1.0", "n": 1}, "shared": {"interval": 5}}
    assert state.get_attributes(dev, ["fw"], None) == {"client": {"fw": "v1.0"}}
    assert state.get_attributes(dev, ["nope"], ["nope"]) == {}
    state.delete_shared_attributes("pre-token", ["interval"])
    assert pushes == [("attributes", {"interval": 5}), ("attributes", {"deleted": ["interval"]})]
    state.unlisten(handle)
    state.set_shared_attributes("pre-token", {"x": 1})
    assert len(pushes) == 2
    assert state.attributes("pre-token") == {"client": {"fw": "v1.0", "n": 1}, "shared": {"x": 1},
                                             "server": {}}


def test_rpc_round_trip_and_device_deletion_notifies():
    state, _ = make()
    pushes: list[tuple[str, object]] = []
    state.listen("pre-token", lambda kind, data: pushes.append((kind, data)))
    rpc_id = state.send_rpc("pre-token", "setLed", {"on": True})
    assert pushes == [("rpc", (rpc_id, "setLed", {"on": True}))]
    state.record_rpc_reply(state.device("pre-token"), rpc_id, b'{"ok":1}')
    assert state.rpc_replies("pre-token") == {rpc_id: {"ok": 1}}
    assert state.delete_device("pre-token") is True
    assert pushes[-1] == ("deleted", None)
    assert state.device("pre-token") is None and state.device_by_token("preTokenValue0000001") is None
    assert state.delete_device("pre-token") is False
    with pytest.raises(KeyError):
        state.send_rpc("pre-token", "m", None)


def test_devices_listing_for_inspection():
    state, _ = make()
    listing = {d["name"]: d for d in state.devices()}
    assert listing["pre-basic"]["credentialsValue"] == {"clientId": "pre-client", "userName": "pre-user",
                                                        "password": "pre-pass"}
    assert set(listing["pre-token"]) == {"name", "profile", "credentialsType", "credentialsValue",
                                         "provisionState", "createdTime"}
    assert listing["pre-token"]["provisionState"] is None


def test_state_survives_a_restart_with_the_same_db(tmp_path):
    db = str(tmp_path / "state.db")
    state = EmulatorState(CONFIG, db, events=lambda _: None)
    token = state.provision(req(deviceName="kept"), "http")["credentialsValue"]
    state.post_telemetry(state.device("kept"), b'{"a":1}')
    state.close()
    again = EmulatorState(CONFIG, db, events=lambda _: None)
    assert again.device_by_token(token).name == "kept"
    assert again.telemetry("kept")[0]["values"] == {"a": 1}
    assert again.provision(req(deviceName="kept"), "http") == FAILURE
    again.close()


def test_profiles_without_a_provision_key_load_and_never_match():
    config = copy.deepcopy(CONFIG)
    config["profiles"][1]["provisionDeviceKey"] = ""
    config["profiles"][2]["provisionDeviceKey"] = ""
    state, _ = make(config=config)
    assert state.provision(req("", CHECK_SECRET, deviceName="pre-token"), "http") == NOT_FOUND
    assert state.provision(req("", DISABLED_SECRET), "http") == NOT_FOUND
    assert state.provision(req(deviceName="still-works"), "http")["status"] == "SUCCESS"


def test_renamed_profile_keeping_its_key_in_the_db_is_a_config_error(tmp_path):
    db = str(tmp_path / "state.db")
    EmulatorState(CONFIG, db, events=lambda _: None).close()
    renamed = copy.deepcopy(CONFIG)
    renamed["profiles"][0]["name"] = "allow-renamed"
    renamed["devices"][4]["profile"] = "allow-renamed"
    with pytest.raises(ConfigError, match=r"profiles\[0\]\.provisionDeviceKey: already used"):
        EmulatorState(renamed, db, events=lambda _: None)
    again = EmulatorState(CONFIG, db, events=lambda _: None)
    assert again.provision(req(deviceName="after"), "http")["status"] == "SUCCESS"
    again.close()


def test_a_config_refused_by_the_db_changes_nothing_in_it(tmp_path):
    db = str(tmp_path / "state.db")
    EmulatorState(CONFIG, db, events=lambda _: None).close()
    refused = copy.deepcopy(CONFIG)
    refused["profiles"][0]["provisionDeviceSecret"] = "changed-secret"
    refused["profiles"][1]["name"] = "check-renamed"
    refused["devices"] = []
    with pytest.raises(ConfigError):
        EmulatorState(refused, db, events=lambda _: None)
    kept = EmulatorState({"profiles": [], "devices": []}, db, events=lambda _: None)
    assert kept.provision(req(ALLOW_KEY, "changed-secret", deviceName="x"), "http") == NOT_FOUND
    assert kept.provision(req(deviceName="y"), "http")["status"] == "SUCCESS"
    kept.close()


def test_a_database_from_before_the_rest_api_gets_ids_and_keeps_its_data(tmp_path):
    db = str(tmp_path / "old.db")
    old = sqlite3.connect(db)
    old.executescript("""
        CREATE TABLE profiles (name TEXT PRIMARY KEY, provision_key TEXT UNIQUE, provision_secret TEXT,
                               provision_type TEXT NOT NULL);
        CREATE TABLE devices (name TEXT PRIMARY KEY, profile TEXT NOT NULL, created_time INTEGER NOT NULL);
        CREATE TABLE attributes (device TEXT NOT NULL, scope TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
                                 PRIMARY KEY (device, scope, key));
        INSERT INTO profiles VALUES ('allow', 'allow-key', 'allow-secret', 'ALLOW_CREATE_NEW_DEVICES');
        INSERT INTO devices VALUES ('kept', 'allow', 5);
        INSERT INTO attributes VALUES ('kept', 'shared', 'interval', '30');
    """)
    old.close()
    state = EmulatorState(CONFIG, db, events=lambda _: None)
    kept = next(d for d in state.device_entities() if d["name"] == "kept")
    assert kept["createdTime"] == 5 and kept["deviceProfileId"]["id"] == \
        next(p for p in state.profiles() if p["name"] == "allow")["id"]["id"]
    assert state.attribute_entries("kept", "shared") == [("interval", 30, 0)]
    assert {p["name"] for p in state.profiles()} == {"default", "allow", "check", "off"}
    tenant = state.tenant_id
    state.close()
    assert EmulatorState(CONFIG, db, events=lambda _: None).tenant_id == tenant


def test_device_and_profile_ids_are_time_based_uuids_kept_across_restarts(tmp_path):
    db = str(tmp_path / "state.db")
    state = EmulatorState(CONFIG, db, events=lambda _: None)
    ids = {d["name"]: d["id"]["id"] for d in state.device_entities()}
    assert all(uuid.UUID(i).version == 1 for i in ids.values())
    state.close()
    again = EmulatorState(CONFIG, db, events=lambda _: None)
    assert {d["name"]: d["id"]["id"] for d in again.device_entities()} == ids
    again.close()


# ---------------------------------------------------------------- config validation

@pytest.mark.parametrize("mutate, field", [
    (lambda c: c.update(profiles={}), "profiles"),
    (lambda c: c["profiles"][0].update(provisionType="SOMETIMES"), "profiles[0].provisionType"),
    (lambda c: c["profiles"][1].pop("provisionDeviceSecret"), "profiles[1].provisionDeviceSecret"),
    (lambda c: c["profiles"][2].update(name="allow"), "profiles[2].name"),
    (lambda c: c["profiles"][1].update(provisionDeviceKey=ALLOW_KEY), "profiles[1].provisionDeviceKey"),
    (lambda c: c["devices"][0].update(profile="ghost"), "devices[0].profile"),
    (lambda c: c["devices"][1].update(credentialsType="PSK"), "devices[1].credentialsType"),
    (lambda c: c["devices"][0].update(credentialsValue=5), "devices[0].credentialsValue"),
    (lambda c: c["devices"][1].update(credentialsValue={"password": "p"}), "devices[1].credentialsValue"),
    (lambda c: c["devices"][4].update(credentialsValue="preTokenValue0000001"), "devices[4].credentialsValue"),
    (lambda c: c["devices"][2].update(name="pre-token"), "devices[2].name"),
    (lambda c: c.update(extra=1), "extra"),
    (lambda c: c.update(users={}), "users"),
    (lambda c: c.update(users=[{"email": " a@b", "password": "p"}]), "users[0].email"),
    (lambda c: c.update(users=[{"email": "a@b", "password": ""}]), "users[0].password"),
    (lambda c: c.update(users=[{"email": "a@b", "password": "p", "role": "x"}]), "users[0]: unknown field 'role'"),
    (lambda c: c.update(users=[{"email": "a@b", "password": "p"}, {"email": "A@B", "password": "q"}]),
     "users[1].email"),
    (lambda c: c.update(jwt={"tokenExpirationTime": 0}), "jwt.tokenExpirationTime"),
    (lambda c: c.update(jwt={"refreshTokenExpTime": "1"}), "jwt.refreshTokenExpTime"),
    (lambda c: c.update(jwt={"signingKey": "k"}), "jwt: unknown field 'signingKey'"),
])
def test_bad_config_names_the_field(mutate, field):
    config = copy.deepcopy(CONFIG)
    mutate(config)
    with pytest.raises(ConfigError) as info:
        EmulatorState(config)
    assert field in str(info.value)


def test_load_config_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "missing.json"))


def test_parse_version():
    assert parse_version("4.2.1.1") == (4, 2, 1, 1) and parse_version("3.8") == (3, 8)
    for bad in ("4", "4.x", "1.2.3.4.5", ""):
        with pytest.raises(ValueError):
            parse_version(bad)
    assert parse_version("3.2") == (3, 2)
    for older in ("3.1.1", "2.5"):  # no device provisioning before 3.2
        with pytest.raises(ValueError, match="3.2 and later"):
            parse_version(older)


def test_parse_keys_drops_empty_keys_and_empty_means_not_given():
    assert parse_keys(None) is None and parse_keys("") is None
    assert parse_keys("a,,b,") == ["a", "b"] and parse_keys(",") == []
