# The saved credentials: one small JSON file in flash, replaced power-safely. A save writes <path>.tmp and renames it
# over <path>; LittleFS commits a rename atomically, so a power cut leaves the old record or the new one.
# Paths stay relative: the Unix port cannot rename between two absolute paths under a VfsPosix mounted with a root.
# A record that does not have the shape this format version saves is a ValueError whose args[0] says what is wrong,
# naming fields this format defines but never a value from the record.
import json
import os

from micropython import const
from tbfleet import log

_VERSION = const(1)
# Far above any real record; bounds the RAM that reading a damaged file can take.
_MAX_BYTES = const(2048)
_ENOENT = const(2)


def _check(rec):
    if type(rec) is not dict:
        raise ValueError("not a JSON object")
    kind = rec.get("type")
    # The credential fields each type carries, beside "type", "device" and "server".
    fields = {"ACCESS_TOKEN": "token", "MQTT_BASIC": "client_id username password", "X509_CERTIFICATE": ""}.get(
        kind if type(kind) is str else None)
    if fields is None:
        raise ValueError("unknown credentials type")
    fields = fields.split()
    for name in ["device", "server"] + fields:
        value = rec.get(name, 0)
        # MQTT_BASIC parts are kept exactly as the server returned them: "" and null included.
        if type(value) is not str and not (value is None and kind == "MQTT_BASIC" and name in fields):
            raise ValueError("field '%s' missing or not text" % name)
    if len(rec) != len(fields) + 3:
        # Not named: in a damaged file a "field" may well be a shifted value, such as the token.
        raise ValueError("a field that %s does not have" % kind)
    host, _, port = rec["server"].rpartition(":")
    if not host or not port.isdigit():
        raise ValueError("field 'server' is not host:port")
    if not (kind == "X509_CERTIFICATE" or rec.get("token") or rec.get("client_id") or rec.get("username")):
        raise ValueError("empty credentials")


def _read(path):
    # The valid record in path (without its version), None when there is no such file, ValueError when damaged.
    # The read is sized by stat: a read of the limit would take a 2 KB buffer for a record of 100 bytes.
    try:
        with open(path, "rb") as f:
            data = f.read(min(os.stat(path)[6], _MAX_BYTES) + 1)
    except OSError as e:
        if e.errno == _ENOENT:
            return None
        raise
    if len(data) > _MAX_BYTES:
        raise ValueError("larger than %d bytes" % _MAX_BYTES)
    try:
        rec = json.loads(data.decode())
    except ValueError:  # an empty file, invalid UTF-8 too (a UnicodeError is a ValueError)
        raise ValueError("not valid JSON")
    if type(rec) is dict:
        version = rec.pop("v", None)
        if type(version) is not int or version != _VERSION:
            raise ValueError("format version missing or not %d" % _VERSION)
    _check(rec)
    return rec


def save(rec, path="creds.json"):
    # Replace the saved record power-safely; ValueError (nothing written) when the record is not valid.
    _check(rec)
    kind = rec["type"]
    rec = dict(rec)
    rec["v"] = _VERSION
    data = json.dumps(rec).encode()
    if len(data) > _MAX_BYTES:
        raise ValueError("larger than %d bytes" % _MAX_BYTES)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:  # closing flushes
        f.write(data)
    os.rename(tmp, path)
    log.info("store: %s credentials saved to %s", kind, path)


def load(path="creds.json"):
    # The saved record, or None when there is none; a damaged record is set aside (<path>.bad) and None returned.
    # First a temporary file left by a save that power cut short is dealt with. With the record in place it is the
    # unfinished new one: dropped. With no record, a complete one was cut off just before its rename (or, on FAT,
    # between the rename's removal of the old file and the rename itself): that save is finished.
    tmp = path + ".tmp"
    try:
        os.stat(tmp)
    except OSError:
        tmp = None
    if tmp:
        try:
            os.stat(path)
            why = "a record is in place"
        except OSError:
            try:
                _read(tmp)
                os.rename(tmp, path)
                log.info("store: completed the cut save in %s", tmp)
                why = None
            except ValueError as e:
                why = e.args[0]
        if why:
            os.remove(tmp)
            log.warn("store: removed the unfinished %s (%s)", tmp, why)
    try:
        return _read(path)
    except ValueError as e:
        discard(e.args[0], path)


def discard(reason, path="creds.json"):
    # Set the saved record aside (<path>.bad, replacing an older one), e.g. when the server revoked it. A temporary
    # file a cut save left is not looked at: the record was loaded, and so the leftover dealt with, earlier this boot.
    bad = path + ".bad"
    try:
        os.rename(path, bad)
    except OSError as e:
        if e.errno == _ENOENT:
            return
        raise
    log.warn("store: %s set aside as %s (%s)", path, bad, reason)


def stamp(creds, cfg):
    # The record to save: the credentials plus the device name and server they were issued for.
    rec = dict(creds)
    rec["device"] = cfg.device_name
    rec["server"] = "%s:%d" % (cfg.host, cfg.port)
    return rec


def matches(rec, cfg):
    # Whether a loaded record was issued for the device and server this config names. The port is not compared:
    # the same server answers MQTT, HTTP and CoAP on different ports with the same credentials.
    return rec["device"] == cfg.device_name and rec["server"].rpartition(":")[0] == cfg.host
