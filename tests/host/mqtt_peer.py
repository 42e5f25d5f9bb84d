"""A scripted MQTT 3.1.1 peer for end-to-end tests: behaves like ThingsBoard's MQTT transport where a test needs it
and records every packet it receives.

Usage::

    from mqtt_peer import MqttPeer, ACCESS_TOKEN_ANSWER

    with MqttPeer(provision_answer=b'{"credentialsValue":"tok","credentialsType":"ACCESS_TOKEN",'
                                   b'"status":"SUCCESS"}', tokens={"tok"}) as peer:
        ...  # point the firmware at peer.host, peer.port
        peer.wait_for(lambda p: p.name == "PUBLISH" and p.topic == TELEMETRY_TOPIC, timeout=5)
        assert peer.telemetry == [b'{"ts":...}']

The server listens on 127.0.0.1 with a free port (``peer.port``); each accepted connection is served by its own
thread. ``stop()`` (or leaving the ``with`` block) closes the listener and every connection and joins the threads.

Behaviour (the script), set by constructor keywords; each is also an attribute that a test may change while the
peer runs:

- ``provision_answer: bytes | None`` -- in a provisioning session (CONNECT with user name or client id
  ``provision``, always CONNACK 0), a PUBLISH to ``/provision/request`` is acknowledged (QoS 1) and then this JSON
  is published to ``/provision/response`` at QoS 1. ``None``: the request is acknowledged and never answered; the
  connection stays open (a server whose core never replies).
- ``provision_prelude: bytes`` -- raw bytes sent after that PUBACK and before the answer: a stray PUBLISH, a
  PINGRESP (see ``publish_packet``), or junk.
- ``suback_in_provision: bool`` (default False) -- False is the pre-3.9 server: a SUBSCRIBE in a provisioning
  session is recorded and never answered. True: SUBACK granting ``/provision/response`` only.
- ``tokens: set[str]`` -- user names accepted as access tokens (password ignored), CONNACK 0.
- ``basic: set[tuple[str, str | None, str | None]]`` -- accepted MQTT_BASIC ``(client_id, username, password)``
  triples, ``None`` meaning the field is absent from CONNECT.
- ``connack_code: int | None`` -- when set, the CONNACK code for every non-provisioning CONNECT (e.g. 3).
  Otherwise unknown credentials get ThingsBoard's 3.1.1 refusal: 2 without a user name, else 5. After a refusal
  the peer closes the connection.
- ``reject_telemetry: Callable[[bytes], bool] | None`` -- called with each telemetry payload; True closes the
  connection instead of sending the PUBACK (what ThingsBoard does with an unparsable payload or a rate limit).
- ``ack_telemetry: bool`` (default True) -- False: telemetry is recorded but never acknowledged.

In a device session, telemetry (``v1/devices/me/telemetry``) is recorded in ``telemetry`` and acknowledged at
QoS 1; PUBLISH to any other topic is acknowledged and recorded only in ``packets``; SUBSCRIBE gets a SUBACK with
QoS min(requested, 1); PINGREQ gets PINGRESP; DISCONNECT ends the connection. A PUBLISH to another topic in a
provisioning session is acknowledged and the connection closed (v3.7+).

Records (read them after ``wait_for`` or ``stop``; appends happen under ``lock``):

- ``packets: list[Packet]`` -- every packet received from clients, in arrival order, decoded (see ``Packet``).
- ``telemetry: list[bytes]`` -- telemetry payloads in arrival order (also the rejected ones).
- ``connections: int`` -- connections accepted so far; ``errors: list[str]`` -- malformed input seen.

``publish(topic, payload, qos=1)`` pushes a PUBLISH to every open device session (shared attributes, RPC);
the device's PUBACK shows up in ``packets``.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

log = logging.getLogger(__name__)

TELEMETRY_TOPIC = "v1/devices/me/telemetry"
PROVISION = "provision"
REQUEST_TOPIC = "/provision/request"
RESPONSE_TOPIC = "/provision/response"
ACCESS_TOKEN_ANSWER = b'{"credentialsValue":"%s","credentialsType":"ACCESS_TOKEN","status":"SUCCESS"}'
NAMES = {1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 5: "PUBREC", 6: "PUBREL", 7: "PUBCOMP",
         8: "SUBSCRIBE", 9: "SUBACK", 10: "UNSUBSCRIBE", 11: "UNSUBACK", 12: "PINGREQ", 13: "PINGRESP",
         14: "DISCONNECT"}
PINGRESP = b"\xd0\x00"


@dataclass
class Packet:
    """One packet a client sent, with the fields of its type decoded (others stay None)."""

    conn: int
    name: str
    flags: int
    raw: bytes
    client_id: str | None = None
    username: str | None = None
    password: str | None = None
    keepalive: int | None = None
    clean_session: bool | None = None
    topic: str | None = None
    payload: bytes | None = None
    qos: int | None = None
    retain: bool | None = None
    pid: int | None = None
    filters: list[tuple[str, int]] = field(default_factory=list)


def encode_length(n: int) -> bytes:
    """MQTT variable-length integer."""
    if not 0 <= n <= 268435455:
        raise ValueError(f"remaining length {n} out of range")
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _mqtt_str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return len(b).to_bytes(2, "big") + b


def publish_packet(topic: str, payload: bytes, qos: int = 0, pid: int = 1) -> bytes:
    """A PUBLISH packet as a server sends it (for ``provision_prelude`` and tests)."""
    body = _mqtt_str(topic) + (pid.to_bytes(2, "big") if qos else b"") + payload
    return bytes([0x30 | qos << 1]) + encode_length(len(body)) + body


class _Closed(Exception):
    pass


class _Malformed(Exception):
    pass


class _Conn:
    """One client connection: reads packets and answers them by the peer's script."""

    def __init__(self, peer: MqttPeer, sock: socket.socket, number: int):
        self.peer = peer
        self.sock = sock
        self.number = number
        self.provisioning = False
        self.device = False
        self.pid = 0
        self.send_lock = threading.Lock()

    def send(self, data: bytes) -> None:
        with self.send_lock:
            self.sock.sendall(data)

    def _recv_exact(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise _Closed()
            data += chunk
        return bytes(data)

    def read_packet(self) -> tuple[int, bytes, bytes]:
        head = self._recv_exact(1)
        raw = bytearray(head)
        n, shift = 0, 0
        while True:
            b = self._recv_exact(1)[0]
            raw.append(b)
            n |= (b & 0x7F) << shift
            if not b & 0x80:
                break
            shift += 7
            if shift > 21:
                raise _Malformed("remaining length longer than 4 bytes")
        body = self._recv_exact(n)
        return head[0], body, bytes(raw) + body

    def serve(self) -> None:
        try:
            while True:
                h, body, raw = self.read_packet()
                pkt = self.decode(h, body, raw)
                with self.peer.lock:
                    self.peer.packets.append(pkt)
                    self.peer.changed.notify_all()
                if not self.answer(pkt):
                    break
        except _Malformed as e:
            with self.peer.lock:
                self.peer.errors.append(f"connection {self.number}: {e}")
            log.warning("mqtt peer: connection %d sent a malformed packet: %s", self.number, e)
        except (_Closed, OSError):
            pass
        finally:
            self.peer._forget(self)
            try:
                self.sock.close()
            except OSError:
                pass

    def decode(self, h: int, body: bytes, raw: bytes) -> Packet:
        kind = h >> 4
        if kind not in NAMES:
            raise _Malformed(f"packet type {kind}")
        pkt = Packet(conn=self.number, name=NAMES[kind], flags=h & 0x0F, raw=raw)
        try:
            if kind == 1:
                self._decode_connect(pkt, body)
            elif kind == 3:
                qos = (h >> 1) & 3
                tl = int.from_bytes(body[:2], "big")
                pkt.topic = body[2:2 + tl].decode()
                pos = 2 + tl
                pkt.qos, pkt.retain = qos, bool(h & 1)
                if qos:
                    pkt.pid = int.from_bytes(body[pos:pos + 2], "big")
                    pos += 2
                if pos > len(body):
                    raise _Malformed("PUBLISH shorter than its topic")
                pkt.payload = body[pos:]
            elif kind in (4, 11):
                pkt.pid = int.from_bytes(body[:2], "big")
            elif kind == 8:
                pkt.pid = int.from_bytes(body[:2], "big")
                pos = 2
                while pos < len(body):
                    tl = int.from_bytes(body[pos:pos + 2], "big")
                    pkt.filters.append((body[pos + 2:pos + 2 + tl].decode(), body[pos + 2 + tl]))
                    pos += 3 + tl
        except (IndexError, UnicodeDecodeError) as e:
            raise _Malformed(f"{pkt.name}: {e}") from e
        return pkt

    @staticmethod
    def _decode_connect(pkt: Packet, body: bytes) -> None:
        pos = 0

        def field_() -> bytes:
            nonlocal pos
            n = int.from_bytes(body[pos:pos + 2], "big")
            if pos + 2 + n > len(body):
                raise _Malformed("CONNECT field runs past the packet")
            value = body[pos + 2:pos + 2 + n]
            pos += 2 + n
            return value

        if field_() != b"MQTT" or body[pos] != 4:
            raise _Malformed("not an MQTT 3.1.1 CONNECT")
        flags = body[pos + 1]
        pkt.keepalive = int.from_bytes(body[pos + 2:pos + 4], "big")
        pkt.clean_session = bool(flags & 0x02)
        pos += 4
        pkt.client_id = field_().decode()
        if flags & 0x04:
            field_()
            field_()
        if flags & 0x80:
            pkt.username = field_().decode()
        if flags & 0x40:
            pkt.password = field_().decode()
        if pos != len(body):
            raise _Malformed("CONNECT has trailing bytes")

    def connack_code(self, pkt: Packet) -> int:
        peer = self.peer
        if peer.connack_code is not None:
            return peer.connack_code
        if pkt.username is not None and pkt.username in peer.tokens:
            return 0
        if (pkt.client_id, pkt.username, pkt.password) in peer.basic:
            return 0
        return 2 if pkt.username is None and pkt.client_id else 5

    def next_pid(self) -> int:
        self.pid = self.pid % 65535 + 1
        return self.pid

    def answer(self, pkt: Packet) -> bool:
        """Plays the script for one packet; False ends the connection."""
        peer = self.peer
        if pkt.name == "CONNECT":
            if PROVISION in (pkt.username, pkt.client_id):
                self.provisioning = True
                self.send(b"\x20\x02\x00\x00")
                return True
            code = self.connack_code(pkt)
            self.send(b"\x20\x02\x00" + bytes([code]))
            self.device = code == 0
            return self.device
        if not (self.provisioning or self.device):
            raise _Malformed(f"{pkt.name} before CONNECT")
        if pkt.name == "PINGREQ":
            self.send(PINGRESP)
        elif pkt.name == "DISCONNECT":
            return False
        elif pkt.name == "SUBSCRIBE":
            if not self.provisioning:
                self._suback(pkt, [min(q, 1) for _, q in pkt.filters])
            elif peer.suback_in_provision:
                self._suback(pkt, [min(q, 1) if f == RESPONSE_TOPIC else 0x80 for f, q in pkt.filters])
        elif pkt.name == "PUBLISH":
            return self._on_publish(pkt)
        return True

    def _suback(self, pkt: Packet, codes: list[int]) -> None:
        self.send(b"\x90" + encode_length(2 + len(codes)) + pkt.pid.to_bytes(2, "big") + bytes(codes))

    def _puback(self, pkt: Packet) -> None:
        if pkt.qos:
            self.send(b"\x40\x02" + pkt.pid.to_bytes(2, "big"))

    def _on_publish(self, pkt: Packet) -> bool:
        peer = self.peer
        if self.provisioning:
            self._puback(pkt)
            if pkt.topic != REQUEST_TOPIC:
                return False
            answer = peer.provision_answer
            self.send(peer.provision_prelude + (b"" if answer is None else
                                                publish_packet(RESPONSE_TOPIC, answer, 1, self.next_pid())))
            return True
        if pkt.topic == TELEMETRY_TOPIC:
            with peer.lock:
                peer.telemetry.append(pkt.payload)
                peer.changed.notify_all()
            if peer.reject_telemetry is not None and peer.reject_telemetry(pkt.payload):
                return False
            if not peer.ack_telemetry:
                return True
        self._puback(pkt)
        return True


class MqttPeer:
    """A scripted MQTT server on 127.0.0.1 (see the module docstring)."""

    def __init__(self, *, provision_answer: bytes | None = None, provision_prelude: bytes = b"",
                 suback_in_provision: bool = False, tokens: Iterable[str] = (),
                 basic: Iterable[tuple[str, str | None, str | None]] = (), connack_code: int | None = None,
                 reject_telemetry: Callable[[bytes], bool] | None = None, ack_telemetry: bool = True):
        self.provision_answer = provision_answer
        self.provision_prelude = provision_prelude
        self.suback_in_provision = suback_in_provision
        self.tokens = set(tokens)
        self.basic = set(basic)
        self.connack_code = connack_code
        self.reject_telemetry = reject_telemetry
        self.ack_telemetry = ack_telemetry
        self.packets: list[Packet] = []
        self.telemetry: list[bytes] = []
        self.errors: list[str] = []
        self.connections = 0
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.host = "127.0.0.1"
        self.port = 0
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._open: list[_Conn] = []
        self._stopping = threading.Event()

    def start(self) -> MqttPeer:
        """Listen on a free port of 127.0.0.1 and serve in background threads."""
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind((self.host, 0))
        self._listener.listen(16)
        self._listener.settimeout(0.05)
        self.port = self._listener.getsockname()[1]
        t = threading.Thread(target=self._accept_loop, name="mqtt-peer-accept", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def stop(self) -> None:
        """Close the listener and every connection; join all threads."""
        self._stopping.set()
        with self.lock:
            conns = list(self._open)
        for c in conns:
            try:
                c.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in list(self._threads):
            t.join(timeout=5)
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def __enter__(self) -> MqttPeer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self.connections += 1
                conn = _Conn(self, sock, self.connections)
                self._open.append(conn)
            t = threading.Thread(target=conn.serve, name=f"mqtt-peer-{conn.number}", daemon=True)
            self._threads.append(t)
            t.start()

    def _forget(self, conn: _Conn) -> None:
        with self.lock:
            if conn in self._open:
                self._open.remove(conn)
            self.changed.notify_all()

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> int:
        """Send a PUBLISH to every open device session; returns how many sessions got it."""
        with self.lock:
            targets = [c for c in self._open if c.device]
        for c in targets:
            c.send(publish_packet(topic, payload, qos, c.next_pid()))
        return len(targets)

    def wait_for(self, predicate: Callable[[Packet], bool], timeout: float = 5.0) -> Packet:
        """The first recorded packet matching `predicate`, waiting up to `timeout` s for it (TimeoutError)."""
        end = time.monotonic() + timeout
        with self.changed:
            while True:
                for p in self.packets:
                    if predicate(p):
                        return p
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no matching packet within {timeout} s; got "
                                       f"{[p.name for p in self.packets]}")
                self.changed.wait(left)

    def open_sessions(self) -> int:
        """How many client connections are open now."""
        with self.lock:
            return len(self._open)
