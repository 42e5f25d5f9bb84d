"""Certificates for the emulator's MQTT-over-TLS listener, made with the `cryptography` package.

The emulator keeps a CA and a server certificate (for localhost and 127.0.0.1) in a directory and reuses them on
the next start, so a device configured with ca.der keeps trusting it. `client_certificate` makes device
certificates for tests: self-signed, or issued by the emulator's CA.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from host_tools.emulator import tls

log = logging.getLogger(__name__)

CA_PEM = "ca.pem"
CA_DER = "ca.der"
CA_KEY = "ca-key.pem"
SERVER_PEM = "server.pem"
SERVER_KEY = "server-key.pem"
_VALID_DAYS = 3650


@dataclass(frozen=True)
class ServerFiles:
    """Paths of the emulator's CA and server certificate files."""

    ca_pem: Path
    ca_der: Path
    ca_key: Path
    server_pem: Path
    server_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _builder(subject: str, issuer: x509.Name, public_key, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=days)))


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def ensure_server_files(tls_dir: str | os.PathLike, hosts: Iterable[str] = ("localhost", "127.0.0.1")
                        ) -> ServerFiles:
    """Create the CA and server certificate in `tls_dir` unless all of them are already there; return paths."""
    root = Path(tls_dir)
    files = ServerFiles(root / CA_PEM, root / CA_DER, root / CA_KEY, root / SERVER_PEM, root / SERVER_KEY)
    if all(p.is_file() for p in (files.ca_pem, files.ca_der, files.server_pem, files.server_key)):
        log.debug("reusing TLS files in %s", root)
        return files
    root.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (_builder("ThingsBoard emulator CA", _name("ThingsBoard emulator CA"), ca_key.public_key(), _VALID_DAYS)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                              critical=True)
               .sign(ca_key, hashes.SHA256()))
    server_key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_cert = (_builder("localhost", ca_cert.subject, server_key.public_key(), _VALID_DAYS)
                   .add_extension(x509.SubjectAlternativeName(names), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .sign(ca_key, hashes.SHA256()))
    files.ca_pem.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.ca_der.write_bytes(ca_cert.public_bytes(serialization.Encoding.DER))
    _write_private(files.ca_key, _key_pem(ca_key))
    files.server_pem.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(files.server_key, _key_pem(server_key))
    log.info("created a CA and a server certificate in %s", root)
    return files


def client_certificate(common_name: str, ca: ServerFiles | None = None, days: int = 365
                       ) -> tuple[bytes, bytes]:
    """A device certificate and its key as (cert PEM, key PEM): self-signed, or issued by `ca`."""
    key = ec.generate_private_key(ec.SECP256R1())
    if ca is None:
        cert = _builder(common_name, _name(common_name), key.public_key(), days).sign(key, hashes.SHA256())
    else:
        ca_cert = x509.load_pem_x509_certificate(ca.ca_pem.read_bytes())
        ca_key = serialization.load_pem_private_key(ca.ca_key.read_bytes(), None)
        cert = _builder(common_name, ca_cert.subject, key.public_key(), days).sign(ca_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def server_context(files: ServerFiles) -> SSL.Context:
    """The MQTTS listener's TLS context: the server certificate; any client certificate passes the handshake.

    ThingsBoard accepts any client certificate in the handshake and refuses unknown ones at CONNACK (tls.py).
    """
    return tls.server_context(str(files.server_pem), str(files.server_key))


def valid_now(cert_der: bytes) -> bool:
    """Whether the certificate's validity period includes now (ThingsBoard checks it at CONNECT)."""
    cert = x509.load_der_x509_certificate(cert_der)
    now = datetime.datetime.now(datetime.timezone.utc)
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc
