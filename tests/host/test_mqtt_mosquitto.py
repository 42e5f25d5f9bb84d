"""The firmware's MQTT client (tbfleet.via_mqtt on the Unix port) against a real mosquitto
broker with a password file, observed by a paho-mqtt subscriber.

mosquitto 2.0 has no password-less users in its password file, so the token user has a password here and the
firmware connects with MQTT_BASIC credentials in ThingsBoard's "user name + password" form (empty client id):
the token is the user name, as with ThingsBoard access tokens.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import logging
import os
import queue
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import paho.mqtt.client as paho
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from support import micropython_env, run_micropython

log = logging.getLogger(__name__)

TOKEN = "Xq3kT9vLm2RcW8pZa1Yb"
TOKEN_PASSWORD = "mq-basic-9c1e"
OBSERVER = ("observer", "obs-7f2a44")
TOPIC = "v1/devices/me/telemetry"
BASE_TS = 1732300000000

# Runs on the board: opens the link with the credentials in run.json, sends the telemetry payloads at QoS 1 and
# prints what happened as JSON. Secrets reach it through the file, never through argv.
FIRMWARE_SCRIPT = """
import json, time
from tbfleet import Refused, via_mqtt

class Cfg:
    pass

with open("run.json") as f:
    run = json.load(f)
cfg = Cfg()
for k, v in run["cfg"].items():
    setattr(cfg, k, v)
payloads = [(b'{"ts":%d,"values":{"uptime":%d,"free_heap":%d,"temp":21.5}}' % (run["ts"] + 1000 * i, i, 81234 - i))
            for i in range(run["count"])]
out = {}
link = via_mqtt.Link(cfg)
creds = run["creds"]
try:
    # The client alone (Link.open adds ThingsBoard's subscriptions and requests, which mosquitto does not answer).
    if creds["type"] == "MQTT_BASIC":
        link.put_connect(creds["client_id"], creds["username"] or None, creds["password"] or None)
    else:
        link.put_connect(cfg.device_name, None, None)
    link.handshake(creds["type"] != "MQTT_BASIC")
except Refused as e:
    out["refused"] = list(e.args)
except Exception as e:
    out["error"] = [type(e).__name__, str(e)]
else:
    t0 = time.ticks_us()
    for p in payloads:
        link.send(p)
    out["us"] = time.ticks_diff(time.ticks_us(), t0)
    link.close()
print(json.dumps(out))
"""


def payloads(count: int) -> list[bytes]:
    """What FIRMWARE_SCRIPT sends."""
    return [b'{"ts":%d,"values":{"uptime":%d,"free_heap":%d,"temp":21.5}}' % (BASE_TS + 1000 * i, i, 81234 - i)
            for i in range(count)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mosquitto(tmp_path: Path, settings: list[str]) -> Iterator[int]:
    """mosquitto on 127.0.0.1 (a free port) with the given listener settings; yields the port, stops it by PID."""
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    lines = [f"listener {port} 127.0.0.1", *settings, "persistence false", "log_dest stderr",
             "log_type error", "log_type warning"]
    if os.geteuid() == 0:
        lines.append("user root")  # otherwise it drops to user mosquitto and cannot read its files
    conf.write_text("\n".join(lines) + "\n")
    errlog = (tmp_path / "mosquitto.log").open("w")
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=errlog, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 5
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mosquitto did not start: {(tmp_path / 'mosquitto.log').read_text()}") from None
                time.sleep(0.02)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        errlog.close()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[int]:
    """mosquitto with a password file and no anonymous access; yields its port."""
    pwfile = tmp_path / "passwd"
    pwfile.write_text(f"{TOKEN}:{TOKEN_PASSWORD}\n{OBSERVER[0]}:{OBSERVER[1]}\n")
    pwfile.chmod(0o600)
    # -U hashes the file in place: the passwords never appear on a command line.
    subprocess.run(["mosquitto_passwd", "-U", str(pwfile)], check=True, capture_output=True, timeout=10)
    assert TOKEN_PASSWORD not in pwfile.read_text()
    with mosquitto(tmp_path, ["allow_anonymous false", f"password_file {pwfile}"]) as port:
        yield port


class Observer:
    """A paho-mqtt subscriber to the telemetry topic."""

    def __init__(self, port: int, tls: tuple[str, str, str] | None = None):
        self.messages: queue.Queue = queue.Queue()
        subscribed = threading.Event()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="observer",
                                  protocol=paho.MQTTv311)
        if tls:
            self.client.tls_set(ca_certs=tls[0], certfile=tls[1], keyfile=tls[2])
        else:
            self.client.username_pw_set(*OBSERVER)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(TOPIC, qos=1)
        self.client.on_subscribe = lambda c, u, mid, codes, p: subscribed.set()
        self.client.on_message = lambda c, u, msg: self.messages.put(msg.payload)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not subscribed.wait(5):
            raise RuntimeError("observer could not subscribe")

    def take(self, count: int, timeout: float = 5) -> list[bytes]:
        return [self.messages.get(timeout=timeout) for _ in range(count)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def observer(broker: int) -> Iterator[Observer]:
    obs = Observer(broker)
    yield obs
    obs.close()


class CountingRelay:
    """A TCP relay on 127.0.0.1 that counts the bytes each way (what the device puts on the wire)."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.up = 0
        self.down = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.threads: list[threading.Thread] = []
        self.socks: list[socket.socket] = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self.threads.append(t)

    def _accept(self) -> None:
        try:
            client, _ = self.listener.accept()
        except OSError:
            return
        server = socket.create_connection(("127.0.0.1", self.target_port))
        for s in (client, server):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.socks += [client, server]
        for a, b, up in ((client, server, True), (server, client, False)):
            t = threading.Thread(target=self._pump, args=(a, b, up), daemon=True)
            t.start()
            self.threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while data := src.recv(65536):
                if up:
                    self.up += len(data)
                else:
                    self.down += len(data)
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def drain(self) -> None:
        """Wait until both directions reached end of file (the device closed, then the broker)."""
        for t in self.threads:
            t.join(timeout=5)

    def close(self) -> None:
        self.listener.close()
        for s in self.socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        for t in self.threads:
            t.join(timeout=5)


def run_firmware(board: Path, port: int, creds: dict, count: int, **cfg: object) -> dict:
    run = {"cfg": {"host": "127.0.0.1", "port": port, "tls": False, "ca_file": None, "cert_file": None,
                   "key_file": None, "device_name": "esp32-a1b2c3", "qos": 1, "timeout": 5, "keepalive": 60,
                   **cfg},
           "creds": creds, "count": count, "ts": BASE_TS}
    (board / "run.json").write_text(json.dumps(run))
    (board / "send.py").write_text(FIRMWARE_SCRIPT)
    proc = run_micropython(["send.py"], cwd=board, env=micropython_env(), timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert TOKEN not in proc.stdout + proc.stderr and TOKEN_PASSWORD not in proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def token_creds(token: str = TOKEN) -> dict:
    return {"type": "MQTT_BASIC", "client_id": "", "username": token, "password": TOKEN_PASSWORD}


def test_token_user_publishes_qos1_and_subscriber_gets_payloads_exactly(board, broker, observer):
    out = run_firmware(board, broker, token_creds(), 100)
    assert set(out) == {"us"}, out
    assert observer.take(100) == payloads(100)
    log.info("100 QoS 1 messages to mosquitto: %.0f us per message", out["us"] / 100)


def test_wrong_token_is_refused_with_connack_5(board, broker, observer):
    out = run_firmware(board, broker, token_creds("WRONG_TOKEN_000000000"), 3)
    assert out == {"refused": [5, "not authorized"]}
    with pytest.raises(queue.Empty):
        observer.messages.get(timeout=0.2)


def test_wire_bytes_per_qos1_message(board, broker, observer):
    relay = CountingRelay(broker)
    try:
        count = 10
        out = run_firmware(board, relay.port, token_creds(), count)
        assert set(out) == {"us"}, out
        assert observer.take(count) == payloads(count)
        relay.drain()
    finally:
        relay.close()
    connect = 1 + 1 + 10 + 2 + 2 + len(TOKEN) + 2 + len(TOKEN_PASSWORD)
    publishes = sum(1 + 1 + 2 + len(TOPIC) + 2 + len(p) for p in payloads(count))
    assert relay.up == connect + publishes + 2  # + DISCONNECT: nothing else went up
    assert relay.down == 4 + 4 * count  # CONNACK + one PUBACK per message
    log.info("wire bytes per QoS 1 message: %.1f (PUBLISH + PUBACK, %d-byte payload)",
             (publishes + 4 * count) / count, len(payloads(count)[0]))


def _cert(subject: str, key, issuer: str, issuer_key, ca: bool = False, server: bool = False):
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert=None, key=None, der: bool = False) -> str:
    enc = serialization.Encoding.DER if der else serialization.Encoding.PEM
    if cert is not None:
        path.write_bytes(cert.public_bytes(enc))
    else:
        fmt = serialization.PrivateFormat.PKCS8
        path.write_bytes(key.private_bytes(enc, fmt, serialization.NoEncryption()))
    return str(path)


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1/localhost, device and observer client certificates, and a
    second CA that signed nothing of this broker's: PEM files for mosquitto and paho, DER for the board."""
    keys = {n: ec.generate_private_key(ec.SECP256R1()) for n in ("ca", "other", "server", "device", "observer")}
    ca = _cert("test CA", keys["ca"], "test CA", keys["ca"], ca=True)
    other = _cert("other CA", keys["other"], "other CA", keys["other"], ca=True)
    d = tmp_path / "pki"
    d.mkdir()
    return {
        "ca_pem": _write(d / "ca.pem", ca), "ca_der": _write(d / "ca.der", ca, der=True),
        "other_ca_der": _write(d / "other.der", other, der=True),
        "server_pem": _write(d / "server.pem", _cert("localhost", keys["server"], "test CA", keys["ca"],
                                                       server=True)),
        "server_key": _write(d / "server.key", key=keys["server"]),
        "device_der": _write(d / "device.der", _cert("esp32-a1b2c3", keys["device"], "test CA", keys["ca"]),
                             der=True),
        "device_key_der": _write(d / "device.key.der", key=keys["device"], der=True),
        "observer_pem": _write(d / "observer.pem", _cert("observer", keys["observer"], "test CA", keys["ca"])),
        "observer_key": _write(d / "observer.key", key=keys["observer"]),
    }


@pytest.fixture
def tls_broker(tmp_path: Path, pki: dict[str, str]) -> Iterator[int]:
    """mosquitto that takes only TLS clients with a certificate from the test CA (its CN is the user name)."""
    settings = [f"cafile {pki['ca_pem']}", f"certfile {pki['server_pem']}", f"keyfile {pki['server_key']}",
                "require_certificate true", "use_identity_as_username true", "allow_anonymous false"]
    with mosquitto(tmp_path, settings) as port:
        yield port


def test_x509_client_certificate_over_verified_tls(board, tls_broker, pki):
    observer = Observer(tls_broker, tls=(pki["ca_pem"], pki["observer_pem"], pki["observer_key"]))
    try:
        out = run_firmware(board, tls_broker, {"type": "X509_CERTIFICATE"}, 5, tls=True, ca_file=pki["ca_der"],
                           cert_file=pki["device_der"], key_file=pki["device_key_der"])
        assert set(out) == {"us"}, out
        assert observer.take(5) == payloads(5)
    finally:
        observer.close()


def test_tls_server_from_another_ca_is_not_trusted(board, tls_broker, pki):
    # The handshake failure is a BadAnswer (the server presented something we cannot accept), naming the cause.
    out = run_firmware(board, tls_broker, {"type": "X509_CERTIFICATE"}, 1, tls=True, ca_file=pki["other_ca_der"],
                       cert_file=pki["device_der"], key_file=pki["device_key_der"])
    assert set(out) == {"error"}, out
    assert out["error"][0] == "BadAnswer" and "certificate" in out["error"][1], out
