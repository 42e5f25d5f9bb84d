"""MQTT over TLS with X.509 client certificates (reference §3.4, §7), using paho-mqtt and the `cryptography` package."""

from __future__ import annotations

import base64
import json
import ssl
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from emulator_fixtures import ALLOW_KEY, ALLOW_SECRET, CONFIG, Paho, mqtt_emulator
from host_tools.emulator import certs


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> certs.ServerFiles:
    return certs.ensure_server_files(tmp_path_factory.mktemp("tls"))


def write_pair(tmp_path: Path, name: str, pair: tuple[bytes, bytes]) -> dict:
    cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}-key.pem"
    cert.write_bytes(pair[0])
    key.write_bytes(pair[1])
    return {"certfile": str(cert), "keyfile": str(key)}


def tls_options(files: certs.ServerFiles, client: dict | None = None) -> dict:
    return {"ca_certs": str(files.ca_pem), "cert_reqs": ssl.CERT_REQUIRED, **(client or {})}


def test_server_files_are_created_once_and_reused(tmp_path):
    first = certs.ensure_server_files(tmp_path / "tls")
    content = first.server_pem.read_bytes()
    again = certs.ensure_server_files(tmp_path / "tls")
    assert again.server_pem.read_bytes() == content
    ca = x509.load_der_x509_certificate(first.ca_der.read_bytes())
    server = x509.load_pem_x509_certificate(content)
    assert server.issuer == ca.subject
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert (first.server_key.stat().st_mode & 0o777) == 0o600


def test_provisioned_certificate_connects_over_tls_and_sends_telemetry(tls_files, tmp_path):
    pair = certs.client_certificate("esp32-cert")
    with mqtt_emulator(tls=tls_files) as emu:
        with Paho(emu.port, "provision", "provision") as p:
            p.publish("/provision/request", json.dumps({
                "deviceName": "cert-dev", "provisionDeviceKey": ALLOW_KEY, "provisionDeviceSecret": ALLOW_SECRET,
                "credentialsType": "X509_CERTIFICATE", "hash": pair[0].decode()}))
            answer = json.loads(p.message().payload)
        der = x509.load_pem_x509_certificate(pair[0]).public_bytes(encoding=Encoding.DER)
        assert answer == {"credentialsValue": base64.b64encode(der).decode(), "credentialsType": "X509_CERTIFICATE",
                          "status": "SUCCESS"}
        options = tls_options(tls_files, write_pair(tmp_path, "dev", pair))
        # username and password are ignored when a certificate is presented
        with Paho(emu.tls_port, "any-client", "not-a-token", "x", tls=options) as d:
            assert d.rc == 0
            d.publish("v1/devices/me/telemetry", b'{"secure":true}')
        assert emu.call(lambda s: s.telemetry("cert-dev"))[0]["values"] == {"secure": True}
        assert any("cert-dev" in e and "X.509" in e for e in emu.events)


def test_preprovisioned_self_signed_certificate_from_the_config(tls_files, tmp_path):
    pair = certs.client_certificate("configured")
    config = {"profiles": CONFIG["profiles"], "devices": [
        {"name": "configured", "profile": "check", "credentialsType": "X509_CERTIFICATE",
         "credentialsValue": pair[0].decode()}]}
    with mqtt_emulator(config, tls=tls_files) as emu, \
            Paho(emu.tls_port, "c", tls=tls_options(tls_files, write_pair(tmp_path, "cfg", pair))) as d:
        assert d.rc == 0
        assert emu.call(lambda s: s.device_by_x509(
            x509.load_pem_x509_certificate(pair[0]).public_bytes(encoding=Encoding.DER)).name) == "configured"


def test_unknown_certificate_handshakes_then_is_refused_at_connack(tls_files, tmp_path):
    unknown = certs.client_certificate("stranger", tls_files)
    with mqtt_emulator(tls=tls_files) as emu:
        client = Paho(emu.tls_port, "c", "preTokenValue0000001",
                      tls=tls_options(tls_files, write_pair(tmp_path, "unknown", unknown)))
        try:
            assert client.rc.is_failure and client.rc.getName() == "Not authorized"
        finally:
            client.client.loop_stop()
        assert any("unknown X.509 certificate" in e for e in emu.events)


def test_tls_without_client_certificate_uses_the_token_and_provisioning(tls_files):
    with mqtt_emulator(tls=tls_files) as emu:
        with Paho(emu.tls_port, "c", "preTokenValue0000001", tls=tls_options(tls_files)) as d:
            assert d.rc == 0
        with Paho(emu.tls_port, "provision", tls=tls_options(tls_files)) as p:
            p.publish("/provision/request", json.dumps({"deviceName": "tls-prov", "provisionDeviceKey": ALLOW_KEY,
                                                        "provisionDeviceSecret": ALLOW_SECRET}))
            assert json.loads(p.message().payload)["status"] == "SUCCESS"


def test_wrong_ca_is_refused_by_the_client(tls_files, tmp_path):
    other = certs.ensure_server_files(tmp_path / "other")
    with mqtt_emulator(tls=tls_files) as emu:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="c")
        client.tls_set(ca_certs=str(other.ca_pem))
        with pytest.raises(ssl.SSLCertVerificationError):
            client.connect("127.0.0.1", emu.tls_port)
