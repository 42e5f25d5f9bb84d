"""The emulator's state and ThingsBoard's server-side logic, shared by the MQTT, HTTP and CoAP transports.

Everything here is synchronous (sqlite3) and is called from the one asyncio event loop. Behaviour follows
docs/thingsboard-device-api.md (the "reference"): provisioning §1, §2 and §7; MQTT credentials §3.4-3.5;
payloads §6. Secrets (provision secrets, tokens, passwords) never appear in event lines.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import math
import re
import secrets
import sqlite3
import string
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from host_tools.emulator import limits, ota
from host_tools.emulator.ota import OtaError, OtaPackage

ACCESS_TOKEN = "ACCESS_TOKEN"
MQTT_BASIC = "MQTT_BASIC"
X509_CERTIFICATE = "X509_CERTIFICATE"
LWM2M_CREDENTIALS = "LWM2M_CREDENTIALS"
CREDENTIALS_TYPES = (ACCESS_TOKEN, MQTT_BASIC, X509_CERTIFICATE)
X509_CHAIN = "X509_CERTIFICATE_CHAIN"

ALLOW_CREATE = "ALLOW_CREATE_NEW_DEVICES"
CHECK_PRE_PROVISIONED = "CHECK_PRE_PROVISIONED_DEVICES"
DISABLED = "DISABLED"
PROVISION_TYPES = (ALLOW_CREATE, CHECK_PRE_PROVISIONED, DISABLED)

PROVISIONED = "provisioned"
NOT_FOUND_MSG = "Provision data was not found!"
FAILURE_MSG = "Failed to provision device!"

# MQTT 3.1.1 CONNACK return codes the server uses (§3.5).
# CONNACK reasons as MQTT 5 codes (the MQTT transport maps them to 3.1.1 return codes for 3.x sessions).
CONNACK_ACCEPTED = 0x00
CONNACK_CLIENT_IDENTIFIER_NOT_VALID = 0x85
CONNACK_BAD_USERNAME_OR_PASSWORD = 0x86
CONNACK_NOT_AUTHORIZED = 0x87

_ALPHANUMERIC = string.ascii_letters + string.digits
_LONG_MIN, _LONG_MAX = -(2 ** 63), 2 ** 63 - 1
# NumberUtils.isParsable, which gates type casting: an optional '-', digits (Character.isDigit: any Unicode decimal
# digit, as Python's \d) with at most one inner or leading '.'. Python's int()/float() would also take "1_000",
# " 12 ", "+5" and "1e3".
_NUMBER = re.compile(r"-?(?:\d+(?:\.\d+)?|\.\d+)")
# ThingsBoard's DeviceCredentialsType enum, named in the exception Java's valueOf() throws.
_ENUM_CLASS = "org.thingsboard.server.common.data.security.DeviceCredentialsType"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS profiles (
    name TEXT PRIMARY KEY, provision_key TEXT UNIQUE, provision_secret TEXT, provision_type TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    name TEXT PRIMARY KEY, profile TEXT NOT NULL, created_time INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS credentials (
    device TEXT PRIMARY KEY REFERENCES devices(name) ON DELETE CASCADE,
    type TEXT NOT NULL, id TEXT NOT NULL UNIQUE, value TEXT);
CREATE TABLE IF NOT EXISTS attributes (
    device TEXT NOT NULL REFERENCES devices(name) ON DELETE CASCADE,
    scope TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (device, scope, key));
CREATE TABLE IF NOT EXISTS telemetry (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, device TEXT NOT NULL REFERENCES devices(name) ON DELETE CASCADE,
    ts INTEGER NOT NULL, kv TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rpc (
    id INTEGER PRIMARY KEY AUTOINCREMENT, device TEXT NOT NULL REFERENCES devices(name) ON DELETE CASCADE,
    method TEXT NOT NULL, params TEXT NOT NULL, reply TEXT);
CREATE TABLE IF NOT EXISTS ota_packages (
    id TEXT PRIMARY KEY, created_time INTEGER NOT NULL,
    profile TEXT REFERENCES profiles(name) ON UPDATE CASCADE ON DELETE CASCADE,
    type TEXT NOT NULL, title TEXT NOT NULL, version TEXT NOT NULL, tag TEXT, url TEXT, file_name TEXT,
    content_type TEXT, checksum_algorithm TEXT, checksum TEXT, data_size INTEGER, data BLOB,
    additional_info TEXT NOT NULL DEFAULT '{}', UNIQUE (title, version));
CREATE TABLE IF NOT EXISTS device_ota (
    device TEXT NOT NULL REFERENCES devices(name) ON UPDATE CASCADE ON DELETE CASCADE, type TEXT NOT NULL,
    package TEXT NOT NULL REFERENCES ota_packages(id), PRIMARY KEY (device, type));
CREATE TABLE IF NOT EXISTS profile_ota (
    profile TEXT NOT NULL REFERENCES profiles(name) ON UPDATE CASCADE ON DELETE CASCADE, type TEXT NOT NULL,
    package TEXT NOT NULL REFERENCES ota_packages(id), PRIMARY KEY (profile, type));
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

# Columns the REST API added to the first schema. A database made before them gets them when it is opened; rows
# without an id get one then.
_ADDED_COLUMNS = (
    ("profiles", "id", "TEXT"), ("profiles", "created_time", "INTEGER"),
    ("profiles", "version", "INTEGER NOT NULL DEFAULT 1"), ("profiles", "data", "TEXT NOT NULL DEFAULT '{}'"),
    ("devices", "id", "TEXT"), ("devices", "version", "INTEGER NOT NULL DEFAULT 1"),
    ("devices", "data", "TEXT NOT NULL DEFAULT '{}'"),
    ("attributes", "ts", "INTEGER NOT NULL DEFAULT 0"),
)

NULL_UUID = "13814000-1dd2-11b2-8080-808080808080"
"""EntityId.NULL_UUID: the customerId of a device no customer owns."""

DEFAULT_PROFILE = "default"
"""The profile every ThingsBoard tenant has; devices saved without a profile get it."""

JWT_DEFAULTS = {"tokenExpirationTime": 9000, "refreshTokenExpTime": 604800}
"""security.jwt lifetimes in seconds (thingsboard.yml)."""


class ConfigError(ValueError):
    """The emulator's config file is invalid; the message names the field."""


class RequestError(Exception):
    """A provisioning body the server cannot parse; str() is the server's exception message.

    `json_object` says whether the body was a JSON object at all (MQTT acknowledges those before it closes).
    """

    def __init__(self, message: str, json_object: bool) -> None:
        super().__init__(message)
        self.json_object = json_object


class PayloadError(Exception):
    """A telemetry, attributes or RPC body the server refuses; str() is a parser-like message."""


class RateLimited(Exception):
    """A device's message over one of its tenant profile's rate limits; str() names the limit (limits.FIELDS)."""


class DataError(ValueError):
    """An entity the REST API refuses to save (DataValidationException: 400); str() is ThingsBoard's message."""


class VersionConflict(Exception):
    """A save with a stale `version` (EntityVersionMismatchException: 409); str() is ThingsBoard's message."""


@dataclass
class Device:
    """A device and its credentials, as stored.

    `credentials_value` is the token for ACCESS_TOKEN, the JSON text of {"clientId","userName","password"} for
    MQTT_BASIC, and the one-line base64 certificate for X509_CERTIFICATE.
    """

    name: str
    profile: str
    credentials_type: str
    credentials_id: str
    credentials_value: str
    created_time: int


def cert_trim_newlines(text: str) -> str:
    """ThingsBoard's certTrimNewLines: drop the PEM markers and every CR/LF, keep other whitespace."""
    for cut in ("-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----", "\n", "\r"):
        text = text.replace(cut, "")
    return text


def sha3_hex(text: str) -> str:
    """ThingsBoard's EncryptionUtil.getSha3Hash: SHA3-256 (FIPS 202) hex of the trimmed text."""
    return hashlib.sha3_256(cert_trim_newlines(text).encode()).hexdigest()


OLDEST_VERSION = (3, 2)
"""The first release with device provisioning, the oldest whose behaviour the model describes."""


def parse_version(text: str) -> tuple[int, ...]:
    """'4.2.1.1' -> (4, 2, 1, 1); raises ValueError unless it is X.Y[.Z[.W]]."""
    parts = text.split(".")
    if not 2 <= len(parts) <= 4 or not all(p.isdigit() for p in parts):
        raise ValueError(f"server version must look like X.Y[.Z[.W]], got {text!r}")
    version = tuple(int(p) for p in parts)
    if version < OLDEST_VERSION:
        raise ValueError(f"the emulator models ThingsBoard 3.2 and later (device provisioning came in 3.2), "
                         f"got {text!r}")
    return version


def load_config(path: str) -> dict:
    """Read and validate the emulator config file; ConfigError names the offending field."""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    # A package's "file" is relative to the config file's folder.
    if isinstance(config, dict) and isinstance(config.get("otaPackages"), list):
        for entry in config["otaPackages"]:
            if isinstance(entry, dict) and isinstance(entry.get("file"), str):
                entry["file"] = str(Path(path).parent / entry["file"])
    validate_config(config)
    return config


def validate_config(config: Any) -> None:
    """Check the config's shape and consistency; raise ConfigError naming the field that is wrong."""
    if not isinstance(config, dict):
        raise ConfigError("config: must be a JSON object with 'profiles' and 'devices'")
    unknown = set(config) - {"profiles", "devices", "otaPackages", "users", "jwt", "tenantProfile"}
    if unknown:
        raise ConfigError(f"config: unknown field {sorted(unknown)[0]!r}")
    _validate_users(config.get("users", []))
    _validate_tenant_profile(config.get("tenantProfile", {}))
    _validate_jwt(config.get("jwt", {}))
    profiles = config.get("profiles", [])
    devices = config.get("devices", [])
    if not isinstance(profiles, list):
        raise ConfigError("profiles: must be a list")
    if not isinstance(devices, list):
        raise ConfigError("devices: must be a list")
    names: set[str] = set()
    keys: set[str] = set()
    for i, p in enumerate(profiles):
        where = f"profiles[{i}]"
        if not isinstance(p, dict):
            raise ConfigError(f"{where}: must be an object")
        for field in ("name", "provisionDeviceKey", "provisionDeviceSecret"):
            if not isinstance(p.get(field), str) or (field == "name" and not p[field].strip()):
                raise ConfigError(f"{where}.{field}: must be a non-empty string" if field == "name"
                                  else f"{where}.{field}: must be a string")
        if p.get("provisionType") not in PROVISION_TYPES:
            raise ConfigError(f"{where}.provisionType: must be one of {', '.join(PROVISION_TYPES)}")
        if p["name"] in names:
            raise ConfigError(f"{where}.name: duplicate profile name {p['name']!r}")
        if p["provisionDeviceKey"] and p["provisionDeviceKey"] in keys:
            raise ConfigError(f"{where}.provisionDeviceKey: the same key is used by another profile")
        names.add(p["name"])
        keys.add(p["provisionDeviceKey"])
    device_names: set[str] = set()
    ids: set[str] = set()
    for i, d in enumerate(devices):
        where = f"devices[{i}]"
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: must be an object")
        if not isinstance(d.get("name"), str) or not d["name"].strip() or d["name"] != d["name"].strip():
            raise ConfigError(f"{where}.name: must be a non-empty string without surrounding spaces")
        if d["name"] in device_names:
            raise ConfigError(f"{where}.name: duplicate device name {d['name']!r}")
        if d.get("profile") not in names:
            raise ConfigError(f"{where}.profile: no profile named {d.get('profile')!r}")
        if d.get("credentialsType") not in CREDENTIALS_TYPES:
            raise ConfigError(f"{where}.credentialsType: must be one of {', '.join(CREDENTIALS_TYPES)}")
        cid = _config_credentials(d, where)[1]
        if cid in ids:
            raise ConfigError(f"{where}.credentialsValue: the same credentials are used by another device")
        device_names.add(d["name"])
        ids.add(cid)
    _validate_ota_config(config)


_NO_OTA = "ThingsBoard before 3.3 has no OTA packages"
_PACKAGE_FIELDS = {"title", "version", "type", "profile", "tag", "url", "file", "text", "base64", "fileName",
                   "contentType", "checksumAlgorithm", "checksum", "additionalInfo"}
_PACKAGE_SOURCES = ("url", "file", "text", "base64")


def _validate_ota_config(config: dict) -> None:
    """Check "otaPackages" and the "firmware"/"software" references of profiles and devices."""
    packages = config.get("otaPackages", [])
    if not isinstance(packages, list):
        raise ConfigError("otaPackages: must be a list")
    profiles = {p["name"] for p in config.get("profiles", [])}
    known: dict[tuple[str, str], dict] = {}
    for i, entry in enumerate(packages):
        where = f"otaPackages[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: must be an object")
        unknown = set(entry) - _PACKAGE_FIELDS
        if unknown:
            raise ConfigError(f"{where}: unknown field {sorted(unknown)[0]!r}")
        for field in ("title", "version"):
            value = entry.get(field)
            if not isinstance(value, str) or not value.strip() or len(value) > ota.MAX_NAME_LENGTH:
                raise ConfigError(f"{where}.{field}: must be a non-empty string of at most "
                                  f"{ota.MAX_NAME_LENGTH} characters")
        if entry.get("type") not in ota.TYPES:
            raise ConfigError(f"{where}.type: must be one of {', '.join(ota.TYPES)}")
        if not isinstance(entry.get("profile"), str) or entry["profile"] not in profiles:
            raise ConfigError(f"{where}.profile: no profile named {entry.get('profile')!r}")
        for field in ("tag", "fileName", "contentType", "checksum"):
            if field in entry and not isinstance(entry[field], str):
                raise ConfigError(f"{where}.{field}: must be a string")
        if not isinstance(entry.get("additionalInfo", {}), dict):
            raise ConfigError(f"{where}.additionalInfo: must be an object")
        sources = [f for f in _PACKAGE_SOURCES if f in entry]
        if len(sources) != 1:
            raise ConfigError(f"{where}: needs exactly one of {', '.join(_PACKAGE_SOURCES)}")
        if entry.get("checksumAlgorithm", "SHA256") not in ota.CHECKSUM_ALGORITHMS:
            raise ConfigError(f"{where}.checksumAlgorithm: must be one of {', '.join(ota.CHECKSUM_ALGORITHMS)}")
        if sources == ["url"]:
            if not isinstance(entry["url"], str) or not entry["url"].strip():
                raise ConfigError(f"{where}.url: must be a non-empty string")
        else:
            data = _config_package_data(entry, where)
            wanted = entry.get("checksum")
            if wanted is not None and wanted != ota.checksum(entry.get("checksumAlgorithm", "SHA256"), data):
                raise ConfigError(f"{where}.checksum: does not match the data (Wrong otaPackage file!)")
        key = (entry["title"], entry["version"])
        if key in known:
            raise ConfigError(f"{where}: another package has title {key[0]!r} and version {key[1]!r}")
        known[key] = entry
    for section in ("profiles", "devices"):
        for i, owner in enumerate(config.get(section, [])):
            profile = owner["name"] if section == "profiles" else owner["profile"]
            for field, ota_type in (("firmware", ota.FIRMWARE), ("software", ota.SOFTWARE)):
                if field not in owner:
                    continue
                ref, where = owner[field], f"{section}[{i}].{field}"
                if not isinstance(ref, dict) or set(ref) != {"title", "version"} or \
                        not all(isinstance(v, str) for v in ref.values()):
                    raise ConfigError(f'{where}: must be {{"title": ..., "version": ...}} of an OTA package')
                entry = known.get((ref["title"], ref["version"]))
                if entry is None:
                    raise ConfigError(f"{where}: no package in otaPackages with that title and version")
                if entry["type"] != ota_type:
                    raise ConfigError(f"{where}: Can't assign {field} with type: {entry['type']}")
                if entry["profile"] != profile:
                    raise ConfigError(f"{where}: Can't assign {field} with different deviceProfile!")


def _config_package_data(entry: dict, where: str) -> bytes:
    """The bytes of a config package: its file, its text (UTF-8) or its base64; never empty."""
    if "file" in entry:
        if not isinstance(entry["file"], str):
            raise ConfigError(f"{where}.file: must be a path")
        try:
            data = Path(entry["file"]).read_bytes()
        except OSError as e:
            raise ConfigError(f"{where}.file: cannot read {entry['file']}: {e.strerror}") from None
    elif "text" in entry:
        if not isinstance(entry["text"], str):
            raise ConfigError(f"{where}.text: must be a string")
        data = entry["text"].encode()
    else:
        try:
            data = base64.b64decode(entry["base64"], validate=True)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}.base64: not valid base64") from None
    if not data:
        raise ConfigError(f"{where}: the package data is empty (OtaPackage data should be specified!)")
    return data


def _validate_tenant_profile(profile: Any) -> None:
    if not isinstance(profile, dict):
        raise ConfigError("tenantProfile: must be an object")
    for field, value in profile.items():
        if field not in limits.FIELDS:
            raise ConfigError(f"tenantProfile: unknown field {field!r} (known: {', '.join(limits.FIELDS)})")
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"tenantProfile.{field}: must be a string such as \"200:1,6000:60\" or null")
        if value:
            try:
                limits.parse(value)
            except limits.LimitSyntaxError as e:
                raise ConfigError(f"tenantProfile.{field}: {e}") from None


def _validate_users(users: Any) -> None:
    """The REST API's tenant administrators: [{"email", "password", optional "firstName", "lastName"}]."""
    if not isinstance(users, list):
        raise ConfigError("users: must be a list")
    emails: set[str] = set()
    for i, u in enumerate(users):
        where = f"users[{i}]"
        if not isinstance(u, dict):
            raise ConfigError(f"{where}: must be an object")
        unknown = set(u) - {"email", "password", "firstName", "lastName"}
        if unknown:
            raise ConfigError(f"{where}: unknown field {sorted(unknown)[0]!r}")
        email = u.get("email")
        if not isinstance(email, str) or not email.strip() or email != email.strip() or _has_control(email):
            raise ConfigError(f"{where}.email: must be a non-empty string without surrounding spaces")
        if not isinstance(u.get("password"), str) or not u["password"]:
            raise ConfigError(f"{where}.password: must be a non-empty string")
        for field in ("firstName", "lastName"):
            if u.get(field) is not None and not isinstance(u[field], str):
                raise ConfigError(f"{where}.{field}: must be a string")
        if email.lower() in emails:
            raise ConfigError(f"{where}.email: duplicate user {email!r}")
        emails.add(email.lower())


def _validate_jwt(jwt: Any) -> None:
    """Token lifetimes: {"tokenExpirationTime": s, "refreshTokenExpTime": s}, positive whole seconds."""
    if not isinstance(jwt, dict):
        raise ConfigError("jwt: must be an object")
    for field, value in jwt.items():
        if field not in JWT_DEFAULTS:
            raise ConfigError(f"jwt: unknown field {field!r}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"jwt.{field}: must be a whole number of seconds, at least 1")


def _config_credentials(d: dict, where: str) -> tuple[str, str, str]:
    """(type, credentialsId, stored value) of a pre-provisioned device from the config file."""
    ctype, value = d["credentialsType"], d.get("credentialsValue")
    field = f"{where}.credentialsValue"
    if ctype == ACCESS_TOKEN:
        if not isinstance(value, str) or not value or _has_control(value):
            raise ConfigError(f"{field}: an ACCESS_TOKEN needs a non-empty token string")
        return ctype, value, value
    if ctype == MQTT_BASIC:
        if not isinstance(value, dict) or set(value) - {"clientId", "userName", "password"}:
            raise ConfigError(f"{field}: MQTT_BASIC needs an object with clientId, userName, password")
        parts = {k: value.get(k) for k in ("clientId", "userName", "password")}
        for k, v in parts.items():
            if v is not None and not isinstance(v, str):
                raise ConfigError(f"{field}.{k}: must be a string or null")
        problem = _basic_problem(parts["clientId"] or "", parts["userName"] or "", parts["password"] or "")
        if problem:
            raise ConfigError(f"{field}: {problem}")
        return ctype, _basic_id(parts["clientId"] or "", parts["userName"] or ""), json.dumps(parts)
    if not isinstance(value, str) or not cert_trim_newlines(value).strip():
        raise ConfigError(f"{field}: X509_CERTIFICATE needs the certificate as PEM or base64 text")
    trimmed = cert_trim_newlines(value)
    return ctype, sha3_hex(trimmed), trimmed


def _has_control(text: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


def _basic_problem(client_id: str, user_name: str, password: str) -> str | None:
    """ThingsBoard's MQTT_BASIC validation (§1); None when the combination is allowed."""
    if not client_id and not user_name:
        return "Both mqtt client id and user name are empty!"
    if client_id and password and not user_name:
        return "Password cannot be specified along with client id"
    if any(_has_control(s) for s in (client_id, user_name, password)):
        return "MQTT credentials must not contain control characters"
    return None


def _basic_id(client_id: str, user_name: str) -> str:
    """DCS.formatSimpleMqttCredentials: the credentialsId of MQTT_BASIC credentials."""
    if not client_id:
        return user_name
    if not user_name:
        return sha3_hex(client_id)
    return sha3_hex(client_id + "|" + user_name)


def _random_alphanumeric() -> str:
    return "".join(secrets.choice(_ALPHANUMERIC) for _ in range(20))


_PROFILE_COLUMNS = "name, provision_key, provision_secret, provision_type, id, created_time, version, data"
_DEVICE_COLUMNS = "d.name, d.profile, d.id, d.created_time, d.version, d.data, p.id"


def entity_uuid(entity_id: Any) -> str | None:
    """The id of an `{"entityType", "id"}` object as a canonical UUID string; None when absent.

    DataError for an id that is not a UUID ("Invalid UUID string: ...", as UUID.fromString says).
    """
    if entity_id is None:
        return None
    value = entity_id.get("id") if isinstance(entity_id, dict) else entity_id
    if value is None:
        return None
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise DataError(f"Invalid UUID string: {value}") from None


def _package_ids(body: dict) -> dict[str, str | None]:
    """{type: package id or None} from an entity's firmwareId and softwareId."""
    return {ota.FIRMWARE: entity_uuid(body.get("firmwareId")), ota.SOFTWARE: entity_uuid(body.get("softwareId"))}


def _package_ref(package_id: str | None) -> dict | None:
    return None if package_id is None else {"entityType": "OTA_PACKAGE", "id": package_id}


def _new_id() -> str:
    """A time-based UUID as ThingsBoard gives its entities (Uuids.timeBased), with a random node."""
    return str(uuid.uuid1(node=secrets.randbits(48) | 0x010000000000))


def _now_ms() -> int:
    return int(time.time() * 1000)


CANT_PARSE_VALUE = "Can't parse value: "
"""JsonConverter's message for a body of the wrong shape, followed by the element as Gson prints it."""


def _json_text(value: Any) -> str:
    """Compact JSON as Gson writes it: no spaces, non-ASCII characters kept."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def json_bytes(value: Any) -> bytes:
    """A value as a JSON body on the wire (UTF-8, Gson's compact form)."""
    return _json_text(value).encode()


def _parse_json(body: bytes) -> Any:
    """Parse like Gson would be asked to: PayloadError with the parser's message when it is not JSON."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PayloadError(f"Malformed UTF-8 at byte {e.start}") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise PayloadError(f"com.google.gson.stream.MalformedJsonException: {e.msg} at line {e.lineno} "
                           f"column {e.colno}") from None


def _reject_constant(name: str) -> Any:
    raise json.JSONDecodeError(f"Use JsonReader.setLenient(true) to accept {name}", name, 0)


def _cast(value: Any) -> Any:
    """A telemetry/attribute value as ThingsBoard stores it (§6.1, type casting on); None means skipped."""
    if isinstance(value, str):
        if not _NUMBER.fullmatch(value):
            return value
        if "." in value:
            if not value.isascii():
                return value  # Double.parseDouble takes ASCII digits only (Long.parseLong takes any)
            number = float(value)
            return number if math.isfinite(number) else value
        number = int(value)
        return number if _LONG_MIN <= number <= _LONG_MAX else value
    if isinstance(value, bool) or isinstance(value, float):
        return value
    if isinstance(value, int):
        return value if _LONG_MIN <= value <= _LONG_MAX else str(value)
    return value


def parse_keys(text: str | None) -> list[str] | None:
    """A comma-separated attribute key list without empty keys; None when absent or empty (not asked for)."""
    if not text:
        return None
    return [k for k in text.split(",") if k]


def _kv(obj: dict) -> dict:
    return {k: _cast(v) for k, v in obj.items() if v is not None}


class EmulatorState:
    """Profiles, devices, credentials, telemetry and attributes in SQLite, with ThingsBoard's server logic."""

    def __init__(self, config: dict, db_path: str = ":memory:", server_version: tuple[int, ...] = (4, 3),
                 events: Callable[[str], None] | None = None) -> None:
        """Open (or create) the database at `db_path` and (re)load the config's profiles and devices.

        `events` receives one readable line per event; by default they go to stderr.
        Raises ConfigError if `config` is invalid.
        """
        validate_config(config)
        self.server_version = tuple(server_version)
        self._events = events
        self._db = sqlite3.connect(db_path, isolation_level=None)
        self._db.execute("PRAGMA foreign_keys = ON")
        self._db.executescript(_SCHEMA)
        self._migrate()
        self._listeners: dict[str, dict[int, Callable[[str, object], Any]]] = {}
        self._handles = itertools.count(1)
        # Server-side RPC requests no session took yet: device name -> {id: (method, params, expiry ms)}.
        self._pending_rpc: dict[str, dict[int, tuple[str, Any, int]]] = {}
        self.users: dict[str, dict] = {u["email"].lower(): u for u in config.get("users", [])}
        self.jwt_settings: dict[str, int] = {**JWT_DEFAULTS, **config.get("jwt", {})}
        self.tenant_id = self._meta("tenantId", _new_id)
        self.rate_limits = limits.RateLimits(config.get("tenantProfile", {}))
        self._load(config)

    # ------------------------------------------------------------------ setup and helpers

    @contextlib.contextmanager
    def _tx(self) -> Iterator[None]:
        """One transaction: every statement of the block or, when it raises, none (the connection autocommits)."""
        self._db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self._db.rollback()
            raise
        self._db.commit()

    def _migrate(self) -> None:
        """Add the columns a database made by an earlier emulator lacks, and ids to rows that have none."""
        with self._tx():
            for table, column, declaration in _ADDED_COLUMNS:
                present = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
                if column not in present:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
            for table in ("profiles", "devices"):
                self._db.execute(f"CREATE UNIQUE INDEX IF NOT EXISTS {table}_id ON {table}(id)")
            self._fill_ids()

    def _fill_ids(self) -> None:
        for table in ("profiles", "devices"):
            names = [n for (n,) in self._db.execute(f"SELECT name FROM {table} WHERE id IS NULL")]
            self._db.executemany(f"UPDATE {table} SET id = ? WHERE name = ?", [(_new_id(), n) for n in names])
        self._db.execute("UPDATE profiles SET created_time = ? WHERE created_time IS NULL", (_now_ms(),))

    def _meta(self, key: str, make: Callable[[], str]) -> str:
        """A value kept in the database across restarts, made by `make` the first time."""
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row:
            return row[0]
        value = make()
        self._db.execute("INSERT INTO meta VALUES (?, ?)", (key, value))
        return value

    def jwt_signing_key(self) -> bytes:
        """The key the REST API signs its tokens with (HS512), kept in the database so tokens outlive a restart."""
        return base64.b64decode(self._meta("jwtSigningKey", lambda: base64.b64encode(secrets.token_bytes(64))
                                           .decode()))

    def _load(self, config: dict) -> None:
        with self._tx():
            for i, p in enumerate(config.get("profiles", [])):
                # An empty key is stored as NULL: UNIQUE allows any number of NULLs, and provision() answers
                # NOT_FOUND for an empty key before it looks one up.
                try:
                    self._db.execute(
                        "INSERT INTO profiles (name, provision_key, provision_secret, provision_type, id, "
                        "created_time) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
                        "provision_key = excluded.provision_key, provision_secret = excluded.provision_secret, "
                        "provision_type = excluded.provision_type",
                        (p["name"], p["provisionDeviceKey"] or None, p["provisionDeviceSecret"], p["provisionType"],
                         _new_id(), _now_ms()))
                except sqlite3.IntegrityError:
                    raise ConfigError(f"profiles[{i}].provisionDeviceKey: already used by another profile in the "
                                      "database") from None
            for i, d in enumerate(config.get("devices", [])):
                ctype, cid, value = _config_credentials(d, f"devices[{i}]")
                self._db.execute("INSERT INTO devices (name, profile, created_time, id) VALUES (?, ?, ?, ?) "
                                 "ON CONFLICT(name) DO UPDATE SET profile = excluded.profile",
                                 (d["name"], d["profile"], _now_ms(), _new_id()))
                clash = self._db.execute("SELECT device FROM credentials WHERE id = ? AND device != ?",
                                         (cid, d["name"])).fetchone()
                if clash:
                    raise ConfigError(f"devices[{i}].credentialsValue: already used by device {clash[0]!r} "
                                      "in the database")
                self._db.execute("INSERT INTO credentials VALUES (?, ?, ?, ?) ON CONFLICT(device) DO UPDATE "
                                 "SET type = excluded.type, id = excluded.id, value = excluded.value",
                                 (d["name"], ctype, cid, value))
            self._load_ota(config)
            self._ensure_default_profile()
        # What the configured assignments mean for each device, once: a database that already holds their effect
        # (the target's title, version, checksum and url in the device's shared attributes) is left alone.
        for (name,) in self._db.execute("SELECT name FROM devices ORDER BY created_time, name").fetchall():
            for ota_type in ota.TYPES:
                keys = [ota.attribute_key(ota_type, k) for k in ("title", "version", "checksum", "url")]
                applied = self._scope(name, "shared", keys)
                target = self.resolve_package(name, ota_type)
                if target is None:
                    if applied:
                        self._ota_remove(name, ota_type)
                    continue
                wanted = {k: v for k, v in target.shared_attributes()[0].items() if k in keys}
                if applied != wanted:
                    self._ota_send(name, target)

    def _load_ota(self, config: dict) -> None:
        """Upsert the config's packages (by title and version) and write the assignments it names."""
        if config.get("otaPackages") and not self.at_least(3, 3):
            raise ConfigError(f"otaPackages: {_NO_OTA}")
        ids: dict[tuple[str, str], str] = {}
        for i, entry in enumerate(config.get("otaPackages", [])):
            data = None if "url" in entry else _config_package_data(entry, f"otaPackages[{i}]")
            algorithm = None if data is None else entry.get("checksumAlgorithm", "SHA256")
            default_name = Path(entry["file"]).name if "file" in entry else f"{entry['title']}-{entry['version']}.bin"
            row = (entry["profile"], entry["type"], entry.get("tag"), entry.get("url"),
                   None if data is None else entry.get("fileName", default_name),
                   None if data is None else entry.get("contentType", "application/octet-stream"),
                   algorithm, None if data is None else ota.checksum(algorithm, data),
                   None if data is None else len(data), data, _json_text(entry.get("additionalInfo", {})))
            found = self._db.execute("SELECT id FROM ota_packages WHERE title = ? AND version = ?",
                                     (entry["title"], entry["version"])).fetchone()
            if found:
                self._db.execute("UPDATE ota_packages SET profile = ?, type = ?, tag = ?, url = ?, file_name = ?, "
                                 "content_type = ?, checksum_algorithm = ?, checksum = ?, data_size = ?, data = ?, "
                                 "additional_info = ? WHERE id = ?", row + (found[0],))
                ids[(entry["title"], entry["version"])] = found[0]
            else:
                package_id = str(uuid.uuid4())
                self._db.execute("INSERT INTO ota_packages (id, created_time, title, version, profile, type, tag, "
                                 "url, file_name, content_type, checksum_algorithm, checksum, data_size, data, "
                                 "additional_info) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                 (package_id, _now_ms(), entry["title"], entry["version"]) + row)
                ids[(entry["title"], entry["version"])] = package_id
        for section, table, column in (("profiles", "profile_ota", "profile"), ("devices", "device_ota", "device")):
            for owner in config.get(section, []):
                for field, ota_type in (("firmware", ota.FIRMWARE), ("software", ota.SOFTWARE)):
                    if field in owner:
                        package_id = ids[(owner[field]["title"], owner[field]["version"])]
                        self._db.execute(f"INSERT INTO {table} ({column}, type, package) VALUES (?, ?, ?) "
                                         f"ON CONFLICT({column}, type) DO UPDATE SET package = excluded.package",
                                         (owner["name"], ota_type, package_id))

    def _ensure_default_profile(self) -> None:
        """Every ThingsBoard tenant has a default profile (provisioning disabled); make it unless one exists."""
        if self._db.execute("SELECT 1 FROM profiles WHERE name = ?", (DEFAULT_PROFILE,)).fetchone() is None:
            self._db.execute("INSERT INTO profiles (name, provision_key, provision_secret, provision_type, id, "
                             "created_time) VALUES (?, NULL, NULL, ?, ?, ?)",
                             (DEFAULT_PROFILE, DISABLED, _new_id(), _now_ms()))

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def at_least(self, *version: int) -> bool:
        """True when the emulated server version is `version` or later (3, 9) < (3, 9, 0, 1)."""
        return self.server_version >= tuple(version)

    def event(self, text: str) -> None:
        """Report one readable event line (stderr unless an `events` callback was given)."""
        if self._events is not None:
            self._events(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def _device_row(self, where: str, arg: str) -> Device | None:
        row = self._db.execute(
            "SELECT d.name, d.profile, c.type, c.id, c.value, d.created_time FROM devices d "
            f"JOIN credentials c ON c.device = d.name WHERE {where} = ?", (arg,)).fetchone()
        return Device(*row) if row else None

    def device(self, name: str) -> Device | None:
        """The device called `name`, or None."""
        return self._device_row("d.name", name)

    def _by_credentials_id(self, cid: str) -> Device | None:
        return self._device_row("c.id", cid)

    def _attribute(self, name: str, scope: str, key: str) -> Any:
        row = self._db.execute("SELECT value FROM attributes WHERE device = ? AND scope = ? AND key = ?",
                               (name, scope, key)).fetchone()
        return json.loads(row[0]) if row else None

    def _set_attributes(self, name: str, scope: str, values: dict) -> None:
        now = _now_ms()
        self._db.executemany(
            "INSERT INTO attributes (device, scope, key, value, ts) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(device, scope, key) DO UPDATE SET value = excluded.value, ts = excluded.ts",
            [(name, scope, k, _json_text(v), now) for k, v in values.items()])

    def _scope(self, name: str, scope: str, keys: list[str] | None = None) -> dict:
        rows = self._db.execute("SELECT key, value FROM attributes WHERE device = ? AND scope = ? ORDER BY key",
                                (name, scope)).fetchall()
        return {k: json.loads(v) for k, v in rows if keys is None or k in keys}

    # ------------------------------------------------------------------ provisioning (§1, §2, §7)

    def provision(self, body: bytes, transport: str) -> dict:
        """Handle one provisioning request; return the response object in the server's key order.

        Raises RequestError for a body the server cannot parse (not a JSON object, missing key or secret,
        unknown credentialsType); every other outcome is a SUCCESS, NOT_FOUND or FAILURE response.
        """
        req = self._parse_provision_request(body)
        raw_name = req["deviceName"]
        name = raw_name.strip()
        if raw_name and not name:
            return self._refuse("FAILURE", transport, "the device name is blank")
        key, secret = req["provisionDeviceKey"], req["provisionDeviceSecret"]
        if not key or not secret:
            return self._refuse("NOT_FOUND", transport, "empty provision key or secret")
        profile = self._db.execute("SELECT name, provision_secret, provision_type FROM profiles "
                                   "WHERE provision_key = ?", (key,)).fetchone()
        if profile is None:
            return self._refuse("NOT_FOUND", transport, "no profile has that provision key")
        profile_name, profile_secret, ptype = profile
        existing = self.device(name)
        if ptype == ALLOW_CREATE and secret == profile_secret:
            if existing is not None:
                return self._refuse("FAILURE", transport, f"device {name!r} already exists", profile_name)
            return self._create(req, name, profile_name, transport)
        if ptype == CHECK_PRE_PROVISIONED and secret == profile_secret:
            if existing is None or existing.profile != profile_name:
                return self._refuse("FAILURE", transport, f"no pre-provisioned device {name!r} in profile "
                                    f"{profile_name!r}", profile_name)
            state = self._attribute(name, "server", "provisionState")
            if state is None:
                self._set_attributes(name, "server", {"provisionState": PROVISIONED})
            elif state != PROVISIONED or self.at_least(4, 2, 1, 1):
                return self._refuse("FAILURE", transport, f"device {name!r} is already provisioned "
                                    f"(provisionState {state!r})", profile_name)
            self.event(f"provisioned device {name!r} over {transport} (profile {profile_name!r}, "
                       f"pre-provisioned, {existing.credentials_type})")
            return self._success(existing)
        why = "provisioning is disabled for the profile" if ptype == DISABLED else "wrong provision secret"
        return self._refuse("NOT_FOUND", transport, why, profile_name)

    @staticmethod
    def _parse_provision_request(body: bytes) -> dict:
        """JC.convertToProvisionRequestMsg: the request fields, absent optional strings as ""."""
        try:
            obj = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            obj = None
        if not isinstance(obj, dict):
            raise RequestError(CANT_PARSE_VALUE + body.decode("utf-8", "replace"), False)
        for field in ("provisionDeviceKey", "provisionDeviceSecret"):
            if field not in obj:
                raise RequestError(f"Failed to find the field {field} in JSON body {_json_text(obj)}!", True)
        req: dict[str, Any] = {}
        for field in ("deviceName", "provisionDeviceKey", "provisionDeviceSecret", "credentialsType", "token",
                      "clientId", "username", "password", "hash"):
            value = obj.get(field, "")
            if isinstance(value, bool):
                value = "true" if value else "false"
            elif isinstance(value, (int, float)):
                value = _json_text(value)
            elif not isinstance(value, str):
                raise RequestError(f"Can't parse the field {field} in JSON body {_json_text(obj)}: "
                                   "not a primitive value", True)
            req[field] = value
        ctype = req["credentialsType"] if "credentialsType" in obj else ACCESS_TOKEN
        if ctype not in CREDENTIALS_TYPES + (LWM2M_CREDENTIALS,):
            raise RequestError(f"No enum constant {_ENUM_CLASS}.{ctype}", True)
        req["credentialsType"] = ctype
        return req

    def _create(self, req: dict, name: str, profile: str, transport: str) -> dict:
        """DPS.processCreateDevice: create the device with supplied or generated credentials."""
        supplied = any(req[f] for f in ("token", "hash", "username", "password", "clientId"))
        ctype = req["credentialsType"] if supplied else ACCESS_TOKEN
        if not supplied:
            cid = value = _random_alphanumeric()
        elif ctype == ACCESS_TOKEN:
            cid = value = req["token"]
            if not cid:
                return self._refuse("FAILURE", transport, "Device credentials id should be specified!", profile)
        elif ctype == MQTT_BASIC:
            client_id, user_name, password = req["clientId"], req["username"], req["password"]
            problem = _basic_problem(client_id, user_name, password)
            if problem:
                return self._refuse("FAILURE", transport, problem, profile)
            cid = _basic_id(client_id, user_name)
            value = json.dumps({"clientId": client_id, "userName": user_name, "password": password})
        elif ctype == X509_CERTIFICATE:
            value = cert_trim_newlines(req["hash"])
            if not value:
                return self._refuse("FAILURE", transport, "Device credentials value should be specified!",
                                    profile)
            cid = sha3_hex(value)
        else:
            return self._refuse("FAILURE", transport, f"{ctype} credentials are not emulated", profile)
        if self._by_credentials_id(cid) is not None:
            return self._refuse("FAILURE", transport,
                                "Device credentials are already assigned to another device!", profile)
        name = name or _random_alphanumeric()
        with self._tx():
            self._db.execute("INSERT INTO devices (name, profile, created_time, id) VALUES (?, ?, ?, ?)",
                             (name, profile, _now_ms(), _new_id()))
            self._db.execute("INSERT INTO credentials VALUES (?, ?, ?, ?)", (name, ctype, cid, value))
            self._set_attributes(name, "server", {"provisionState": PROVISIONED})
        device = self.device(name)
        assert device is not None
        self.event(f"provisioned device {name!r} over {transport} (profile {profile!r}, new device, {ctype})")
        self.apply_ota_targets(name, {})
        return self._success(device)

    @staticmethod
    def _success(device: Device) -> dict:
        """§2.2 SUCCESS in Gson's key order; MQTT_BASIC as a nested object."""
        if device.credentials_type == MQTT_BASIC:
            value: Any = json.loads(device.credentials_value)
        else:
            value = device.credentials_value
        return {"credentialsValue": value, "credentialsType": device.credentials_type, "status": "SUCCESS"}

    def _refuse(self, status: str, transport: str, why: str, profile: str | None = None) -> dict:
        where = f" (profile {profile!r})" if profile else ""
        self.event(f"provisioning refused over {transport}: {status}, {why}{where}")
        message = NOT_FOUND_MSG if status == "NOT_FOUND" else FAILURE_MSG
        return {"errorMsg": message, "status": status}

    # ------------------------------------------------------------------ authentication (§3.4, §3.5)

    def device_by_token(self, token: str) -> Device | None:
        """The device whose ACCESS_TOKEN is `token` (HTTP and CoAP paths, MQTT username)."""
        device = self._by_credentials_id(token)
        return device if device is not None and device.credentials_type == ACCESS_TOKEN else None

    def device_by_x509(self, cert_der: bytes) -> Device | None:
        """The device whose X.509 credentials id is sha3_256_hex(base64(DER)) of the client certificate."""
        device = self._by_credentials_id(sha3_hex(base64.b64encode(cert_der).decode("ascii")))
        return device if device is not None and device.credentials_type == X509_CERTIFICATE else None

    def authenticate_mqtt(self, client_id: str, username: str | None, password: str | None
                          ) -> tuple[Device | None, int]:
        """Check MQTT CONNECT credentials (no certificate); (device, 0) or (None, MQTT 5 CONNACK reason)."""
        device = self._basic_or_token(client_id, username, password)
        if device is not None:
            return device, CONNACK_ACCEPTED
        if not self.at_least(3, 5):
            return None, CONNACK_NOT_AUTHORIZED  # 3.2-3.4: always 5 on 3.1.1
        # MTH.onValidateDeviceResponse (3.1.1 through ReturnCodeResolver: 0x86/0x87 -> 5, 0x85 -> 2).
        # (The client id is never null there: netty decodes an absent one as "".)
        if (username is not None and password is not None) or ((username is None) != (password is None)):
            return None, CONNACK_BAD_USERNAME_OR_PASSWORD
        if client_id.strip():
            return None, CONNACK_CLIENT_IDENTIFIER_NOT_VALID
        return None, CONNACK_NOT_AUTHORIZED

    def _basic_or_token(self, client_id: str, username: str | None, password: str | None) -> Device | None:
        if not username:
            device = self._by_credentials_id(sha3_hex(client_id)) if client_id else None
            if device is not None and device.credentials_type == MQTT_BASIC and \
                    self._basic_check(device, client_id, username, password) == "valid":
                return device
            return None
        if client_id:
            device = self._by_credentials_id(sha3_hex(client_id + "|" + username))
            if device is not None and device.credentials_type == MQTT_BASIC:
                verdict = self._basic_check(device, client_id, username, password)
                if verdict == "valid":
                    return device
                if verdict == "password":
                    return None
        device = self._by_credentials_id(username)
        if device is None:
            return None
        if device.credentials_type == ACCESS_TOKEN:
            return device
        if device.credentials_type == MQTT_BASIC and \
                self._basic_check(device, client_id, username, password) == "valid":
            return device
        return None

    @staticmethod
    def _basic_check(device: Device, client_id: str, username: str | None, password: str | None) -> str:
        """TAS.validateMqttCredentials: 'valid', 'password' (mismatch) or 'mismatch' (client id / user name)."""
        stored = json.loads(device.credentials_value)
        if stored.get("clientId") and stored["clientId"] != client_id:
            return "mismatch"
        if stored.get("userName") and stored["userName"] != (username or ""):
            return "mismatch"
        if stored.get("password") and stored["password"] != (password or ""):
            return "password"
        return "valid"

    # ------------------------------------------------------------------ device data (§6)

    def limit(self, device: Device, data_points: int = 0) -> None:
        """Count one message of `device` against its rate limits (the telemetry ones when it carries data points).

        RateLimited when over one; the transport then refuses the message as ThingsBoard does (reference §8).
        """
        hit = self.rate_limits.allow(device.name, data_points)
        if hit is not None:
            self.event(f"rate limit: a message from {device.name!r} refused ({hit} limit reached)")
            raise RateLimited(hit)

    def post_telemetry(self, device: Device, body: bytes) -> int:
        """Store a telemetry body (object, {"ts","values"} or an array of those); return the records stored."""
        data = _parse_json(body)
        items = data if isinstance(data, list) else [data]
        now = _now_ms()
        records: list[tuple[int, dict]] = []
        for item in items:
            if not isinstance(item, dict):
                raise PayloadError(CANT_PARSE_VALUE + _json_text(item))
            if "ts" in item and "values" in item:
                ts, values = item["ts"], item["values"]
                if isinstance(ts, bool) or not isinstance(ts, (int, float, str)):
                    raise PayloadError(f"Can't parse ts value: {_json_text(ts)[:80]}")
                try:
                    ts = int(ts)
                except ValueError:
                    raise PayloadError(f"Can't parse ts value: {_json_text(ts)[:80]}") from None
                if not isinstance(values, dict):
                    raise PayloadError(f"Can't parse values: {_json_text(values)[:80]}")
                records.append((ts, _kv(values)))
            else:
                records.append((now, _kv(item)))
        self.limit(device, sum(len(kv) for _, kv in records))
        with self._tx():
            self._db.executemany("INSERT INTO telemetry (device, ts, kv) VALUES (?, ?, ?)",
                                 [(device.name, ts, _json_text(kv)) for ts, kv in records])
        points = sum(len(kv) for _, kv in records)
        self.event(f"telemetry from {device.name!r}: {len(records)} record(s), {points} value(s)")
        return len(records)

    def post_attributes(self, device: Device, body: bytes) -> None:
        """Store client-scope attributes from a JSON object body."""
        data = _parse_json(body)
        if not isinstance(data, dict):
            raise PayloadError(CANT_PARSE_VALUE + _json_text(data))
        self.limit(device, len(data))  # data points: attributes count as telemetry does (PostAttributeMsg)
        with self._tx():
            self._set_attributes(device.name, "client", _kv(data))
        self.event(f"attributes from {device.name!r}: {', '.join(sorted(data)) or 'none'}")

    def get_attributes(self, device: Device, client_keys: list[str] | None, shared_keys: list[str] | None
                       ) -> dict:
        """{"client": {...}, "shared": {...}} for the requested keys (all when neither list is given).

        Empty sections are omitted. A section whose key list is None is not asked for, unless both are None.
        """
        self.limit(device)
        result = {}
        everything = client_keys is None and shared_keys is None
        for section, keys in (("client", client_keys), ("shared", shared_keys)):
            if everything or keys is not None:
                values = self._scope(device.name, section, None if everything else keys)
                if values:
                    result[section] = values
        return result

    def claim(self, device: Device, body: bytes) -> None:
        """A device's claiming request (reference §6.4): an empty body or a JSON object
        (`JsonConverter.convertToClaimDeviceProto`), counted as a message. Claiming itself is not emulated (there
        are no customers to claim a device), so the request is accepted and only logged."""
        if body.strip():
            data = _parse_json(body)
            if not isinstance(data, dict):
                raise PayloadError(CANT_PARSE_VALUE + _json_text(data))
        self.limit(device)
        self.event(f"claim request from {device.name!r} accepted (claiming is not emulated)")

    def record_rpc_reply(self, device: Device, request_id: int, body: bytes) -> None:
        """Store a device's reply to server-side RPC `request_id` (any JSON); a waiting REST call gets it too."""
        reply = _parse_json(body)
        self.limit(device)
        self._db.execute("UPDATE rpc SET reply = ? WHERE id = ? AND device = ?",
                         (_json_text(reply), request_id, device.name))
        self.event(f"rpc reply from {device.name!r} to request {request_id}")
        self._notify(device.name, "rpc_reply", (request_id, reply))

    # ------------------------------------------------------------------ inspection and server-side actions

    def devices(self) -> list[dict]:
        """Every device as the inspection API shows it."""
        rows = self._db.execute(
            "SELECT d.name, d.profile, c.type, c.value, a.value, d.created_time FROM devices d "
            "JOIN credentials c ON c.device = d.name LEFT JOIN attributes a ON a.device = d.name "
            "AND a.scope = 'server' AND a.key = 'provisionState' ORDER BY d.created_time, d.name").fetchall()
        return [{"name": name, "profile": profile, "credentialsType": ctype,
                 "credentialsValue": json.loads(value) if ctype == MQTT_BASIC else value,
                 "provisionState": None if state is None else json.loads(state), "createdTime": created}
                for name, profile, ctype, value, state, created in rows]

    def telemetry(self, name: str) -> list[dict]:
        """[{"ts", "values"}] of a device in arrival order."""
        rows = self._db.execute("SELECT ts, kv FROM telemetry WHERE device = ? ORDER BY seq", (name,))
        return [{"ts": ts, "values": json.loads(kv)} for ts, kv in rows.fetchall()]

    def attributes(self, name: str) -> dict:
        """{"client", "shared", "server"} attributes of a device."""
        return {scope: self._scope(name, scope) for scope in ("client", "shared", "server")}

    def set_shared_attributes(self, name: str, values: dict) -> None:
        """Set shared attributes (as a user would in the UI) and push them to subscribed sessions."""
        self.save_attributes(name, "shared", values)

    def save_attributes(self, name: str, scope: str, values: dict) -> None:
        """Set "shared" or "server" attributes as a user does; shared ones are pushed to subscribed sessions."""
        self._require(name)
        values = _kv(values)
        with self._tx():
            self._set_attributes(name, scope, values)
        self.event(f"{scope} attributes set on {name!r}: {', '.join(sorted(values))}")
        if scope == "shared":
            self._notify(name, "attributes", values)

    def delete_shared_attributes(self, name: str, keys: list[str]) -> None:
        """Delete shared attributes and push {"deleted": [...]} to subscribed sessions."""
        self.delete_attributes(name, "shared", keys)

    def delete_attributes(self, name: str, scope: str, keys: list[str]) -> None:
        """Delete attributes of one scope; for "shared" push {"deleted": [...]} (the keys asked) to the sessions."""
        self._require(name)
        with self._tx():
            self._db.executemany("DELETE FROM attributes WHERE device = ? AND scope = ? AND key = ?",
                                 [(name, scope, k) for k in keys])
        if scope == "shared":
            self._notify(name, "attributes", {"deleted": list(keys)})

    def send_rpc(self, name: str, method: str, params: Any) -> int:
        """Queue a server-side RPC for device `name`, deliver it to its listeners and return its id."""
        return self.call_rpc(name, method, params)[0]

    def call_rpc(self, name: str, method: str, params: Any, expires_ms: int | None = None) -> tuple[int, bool]:
        """`send_rpc`, also telling whether a session subscribed to RPC took the request.

        With `expires_ms` (ms since 1970) a request no session took waits for the device's next RPC subscription
        until then, as ThingsBoard keeps it (DeviceActorMessageProcessor.sendPendingRequests); its delivery is
        then told to listeners as "rpc_delivered" (the request id).
        """
        self._require(name)
        cur = self._db.execute("INSERT INTO rpc (device, method, params) VALUES (?, ?, ?)",
                               (name, method, _json_text(params)))
        rpc_id = int(cur.lastrowid)
        delivered = self._notify(name, "rpc", (rpc_id, method, params))
        self.event(f"rpc {rpc_id} {method!r} sent to {name!r}" + ("" if delivered else " (no RPC subscription)"))
        if not delivered and expires_ms is not None:
            self._pending_rpc.setdefault(name, {})[rpc_id] = (method, params, expires_ms)
        return rpc_id, delivered > 0

    def rpc_subscribed(self, name: str) -> None:
        """A session of device `name` subscribed to RPC: deliver the requests still waiting for one."""
        pending = self._pending_rpc.get(name, {})
        now = _now_ms()
        for rpc_id, (method, params, expires_ms) in list(pending.items()):
            if expires_ms <= now:
                del pending[rpc_id]
            elif self._notify(name, "rpc", (rpc_id, method, params)):
                del pending[rpc_id]
                self.event(f"rpc {rpc_id} {method!r} delivered to {name!r} on its RPC subscription")
                self._notify(name, "rpc_delivered", rpc_id)
        if not pending:
            self._pending_rpc.pop(name, None)

    def forget_rpc(self, name: str, rpc_id: int) -> None:
        """Stop keeping request `rpc_id` for device `name`'s next RPC subscription (its caller stopped waiting)."""
        pending = self._pending_rpc.get(name, {})
        pending.pop(rpc_id, None)
        if not pending:
            self._pending_rpc.pop(name, None)

    def rpc_replies(self, name: str) -> dict[int, object]:
        """{request id: reply} of the RPC replies device `name` sent."""
        rows = self._db.execute("SELECT id, reply FROM rpc WHERE device = ? AND reply IS NOT NULL ORDER BY id",
                                (name,)).fetchall()
        return {i: json.loads(r) for i, r in rows}

    def delete_device(self, name: str) -> bool:
        """Delete a device and its data; its sessions are told ("deleted") so they close. False if unknown."""
        cur = self._db.execute("DELETE FROM devices WHERE name = ?", (name,))
        if not cur.rowcount:
            return False
        self.event(f"device {name!r} deleted")
        self._pending_rpc.pop(name, None)
        self.rate_limits.forget(name)
        self._notify(name, "deleted", None)
        return True

    def _require(self, name: str) -> None:
        if self.device(name) is None:
            raise KeyError(f"no device named {name!r}")

    # -------------------------------------------------------------- OTA packages (REST §7, device API §4.3, §5.8, §6.5)

    _PACKAGE_COLUMNS = ("id, created_time, profile, type, title, version, tag, url, file_name, content_type, "
                        "checksum_algorithm, checksum, data_size, additional_info")

    def _package_row(self, where: str, *args: object) -> OtaPackage | None:
        row = self._db.execute(f"SELECT {self._PACKAGE_COLUMNS} FROM ota_packages WHERE {where}", args).fetchone()
        return None if row is None else OtaPackage(*row[:-1], additional_info=json.loads(row[-1]))

    def create_package(self, title: str, version: str, ota_type: str, profile: str | None, *,
                       tag: str | None = None, url: str | None = None,
                       additional_info: dict[str, Any] | None = None) -> OtaPackage:
        """Create a package without data (OtaPackageController.saveOtaPackageInfo); a `url` makes it a URL package.

        OtaError with ThingsBoard's message for a missing or too long title or version, an unknown type or
        profile, and a title and version another package already has.
        """
        if not self.at_least(3, 3):
            raise OtaError(_NO_OTA)
        if not isinstance(title, str) or not title.strip():
            raise OtaError("OtaPackage title should be specified!")
        if ota_type not in ota.TYPES:
            raise OtaError("Type should be specified!")
        if not isinstance(version, str) or not version:
            raise OtaError("OtaPackage version should be specified!")
        if len(title) > ota.MAX_NAME_LENGTH:
            raise OtaError("The length of title should be equal or shorter than 255")
        if len(version) > ota.MAX_NAME_LENGTH:
            raise OtaError("The length of version should be equal or shorter than 255")
        if profile is not None and self._db.execute("SELECT 1 FROM profiles WHERE name = ?",
                                                    (profile,)).fetchone() is None:
            raise OtaError("OtaPackage is referencing to non-existent device profile!")
        package_id = str(uuid.uuid4())
        try:
            self._db.execute("INSERT INTO ota_packages (id, created_time, profile, type, title, version, tag, url, "
                             "additional_info) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             (package_id, _now_ms(), profile, ota_type, title, version, tag, url or None,
                              _json_text(additional_info or {})))
        except sqlite3.IntegrityError:
            raise OtaError("OtaPackage with such title and version already exists!") from None
        self.event(f"ota: {ota_type.lower()} package {title!r} {version!r} created")
        package = self.package(package_id)
        assert package is not None
        return package

    def upload_package_data(self, package_id: str, data: bytes, *, file_name: str, content_type: str,
                            checksum_algorithm: str, checksum: str | None = None) -> OtaPackage:
        """Store a package's file (DefaultTbOtaPackageService.saveOtaPackageData) and return the updated package.

        The checksum is computed with `checksum_algorithm` when not given, else verified (case-sensitively, as
        ThingsBoard compares). KeyError for an unknown package; OtaError with ThingsBoard's message for empty data,
        a missing file name or content type, an unknown algorithm, a wrong checksum, a URL package or a package
        that already has data.
        """
        package = self.package(package_id)
        if package is None:
            raise KeyError(f"no OTA package with id {package_id!r}")
        if checksum_algorithm not in ota.CHECKSUM_ALGORITHMS:
            raise OtaError("OtaPackage checksum algorithm should be specified!")
        computed = ota.checksum(checksum_algorithm, data)
        if package.url:
            raise OtaError("File can't be saved if URL present!")
        if not file_name:
            raise OtaError("OtaPackage file name should be specified!")
        if not content_type:
            raise OtaError("OtaPackage content type should be specified!")
        if checksum and checksum != computed:
            raise OtaError("Wrong otaPackage file!")
        if package.has_data:
            raise OtaError("Updating otaPackage data is prohibited!")
        self._db.execute("UPDATE ota_packages SET file_name = ?, content_type = ?, checksum_algorithm = ?, "
                         "checksum = ?, data_size = ?, data = ? WHERE id = ?",
                         (file_name, content_type, checksum_algorithm, computed, len(data), data, package_id))
        self.event(f"ota: {len(data)} bytes uploaded to package {package.title!r} {package.version!r} "
                   f"({checksum_algorithm} {computed})")
        uploaded = self.package(package_id)
        assert uploaded is not None
        return uploaded

    def package(self, package_id: str) -> OtaPackage | None:
        """The package with id `package_id`, or None."""
        return self._package_row("id = ?", package_id)

    def package_by_title(self, title: str, version: str) -> OtaPackage | None:
        """The package with this title and version (they are unique, as in ThingsBoard), or None."""
        return self._package_row("title = ? AND version = ?", title, version)

    def packages(self, profile: str | None = None, ota_type: str | None = None,
                 assignable: bool = False) -> list[OtaPackage]:
        """Every package, oldest first; only those of `profile` and `ota_type` when given, and with `assignable`
        only those with data or a URL (what `GET /api/otaPackages/{profileId}/{type}` lists)."""
        where, args = ["1"], []
        if profile is not None:
            where.append("profile = ?")
            args.append(profile)
        if ota_type is not None:
            where.append("type = ?")
            args.append(ota_type)
        if assignable:
            where.append("(data IS NOT NULL OR url IS NOT NULL)")
        rows = self._db.execute(f"SELECT {self._PACKAGE_COLUMNS} FROM ota_packages WHERE {' AND '.join(where)} "
                                "ORDER BY created_time, id", args).fetchall()
        return [OtaPackage(*row[:-1], additional_info=json.loads(row[-1])) for row in rows]

    def package_data(self, package_id: str) -> bytes | None:
        """A package's file, or None when it has none (no upload yet, a URL package, or no such package)."""
        row = self._db.execute("SELECT data FROM ota_packages WHERE id = ?", (package_id,)).fetchone()
        return None if row is None or row[0] is None else bytes(row[0])

    def delete_package(self, package_id: str) -> bool:
        """Delete a package; False if there is none. OtaError (ThingsBoard's message) while it is assigned."""
        package = self.package(package_id)
        if package is None:
            return False
        kind = "otaPackage" if package.type == ota.FIRMWARE else "software"
        if self._db.execute("SELECT 1 FROM device_ota WHERE package = ?", (package_id,)).fetchone():
            raise OtaError(f"The {kind} referenced by the devices cannot be deleted!")
        if self._db.execute("SELECT 1 FROM profile_ota WHERE package = ?", (package_id,)).fetchone():
            raise OtaError(f"The {kind} referenced by the device profile cannot be deleted!")
        self._db.execute("DELETE FROM ota_packages WHERE id = ?", (package_id,))
        self.event(f"ota: package {package.title!r} {package.version!r} deleted")
        return True

    def _assignable(self, package_id: str, ota_type: str, profile: str | None) -> None:
        """AbstractHasOtaPackageValidator: OtaError unless the package can be assigned within `profile`."""
        field = ota_type.lower()
        package = self.package(package_id)
        if package is None:
            raise OtaError(f"Can't assign non-existent {field}!")
        if package.type != ota_type:
            raise OtaError(f"Can't assign {field} with type: {package.type}")
        if not package.has_data and not package.url:
            raise OtaError(f"Can't assign {field} with empty data!")
        if package.profile is None or package.profile != profile:  # a package of no profile fits none
            raise OtaError(f"Can't assign {field} with different deviceProfile!")

    def assign_device_package(self, name: str, ota_type: str, package_id: str | None) -> None:
        """Set (or with None clear) device `name`'s own `ota_type` package, as saving a Device with a firmwareId
        or softwareId does, and apply what that changes (see `apply_ota_targets`).

        KeyError for an unknown device; OtaError (ThingsBoard's message) for an unknown type or a package that
        cannot be assigned to it.
        """
        device = self.device(name)
        if device is None:
            raise KeyError(f"no device named {name!r}")
        if ota_type not in ota.TYPES:
            raise OtaError(f"OTA package type must be one of {', '.join(ota.TYPES)}")
        if package_id is not None:
            self._assignable(package_id, ota_type, device.profile)
        before = self.ota_targets(name)
        self._store_device_package(name, ota_type, package_id)
        self.apply_ota_targets(name, before)

    def _store_device_package(self, name: str, ota_type: str, package_id: str | None) -> None:
        if package_id is None:
            self._db.execute("DELETE FROM device_ota WHERE device = ? AND type = ?", (name, ota_type))
        else:
            self._db.execute("INSERT INTO device_ota VALUES (?, ?, ?) ON CONFLICT(device, type) DO UPDATE "
                             "SET package = excluded.package", (name, ota_type, package_id))

    def assign_profile_package(self, profile: str, ota_type: str, package_id: str | None) -> None:
        """Set (or with None clear) a device profile's `ota_type` package, as saving a DeviceProfile with a
        firmwareId or softwareId does; every device of the profile without a package of its own follows.

        KeyError for an unknown profile; OtaError as `assign_device_package`.
        """
        if self._db.execute("SELECT 1 FROM profiles WHERE name = ?", (profile,)).fetchone() is None:
            raise KeyError(f"no device profile named {profile!r}")
        if ota_type not in ota.TYPES:
            raise OtaError(f"OTA package type must be one of {', '.join(ota.TYPES)}")
        if package_id is not None:
            self._assignable(package_id, ota_type, profile)
        names = [n for (n,) in self._db.execute("SELECT name FROM devices WHERE profile = ? "
                                                "ORDER BY created_time, name", (profile,)).fetchall()]
        before = {name: self.ota_targets(name) for name in names}
        if package_id is None:
            self._db.execute("DELETE FROM profile_ota WHERE profile = ? AND type = ?", (profile, ota_type))
        else:
            self._db.execute("INSERT INTO profile_ota VALUES (?, ?, ?) ON CONFLICT(profile, type) DO UPDATE "
                             "SET package = excluded.package", (profile, ota_type, package_id))
        for name in names:
            self.apply_ota_targets(name, before[name])

    def device_package_id(self, name: str, ota_type: str) -> str | None:
        """The id of device `name`'s own `ota_type` package (Device.firmwareId / softwareId), or None."""
        row = self._db.execute("SELECT package FROM device_ota WHERE device = ? AND type = ?",
                               (name, ota_type)).fetchone()
        return row[0] if row else None

    def profile_package_id(self, profile: str, ota_type: str) -> str | None:
        """The id of a profile's `ota_type` package (DeviceProfile.firmwareId / softwareId), or None."""
        row = self._db.execute("SELECT package FROM profile_ota WHERE profile = ? AND type = ?",
                               (profile, ota_type)).fetchone()
        return row[0] if row else None

    def ota_targets(self, name: str) -> dict[str, str | None]:
        """{type: id of the package device `name` should run, or None}: its own wins over its profile's."""
        device = self.device(name)
        if device is None:
            return {t: None for t in ota.TYPES}
        return {t: self.device_package_id(name, t) or self.profile_package_id(device.profile, t)
                for t in ota.TYPES}

    def resolve_package(self, name: str, ota_type: str) -> OtaPackage | None:
        """The `ota_type` package device `name` should run (its own, else its profile's), or None."""
        package_id = self.ota_targets(name)[ota_type]
        return None if package_id is None else self.package(package_id)

    def ota_request(self, device: Device, ota_type: str) -> tuple[str, OtaPackage | None]:
        """What the transports get when a device asks for its package (DefaultTransportApiService):
        ("SUCCESS", package), ("NOT_FOUND", None) when none is assigned, ("FAILURE", package) for a URL one."""
        package = self.resolve_package(device.name, ota_type)
        if package is None:
            return "NOT_FOUND", None
        if package.url or not package.has_data:
            return "FAILURE", package
        return "SUCCESS", package

    def apply_ota_targets(self, name: str, before: dict[str, str | None]) -> None:
        """Do what ThingsBoard does after device `name` was saved (created: all None in `before`) or its
        profile's packages changed (DefaultOtaPackageStateService.update): for each type whose target changed,
        start the update to the new package, or clear the fw_*/sw_* shared attributes when there is none now."""
        after = self.ota_targets(name)
        for ota_type in ota.TYPES:
            new, old = after[ota_type], before.get(ota_type)
            if new is not None and new != old:
                package = self.package(new)
                if package is not None:
                    self._ota_send(name, package)
            elif new is None and old is not None:
                self._ota_remove(name, ota_type)

    def _ota_send(self, name: str, package: OtaPackage) -> None:
        """Target telemetry and QUEUED, then INITIATED and the shared attributes, pushed to the device.

        ThingsBoard paces the second step through a queue (about 600 ms per device); the emulator does both at once.
        """
        prefix = ota.PREFIX[package.type]
        ts = _now_ms()
        target: dict[str, Any] = {f"target_{prefix}_title": package.title, f"target_{prefix}_version": package.version}
        if package.tag:
            target[f"target_{prefix}_tag"] = package.tag
        target[f"target_{prefix}_ts"] = ts
        target[f"{prefix}_state"] = "QUEUED"
        values, remove = package.shared_attributes()
        with self._tx():
            self._db.executemany("INSERT INTO telemetry (device, ts, kv) VALUES (?, ?, ?)",
                                 [(name, ts, _json_text(target)),
                                  (name, _now_ms(), _json_text({f"{prefix}_state": "INITIATED"}))])
            self._db.executemany("DELETE FROM attributes WHERE device = ? AND scope = 'shared' AND key = ?",
                                 [(name, k) for k in remove])
            self._set_attributes(name, "shared", values)
        self.event(f"ota: {package.type.lower()} {package.title!r} {package.version!r} sent to {name!r}")
        self._notify(name, "attributes", {"deleted": remove})
        self._notify(name, "attributes", values)

    def _ota_remove(self, name: str, ota_type: str) -> None:
        """Delete every fw_*/sw_* shared attribute of the device and push the deletion."""
        keys = [ota.attribute_key(ota_type, k) for k in ota.ATTRIBUTE_KEYS]
        with self._tx():
            self._db.executemany("DELETE FROM attributes WHERE device = ? AND scope = 'shared' AND key = ?",
                                 [(name, k) for k in keys])
        self.event(f"ota: {ota_type.lower()} unassigned from {name!r}")
        self._notify(name, "attributes", {"deleted": keys})

    # ------------------------------------------------------------------ REST API entities (docs/thingsboard-notes.md)

    def _tenant(self) -> dict:
        return {"entityType": "TENANT", "id": self.tenant_id}

    def profiles(self) -> list[dict]:
        """Every device profile as ThingsBoard's REST API shows it (DeviceProfile), oldest first."""
        rows = self._db.execute(f"SELECT {_PROFILE_COLUMNS} FROM profiles ORDER BY created_time, name")
        return [self._profile_json(row) for row in rows.fetchall()]

    def profile_by_id(self, profile_id: str) -> dict | None:
        """The DeviceProfile with id `profile_id`, or None."""
        row = self._db.execute(f"SELECT {_PROFILE_COLUMNS} FROM profiles WHERE id = ?", (profile_id,)).fetchone()
        return self._profile_json(row) if row else None

    def transport_allowed(self, device: Device, transport: str) -> bool:
        """Whether `device` may use `transport` ("MQTT" or "COAP"): its profile's transportType is DEFAULT or that
        one (DefaultTransportService.doProcess refuses the credentials otherwise; HTTP never checks)."""
        row = self._db.execute("SELECT data FROM profiles WHERE name = ?", (device.profile,)).fetchone()
        kind = (json.loads(row[0]).get("transportType") if row and row[0] else None) or "DEFAULT"
        return kind in ("DEFAULT", transport)

    def profile_id(self, name: str) -> str | None:
        """The id of the profile called `name`, or None."""
        row = self._db.execute("SELECT id FROM profiles WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def profile_name(self, profile_id: str) -> str | None:
        """The name of the profile with id `profile_id`, or None."""
        row = self._db.execute("SELECT name FROM profiles WHERE id = ?", (profile_id,)).fetchone()
        return row[0] if row else None

    def _profile_json(self, row: tuple) -> dict:
        name, key, secret, ptype, pid, created, version, data_text = row
        data = json.loads(data_text)
        return {
            "id": {"entityType": "DEVICE_PROFILE", "id": pid}, "createdTime": created, "tenantId": self._tenant(),
            "name": name, "description": data.get("description"), "image": data.get("image"), "type": "DEFAULT",
            "transportType": data.get("transportType", "DEFAULT"), "provisionType": ptype,
            "defaultRuleChainId": None, "defaultDashboardId": None, "defaultQueueName": None,
            "provisionDeviceKey": key, "firmwareId": _package_ref(self.profile_package_id(name, ota.FIRMWARE)),
            "softwareId": _package_ref(self.profile_package_id(name, ota.SOFTWARE)),
            "defaultEdgeRuleChainId": None, "externalId": None, "version": version,
            "default": data.get("default", name == DEFAULT_PROFILE),
            "profileData": {
                "configuration": data.get("configuration") or {"type": "DEFAULT"},
                "transportConfiguration": data.get("transportConfiguration") or {"type": "DEFAULT"},
                "provisionConfiguration": {"type": data.get("provisionConfigurationType") or ptype,
                                           "provisionDeviceSecret": secret},
                "alarms": data.get("alarms")},
        }

    def save_profile(self, body: dict) -> dict:
        """Create or update a device profile from a DeviceProfile body (POST /api/deviceProfile).

        DataError or VersionConflict when ThingsBoard would refuse it; KeyError for an unknown id.
        """
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise DataError("Device profile name should be specified!")
        if body.get("type") is None:
            raise DataError("Device profile type should be specified!")
        if body.get("transportType") is None:
            raise DataError("Device profile transport type should be specified!")
        profile_data = body.get("profileData") or {}
        if not isinstance(profile_data, dict):
            raise DataError("Device profile data should be an object")
        provision = profile_data.get("provisionConfiguration") or {}
        if not isinstance(provision, dict) or provision.get("type", DISABLED) not in PROVISION_TYPES + (X509_CHAIN,):
            raise DataError("Invalid request body")  # Jackson knows no such provisionConfiguration subtype
        # Provisioning follows the top-level provisionType, saved as DISABLED when null (DeviceProvisionServiceImpl,
        # DeviceProfileDataValidator); provisionConfiguration only carries the secret.
        ptype = body.get("provisionType") or DISABLED
        if ptype not in PROVISION_TYPES:
            raise DataError(f"Provision type {ptype} is not emulated (one of {', '.join(PROVISION_TYPES)})")
        key = body.get("provisionDeviceKey") or None
        secret = provision.get("provisionDeviceSecret") or None
        for field, value in (("provisionDeviceKey", key), ("provisionDeviceSecret", secret)):
            if value is not None and not isinstance(value, str):
                raise DataError(f"{field} must be a string")
        packages = _package_ids(body)
        data = {"description": body.get("description"), "image": body.get("image"),
                "transportType": body.get("transportType"), "provisionConfigurationType": provision.get("type"),
                "configuration": profile_data.get("configuration"),
                "transportConfiguration": profile_data.get("transportConfiguration"),
                "alarms": profile_data.get("alarms")}
        old = self._profile_row_by_id(entity_uuid(body.get("id")))
        same_name = self._db.execute("SELECT id FROM profiles WHERE name = ?", (name,)).fetchone()
        if same_name and (old is None or same_name[0] != old[4]):
            raise DataError("Device profile with such name already exists!")
        if body.get("default") and not (old is not None and self._is_default(old)):
            raise DataError("Another default device profile is present in scope of current tenant!")
        same_key = key and self._db.execute("SELECT id FROM profiles WHERE provision_key = ?", (key,)).fetchone()
        if same_key and (old is None or same_key[0] != old[4]):
            raise DataError("Device profile with such provision device key already exists!")
        for ota_type, package_id in packages.items():
            if package_id is not None:
                self._assignable(package_id, ota_type, name if old is None else old[0])
        with self._tx():
            if old is None:
                pid = _new_id()
                self._db.execute(
                    "INSERT INTO profiles (name, provision_key, provision_secret, provision_type, id, created_time, "
                    "data) VALUES (?, ?, ?, ?, ?, ?, ?)", (name, key, secret, ptype, pid, _now_ms(), _json_text(data)))
            else:
                pid = old[4]
                self._check_version("Device profile", body, old[6])
                data["default"] = self._is_default(old)
                self._db.execute("UPDATE profiles SET name = ?, provision_key = ?, provision_secret = ?, "
                                 "provision_type = ?, version = version + 1, data = ? WHERE id = ?",
                                 (name, key, secret, ptype, _json_text(data), pid))
                self._db.execute("UPDATE devices SET profile = ? WHERE profile = ?", (name, old[0]))
        self.event(f"device profile {name!r} {'created' if old is None else 'updated'} ({ptype})")
        for ota_type, package_id in packages.items():
            if package_id != self.profile_package_id(name, ota_type):
                self.assign_profile_package(name, ota_type, package_id)
        saved = self.profile_by_id(pid)
        assert saved is not None
        return saved

    @staticmethod
    def _is_default(row: tuple) -> bool:
        """Whether a profiles row is the tenant's default profile (the one made as `default`, even if renamed)."""
        return json.loads(row[7]).get("default", row[0] == DEFAULT_PROFILE)

    def delete_profile(self, profile_id: str) -> None:
        """Delete a device profile and its OTA packages (DELETE /api/deviceProfile/{id}).

        KeyError for an unknown id; DataError for the default profile or one that devices use.
        """
        row = self._profile_row_by_id(profile_id)
        assert row is not None
        if self._is_default(row):
            raise DataError("Deletion of Default Device Profile is prohibited!")
        if self._db.execute("SELECT 1 FROM devices WHERE profile = ?", (row[0],)).fetchone():
            raise DataError("The device profile referenced by the devices cannot be deleted!")
        self._db.execute("DELETE FROM profiles WHERE id = ?", (profile_id,))
        self.event(f"device profile {row[0]!r} deleted")

    def _profile_row_by_id(self, profile_id: str | None) -> tuple | None:
        if profile_id is None:
            return None
        row = self._db.execute(f"SELECT {_PROFILE_COLUMNS} FROM profiles WHERE id = ?", (profile_id,)).fetchone()
        if row is None:
            raise KeyError(profile_id)
        return row

    @staticmethod
    def _check_version(what: str, body: dict, stored: int) -> None:
        """Optimistic locking: a `version` that is given must be the stored one (JpaAbstractDao)."""
        version = body.get("version")
        if version is not None and version != stored:
            raise VersionConflict(f"{what} was already changed by someone else")

    def device_entities(self) -> list[dict]:
        """Every device as ThingsBoard's REST API shows it (Device), oldest first."""
        rows = self._db.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices d JOIN profiles p ON p.name = d.profile "
                                "ORDER BY d.created_time, d.name")
        return [self._device_json(row) for row in rows.fetchall()]

    def device_entity(self, device_id: str) -> dict | None:
        """The Device with id `device_id`, or None."""
        row = self._db.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices d JOIN profiles p ON p.name = d.profile "
                               "WHERE d.id = ?", (device_id,)).fetchone()
        return self._device_json(row) if row else None

    def device_name(self, device_id: str) -> str | None:
        """The name of the device with id `device_id`, or None."""
        row = self._db.execute("SELECT name FROM devices WHERE id = ?", (device_id,)).fetchone()
        return row[0] if row else None

    def _device_json(self, row: tuple) -> dict:
        name, profile, did, created, version, data_text, pid = row
        data = json.loads(data_text)
        return {
            "id": {"entityType": "DEVICE", "id": did}, "createdTime": created, "tenantId": self._tenant(),
            "customerId": {"entityType": "CUSTOMER", "id": NULL_UUID}, "name": name, "type": profile,
            "label": data.get("label"), "deviceProfileId": {"entityType": "DEVICE_PROFILE", "id": pid},
            "deviceData": {"configuration": {"type": "DEFAULT"}, "transportConfiguration": {"type": "DEFAULT"}},
            "firmwareId": _package_ref(self.device_package_id(name, ota.FIRMWARE)),
            "softwareId": _package_ref(self.device_package_id(name, ota.SOFTWARE)), "externalId": None,
            "version": version, "additionalInfo": data.get("additionalInfo"),
        }

    def save_device_entity(self, body: dict, access_token: str | None = None) -> dict:
        """Create or update a device from a Device body (POST /api/device[?accessToken=]).

        A new device gets ACCESS_TOKEN credentials: `access_token`, or 20 random letters and digits.
        DataError or VersionConflict when ThingsBoard would refuse it; KeyError for an unknown id.
        """
        name = body.get("name")
        if not isinstance(name, str) or not name.strip():
            raise DataError("Device name should be specified!")
        label = body.get("label")
        if label is not None and not isinstance(label, str):
            raise DataError("Device label must be a string")
        packages = _package_ids(body)
        old_id = entity_uuid(body.get("id"))
        old = None
        if old_id is not None:
            old = self._db.execute("SELECT name, version FROM devices WHERE id = ?", (old_id,)).fetchone()
            if old is None:
                raise KeyError(old_id)
            if old[0] != name:
                raise DataError("Renaming a device is not emulated: delete it and create it under the new name")
            self._check_version("Device", body, old[1])
        elif self.device(name) is not None:
            raise DataError("Device with such name already exists!")
        data = {"label": label, "additionalInfo": body.get("additionalInfo")}
        # DeviceDataValidator checks the packages against the body's deviceProfileId, before a profile is derived
        # from `type`: a package comes with its profile's id or is refused.
        given_profile = entity_uuid(body.get("deviceProfileId"))
        for ota_type, package_id in packages.items():
            if package_id is not None:
                self._assignable(package_id, ota_type, given_profile and self.profile_name(given_profile))
        before = {} if old is None else self.ota_targets(name)
        with self._tx():
            profile = self._device_profile_for(body)
            if old is None:
                token = access_token if access_token is not None else _random_alphanumeric()
                if not token:
                    raise DataError("Device credentials id should be specified!")
                if self._by_credentials_id(token) is not None:
                    raise DataError("Device credentials are already assigned to another device!")
                self._db.execute("INSERT INTO devices (name, profile, created_time, id, data) VALUES (?, ?, ?, ?, ?)",
                                 (name, profile, _now_ms(), _new_id(), _json_text(data)))
                self._db.execute("INSERT INTO credentials VALUES (?, ?, ?, ?)", (name, ACCESS_TOKEN, token, token))
            else:
                self._db.execute("UPDATE devices SET profile = ?, data = ?, version = version + 1 WHERE id = ?",
                                 (profile, _json_text(data), old_id))
            for ota_type, package_id in packages.items():
                self._store_device_package(name, ota_type, package_id)
        self.event(f"device {name!r} {'created' if old is None else 'updated'} over REST (profile {profile!r})")
        self.apply_ota_targets(name, before)
        row = self._db.execute("SELECT id FROM devices WHERE name = ?", (name,)).fetchone()
        saved = self.device_entity(row[0])
        assert saved is not None
        return saved

    def _device_profile_for(self, body: dict) -> str:
        """The profile a saved device gets: by deviceProfileId, else by `type` (made if missing), else default."""
        profile_id = entity_uuid(body.get("deviceProfileId"))
        if profile_id is not None:
            row = self._db.execute("SELECT name FROM profiles WHERE id = ?", (profile_id,)).fetchone()
            if row is None:
                raise DataError("Device is referencing non existing device profile!")
            return row[0]
        name = body.get("type") or DEFAULT_PROFILE
        if not isinstance(name, str):
            raise DataError("Device type must be a string")
        if self._db.execute("SELECT 1 FROM profiles WHERE name = ?", (name,)).fetchone() is None:
            self._db.execute("INSERT INTO profiles (name, provision_type, id, created_time) VALUES (?, ?, ?, ?)",
                             (name, DISABLED, _new_id(), _now_ms()))
        return name

    def credentials_entity(self, device_id: str) -> dict | None:
        """DeviceCredentials of the device with id `device_id`, or None."""
        row = self._db.execute("SELECT d.created_time, c.type, c.id, c.value FROM devices d JOIN credentials c "
                               "ON c.device = d.name WHERE d.id = ?", (device_id,)).fetchone()
        if row is None:
            return None
        created, ctype, cid, value = row
        return {"id": {"id": str(uuid.uuid5(uuid.UUID(device_id), "credentials"))}, "createdTime": created,
                "deviceId": {"entityType": "DEVICE", "id": device_id}, "credentialsType": ctype,
                "credentialsId": cid, "credentialsValue": None if ctype == ACCESS_TOKEN else value, "version": 1}

    def latest_telemetry(self, name: str) -> dict[str, tuple[int, Any]]:
        """{key: (ts, value)} of the newest value of each telemetry key (newest by ts, then by arrival)."""
        latest: dict[str, tuple[int, Any]] = {}
        for ts, kv in self._db.execute("SELECT ts, kv FROM telemetry WHERE device = ? ORDER BY ts, seq", (name,)):
            for key, value in json.loads(kv).items():
                latest[key] = (ts, value)
        return latest

    def telemetry_points(self, name: str, start_ms: int, end_ms: int) -> dict[str, dict[int, Any]]:
        """{key: {ts: value}} of the telemetry with start_ms <= ts < end_ms; a later value at the same key and ts
        replaces the earlier one, as ThingsBoard's (entity, key, ts) primary key does."""
        points: dict[str, dict[int, Any]] = {}
        for ts, kv in self._db.execute("SELECT ts, kv FROM telemetry WHERE device = ? AND ts >= ? AND ts < ? "
                                       "ORDER BY seq", (name, start_ms, end_ms)):
            for key, value in json.loads(kv).items():
                points.setdefault(key, {})[ts] = value
        return points

    def attribute_entries(self, name: str, scope: str) -> list[tuple[str, Any, int]]:
        """[(key, value, last update ms)] of one scope ("client", "shared", "server") by key."""
        rows = self._db.execute("SELECT key, value, ts FROM attributes WHERE device = ? AND scope = ? ORDER BY key",
                                (name, scope)).fetchall()
        return [(k, json.loads(v), ts) for k, v, ts in rows]

    # ------------------------------------------------------------------ listeners (sessions)

    def listen(self, device_name: str, callback: Callable[[str, object], Any]) -> object:
        """Call `callback(kind, data)` for events of the device: pushes ("attributes", "rpc"), "deleted",
        "rpc_reply" ((request id, reply)) and "rpc_delivered" (request id). For "rpc" the callback returns True when
        it delivered the request."""
        handle = next(self._handles)
        self._listeners.setdefault(device_name, {})[handle] = callback
        return (device_name, handle)

    def unlisten(self, handle: object) -> None:
        """Stop a listener registered with `listen`; unknown handles are ignored."""
        device_name, number = handle  # type: ignore[misc]
        callbacks = self._listeners.get(device_name, {})
        callbacks.pop(number, None)
        if not callbacks:
            self._listeners.pop(device_name, None)

    def _notify(self, name: str, kind: str, data: object) -> int:
        """Tell the device's listeners; the number of them that answered True (took the event)."""
        return sum(bool(callback(kind, data)) for callback in list(self._listeners.get(name, {}).values()))
