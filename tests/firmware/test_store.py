# The credential store on the board's filesystem (here the test's scratch directory): round trips, validation,
# damaged records set aside, leftovers of a cut save, and no secret in the log.
import json
import os

from mptest import eq, raises
from tbfleet import log, store

TOKEN = "kT3vQ9pZx7LmB2nR8sYw"
PASSWORD = "Zq81-w0rd-fleet"
DEVICE = "esp32-a4cf12f3e9b0"
SERVER = "tb.fleet.example:1883"

ACCESS = {"type": "ACCESS_TOKEN", "token": TOKEN, "device": DEVICE, "server": SERVER}
BASIC = {"type": "MQTT_BASIC", "client_id": DEVICE, "username": "fleet-a4cf12", "password": PASSWORD,
         "device": DEVICE, "server": SERVER}
X509 = {"type": "X509_CERTIFICATE", "device": DEVICE, "server": "tb.fleet.example:8883"}


class Cfg:
    # The attributes of tbfleet.config that the store looks at.
    def __init__(self, host="tb.fleet.example", port=1883, device_name=DEVICE):
        self.host = host
        self.port = port
        self.device_name = device_name


def capture_log():
    lines = []

    def keep(msg, *args):
        lines.append(msg % args if args else msg)

    log.debug = log.info = log.warn = log.error = keep
    return lines


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def with_(rec, **changes):
    rec = dict(rec)
    rec.update(changes)
    return rec


def without(rec, key):
    rec = dict(rec)
    del rec[key]
    return rec


def encoded(rec, v=1):
    rec = dict(rec)
    rec["v"] = v
    return json.dumps(rec).encode()


def test_round_trip_each_type():
    for rec in (ACCESS, BASIC, X509):
        store.save(rec)
        eq(store.load(), rec)
        eq(sorted(os.listdir()), ["creds.json"])


def test_mqtt_basic_keeps_server_values_exactly():
    # The server may return "" for parts the device did not send, and null for pre-provisioned devices.
    for rec in (with_(BASIC, password=""), with_(BASIC, client_id="", password=None),
                with_(BASIC, username=None), with_(BASIC, username="föhn ünïcode ✓")):
        store.save(rec)
        eq(store.load(), rec)


def test_file_is_versioned_json_and_save_replaces():
    store.save(ACCESS)
    store.save(BASIC)
    on_disk = json.loads(read("creds.json"))
    eq(on_disk.pop("v"), 1)
    eq(on_disk, BASIC)
    eq(store.load(), BASIC)


def test_nothing_saved_is_none():
    lines = capture_log()
    eq(store.load(), None)
    eq(os.listdir(), [])
    eq(lines, [])


def test_other_path_in_a_subdirectory():
    os.mkdir("data")
    store.save(X509, "data/tb.json")
    eq(store.load("data/tb.json"), X509)
    eq(store.load(), None)
    eq(os.listdir("data"), ["tb.json"])


def test_save_refuses_invalid_records():
    cases = [
        ("not a dict", [("type", "ACCESS_TOKEN")], "not a JSON object"),
        ("unknown type", with_(ACCESS, type="LWM2M_CREDENTIALS"), "unknown credentials type"),
        ("no type", without(ACCESS, "type"), "unknown credentials type"),
        ("type not text", with_(ACCESS, type=["ACCESS_TOKEN"]), "unknown credentials type"),
        ("no token", without(ACCESS, "token"), "field 'token' missing or not text"),
        ("empty token", with_(ACCESS, token=""), "empty credentials"),
        ("token not str", with_(ACCESS, token=12345), "field 'token' missing or not text"),
        ("null token", with_(ACCESS, token=None), "field 'token' missing or not text"),
        ("no password", without(BASIC, "password"), "field 'password' missing or not text"),
        ("password bytes", with_(BASIC, password=b"x"), "field 'password' missing or not text"),
        ("basic without id", with_(BASIC, client_id="", username=None), "empty credentials"),
        ("no device", without(ACCESS, "device"), "field 'device' missing or not text"),
        ("device null", with_(X509, device=None), "field 'device' missing or not text"),
        ("no server", without(ACCESS, "server"), "field 'server' missing or not text"),
        ("server no port", with_(ACCESS, server="tb.fleet.example"), "not host:port"),
        ("server no host", with_(ACCESS, server=":1883"), "not host:port"),
        ("server port text", with_(ACCESS, server="tb:mqtt"), "not host:port"),
        ("extra field", with_(X509, token=TOKEN), "a field that X509_CERTIFICATE does not have"),
        ("extra and missing", with_(without(ACCESS, "token"), user="u"), "field 'token' missing"),
        ("version inside", with_(ACCESS, v=1), "a field that ACCESS_TOKEN does not have"),
        ("too large", with_(ACCESS, token="t" * 2100), "larger than 2048 bytes"),
    ]
    for name, rec, why in cases:
        e = raises(ValueError, store.save, rec)
        assert why in e.args[0], (name, e.args[0])
        eq((name, os.listdir()), (name, []))


def test_damaged_records_are_set_aside():
    valid = encoded(ACCESS)
    cases = [
        ("empty file", b"", "not valid JSON"),
        ("truncated", valid[: len(valid) // 2], "not valid JSON"),
        ("cut one byte short", valid[:-1], "not valid JSON"),
        ("bad JSON", b'{"v": 1, "type": "ACCESS_TOKEN", "token": tru}', "not valid JSON"),
        # MicroPython's parser takes ':' and ',' for blanks: with a value gone, later keys and values swap places,
        # and the token becomes a key. Validation still refuses it, and the message does not name that "key".
        ("value missing", b'{"v": 1, "type": "ACCESS_TOKEN", "device": , "token": "%s", "server": "%s"}'
         % (TOKEN.encode(), SERVER.encode()), "field 'server' missing or not text"),
        ("erased flash", b"\xff" * 64, "not valid JSON"),
        ("not UTF-8", valid.replace(b"kT3v", b"k\xc3\x28v"), "not valid JSON"),
        ("not an object", b'["ACCESS_TOKEN"]', "not a JSON object"),
        ("no version", json.dumps(ACCESS).encode(), "format version missing or not 1"),
        ("future version", encoded(ACCESS, 2), "format version"),
        ("version as text", encoded(ACCESS, "1"), "format version"),
        ("version as bool", encoded(ACCESS, True), "format version"),
        ("unknown type", encoded(with_(ACCESS, type="LWM2M_CREDENTIALS")), "unknown credentials type"),
        ("missing field", encoded(without(BASIC, "username")), "field 'username' missing"),
        ("wrong type", encoded(with_(ACCESS, token=["x"])), "field 'token' missing or not text"),
        ("wrong server", encoded(with_(ACCESS, server=1883)), "field 'server'"),
        ("too large", encoded(with_(ACCESS, token="t" * 3000)), "larger than 2048 bytes"),
    ]
    for name, data, why in cases:
        lines = capture_log()
        write("creds.json", data)
        eq((name, store.load()), (name, None))
        eq((name, sorted(os.listdir())), (name, ["creds.json.bad"]))
        eq((name, read("creds.json.bad")), (name, data))
        eq((name, len(lines)), (name, 1))
        assert lines[0].startswith("store: creds.json set aside as creds.json.bad (") and why in lines[0], (name, lines)
        assert TOKEN not in lines[0] and "kT3v" not in lines[0], (name, lines)
        eq((name, store.load()), (name, None))
        os.remove("creds.json.bad")


def test_set_aside_replaces_an_older_bad_record():
    write("creds.json.bad", b"older damage")
    write("creds.json", b"{")
    eq(store.load(), None)
    eq(read("creds.json.bad"), b"{")
    eq(os.listdir(), ["creds.json.bad"])


def test_leftover_temporary_file_beside_a_record_is_removed():
    store.save(ACCESS)
    write("creds.json.tmp", encoded(BASIC)[:40])
    lines = capture_log()
    eq(store.load(), ACCESS)
    eq(os.listdir(), ["creds.json"])
    eq(lines, ["store: removed the unfinished creds.json.tmp (a record is in place)"])


def test_save_over_a_leftover_temporary_file():
    store.save(ACCESS)
    write("creds.json.tmp", b"\xff" * 300)
    store.save(X509)
    eq(os.listdir(), ["creds.json"])
    eq(store.load(), X509)


def test_complete_temporary_file_without_record_finishes_the_save():
    # A first save cut between closing the temporary file and the rename.
    write("creds.json.tmp", encoded(BASIC))
    lines = capture_log()
    eq(store.load(), BASIC)
    eq(os.listdir(), ["creds.json"])
    eq(lines, ["store: completed the cut save in creds.json.tmp"])


def test_damaged_temporary_file_without_record_is_removed():
    write("creds.json.tmp", encoded(BASIC)[:-7])
    lines = capture_log()
    eq(store.load(), None)
    eq(os.listdir(), [])
    assert "removed the unfinished creds.json.tmp (not valid JSON" in lines[0], lines


def test_discard_sets_the_record_aside():
    store.save(BASIC)
    lines = capture_log()
    store.discard("refused 5 times (not authorized)")
    eq(store.load(), None)
    eq(os.listdir(), ["creds.json.bad"])
    eq(json.loads(read("creds.json.bad")), with_(BASIC, v=1))
    eq(lines, ["store: creds.json set aside as creds.json.bad (refused 5 times (not authorized))"])
    store.discard("nothing there")
    eq(os.listdir(), ["creds.json.bad"])


def test_secrets_never_logged():
    lines = capture_log()
    for rec in (ACCESS, BASIC):
        store.save(rec)
        store.load()
        write("creds.json.tmp", encoded(rec)[:-3])
        store.load()
        write("creds.json", encoded(rec)[:-1])
        store.load()
        store.save(rec)
        store.discard("revoked")
        write("creds.json.tmp", encoded(rec))
        store.load()
        write("creds.json", encoded(rec, 7))
        store.load()
    assert len(lines) >= 14, lines
    for line in lines:
        assert TOKEN not in line and PASSWORD not in line, line


def test_stamp_and_matches():
    cfg = Cfg()
    rec = store.stamp({"type": "ACCESS_TOKEN", "token": TOKEN}, cfg)
    eq(rec, ACCESS)
    store.save(rec)
    rec = store.load()
    assert store.matches(rec, cfg)
    assert not store.matches(rec, Cfg(host="tb.other.example"))
    assert store.matches(rec, Cfg(port=8080))  # another transport of the same server
    assert not store.matches(rec, Cfg(device_name="esp32-000000000000"))
