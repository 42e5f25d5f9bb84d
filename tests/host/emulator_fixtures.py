"""Ways for tests to run the ThingsBoard emulator.

- `emulator_process(config, *extra_args)`: a context manager that starts the real CLI,
  `python -m host_tools emulator --config F --mqtt-port 0 --http-port 0 --coap-port 0 --db :memory: ...`,
  waits for its ready line and yields a `host_tools.emulator.process.EmulatorProcess` (ports, the event lines
  so far, `wait_event`, the inspection API); it stops the process by PID (SIGTERM, then SIGKILL) on exit. Use it for
  end-to-end tests of anything that talks to the emulator:

      with emulator_process(DEMO_CONFIG, "--server-version", "3.8") as emu:
          client.connect("127.0.0.1", emu.ports["mqtt"])

- `mqtt_emulator(config, ...)`: a context manager that runs only the state and the MQTT server in this process,
  on a background event loop thread (fast; used by the MQTT tests). Yields an `InProcessMqtt` whose `call(fn)`
  runs `fn(state)` on the loop thread (SQLite objects belong to that thread).
- `Paho`: a paho-mqtt 2.x client (MQTT 3.1.1 or 5) on its own thread, with queues of what arrives.
- `RawMqtt`: a byte-level MQTT client with deadlines on every read, for exact-bytes and garbage tests.
- `CONFIG`: a config with one profile per provisioning strategy and a pre-provisioned device per credentials type.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import queue
import socket
import struct
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from host_tools.emulator.process import EmulatorProcess

ALLOW_KEY, ALLOW_SECRET = "allow-key", "allow-secret"
CHECK_KEY, CHECK_SECRET = "check-key", "check-secret"
DISABLED_KEY, DISABLED_SECRET = "disabled-key", "disabled-secret"

CONFIG: dict = {
    "profiles": [
        {"name": "allow", "provisionDeviceKey": ALLOW_KEY, "provisionDeviceSecret": ALLOW_SECRET,
         "provisionType": "ALLOW_CREATE_NEW_DEVICES"},
        {"name": "check", "provisionDeviceKey": CHECK_KEY, "provisionDeviceSecret": CHECK_SECRET,
         "provisionType": "CHECK_PRE_PROVISIONED_DEVICES"},
        {"name": "off", "provisionDeviceKey": DISABLED_KEY, "provisionDeviceSecret": DISABLED_SECRET,
         "provisionType": "DISABLED"},
    ],
    "devices": [
        {"name": "pre-token", "profile": "check", "credentialsType": "ACCESS_TOKEN",
         "credentialsValue": "preTokenValue0000001"},
        {"name": "pre-basic", "profile": "check", "credentialsType": "MQTT_BASIC",
         "credentialsValue": {"clientId": "pre-client", "userName": "pre-user", "password": "pre-pass"}},
        {"name": "pre-userpass", "profile": "check", "credentialsType": "MQTT_BASIC",
         "credentialsValue": {"clientId": "", "userName": "up-user", "password": "up-pass"}},
        {"name": "pre-clientonly", "profile": "check", "credentialsType": "MQTT_BASIC",
         "credentialsValue": {"clientId": "only-client", "userName": "", "password": ""}},
        {"name": "other-profile", "profile": "allow", "credentialsType": "ACCESS_TOKEN",
         "credentialsValue": "otherProfileToken001"},
    ],
}

READY_TIMEOUT = 15.0



def make_cert_pem(name: str) -> str:
    """A throwaway self-signed certificate, PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def one_line(pem: str) -> str:
    """The certificate's base64 body on one line, as ThingsBoard stores X.509 credentials."""
    return "".join(line for line in pem.splitlines() if not line.startswith("-----"))


def strategy_config(secret: str, cert_pem: str, *more_devices: dict) -> dict:
    """One profile per provisioning strategy, all with `secret`, and a pre-provisioned device per credentials type
    (token preTokenValue0000001, MQTT_BASIC pre-client/pre-user/pre-pass, X.509 `cert_pem`)."""
    return {
        "profiles": [
            {"name": "allow", "provisionDeviceKey": "allow-key", "provisionDeviceSecret": secret,
             "provisionType": "ALLOW_CREATE_NEW_DEVICES"},
            {"name": "check", "provisionDeviceKey": "check-key", "provisionDeviceSecret": secret,
             "provisionType": "CHECK_PRE_PROVISIONED_DEVICES"},
            {"name": "off", "provisionDeviceKey": "off-key", "provisionDeviceSecret": secret,
             "provisionType": "DISABLED"},
        ],
        "devices": [
            {"name": "pre-token", "profile": "check", "credentialsType": "ACCESS_TOKEN",
             "credentialsValue": "preTokenValue0000001"},
            {"name": "pre-basic", "profile": "check", "credentialsType": "MQTT_BASIC",
             "credentialsValue": {"clientId": "pre-client", "userName": "pre-user", "password": "pre-pass"}},
            {"name": "pre-x509", "profile": "check", "credentialsType": "X509_CERTIFICATE",
             "credentialsValue": cert_pem},
            *more_devices,
        ],
    }

@contextlib.contextmanager
def emulator_process(config: dict | Path, *extra_args: str, timeout: float = READY_TIMEOUT
                     ) -> Iterator[EmulatorProcess]:
    """Start `python -m host_tools emulator` on free ports; yield it once ready; stop it by PID."""
    emu = EmulatorProcess(config, extra_args=extra_args).start(timeout)
    try:
        yield emu
    finally:
        emu.stop()


class InProcessMqtt:
    """The state and MQTT server on a background event loop (see `mqtt_emulator`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, state: Any, server: Any, port: int,
                 events: list[str]) -> None:
        self.loop, self.state, self.server, self.port, self.events = loop, state, server, port, events
        self.tls_port: int | None = None

    def call(self, fn: Callable[[Any], Any]) -> Any:
        """Run `fn(state)` on the loop thread and return its result."""
        async def job() -> Any:
            return fn(self.state)
        return asyncio.run_coroutine_threadsafe(job(), self.loop).result(10)


@contextlib.contextmanager
def mqtt_emulator(config: dict = CONFIG, server_version: tuple[int, ...] = (4, 3), tls: Any = None,
                  **server_options: Any) -> Iterator[InProcessMqtt]:
    """Run an EmulatorState and an MqttServer on a loop thread; `tls`: a certs.ServerFiles to add a TLS port."""
    from host_tools.emulator import certs
    from host_tools.emulator.mqtt import MqttServer
    from host_tools.emulator.state import EmulatorState

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    events: list[str] = []

    async def setup() -> InProcessMqtt:
        state = EmulatorState(config, server_version=server_version, events=events.append)
        server = MqttServer(state, **server_options)
        emu = InProcessMqtt(loop, state, server, await server.listen("127.0.0.1", 0), events)
        if tls is not None:
            emu.tls_port = await server.listen("127.0.0.1", 0, certs.server_context(tls))
        return emu

    emu = asyncio.run_coroutine_threadsafe(setup(), loop).result(10)
    try:
        yield emu
    finally:
        asyncio.run_coroutine_threadsafe(emu.server.stop(), loop).result(10)
        loop.call_soon_threadsafe(emu.state.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def mqtt_string(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("!H", len(data)) + data


def mqtt_packet(first: int, body: bytes = b"") -> bytes:
    """An MQTT packet with the remaining length encoded."""
    n, length = len(body), bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        length.append(byte | (0x80 if n else 0))
        if not n:
            break
    return bytes([first]) + bytes(length) + body


def connect_packet(client_id: str = "raw", username: str | None = None, password: str | None = None,
                   clean: bool = True, level: int = 4, protocol: str = "MQTT") -> bytes:
    """A CONNECT packet (keep-alive 60; level 5: with an empty property list)."""
    flags = (0x02 if clean else 0) | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    body = mqtt_string(protocol) + bytes([level, flags]) + struct.pack("!H", 60) + (b"\x00" if level == 5 else b"") \
        + mqtt_string(client_id)
    if username is not None:
        body += mqtt_string(username)
    if password is not None:
        body += mqtt_string(password)
    return mqtt_packet(0x10, body)


def publish_packet(topic: str, payload: bytes, qos: int = 1, packet_id: int = 1) -> bytes:
    """A PUBLISH packet."""
    body = mqtt_string(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return mqtt_packet(0x30 | (qos << 1), body)


def subscribe_packet(packet_id: int, *filters: tuple[str, int]) -> bytes:
    """A SUBSCRIBE packet."""
    return mqtt_packet(0x82, struct.pack("!H", packet_id) + b"".join(mqtt_string(t) + bytes([q])
                                                                     for t, q in filters))


class RawMqtt:
    """A byte-level MQTT connection with a deadline on every read."""

    def __init__(self, port: int, timeout: float = 3.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.timeout = timeout

    def __enter__(self) -> "RawMqtt":
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed by the server")
            data += chunk
        return data

    def read_packet(self) -> tuple[int, bytes]:
        """(first byte, body) of the next packet; ConnectionError if the server closed."""
        first = self._exact(1)[0]
        length, shift = 0, 0
        while True:
            byte = self._exact(1)[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        return first, self._exact(length)

    def read_publish(self) -> tuple[str, bytes, int, int]:
        """(topic, payload, qos, packet id) of the next packet, which must be a PUBLISH."""
        first, body = self.read_packet()
        assert first >> 4 == 3, f"expected PUBLISH, got {first:#x}"
        qos = (first >> 1) & 3
        n = struct.unpack("!H", body[:2])[0]
        topic, rest = body[2:2 + n].decode(), body[2 + n:]
        packet_id = 0
        if qos:
            packet_id, rest = struct.unpack("!H", rest[:2])[0], rest[2:]
        return topic, rest, qos, packet_id

    def closed_by_server(self, within: float = 3.0) -> bool:
        """True when the server closes the connection (EOF or reset) within `within` seconds."""
        self.sock.settimeout(within)
        try:
            while True:
                if not self.sock.recv(4096):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    def silent(self, within: float = 0.3) -> bool:
        """True when nothing arrives (and the connection stays open) for `within` seconds."""
        self.sock.settimeout(within)
        try:
            data = self.sock.recv(1)
        except socket.timeout:
            return True
        finally:
            self.sock.settimeout(self.timeout)
        del data  # a byte or EOF: either way the server was not silent
        return False


class Paho:
    """A paho-mqtt 2.x client (MQTT 3.1.1, or `protocol=mqtt.MQTTv5`) run on its own thread, with queues for what
    arrives: CONNACK reason, messages, SUBACK and UNSUBACK reason lists, PUBACK reasons by message id, and the
    reason of a DISCONNECT the server sent (`server_disconnect`, MQTT 5)."""

    def __init__(self, port: int, client_id: str = "", username: str | None = None, password: str | None = None,
                 tls: dict | None = None, protocol: int = mqtt.MQTTv311, properties: Any = None) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
        self.connack: queue.Queue = queue.Queue()
        self.messages: queue.Queue = queue.Queue()
        self.subacks: queue.Queue = queue.Queue()
        self.unsubacks: queue.Queue = queue.Queue()
        self.pubacks: dict[int, int] = {}
        self.disconnected = threading.Event()
        self.server_disconnect: int | None = None
        self.client.on_connect = lambda c, u, flags, rc, props: self.connack.put(rc)
        self.client.on_message = lambda c, u, msg: self.messages.put(msg)
        self.client.on_subscribe = lambda c, u, mid, rcs, props: self.subacks.put([int(r.value) for r in rcs])
        self.client.on_unsubscribe = lambda c, u, mid, rcs, props: self.unsubacks.put([int(r.value) for r in rcs])
        self.client.on_publish = lambda c, u, mid, rc, props: self.pubacks.__setitem__(mid, int(rc.value))
        self.client.on_disconnect = self._on_disconnect
        if username is not None:
            self.client.username_pw_set(username, password)
        if tls is not None:
            self.client.tls_set(**tls)
        self.client.connect("127.0.0.1", port, keepalive=60, properties=properties)
        self.client.loop_start()
        self.rc = self.connack.get(timeout=5)

    def _on_disconnect(self, _client: Any, _userdata: Any, flags: Any, rc: Any, _props: Any) -> None:
        if flags.is_disconnect_packet_from_server:
            self.server_disconnect = int(rc.value)
        self.disconnected.set()

    def __enter__(self) -> "Paho":
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, properties: Any = None) -> int | None:
        """Publish and wait until it is sent (QoS 1: acknowledged); the PUBACK reason code (None for QoS 0)."""
        info = self.client.publish(topic, payload, qos=qos, properties=properties)
        info.wait_for_publish(timeout=5)
        assert info.is_published()
        return self.pubacks.get(info.mid) if qos else None

    def subscribe(self, topic: str, qos: int = 1) -> list[int]:
        self.client.subscribe(topic, qos)
        return self.subacks.get(timeout=5)

    def unsubscribe(self, *topics: str) -> list[int]:
        self.client.unsubscribe(list(topics))
        return self.unsubacks.get(timeout=5)

    def message(self, timeout: float = 5.0) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=timeout)
