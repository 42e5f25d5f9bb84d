"""The board's config.json, built from make variables / the environment and validated before any board is touched.

Two checks, in order: host-side checks of each variable (the message names the variable), then the firmware's own
`tbfleet.config.load` run under the MicroPython Unix port on a private temporary copy of exactly what goes onto the
board, so that host and board can never disagree about what is valid.

Certificates and keys may be PEM or DER on the host; the board gets DER (the Unix port cannot parse PEM), under fixed
names next to config.json. Secrets only ever live in files (mode 0600) and in this process's memory.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from host_tools.build import FIRMWARE, MICROPYTHON

log = logging.getLogger(__name__)

FIRMWARE_LIB = FIRMWARE / "lib"
TRANSPORTS = ("mqtt", "http", "coap")
CREDENTIALS_TYPES = ("ACCESS_TOKEN", "MQTT_BASIC", "X509_CERTIFICATE", "SERVER_GENERATED")
# Where the DER files go on the board, relative to config.json.
BOARD_FILES = {"CA_FILE": "ca.der", "CERT_FILE": "cert.der", "KEY_FILE": "key.der"}
# config.json field -> the variable that sets it, to name the variable in the firmware's messages.
VARIABLE_OF = {
    "host": "TB_HOST", "port": "TB_PORT", "transport": "TRANSPORT", "tls": "TLS", "ca_file": "CA_FILE",
    "provision_key": "PROVISION_KEY", "provision_secret": "PROVISION_SECRET", "device_name": "DEVICE_NAME",
    "credentials_type": "CREDENTIALS_TYPE", "token": "TOKEN", "client_id": "CLIENT_ID", "username": "USERNAME",
    "password": "PASSWORD", "cert_file": "CERT_FILE", "key_file": "KEY_FILE", "telemetry_interval": "INTERVAL",
    "wifi_ssid": "WIFI_SSID", "wifi_password": "WIFI_PASSWORD", "log_level": "LOG_LEVEL",
}
_SECRET_FIELDS = ("provision_secret", "token", "password", "wifi_password")
_CHECK_TIMEOUT = 30.0
# Runs in the Unix port inside the temporary board directory: the firmware's validation, answered as one JSON line.
_CHECK = """\
import json
from tbfleet import config
try:
    cfg = config.load("config.json")
    print(json.dumps({"ok": True, "device_name": cfg.device_name, "port": cfg.port}))
except config.ConfigError as e:
    print(json.dumps({"ok": False, "field": e.field, "message": e.message}))
"""


class ConfigProblem(ValueError):
    """A variable (or the combination) the board would not accept; the message names the variable."""


@dataclass
class DeviceConfig:
    """What a deploy writes onto a board: config.json and the DER files it refers to."""

    config: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict)

    def json_bytes(self) -> bytes:
        """config.json exactly as it goes onto the board (sorted keys, so an unchanged config hashes the same)."""
        return json.dumps(self.config, sort_keys=True, separators=(",", ":")).encode()

    def secrets(self) -> list[str]:
        """Secret values in this config, for scrubbing any text shown to people."""
        return [v for k, v in self.config.items() if k in _SECRET_FIELDS and isinstance(v, str) and v]

    def for_uid(self, uid: str) -> DeviceConfig:
        """This config for the board whose chip MAC is `uid` (12 hex digits): {uid} in the device name expanded.

        The rest is shared, so a fleet reads its files and runs the firmware's check once, not once per board.
        """
        return DeviceConfig({**self.config, "device_name": self.config["device_name"].replace("{uid}", uid)},
                            self.files)

    def redacted(self) -> dict[str, Any]:
        """The config with every secret replaced by "***", safe to show or log."""
        return {k: ("***" if k in _SECRET_FIELDS and v else v) for k, v in self.config.items()}


def env_value(env: Mapping[str, str], name: str) -> str | None:
    """The variable `name`, None when unset or empty (make exports unset variables as empty)."""
    value = env.get(name)
    return value if value not in (None, "") else None


def env_flag(env: Mapping[str, str], name: str) -> bool | None:
    """A yes/no variable: True, False, or None when unset; ConfigProblem naming it otherwise."""
    value = env_value(env, name)
    if value is None:
        return None
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigProblem(f"{name}={value!r} is not a yes/no value (use 1 or 0)")


def _read(name: str, path: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as e:
        raise ConfigProblem(f"{name}: cannot read {path}: {e.strerror}") from None


def certificate_der(name: str, path: str) -> bytes:
    """The certificate in file `path` (PEM or DER) as DER; ConfigProblem naming variable `name` otherwise."""
    data = _read(name, path)
    for loader in (x509.load_pem_x509_certificate, x509.load_der_x509_certificate):
        try:
            return loader(data).public_bytes(serialization.Encoding.DER)
        except ValueError:
            continue
    raise ConfigProblem(f"{name}: {path} is not a PEM or DER X.509 certificate")


def private_key_der(name: str, path: str) -> bytes:
    """The unencrypted private key in file `path` (PEM or DER) as PKCS#8 DER; ConfigProblem otherwise."""
    data = _read(name, path)
    for loader in (serialization.load_pem_private_key, serialization.load_der_private_key):
        try:
            key = loader(data, password=None)
        except (ValueError, TypeError):
            continue
        return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    raise ConfigProblem(f"{name}: {path} is not an unencrypted PEM or DER private key")


def _provision_secret(env: Mapping[str, str], default: str | None) -> str:
    secret, secret_file = env_value(env, "PROVISION_SECRET"), env_value(env, "PROVISION_SECRET_FILE")
    if secret and secret_file:
        raise ConfigProblem("PROVISION_SECRET and PROVISION_SECRET_FILE are both set: give only one")
    if secret_file:
        try:
            secret = _read("PROVISION_SECRET_FILE", secret_file).decode().strip("\r\n")
        except UnicodeDecodeError:
            raise ConfigProblem(f"PROVISION_SECRET_FILE: {secret_file} is not text") from None
        if not secret:
            raise ConfigProblem(f"PROVISION_SECRET_FILE: {secret_file} is empty")
    secret = secret or default
    if not secret:
        raise ConfigProblem("PROVISION_SECRET is not set: give the device profile's provisioning secret in "
                            "PROVISION_SECRET or in a file named by PROVISION_SECRET_FILE")
    return secret


def _port(env: Mapping[str, str], default: int | None) -> int | None:
    text = env_value(env, "TB_PORT")
    if text is None:
        return default
    try:
        port = int(text)
    except ValueError:
        raise ConfigProblem(f"TB_PORT={text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise ConfigProblem(f"TB_PORT={port} is outside 1..65535")
    return port


def _app_settings(path: str) -> dict:
    """config.json's "app" object from the JSON file APP_CONFIG names; ConfigProblem when it is not one."""
    try:
        data = json.loads(Path(path).expanduser().read_text())
    except OSError as e:
        raise ConfigProblem(f"APP_CONFIG={path}: cannot read it ({e.strerror})") from None
    except ValueError as e:
        raise ConfigProblem(f"APP_CONFIG={path}: not JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigProblem(f"APP_CONFIG={path}: not a JSON object")
    return data


def from_env(env: Mapping[str, str], device_name: str, sensors: list[str] | tuple[str, ...],
             defaults: Mapping[str, Any] | None = None, uid: str | None = None) -> DeviceConfig:
    """Build the board's config from `env` (make variables); ConfigProblem names the first wrong variable.

    `device_name` and `sensors` are the board's defaults (DEVICE_NAME overrides the name). `defaults` may supply
    host, port, provision_key, provision_secret and telemetry_interval (the emulator's, for the unix board).
    With `uid` (the chip MAC as 12 hex digits) the name's {uid} and {mac} are expanded here, so that the caller
    knows the final name.
    """
    defaults = defaults or {}
    cfg: dict[str, Any] = {}
    host = env_value(env, "TB_HOST") or defaults.get("host")
    if not host:
        raise ConfigProblem("TB_HOST is not set: give the ThingsBoard server's host name or address")
    if any(c.isspace() for c in host) or "/" in host:
        raise ConfigProblem(f"TB_HOST={host!r} is not a host name or address")
    cfg["host"] = host
    port = _port(env, defaults.get("port"))
    if port is not None:
        cfg["port"] = port
    transport = (env_value(env, "TRANSPORT") or defaults.get("transport") or "mqtt").lower()
    if transport not in TRANSPORTS:
        raise ConfigProblem(f"TRANSPORT={transport!r} is not one of {', '.join(TRANSPORTS)}")
    cfg["transport"] = transport
    key = env_value(env, "PROVISION_KEY") or defaults.get("provision_key")
    if not key:
        raise ConfigProblem("PROVISION_KEY is not set: give the device profile's provisioning key")
    cfg["provision_key"] = key
    cfg["provision_secret"] = _provision_secret(env, defaults.get("provision_secret"))

    name = env_value(env, "DEVICE_NAME") or device_name
    if uid is not None:
        name = name.replace("{uid}", uid).replace("{mac}", uid)
    elif "{mac}" in name:
        # On ESP32 the firmware's {uid} is the chip MAC: the board expands it itself.
        name = name.replace("{mac}", "{uid}")
    cfg["device_name"] = name

    ctype = env_value(env, "CREDENTIALS_TYPE")
    if ctype is not None:
        ctype = ctype.upper()
        if ctype not in CREDENTIALS_TYPES:
            raise ConfigProblem(f"CREDENTIALS_TYPE={ctype!r} is not one of {', '.join(CREDENTIALS_TYPES)} "
                                "(leave it unset for a token the board chooses itself)")
        cfg["credentials_type"] = ctype
    for var, key_ in (("TOKEN", "token"), ("CLIENT_ID", "client_id"), ("USERNAME", "username"),
                      ("PASSWORD", "password"), ("WIFI_SSID", "wifi_ssid"), ("WIFI_PASSWORD", "wifi_password"),
                      ("LOG_LEVEL", "log_level")):
        value = env_value(env, var)
        if value is not None:
            cfg[key_] = value

    files: dict[str, bytes] = {}
    if env_value(env, "CA_FILE"):
        files[BOARD_FILES["CA_FILE"]] = certificate_der("CA_FILE", env["CA_FILE"])
        cfg["ca_file"] = BOARD_FILES["CA_FILE"]
    if env_value(env, "CERT_FILE"):
        files[BOARD_FILES["CERT_FILE"]] = certificate_der("CERT_FILE", env["CERT_FILE"])
        cfg["cert_file"] = BOARD_FILES["CERT_FILE"]
    if env_value(env, "KEY_FILE"):
        files[BOARD_FILES["KEY_FILE"]] = private_key_der("KEY_FILE", env["KEY_FILE"])
        cfg["key_file"] = BOARD_FILES["KEY_FILE"]
    tls = env_flag(env, "TLS")
    if tls is None:
        # A CA or a client certificate only makes sense over TLS.
        tls = bool(files)
    cfg["tls"] = tls

    app = env_value(env, "APP_CONFIG")
    if app is not None:
        cfg["app"] = _app_settings(app)

    interval = env_value(env, "INTERVAL") or defaults.get("telemetry_interval")
    if interval is not None:
        try:
            seconds = float(interval)
        except ValueError:
            raise ConfigProblem(f"INTERVAL={interval!r} is not a number of seconds") from None
        if not math.isfinite(seconds):
            raise ConfigProblem(f"INTERVAL={interval!r} is not a number of seconds")
        # Its range is the firmware's own check (0 sends back to back), so that host and board agree on it.
        cfg["telemetry_interval"] = int(seconds) if seconds.is_integer() else seconds
    cfg["sensors"] = list(sensors)
    return DeviceConfig(cfg, files)


def write_private(path: Path, data: bytes) -> Path:
    """Write `data` to a new file at `path` readable by its owner only (created 0600, never wider)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def firmware_check(dc: DeviceConfig, micropython: str = MICROPYTHON,
                   firmware_lib: Path = FIRMWARE_LIB) -> dict[str, Any]:
    """Run the firmware's own config validation on `dc`; ConfigProblem with its message naming the variable.

    Returns what the firmware derived (the expanded device name and the port it defaults to).
    """
    with tempfile.TemporaryDirectory(prefix="tbfleet-config-") as tmp:
        board_dir = Path(tmp)
        write_private(board_dir / "config.json", dc.json_bytes())
        for name, data in dc.files.items():
            write_private(board_dir / name, data)
        env = dict(os.environ)
        env["MICROPYPATH"] = str(firmware_lib)
        try:
            proc = subprocess.run([micropython, "-c", _CHECK], cwd=board_dir, env=env, capture_output=True,
                                  text=True, timeout=_CHECK_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise ConfigProblem("the firmware's config check did not finish") from None
    lines = proc.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1])
    except (IndexError, ValueError):
        log.debug("config check output: %s %s", proc.stdout, proc.stderr)
        raise ConfigProblem(f"the firmware's config check failed (exit {proc.returncode}); "
                            "is firmware/lib/tbfleet/config.py intact?") from None
    if not answer["ok"]:
        fld = answer["field"]
        var = VARIABLE_OF.get(fld, fld)
        where = f"{var} (config.json {fld})" if fld else "config.json"
        raise ConfigProblem(f"{where}: {answer['message']}")
    return answer
