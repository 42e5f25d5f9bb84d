# The saved credentials: one small JSON file in flash, replaced power-safely. A save writes <path>.tmp and renames it
# over <path>; LittleFS commits a rename atomically, so a power cut leaves the old record or the new one.
# Paths stay relative: the Unix port cannot rename between two absolute paths under a VfsPosix mounted with a root.
import errno
import json
import os

from micropython import const
from tbfleet import log

VERSION = const(1)
PATH = "creds.json"
# Far above any real record; bounds the RAM that reading a damaged file can take.
_MAX_BYTES = const(2048)


class StoreError(Exception):
    # A record that does not have the shape this format version saves; args[0] says what is wrong, naming fields
    # this format defines but never a value from the record.
    pass


def _fields(kind):
    # The credential fields each type carries, beside "type", "device" and "server".
    if kind == "ACCESS_TOKEN":
        return ("token",)
    if kind == "MQTT_BASIC":
        return ("client_id", "username", "password")
    if kind == "X509_CERTIFICATE":
        return ()
    raise StoreError("unknown credentials type")


def _str(rec, k):
    v = rec.get(k)
    if not isinstance(v, str):
        raise StoreError("field '%s' missing or not a string" % k)
    return v


def _check(rec):
    if not isinstance(rec, dict):
        raise StoreError("record is not a JSON object")
    kind = _str(rec, "type")
    fields = _fields(kind)
    for k in rec:
        if k not in fields and k not in ("type", "device", "server"):
            # Not named: in a damaged file a "field" may well be a shifted value, such as the token.
            raise StoreError("a field that %s does not have" % kind)
    _str(rec, "device")
    host, _, port = _str(rec, "server").rpartition(":")
    if not host or not port.isdigit():
        raise StoreError("field 'server' is not host:port")
    for k in fields:
        if k not in rec:
            raise StoreError("field '%s' missing" % k)
        v = rec[k]
        # MQTT_BASIC parts are kept exactly as the server returned them: "" and null included.
        if not (isinstance(v, str) or (v is None and kind == "MQTT_BASIC")):
            raise StoreError("field '%s' has the wrong type" % k)
    if kind == "ACCESS_TOKEN" and not rec["token"]:
        raise StoreError("field 'token' is empty")
    if kind == "MQTT_BASIC" and not (rec["client_id"] or rec["username"]):
        raise StoreError("fields 'client_id' and 'username' both empty")


def _decode(data):
    # File bytes -> validated record (without the version), or StoreError saying what is wrong.
    if not data:
        raise StoreError("empty file")
    if len(data) > _MAX_BYTES:
        raise StoreError("larger than %d bytes" % _MAX_BYTES)
    try:
        rec = json.loads(data.decode())
    except ValueError:  # UnicodeError is a ValueError too
        raise StoreError("not valid JSON (truncated or damaged)")
    if not isinstance(rec, dict):
        raise StoreError("record is not a JSON object")
    v = rec.pop("v", None)
    if type(v) is not int or v != VERSION:
        raise StoreError("format version missing or not %d" % VERSION)
    _check(rec)
    return rec


def _read(path):
    # The file's bytes (at most one past the limit), or None when there is no such file. Sized by stat: a read of
    # the limit would take a 2 KB buffer for a record of 100 bytes.
    try:
        with open(path, "rb") as f:
            return f.read(min(os.stat(path)[6], _MAX_BYTES) + 1)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return None
        raise


def _exists(path):
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    return True


def _set_aside(path, why):
    bad = path + ".bad"
    os.rename(path, bad)
    log.warn("store: %s %s; set aside as %s", path, why, bad)


def _settle(path):
    # Deal with a temporary file left by a save that power cut short. With the record in place it is the unfinished
    # new one: drop it. With no record, a complete one was cut off just before its rename (or, on FAT, between the
    # rename's removal of the old file and the rename itself): finish that save.
    tmp = path + ".tmp"
    if not _exists(tmp):
        return
    if _exists(path):
        os.remove(tmp)
        log.info("store: removed the unfinished %s", tmp)
        return
    try:
        _decode(_read(tmp))
    except StoreError as e:
        os.remove(tmp)
        log.warn("store: removed the unfinished %s (%s)", tmp, e.args[0])
        return
    os.rename(tmp, path)
    log.info("store: completed the save that %s was left from", tmp)


def save(record, path=PATH):
    # Replace the saved record power-safely; StoreError (nothing written) when the record is not valid.
    _check(record)
    rec = dict(record)
    rec["v"] = VERSION
    body = json.dumps(rec).encode()
    if len(body) > _MAX_BYTES:
        raise StoreError("record larger than %d bytes" % _MAX_BYTES)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(body)
        f.flush()
    os.rename(tmp, path)
    log.info("store: %s credentials saved to %s", record["type"], path)


def load(path=PATH):
    # The saved record, or None when there is none; a damaged record is set aside (<path>.bad) and None returned.
    _settle(path)
    data = _read(path)
    if data is None:
        return None
    try:
        return _decode(data)
    except StoreError as e:
        _set_aside(path, "is damaged: " + e.args[0])
        return None


def discard(reason="discarded", path=PATH):
    # Set the saved record aside (<path>.bad, replacing an older one), e.g. when the server revoked it.
    _settle(path)
    if _exists(path):
        _set_aside(path, "no longer used: " + reason)


def server_of(cfg):
    return "%s:%d" % (cfg.host, cfg.port)


def stamp(creds, cfg):
    # The record to save: the credentials plus the device name and server they were issued for.
    rec = dict(creds)
    rec["device"] = cfg.device_name
    rec["server"] = server_of(cfg)
    return rec


def matches(rec, cfg):
    # Whether a loaded record was issued for the device and server this config names. The port is not compared:
    # the same server answers MQTT, HTTP and CoAP on different ports with the same credentials.
    return rec["device"] == cfg.device_name and rec["server"].rpartition(":")[0] == cfg.host
