"""Certificates given as PEM on the host reach the board as DER and work: verified TLS and X.509 provisioning."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from host_tools import devconfig
from host_tools.emulator import certs
from host_tools.emulator.process import EmulatorProcess
from host_tools.vboard import VirtualBoard, board_mac
from vboard_fixtures import ArgvWatch, Server, run_tool, vboard  # noqa: F401 - fixture


@pytest.fixture
def tls_emulator(tmp_path: Path) -> Iterator[tuple[Server, Path]]:
    """The emulator with an MQTT-over-TLS listener; its CA and server certificate live in tmp_path/tls."""
    key, secret = "key-" + secrets.token_hex(6), "secret-" + secrets.token_hex(8)
    config = {"profiles": [{"name": "tls", "provisionDeviceKey": key, "provisionDeviceSecret": secret,
                            "provisionType": "ALLOW_CREATE_NEW_DEVICES"}], "devices": []}
    tls_dir = tmp_path / "tls"
    emu = EmulatorProcess(config, extra_args=("--mqtts-port", "0", "--tls-dir", str(tls_dir)))
    emu.start()
    try:
        yield Server(emu, key, secret), tls_dir
    finally:
        emu.stop()


def tls_env(server: Server, tls_dir: Path, port: str) -> dict[str, str]:
    return {"PORT": port, "TB_HOST": "127.0.0.1", "TB_PORT": str(server.emu.ports["mqtts"]), "TLS": "1",
            "CA_FILE": str(tls_dir / certs.CA_PEM), "PROVISION_KEY": server.key,
            "PROVISION_SECRET": server.secret, "INTERVAL": "0.3", "MONITOR": "0"}


def test_pem_ca_is_deployed_as_der_and_the_board_verifies_the_server(
        vboard: VirtualBoard, tls_emulator: tuple[Server, Path]) -> None:
    server, tls_dir = tls_emulator
    with ArgvWatch([server.secret]) as watch:
        proc = run_tool(["deploy"], tls_env(server, tls_dir, vboard.port), timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    name = "unix-" + board_mac(vboard.flash_dir).hex()
    server.emu.wait_for_telemetry(name, 2, timeout=30)
    assert (vboard.flash_dir / "ca.der").read_bytes() == (tls_dir / certs.CA_DER).read_bytes()
    assert '"ca_file":"ca.der"' in (vboard.flash_dir / "config.json").read_text()
    assert watch.hits == []


def test_x509_device_certificate_and_key_from_pem(vboard: VirtualBoard, tls_emulator: tuple[Server, Path],
                                                   tmp_path: Path) -> None:
    server, tls_dir = tls_emulator
    cert_pem, key_pem = certs.client_certificate("x509-board")
    (tmp_path / "device.pem").write_bytes(cert_pem)
    (tmp_path / "device-key.pem").write_bytes(key_pem)
    env = {**tls_env(server, tls_dir, vboard.port), "CREDENTIALS_TYPE": "X509_CERTIFICATE",
           "CERT_FILE": str(tmp_path / "device.pem"), "KEY_FILE": str(tmp_path / "device-key.pem"),
           "DEVICE_NAME": "x509-board"}
    proc = run_tool(["deploy"], env, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    server.emu.wait_for_telemetry("x509-board", 1, timeout=30)
    cert_der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    assert (vboard.flash_dir / "cert.der").read_bytes() == cert_der
    key = serialization.load_der_private_key((vboard.flash_dir / "key.der").read_bytes(), None)
    assert key.public_key().public_numbers() == x509.load_pem_x509_certificate(cert_pem).public_key().public_numbers()
    assert b"PRIVATE KEY" not in (proc.stdout + proc.stderr).encode()


def test_devconfig_accepts_der_and_refuses_a_key_for_a_certificate(tmp_path: Path) -> None:
    cert_pem, key_pem = certs.client_certificate("any")
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    (tmp_path / "ca.der").write_bytes(der)
    (tmp_path / "key.pem").write_bytes(key_pem)
    assert devconfig.certificate_der("CA_FILE", str(tmp_path / "ca.der")) == der
    with pytest.raises(devconfig.ConfigProblem, match="CA_FILE: .*key.pem is not a PEM or DER X.509 certificate"):
        devconfig.certificate_der("CA_FILE", str(tmp_path / "key.pem"))
    with pytest.raises(devconfig.ConfigProblem, match="KEY_FILE: .*ca.der is not an unencrypted PEM or DER"):
        devconfig.private_key_der("KEY_FILE", str(tmp_path / "ca.der"))
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-a-file\n")
    dc = devconfig.from_env({"TB_HOST": "h", "PROVISION_KEY": "k", "PROVISION_SECRET_FILE": str(secret_file),
                             "CA_FILE": str(tmp_path / "ca.der")}, "d-{uid}", ["uptime"])
    assert dc.config["provision_secret"] == "from-a-file" and dc.config["tls"] is True
    assert dc.files == {"ca.der": der}
    assert dc.redacted()["provision_secret"] == "***"
    assert devconfig.firmware_check(dc)["ok"]
