"""MQTT over TLS with X.509 client certificates (reference §3.4, §7), using paho-mqtt and the `cryptography` package."""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import socket
import ssl
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from cryptography.x509.oid import NameOID

from emulator_fixtures import ALLOW_KEY, ALLOW_SECRET, CONFIG, Paho, connect_packet, mqtt_emulator
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


def self_signed(tmp_path: Path, name: str, not_before: datetime.datetime | None = None,
                not_after: datetime.datetime | None = None) -> dict:
    """Files of a self-signed client certificate nobody registered, optionally with the given validity."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - datetime.timedelta(hours=1))
            .not_valid_after(not_after or now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    return write_pair(tmp_path, name, (cert.public_bytes(Encoding.PEM), key.private_bytes(
        Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())))


def test_unknown_self_signed_certificate_is_refused_at_connack(tls_files, tmp_path):
    options = tls_options(tls_files, self_signed(tmp_path, "stranger"))
    with mqtt_emulator(tls=tls_files) as emu:
        client = Paho(emu.tls_port, "c", "preTokenValue0000001", tls=options)  # the token is not looked at
        try:
            assert client.rc.is_failure and client.rc.getName() == "Not authorized"  # 3.1.1 return code 5
        finally:
            client.client.loop_stop()
        client = Paho(emu.tls_port, "c", "preTokenValue0000001", tls=options, protocol=mqtt.MQTTv5)
        try:
            assert client.rc.value == 0x87
        finally:
            client.client.loop_stop()
        # The bytes: CONNACK 0x87 without properties, then DISCONNECT 0x87, then the close.
        context = ssl.create_default_context(cafile=options["ca_certs"])
        context.load_cert_chain(options["certfile"], options["keyfile"])
        with socket.create_connection(("127.0.0.1", emu.tls_port), timeout=5) as raw, \
                context.wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(connect_packet("c", "preTokenValue0000001", level=5))
            received = b""
            while chunk := s.recv(100):
                received += chunk
        assert received == b"\x20\x03\x00\x87\x00\xe0\x02\x87\x00"
        assert sum("unknown X.509 certificate" in e for e in emu.events) == 3


@pytest.mark.parametrize("protocol", [mqtt.MQTTv311, mqtt.MQTTv5])
def test_unknown_self_signed_certificate_may_provision_then_connect(tls_files, tmp_path, protocol):
    files = self_signed(tmp_path, "newcomer")
    options = tls_options(tls_files, files)
    pem = Path(files["certfile"]).read_text()
    with mqtt_emulator(tls=tls_files) as emu:
        with Paho(emu.tls_port, "provision", tls=options, protocol=protocol) as p:
            assert p.rc == 0
            assert p.publish("/provision/request", json.dumps({
                "deviceName": "newcomer", "provisionDeviceKey": ALLOW_KEY, "provisionDeviceSecret": ALLOW_SECRET,
                "credentialsType": "X509_CERTIFICATE", "hash": pem})) == 0
            assert json.loads(p.message().payload)["status"] == "SUCCESS"
        with Paho(emu.tls_port, "newcomer", tls=options, protocol=protocol) as d:
            assert d.rc == 0
            d.publish("v1/devices/me/telemetry", b'{"provisioned":1}')
        assert emu.call(lambda s: s.telemetry("newcomer"))[0]["values"] == {"provisioned": 1}


def test_expired_registered_certificate_is_refused_at_connack(tls_files, tmp_path):
    now = datetime.datetime.now(datetime.timezone.utc)
    files = self_signed(tmp_path, "old", now - datetime.timedelta(days=10), now - datetime.timedelta(days=1))
    config = {"profiles": CONFIG["profiles"], "devices": [
        {"name": "old", "profile": "check", "credentialsType": "X509_CERTIFICATE",
         "credentialsValue": Path(files["certfile"]).read_text()}]}
    with mqtt_emulator(config, tls=tls_files) as emu:
        client = Paho(emu.tls_port, "c", tls=tls_options(tls_files, files))
        try:
            assert client.rc.is_failure and client.rc.getName() == "Not authorized"
        finally:
            client.client.loop_stop()
        assert any("expired or not yet valid" in e for e in emu.events)


def test_a_chain_whose_certificates_do_not_sign_each_other_is_dropped_after_the_handshake(tls_files, tmp_path):
    leaf = self_signed(tmp_path, "leaf")
    unrelated = self_signed(tmp_path, "unrelated")
    chain = tmp_path / "chain.pem"
    chain.write_text(Path(leaf["certfile"]).read_text() + Path(unrelated["certfile"]).read_text())
    context = ssl.create_default_context(cafile=str(tls_files.ca_pem))
    context.load_cert_chain(str(chain), leaf["keyfile"])
    with mqtt_emulator(tls=tls_files) as emu:
        with socket.create_connection(("127.0.0.1", emu.tls_port), timeout=5) as raw, \
                context.wrap_socket(raw, server_hostname="localhost") as s:
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                s.sendall(connect_packet("c", "preTokenValue0000001"))
            with pytest.raises((ConnectionError, ssl.SSLError)):
                if not s.recv(10):
                    raise ConnectionError("closed")


def test_tls_garbage_and_silence_do_not_stop_the_listener(tls_files):
    with mqtt_emulator(tls=tls_files) as emu:
        with socket.create_connection(("127.0.0.1", emu.tls_port), timeout=5) as junk:
            junk.sendall(b"\x16\x03\x01\x00\x05hello" + bytes(range(256)))
            with contextlib.suppress(ConnectionError):
                assert junk.recv(100) is not None
        silent = socket.create_connection(("127.0.0.1", emu.tls_port), timeout=5)
        try:
            with Paho(emu.tls_port, "c", "preTokenValue0000001", tls=tls_options(tls_files)) as d:
                assert d.rc == 0
        finally:
            silent.close()


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
