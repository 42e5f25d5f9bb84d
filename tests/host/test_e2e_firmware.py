"""The whole firmware, end to end: `micropython main.py` in a board directory against the emulator's CLI.

For each transport: first boot provisions and saves, second boot reuses the credentials; both strategies and each
credentials type the transport can use; wrong key; device already there; emulator down at first boot; emulator
restarted mid-run; credentials deleted on the server; the lifecycle against an older server version; X.509 over
verified TLS.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from emulator_fixtures import ALLOW_KEY, ALLOW_SECRET, CHECK_KEY, CHECK_SECRET, CONFIG
from firmware_board import FirmwareBoard
from host_tools.emulator.process import EmulatorProcess

TRANSPORTS = ["mqtt", "http", "coap"]
SENSORS = ["uptime", "free_heap", "heap_used"]


def board_config(port: int, transport: str, name: str, **fields) -> dict:
    config = {"host": "127.0.0.1", "port": port, "transport": transport, "provision_key": ALLOW_KEY,
              "provision_secret": ALLOW_SECRET, "device_name": name, "telemetry_interval": 0.2, "timeout": 3,
              "sensors": SENSORS}
    config.update(fields)
    return config


@pytest.fixture
def emulator():
    with EmulatorProcess(CONFIG) as emu:
        yield emu


def free_ports() -> dict[str, int]:
    """Ports nobody listens on right now (TCP for MQTT and HTTP, UDP for CoAP)."""
    ports = {}
    for name, kind in (("mqtt", socket.SOCK_STREAM), ("http", socket.SOCK_STREAM), ("coap", socket.SOCK_DGRAM)):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("127.0.0.1", 0))
            ports[name] = s.getsockname()[1]
    return ports


def assert_lifecycle(emu: EmulatorProcess, board: FirmwareBoard, name: str, ctype: str) -> None:
    with board.boot() as run:
        run.wait_for("provisioned %s with %s credentials" % (name, ctype))
        run.wait_for("telemetry 2 sent")
    saved = board.credentials
    assert saved["type"] == ctype and saved["device"] == name
    first = emu.wait_for_telemetry(name, 2, timeout=10)
    with board.boot() as run:
        run.wait_for("telemetry 2 sent")
        assert "provisioning" not in run.output
    entries = emu.wait_for_telemetry(name, 4, timeout=10)
    assert set(entries[-1]["values"]) == set(SENSORS)
    assert entries[-1]["ts"] >= first[0]["ts"] > time.time() * 1000 - 60_000
    device = next(d for d in emu.devices() if d["name"] == name)
    assert device["provisionState"] == "provisioned"
    assert device["credentialsType"] == ctype


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_server_generated_token(emulator, tmp_path: Path, transport: str) -> None:
    name = f"e2e-{transport}-gen"
    board = FirmwareBoard(tmp_path / "b", board_config(emulator.ports[transport], transport, name,
                                                       credentials_type="SERVER_GENERATED"))
    assert_lifecycle(emulator, board, name, "ACCESS_TOKEN")
    assert len(board.credentials["token"]) == 20


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_token_chosen_by_the_board_by_default(emulator, tmp_path: Path, transport: str) -> None:
    name = f"e2e-{transport}-own"
    board = FirmwareBoard(tmp_path / "b", board_config(emulator.ports[transport], transport, name))
    assert_lifecycle(emulator, board, name, "ACCESS_TOKEN")
    token = board.credentials["token"]
    assert len(token) == 20 and all(c in "0123456789abcdef" for c in token), token
    assert not (board.path / "ahead.json").exists()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_device_supplied_access_token(emulator, tmp_path: Path, transport: str) -> None:
    name = f"e2e-{transport}-tok"
    token = f"e2eToken{transport}0123456"
    board = FirmwareBoard(tmp_path / "b", board_config(emulator.ports[transport], transport, name,
                                                       credentials_type="ACCESS_TOKEN", token=token))
    assert_lifecycle(emulator, board, name, "ACCESS_TOKEN")
    assert board.credentials["token"] == token


@pytest.mark.parametrize("fields", [
    {"client_id": "e2e-client", "username": "e2e-user", "password": "e2e-pass"},
    {"username": "e2e-user2", "password": "e2e-pass2"},
    {"client_id": "e2e-client3"},
], ids=["all-three", "user-password", "client-id-only"])
def test_mqtt_basic(emulator, tmp_path: Path, fields: dict) -> None:
    name = "e2e-basic-" + "-".join(sorted(fields))
    board = FirmwareBoard(tmp_path / "b", board_config(emulator.ports["mqtt"], "mqtt", name,
                                                       credentials_type="MQTT_BASIC", **fields))
    assert_lifecycle(emulator, board, name, "MQTT_BASIC")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_pre_provisioned_device(emulator, tmp_path: Path, transport: str) -> None:
    board = FirmwareBoard(tmp_path / "b", board_config(emulator.ports[transport], transport, "pre-token",
                                                       provision_key=CHECK_KEY, provision_secret=CHECK_SECRET))
    with board.boot() as run:
        run.wait_for("provisioned pre-token with ACCESS_TOKEN credentials")
        run.wait_for("telemetry 1 sent")
    assert board.credentials["token"] == "preTokenValue0000001"
    with board.boot() as run:
        run.wait_for("telemetry 2 sent")
        assert "provisioning" not in run.output
    emulator.wait_for_telemetry("pre-token", 3, timeout=10)


def test_pre_provisioned_mqtt_basic_device(emulator, tmp_path: Path) -> None:
    board = FirmwareBoard(tmp_path / "b", board_config(emulator.ports["mqtt"], "mqtt", "pre-basic",
                                                       provision_key=CHECK_KEY, provision_secret=CHECK_SECRET))
    with board.boot() as run:
        run.wait_for("provisioned pre-basic with MQTT_BASIC credentials")
        run.wait_for("telemetry 2 sent")
    assert board.credentials["username"] == "pre-user"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_wrong_secret_saves_nothing(emulator, tmp_path: Path, transport: str) -> None:
    name = f"e2e-{transport}-wrong"
    board = FirmwareBoard(tmp_path / "b", board_config(emulator.ports[transport], transport, name,
                                                       provision_secret="not-the-secret"))
    with board.boot() as run:
        run.wait_for(r"E provisioning refused \(NOT_FOUND: Provision data was not found!\)")
        run.wait_for("retrying in 900000 ms")
    assert board.credentials is None
    assert name not in [d["name"] for d in emulator.devices()]
    assert "not-the-secret" not in run.output


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_device_already_exists(emulator, tmp_path: Path, transport: str) -> None:
    # The board's own token is not the device's: the log tells the operator what to do.
    board = FirmwareBoard(tmp_path / "b", board_config(emulator.ports[transport], transport, "pre-token"))
    with board.boot() as run:
        run.wait_for("answered FAILURE .*trying the board's own credentials")
        run.wait_for(r"E the server refused the credentials of pre-token too .*: on the server, delete the device "
                     r"pre-token, or reset its provisionState")
    assert board.credentials is None


def test_device_already_exists_with_a_server_generated_token(emulator, tmp_path: Path) -> None:
    board = FirmwareBoard(tmp_path / "b", board_config(emulator.ports["mqtt"], "mqtt", "pre-token",
                                                       credentials_type="SERVER_GENERATED"))
    with board.boot() as run:
        run.wait_for(r"E provisioning failed \(FAILURE: Failed to provision device!\) and pre-token has no "
                     r"credentials of its own: on the server, delete the device pre-token")
    assert board.credentials is None


def test_device_already_exists_with_its_token_in_config(emulator, tmp_path: Path) -> None:
    board = FirmwareBoard(tmp_path / "b", board_config(emulator.ports["mqtt"], "mqtt", "pre-token",
                                                       credentials_type="ACCESS_TOKEN", token="preTokenValue0000001"))
    with board.boot() as run:
        run.wait_for("answered FAILURE")
        run.wait_for("telemetry 1 sent")
    assert board.credentials["token"] == "preTokenValue0000001"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_emulator_down_at_first_boot(tmp_path: Path, transport: str) -> None:
    ports = free_ports()
    name = f"e2e-{transport}-late"
    board = FirmwareBoard(tmp_path / "b", board_config(ports[transport], transport, name, timeout=1))
    with board.boot(retry_ms=300) as run:
        run.wait_for("provisioning got NO_ANSWER")
        run.wait_for("retrying in")
        with EmulatorProcess(CONFIG, ports=ports) as emu:
            run.wait_for("telemetry 1 sent", timeout=30)
            emu.wait_for_telemetry(name, 1, timeout=10)
    assert board.credentials["device"] == name


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_emulator_restarted_mid_run(tmp_path: Path, transport: str) -> None:
    ports = free_ports()
    db = ["--db", str(tmp_path / "tb.sqlite")]
    name = f"e2e-{transport}-restart"
    board = FirmwareBoard(tmp_path / "b", board_config(ports[transport], transport, name, timeout=1))
    with board.boot(retry_ms=300) as run:
        with EmulatorProcess(CONFIG, ports=ports, extra_args=tuple(db)) as emu:
            run.wait_for("telemetry 2 sent")
        before = len(run.lines)
        with EmulatorProcess(CONFIG, ports=ports, extra_args=tuple(db)) as emu:
            stored = len(emu.telemetry(name))
            assert stored >= 2  # the restarted emulator remembers the device and its telemetry
            emu.wait_for_telemetry(name, stored + 3, timeout=30)
        assert "provisioning" not in "\n".join(run.lines[before:])


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_credentials_deleted_on_server(emulator, tmp_path: Path, transport: str) -> None:
    name = f"e2e-{transport}-deleted"
    board = FirmwareBoard(tmp_path / "b", board_config(emulator.ports[transport], transport, name))
    with board.boot(retry_ms=100) as run:
        run.wait_for("telemetry 2 sent")
        old = board.credentials["token"]
        emulator.delete_device(name)
        run.wait_for(r"refused the credentials .*3 in a row", timeout=30)
        run.wait_for(f"provisioned {name}", timeout=30)
        emulator.wait_for_telemetry(name, 1, timeout=10)
    assert board.credentials["token"] != old
    assert (board.path / "creds.json.bad").exists()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_lifecycle_against_server_3_8(tmp_path: Path, transport: str) -> None:
    with EmulatorProcess(CONFIG, server_version="3.8") as emu:
        name = f"e2e-{transport}-v38"
        board = FirmwareBoard(tmp_path / "b", board_config(emu.ports[transport], transport, name))
        assert_lifecycle(emu, board, name, "ACCESS_TOKEN")


@pytest.mark.parametrize("issuer", ["self-signed", "emulator-ca"])
def test_x509_certificate_over_verified_tls(tmp_path: Path, issuer: str) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from host_tools.emulator import certs

    tls_dir = tmp_path / "tls"
    name = f"e2e-x509-{issuer}"
    with EmulatorProcess(CONFIG, extra_args=("--mqtts-port", "0", "--tls-dir", str(tls_dir))) as emu:
        ca = certs.ensure_server_files(tls_dir)
        cert_pem, key_pem = certs.client_certificate(name, None if issuer == "self-signed" else ca)
        board = FirmwareBoard(tmp_path / "b", board_config(
            emu.ports["mqtts"], "mqtt", name, tls=True, ca_file="ca.der", credentials_type="X509_CERTIFICATE",
            cert_file="device.der", key_file="device-key.der"))
        (board.path / "ca.der").write_bytes((tls_dir / "ca.der").read_bytes())
        (board.path / "device.der").write_bytes(
            x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER))
        (board.path / "device-key.der").write_bytes(serialization.load_pem_private_key(key_pem, None).private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption()))
        assert_lifecycle(emu, board, name, "X509_CERTIFICATE")


def test_tls_server_not_signed_by_the_configured_ca(tmp_path: Path) -> None:
    from host_tools.emulator import certs

    with EmulatorProcess(CONFIG, extra_args=("--mqtts-port", "0", "--tls-dir", str(tmp_path / "tls"))) as emu:
        other = certs.ensure_server_files(tmp_path / "other")
        board = FirmwareBoard(tmp_path / "b", board_config(emu.ports["mqtts"], "mqtt", "e2e-wrong-ca", tls=True,
                                                           ca_file="ca.der"))
        (board.path / "ca.der").write_bytes(other.ca_der.read_bytes())
        with board.boot() as run:
            run.wait_for(r"provisioning got BAD_ANSWER: TLS handshake failed: .*not correctly signed")
        assert board.credentials is None
        assert "e2e-wrong-ca" not in [d["name"] for d in emu.devices()]
