"""MQTT side of the emulator: ThingsBoard's MQTT transport (reference §3 and §6) on asyncio.

Speaks MQTT 3.1, 3.1.1 and, emulating ThingsBoard 3.5 or later, MQTT 5 as ThingsBoard serves it (reference §3.5,
§9; docs/thingsboard-notes.md "MQTT 5"): reason codes in CONNACK, PUBACK (0x90 unknown topic, 0x99 bad payload),
SUBACK (0x8F) and UNSUBACK; from 3.7 on a DISCONNECT with a reason before the server closes an MQTT 5 session;
properties are parsed and ignored, an unknown property identifier is a malformed packet. Before 3.5 an MQTT 5
CONNECT is refused with CONNACK 0x84 (unsupported protocol version).

Robustness: a packet whose remaining length is over 65536 bytes or malformed closes that connection only; every
read waits at most `inactivity_timeout` (ThingsBoard's 600 s session inactivity timeout); a client that stops
reading is dropped once its write buffer passes `max_write_buffer` or a drain takes longer than `write_timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import struct
from typing import Iterable

from OpenSSL import SSL

from host_tools.emulator import certs, ota, tls
from host_tools.emulator.state import CONNACK_NOT_AUTHORIZED, Device, EmulatorState, PayloadError, RateLimited, \
    RequestError, json_bytes, parse_keys

log = logging.getLogger(__name__)

MAX_PACKET = 65536
"""`transport.mqtt.netty.max_payload_size`: a longer packet is a decode failure and closes the connection."""
MAX_INFLIGHT = 100
"""`transport.mqtt.msg_queue_size_per_device_limit`, which getSessionLimits reports as maxInflightMessages."""
SESSION_LIMITS = "getSessionLimits"
"""The client-side RPC the transport answers itself (MqttTransportHandler.onGetSessionLimitsRpc; v1 topic only)."""
SESSION_LIMITS_PREFIX = "v1/devices/me/rpc/request/"

PROVISION = "provision"
PROVISION_REQUEST = "/provision/request"
PROVISION_RESPONSE = "/provision/response"

# MqttTopics: v1, the v2 short forms, and their JSON forms (".../j", for JSON whatever the profile's payload type;
# the protobuf forms ".../p" are not emulated). A JSON prefix comes before its short form, which it starts with.
TELEMETRY_TOPICS = ("v1/devices/me/telemetry", "v2/t", "v2/t/j")
ATTRIBUTES_TOPICS = ("v1/devices/me/attributes", "v2/a", "v2/a/j")
# Attribute request prefix -> prefix of its response: the answer comes in the style (v1, v2 or v2 JSON) asked in.
ATTRIBUTE_REQUEST_PREFIXES = {"v1/devices/me/attributes/request/": "v1/devices/me/attributes/response/",
                              "v2/a/req/j/": "v2/a/res/j/", "v2/a/req/": "v2/a/res/"}
RPC_RESPONSE_PREFIXES = ("v1/devices/me/rpc/response/", "v2/r/res/j/", "v2/r/res/")
# MqttTopics.DEVICE_FIRMWARE/SOFTWARE_REQUEST_TOPIC_PATTERN, searched (Matcher.find) rather than matched whole.
OTA_REQUEST = re.compile(r"v2/(fw|sw)/request/(\d+)/chunk/(\d+)")
OTA_TYPES = {"fw": ota.FIRMWARE, "sw": ota.SOFTWARE}
OTA_ERROR_TOPIC = "v2/fw/error"
"""Where OTA errors go, for software too (MqttTransportHandler.sendOtaPackageError)."""
# Topics ThingsBoard processes that the emulator acknowledges without acting on (client-side RPC but
# getSessionLimits): PUBACK success, where an unknown topic gets 0x90 on MQTT 5. A claim is checked, then acknowledged.
NOT_EMULATED_PREFIXES = ("v1/devices/me/rpc/request/", "v2/r/req/")
CLAIM_TOPIC = "v1/devices/me/claim"

GATEWAY_PREFIX = "v1/gateway"
"""MqttTopics.BASE_GATEWAY_API_TOPIC: the gateway API, not emulated (no device is a gateway)."""

# SUBSCRIBE filters ThingsBoard grants, matched literally (§3.6). A filter that turns pushes on maps to (what is
# pushed, the topic it goes to): ThingsBoard pushes in the style (v1 or v2 short) of the latest such subscription.
SUBSCRIPTIONS: dict[str, tuple[str, str] | None] = {
    "v1/devices/me/attributes": ("attributes", "v1/devices/me/attributes"), "v2/a": ("attributes", "v2/a"),
    "v2/a/j": ("attributes", "v2/a/j"),
    "v1/devices/me/rpc/request/+": ("rpc", "v1/devices/me/rpc/request/{}"), "v2/r/req/+": ("rpc", "v2/r/req/{}"),
    "v2/r/req/j/+": ("rpc", "v2/r/req/j/{}"),
    "v1/devices/me/attributes/response/+": None, "v2/a/res/+": None, "v2/a/res/j/+": None,
    "v1/devices/me/rpc/response/+": None, "v2/r/res/+": None, "v2/r/res/j/+": None,
    "v2/fw/response/+/chunk/+": None, "v2/fw/error": None,
    "v2/sw/response/+/chunk/+": None, "v2/sw/error": None,
    # Granted to any device session, though only a gateway's gets anything on them.
    "v1/gateway/attributes": None, "v1/gateway/rpc": None, "v1/gateway/attributes/response": None,
}

_CONNECT, _CONNACK, _PUBLISH, _PUBACK = 1, 2, 3, 4
_PUBREC, _PUBREL, _PUBCOMP, _SUBSCRIBE = 5, 6, 7, 8
_SUBACK, _UNSUBSCRIBE, _UNSUBACK, _PINGREQ = 9, 10, 11, 12
_PINGRESP, _DISCONNECT = 13, 14
_AUTH = 15
_SUBSCRIBE_FAILURE = 0x80

# MQTT 5 reason codes the server sends (netty's MqttReasonCodes, as MqttTransportHandler picks them).
RC_SUCCESS = 0x00
RC_NO_SUBSCRIPTION_EXISTED = 0x11
RC_MALFORMED_PACKET = 0x81
RC_IMPLEMENTATION_SPECIFIC_ERROR = 0x83
RC_UNSUPPORTED_PROTOCOL_VERSION = 0x84
RC_SERVER_UNAVAILABLE = 0x88
RC_SERVER_BUSY = 0x89
RC_SERVER_SHUTTING_DOWN = 0x8B
RC_TOPIC_FILTER_INVALID = 0x8F
RC_TOPIC_NAME_INVALID = 0x90
RC_ADMINISTRATIVE_ACTION = 0x98
RC_PAYLOAD_FORMAT_INVALID = 0x99
RC_CONNECTION_RATE_EXCEEDED = 0x9F
RC_MAXIMUM_CONNECT_TIME = 0xA0

# ReturnCodeResolver: an MQTT 5 CONNACK reason as a 3.1/3.1.1 return code.
CONNACK_V3 = {0x00: 0, 0x85: 2, 0x86: 5, 0x87: 5, 0x88: 3, 0x9F: 3}

# MQTT 5 property identifier -> how its value is encoded (MQTT 5.0 §2.2.2.2); netty's decoder accepts each of them
# in any packet and fails the packet on any other identifier.
_PROPERTY_TYPES = {
    0x01: "byte", 0x17: "byte", 0x19: "byte", 0x24: "byte", 0x25: "byte", 0x28: "byte", 0x29: "byte", 0x2A: "byte",
    0x13: "int16", 0x21: "int16", 0x22: "int16", 0x23: "int16",
    0x02: "int32", 0x11: "int32", 0x18: "int32", 0x27: "int32",
    0x0B: "varint",
    0x03: "string", 0x08: "string", 0x12: "string", 0x15: "string", 0x1A: "string", 0x1C: "string", 0x1F: "string",
    0x09: "binary", 0x16: "binary",
    0x26: "pair",
}
_PROPERTY_SIZES = {"byte": 1, "int16": 2, "int32": 4}


class Malformed(Exception):
    """A packet the server cannot decode: the connection is closed."""


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def packet(first: int, body: bytes = b"") -> bytes:
    """One MQTT packet: fixed header byte, remaining length, body."""
    return bytes([first]) + _varint(len(body)) + body


def _mqtt_str(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("!H", len(data)) + data


def publish_packet(topic: str, payload: bytes, qos: int, packet_id: int = 0, v5: bool = False) -> bytes:
    """A PUBLISH packet (no DUP, no RETAIN); `v5` adds the (empty) property list MQTT 5 has."""
    body = _mqtt_str(topic) + (struct.pack("!H", packet_id) if qos else b"") + (b"\x00" if v5 else b"") + payload
    return packet((_PUBLISH << 4) | (qos << 1), body)


class _Reader:
    """Sequential decoding of one packet body; running past its end is Malformed."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise Malformed("packet shorter than its fields")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack("!H", self.take(2))[0]

    def binary(self) -> bytes:
        return self.take(self.u16())

    def text(self) -> str:
        try:
            return self.binary().decode("utf-8")
        except UnicodeDecodeError:
            raise Malformed("string is not UTF-8") from None

    def rest(self) -> bytes:
        chunk = self.data[self.pos:]
        self.pos = len(self.data)
        return chunk

    def varint(self) -> int:
        value = 0
        for shift in range(0, 28, 7):
            byte = self.u8()
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
        raise Malformed("variable byte integer longer than 4 bytes")

    def properties(self) -> None:
        """Skip an MQTT 5 property list: ThingsBoard acts on none of a device's properties.

        As netty's decoder, properties are read while the list's declared length is not used up, so a last property
        running past it is read whole; an unknown identifier or a property running past the packet is Malformed.
        """
        length = self.varint()
        end = self.pos + length
        if end > len(self.data):
            raise Malformed("property list longer than the packet")
        while self.pos < end:
            identifier = self.varint()
            kind = _PROPERTY_TYPES.get(identifier)
            if kind is None:
                raise Malformed(f"unknown property identifier {identifier:#x}")
            if kind == "varint":
                self.varint()
            elif kind in ("string", "binary"):
                self.binary()
            elif kind == "pair":
                self.binary()
                self.binary()
            else:
                self.take(_PROPERTY_SIZES[kind])


def _topic_id(topic: str, prefixes: Iterable[str]) -> tuple[str, int] | None:
    """(prefix, integer id) when `topic` is one of `prefixes` followed by an id; None if it starts otherwise."""
    for prefix in prefixes:
        if topic.startswith(prefix):
            try:
                return prefix, int(topic[len(prefix):])
            except ValueError:
                raise PayloadError(f"request id is not an integer in {topic!r}") from None
    return None


def _rpc_method(payload: bytes) -> object:
    """The "method" of a client-side RPC request body; None when the body is not a JSON object."""
    try:
        request = json.loads(payload)
    except ValueError:
        return None
    return request.get("method") if isinstance(request, dict) else None


def _matches(topic_filter: str, topic: str) -> bool:
    """Whether `topic` matches `topic_filter` (the granted filters use only the single-level wildcard)."""
    levels, wanted = topic.split("/"), topic_filter.split("/")
    return len(levels) == len(wanted) and all(w in ("+", level) for w, level in zip(wanted, levels, strict=True))


class _Closed(Exception):
    """The session decided to end the connection."""


class Session:
    """One MQTT connection: CONNECT, then a provisioning session or an authenticated device session."""

    def __init__(self, server: "MqttServer", reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server, self.state = server, server.state
        self.reader, self.writer = reader, writer
        self.peer = "%s:%s" % (writer.get_extra_info("peername") or ("?", "?"))[:2]
        self.device: Device | None = None
        self.provisioning = False
        self.v5 = False
        self._connected = False  # CONNACK 0 sent: from then on MQTT 5 closes are announced with a DISCONNECT
        self.granted: dict[str, int] = {}
        self._listen_handle: object | None = None
        self._next_id = 0
        self._close_timer: asyncio.TimerHandle | None = None
        self._closing = False
        # Per OTA request id, as MqttTransportHandler keeps them for the session: the chunk size last asked for and
        # the package the first request resolved to (later chunks keep coming from it).
        self._chunk_sizes: dict[str, int] = {}
        self._ota_packages: dict[str, str] = {}

    # ------------------------------------------------------------------ I/O

    async def _read_packet(self, connect: bool = False) -> tuple[int, bytes]:
        """(fixed header byte, body) of the next packet; with `connect`, anything but CONNECT is refused at once."""
        timeout = self.server.inactivity_timeout
        first = (await asyncio.wait_for(self.reader.readexactly(1), timeout))[0]
        if connect and first != _CONNECT << 4:
            raise Malformed("the first packet is not CONNECT")
        length, shift = 0, 0
        for _ in range(4):
            byte = (await asyncio.wait_for(self.reader.readexactly(1), timeout))[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        else:
            raise Malformed("remaining length longer than 4 bytes")
        if length > MAX_PACKET:
            raise Malformed(f"packet of {length} bytes is over the {MAX_PACKET}-byte limit")
        body = await asyncio.wait_for(self.reader.readexactly(length), timeout) if length else b""
        return first, body

    def send(self, data: bytes) -> None:
        """Queue bytes; a client whose unread backlog passes the limit is dropped (it stopped reading)."""
        if self._closing:
            return
        transport = self.writer.transport
        transport.write(data)
        if transport.get_write_buffer_size() > self.server.max_write_buffer:
            log.info("mqtt %s: client is not reading, dropping it", self.peer)
            self.abort()

    async def flush(self) -> None:
        """Wait until the client has taken what was written, at most `write_timeout`."""
        if self._closing:
            raise _Closed()
        try:
            await asyncio.wait_for(self.writer.drain(), self.server.write_timeout)
        except asyncio.TimeoutError:
            log.info("mqtt %s: client is not reading, dropping it", self.peer)
            self.abort()
            raise _Closed() from None

    def abort(self) -> None:
        """Drop the connection now, discarding unsent data."""
        self._closing = True
        self.writer.transport.abort()

    def close(self) -> None:
        """Close the connection after sending what is queued."""
        self._closing = True
        self.writer.close()

    def _packet_id(self) -> int:
        self._next_id = self._next_id % 0xFFFF + 1
        return self._next_id

    def publish(self, topic: str, payload: bytes, qos: int) -> None:
        """Send a PUBLISH to the client at `qos` (0 or 1)."""
        self.send(publish_packet(topic, payload, qos, self._packet_id() if qos else 0, self.v5))

    def puback(self, packet_id: int, reason: int = RC_SUCCESS) -> None:
        """Acknowledge a QoS 1 PUBLISH (nothing for QoS 0); MQTT 5 carries `reason` when it is not success."""
        if not packet_id:
            return
        body = struct.pack("!H", packet_id)
        if self.v5 and reason != RC_SUCCESS:
            body += bytes([reason, 0])  # reason code and an empty property list, as netty encodes it
        self.send(packet(_PUBACK << 4, body))

    def _acks(self, packet_id: int, codes: bytes) -> bytes:
        """Body of a SUBACK or UNSUBACK: packet id, (MQTT 5) an empty property list, the codes."""
        return struct.pack("!H", packet_id) + (b"\x00" if self.v5 else b"") + codes

    def _announce_close(self, reason: int) -> None:
        """ThingsBoard's closeCtx: an MQTT 5 session (3.7+) is sent a DISCONNECT with `reason` before it closes."""
        if self.v5 and self.state.at_least(3, 7):
            self.send(packet(_DISCONNECT << 4, bytes([reason, 0]) if reason != RC_SUCCESS else b""))

    async def close_with(self, reason: int) -> None:
        """End the session as ThingsBoard's closeCtx does, after what is queued has been sent."""
        self._announce_close(reason)
        await self._end()

    # ------------------------------------------------------------------ life cycle

    async def run(self) -> None:
        """Serve the connection until it closes; never raises."""
        try:
            _, body = await self._read_packet(connect=True)
            if not await self._connect(body):
                return
            while not self._closing:
                first, body = await self._read_packet()
                await self._dispatch(first >> 4, first & 0x0F, _Reader(body))
        except Malformed as e:
            log.info("mqtt %s: malformed packet (%s), closing", self.peer, e)
            await self._close_after_error(RC_MALFORMED_PACKET)
        except asyncio.TimeoutError:
            log.info("mqtt %s: inactive for %.0f s, closing", self.peer, self.server.inactivity_timeout)
            await self._close_after_error(RC_MAXIMUM_CONNECT_TIME)
        except (asyncio.IncompleteReadError, ConnectionError, _Closed):
            pass
        except Exception:  # keep serving everybody else whatever one session hits
            log.exception("mqtt %s: session failed", self.peer)
        finally:
            self._finish()

    async def _close_after_error(self, reason: int) -> None:
        # Before its CONNACK a session's protocol version is unknown to the server: it closes without a word.
        if self._connected:
            with contextlib.suppress(ConnectionError):
                await self.close_with(reason)

    def _finish(self) -> None:
        if self._close_timer is not None:
            self._close_timer.cancel()
        if self._listen_handle is not None:
            self.state.unlisten(self._listen_handle)
            self._listen_handle = None
        if self.device is not None:
            self.state.event(f"mqtt: device {self.device.name!r} disconnected")
        if not self._closing:
            self.close()

    def _connack(self, present: bool, reason: int) -> None:
        """CONNACK with MQTT 5 reason `reason`, as a 3.1.1 return code on 3.x; MQTT 5 adds no properties."""
        if self.v5:
            self.send(packet(_CONNACK << 4, bytes([present, reason, 0])))
        else:
            self.send(packet(_CONNACK << 4, bytes([present, CONNACK_V3[reason]])))

    async def _connect(self, body: bytes) -> bool:
        r = _Reader(body)
        protocol, level = r.text(), r.u8()
        if (protocol, level) == ("MQTT", 5) and not self.state.at_least(3, 5):
            self.state.event(f"mqtt: refused an MQTT 5 connection from {self.peer} (ThingsBoard before 3.5)")
            self.send(packet(_CONNACK << 4, bytes([0, RC_UNSUPPORTED_PROTOCOL_VERSION, 0])))
            await self._end()
            return False
        if (protocol, level) not in (("MQTT", 5), ("MQTT", 4), ("MQIsdp", 3)):
            # Netty's MqttDecoder fails the CONNECT (MqttUnacceptableProtocolVersionException) and
            # MqttTransportHandler.channelRead closes the channel: no CONNACK 0x01.
            raise Malformed(f"unknown protocol {protocol!r} level {level}")
        self.v5 = level == 5
        flags = r.u8()
        if flags & 0x01:
            raise Malformed("reserved CONNECT flag set")
        r.u16()  # keep-alive: ThingsBoard has no keep-alive handler, sessions expire on inactivity
        if self.v5:
            r.properties()
        client_id = r.text()
        if flags & 0x04:
            if self.v5:
                r.properties()  # the will's properties
            r.text()
            r.binary()
        username = r.text() if flags & 0x80 else None
        password = r.binary().decode("utf-8", "replace") if flags & 0x40 else None
        if self.v5 and r.pos != len(r.data):
            raise Malformed("bytes after the CONNECT payload")
        present = not flags & 0x02  # sessionPresent = !cleanSession
        if username == PROVISION or client_id == PROVISION:
            self.provisioning = True
            self.state.event(f"mqtt: provisioning session opened from {self.peer}")
            self._connack(present, RC_SUCCESS)
            self._connected = True
            return True
        device, reason, how = self._authenticate(client_id, username, password)
        if device is None:
            code = f"{reason:#04x}" if self.v5 else str(CONNACK_V3[reason])
            self.state.event(f"mqtt: connection from {self.peer} refused with CONNACK {code} ({how})")
            self._connack(present, reason)  # createMqttConnAckMsg: !cleanSession on refusals too
            await self.close_with(reason)  # MQTT 5 (3.7+): a DISCONNECT with the same reason follows
            return False
        if not self.state.transport_allowed(device, "MQTT"):
            # The credential check fails (DefaultTransportService.doProcess): CONNACK "server unavailable" (3 on
            # 3.x), then on MQTT 5 a DISCONNECT 0x89 (token or basic) or 0x83 (certificate), as the error callbacks
            # of processAuthTokenConnect and processX509CertConnect close.
            self.state.event(f"mqtt: {device.name!r} refused: its profile's transport type is not MQTT")
            self._connack(present, RC_SERVER_UNAVAILABLE)
            await self.close_with(RC_IMPLEMENTATION_SPECIFIC_ERROR if how.startswith("X.509") else RC_SERVER_BUSY)
            return False
        try:
            self.state.limit(device)  # the session's OPEN event is a message
        except RateLimited:
            self._connack(present, RC_CONNECTION_RATE_EXCEEDED)  # 0x03 on 3.x
            await self.close_with(RC_CONNECTION_RATE_EXCEEDED)
            return False
        self.device = device
        self._listen_handle = self.state.listen(device.name, self._on_push)
        self.state.event(f"mqtt: device {device.name!r} connected from {self.peer} ({how}"
                         f"{', MQTT 5' if self.v5 else ''})")
        self._connack(present, RC_SUCCESS)
        self._connected = True
        return True

    def _authenticate(self, client_id: str, username: str | None, password: str | None
                      ) -> tuple[Device | None, int, str]:
        cert = self.writer.get_extra_info("client_certificate")  # DER, from the TLS listener (tls.py)
        if cert:
            # Certificate path only: user name and password are not looked at (reference §3.4).
            if not certs.valid_now(cert):
                return None, CONNACK_NOT_AUTHORIZED, "X.509 certificate expired or not yet valid"
            device = self.state.device_by_x509(cert)
            return device, RC_SUCCESS if device else CONNACK_NOT_AUTHORIZED, \
                "X.509 certificate" if device else "unknown X.509 certificate"
        device, code = self.state.authenticate_mqtt(client_id, username, password)
        if device is not None:
            return device, code, device.credentials_type
        return None, code, "unknown credentials"

    async def _end(self) -> None:
        with contextlib.suppress(_Closed):
            await self.flush()
        self.close()

    # ------------------------------------------------------------------ packets after CONNECT

    async def _dispatch(self, kind: int, flags: int, r: _Reader) -> None:
        if kind == _PUBLISH:
            await self._publish(flags, r)
        elif kind == _SUBSCRIBE and flags == 0x02:
            await self._subscribe(r)
        elif kind == _UNSUBSCRIBE and flags == 0x02:
            self._unsubscribe(r)
        elif kind == _PINGREQ and not r.data:
            self.send(packet(_PINGRESP << 4))
        elif kind == _DISCONNECT and flags == 0:
            if self.v5:
                self._reason_and_properties(r)
            await self.close_with(RC_SUCCESS)  # MQTT 5: ThingsBoard answers DISCONNECT 0x00, then closes
            return
        elif kind in (_PUBACK, _PUBREC, _PUBCOMP) and flags == 0 and self._ack_fits(r):
            pass  # the client acknowledging our QoS 1 publishes: nothing to redeliver
        elif kind == _PUBREL and flags == 0x02 and self._ack_fits(r):
            self.send(packet(_PUBCOMP << 4, r.data[:2]))
        elif kind == _AUTH and flags == 0 and self.v5:
            self._reason_and_properties(r)  # parsed, then ignored as ThingsBoard ignores it
        else:
            raise Malformed(f"unexpected packet type {kind} with flags {flags:#x}")
        await self.flush()

    def _ack_fits(self, r: _Reader) -> bool:
        """A PUBACK/PUBREC/PUBREL/PUBCOMP body: a packet id, and on MQTT 5 maybe a reason code and properties."""
        if len(r.data) == 2 or not self.v5:
            return len(r.data) == 2
        r.u16()
        self._reason_and_properties(r)
        return True

    @staticmethod
    def _reason_and_properties(r: _Reader) -> None:
        """An MQTT 5 reason code and property list, each optional at the end of a packet (DISCONNECT, AUTH, acks)."""
        if r.pos < len(r.data):
            r.u8()
        if r.pos < len(r.data):
            r.properties()
        if r.pos != len(r.data):
            raise Malformed("bytes after the property list")

    def _unsubscribe(self, r: _Reader) -> None:
        packet_id = r.u16()
        if self.v5:
            r.properties()
        codes = bytearray()
        while r.pos < len(r.data):
            topic = r.text()
            existed = self.granted.pop(topic, None) is not None
            if existed:
                self._count_push_subscription(topic)
            codes.append(RC_SUCCESS if existed else RC_NO_SUBSCRIPTION_EXISTED)
        if not self.provisioning or self.state.at_least(3, 9):
            # 3.x UNSUBACK has no codes; MQTT 5 has one per filter.
            self.send(packet(_UNSUBACK << 4, self._acks(packet_id, bytes(codes) if self.v5 else b"")))

    async def _subscribe(self, r: _Reader) -> None:
        packet_id = r.u16()
        if self.v5:
            r.properties()
        filters = []
        while r.pos < len(r.data):
            filters.append((r.text(), r.u8()))
        if not filters:
            raise Malformed("SUBSCRIBE without a topic filter")
        for _, options in filters:
            # netty: QoS 3 fails the packet; on MQTT 5 so does retain handling 3, while no-local, retain-as-published
            # and the two top bits pass; 3.x must leave every bit above the QoS clear.
            if options & 0x03 == 3 or (options & 0x30 == 0x30 if self.v5 else options & 0xFC):
                raise Malformed(f"invalid subscription options {options:#04x}")
        if self.provisioning and not self.state.at_least(3, 9):
            return  # before 3.9 a provisioning session ignores SUBSCRIBE: no SUBACK at all
        failure = RC_TOPIC_FILTER_INVALID if self.v5 else _SUBSCRIBE_FAILURE
        codes = bytearray()
        for topic, options in filters:
            known = topic == PROVISION_RESPONSE if self.provisioning else topic in SUBSCRIPTIONS
            if known:
                qos = min(options & 0x03, 1)
                codes.append(qos)
                if not self._count_push_subscription(topic):
                    continue  # granted all the same, but the device's pushes do not come
                self.granted.pop(topic, None)  # re-granted: now the latest subscription
                self.granted[topic] = qos
            else:
                codes.append(failure)
        if self.device is not None:
            granted = ", ".join(t for (t, _), code in zip(filters, codes, strict=True) if code != failure)
            self.state.event(f"mqtt: device {self.device.name!r} subscribed to {granted or 'nothing'}")
        self.send(packet(_SUBACK << 4, self._acks(packet_id, bytes(codes))))
        if self.device is not None and self._push_topic("rpc") is not None:
            self.state.rpc_subscribed(self.device.name)  # RPC requests that waited for a subscription go now

    def _count_push_subscription(self, topic: str) -> bool:
        """(Un)subscribing to pushes is a message (processAttributesSubscribe, processRpcSubscribe); whether it
        passed the rate limits. ThingsBoard passes it no callback: a refused one changes nothing and is not told."""
        if self.device is None or SUBSCRIPTIONS.get(topic) is None:
            return True
        try:
            self.state.limit(self.device)
        except RateLimited:
            return False
        return True

    def _qos(self, topic: str) -> int:
        """Granted QoS of the subscription matching the outgoing `topic`; 1 when none does (the server's default)."""
        return next((qos for f, qos in self.granted.items() if _matches(f, topic)), 1)

    def _push_topic(self, kind: str) -> str | None:
        """Topic template for pushes of `kind`, from the latest granted subscription for it; None if there is none."""
        for topic_filter in reversed(self.granted):
            push = SUBSCRIPTIONS.get(topic_filter)
            if push is not None and push[0] == kind:
                return push[1]
        return None

    async def _publish(self, flags: int, r: _Reader) -> None:
        qos = (flags >> 1) & 0x03
        if qos == 3:
            raise Malformed("PUBLISH with QoS 3")
        topic = r.text()
        if "+" in topic or "#" in topic:
            raise Malformed("PUBLISH to a topic with a wildcard")  # netty's isValidPublishTopicName
        packet_id = r.u16() if qos else 0
        if qos and not packet_id:
            raise Malformed("PUBLISH with packet id 0")
        if self.v5:
            r.properties()  # a topic alias among them is ignored too: ThingsBoard only reads the topic name
        payload = r.rest()
        if self.provisioning:
            await self._provision_publish(topic, payload, packet_id)
        else:
            await self._device_publish(topic, payload, packet_id)

    async def _payload_refused(self, packet_id: int) -> None:
        """sendResponseForAdaptorErrorOrCloseContext: an MQTT 5 QoS 1 message gets PUBACK 0x99 and the session
        goes on; anything else closes the session (MQTT 5: DISCONNECT 0x99)."""
        if self.v5 and packet_id:
            self.puback(packet_id, RC_PAYLOAD_FORMAT_INVALID)
            return
        await self.close_with(RC_PAYLOAD_FORMAT_INVALID)
        raise _Closed()

    async def _provision_publish(self, topic: str, payload: bytes, packet_id: int) -> None:
        if topic != PROVISION_REQUEST:
            self.state.event(f"mqtt: provisioning session {self.peer} published to another topic, closing")
            # v3.7+: PUBACK (0x90 on MQTT 5) then close; before: close at once.
            if self.state.at_least(3, 7):
                self.puback(packet_id, RC_TOPIC_NAME_INVALID)
            await self.close_with(RC_TOPIC_NAME_INVALID)
            raise _Closed()
        try:
            response = self.state.provision(payload, "mqtt")
        except RequestError as e:
            self.state.event(f"mqtt: unparsable provisioning request from {self.peer}")
            if not e.json_object:
                await self._payload_refused(packet_id)  # neither JSON nor protobuf: an adaptor error
                return
            # parse error after JSON: PUBACK (0x83 on MQTT 5), then disconnect
            self.puback(packet_id, RC_IMPLEMENTATION_SPECIFIC_ERROR)
            await self.close_with(RC_IMPLEMENTATION_SPECIFIC_ERROR)
            raise _Closed() from None
        self.puback(packet_id)
        self.publish(PROVISION_RESPONSE, json_bytes(response), self._qos(PROVISION_RESPONSE))
        if self._close_timer is None:
            self._close_timer = asyncio.get_running_loop().call_later(self.server.provision_close_after,
                                                                      self.close)

    async def _device_publish(self, topic: str, payload: bytes, packet_id: int) -> None:
        device = self.device
        assert device is not None
        if topic.startswith(GATEWAY_PREFIX):
            # MqttTransportHandler.processPublish: a session without a gateway handler only logs it (no PUBACK).
            self.state.event(f"mqtt: {device.name!r} published to {topic!r}, but it is no gateway; not acknowledged")
            return
        try:
            if topic in TELEMETRY_TOPICS:
                self.state.post_telemetry(device, payload)
                self.puback(packet_id)
            elif topic in ATTRIBUTES_TOPICS:
                self.state.post_attributes(device, payload)
                self.puback(packet_id)
            elif (request := _topic_id(topic, ATTRIBUTE_REQUEST_PREFIXES)) is not None:
                answer = self._attribute_request(device, payload)
                self.puback(packet_id)
                prefix, request_id = request
                response_topic = f"{ATTRIBUTE_REQUEST_PREFIXES[prefix]}{request_id}"
                self.publish(response_topic, json_bytes(answer), self._qos(response_topic))
            elif (reply := _topic_id(topic, RPC_RESPONSE_PREFIXES)) is not None:
                self.state.record_rpc_reply(device, reply[1], payload)
                self.puback(packet_id)
            elif self.state.at_least(3, 3) and (request := OTA_REQUEST.search(topic)) is not None:
                await self._ota_chunk(device, request, payload, packet_id)
            elif topic.startswith(SESSION_LIMITS_PREFIX) and _rpc_method(payload) == SESSION_LIMITS:
                # Answered by the transport itself, with no rate limit counted (onGetSessionLimitsRpc).
                request_id = _topic_id(topic, (SESSION_LIMITS_PREFIX,))[1]
                answer = self.state.rate_limits.session_limits(MAX_PACKET, MAX_INFLIGHT)
                self.puback(packet_id)
                response_topic = f"v1/devices/me/rpc/response/{request_id}"
                self.publish(response_topic, json_bytes(answer), self._qos(response_topic))
            elif topic == CLAIM_TOPIC:
                self.state.claim(device, payload)
                self.puback(packet_id)
            elif topic.startswith(NOT_EMULATED_PREFIXES):
                self.state.limit(device)
                self.puback(packet_id)
            else:
                # An unknown topic: PUBACK (0x90 on MQTT 5), not processed, session kept.
                self.puback(packet_id, RC_TOPIC_NAME_INVALID)
        except PayloadError as e:
            self.state.event(f"mqtt: invalid payload from {device.name!r} on {topic!r} ({e})")
            await self._payload_refused(packet_id)
        except RateLimited:
            # getPubAckCallback.onError: no PUBACK, the session is closed (MQTT 5: DISCONNECT 0x83).
            await self.close_with(RC_IMPLEMENTATION_SPECIFIC_ERROR)
            raise _Closed() from None

    async def _ota_chunk(self, device: Device, request: re.Match, payload: bytes, packet_id: int) -> None:
        """One chunk of the device's package (MqttTransportHandler.getOtaPackageCallback, reference §6.5).

        The payload is the chunk size in ASCII decimal (empty: the size this request id used before; 0: the whole
        file). Over the maximum packet size, or with no package, the error goes to v2/fw/error and the session is
        closed, with no PUBACK. A size or chunk number Integer.parseInt refuses closes the session too.
        """
        prefix, request_id, number_text = request.groups()
        text = payload.decode("utf-8", "replace")
        size, number = ota.java_int(text or "0"), ota.java_int(number_text)
        if size is None or number is None:
            self.state.event(f"mqtt: OTA request from {device.name!r} with a size or chunk that is not an int, "
                             "closing")
            # The NumberFormatException reaches MqttTransportHandler.exceptionCaught.
            await self.close_with(RC_SERVER_SHUTTING_DOWN)
            raise _Closed()
        if size > 0:
            self._chunk_sizes[request_id] = size
        else:
            size = self._chunk_sizes.get(request_id, 0)
        if size > MAX_PACKET:
            await self._ota_error(device, "PAYLOAD_TOO_LARGE")
        package_id = self._ota_packages.get(request_id)
        if package_id is None:
            status, package = self.state.ota_request(device, OTA_TYPES[prefix])
            if status != "SUCCESS" or package is None:
                await self._ota_error(device, status)
            package_id = self._ota_packages[request_id] = package.id
        self.puback(packet_id)
        data = self.state.package_data(package_id)
        if data is None:
            return  # deleted since this request id started: ThingsBoard's cache has nothing, nothing is sent
        topic = f"v2/{prefix}/response/{request_id}/chunk/{number}"
        self.publish(topic, ota.chunk(data, size, number), self._qos(topic))

    async def _ota_error(self, device: Device, error: str) -> None:
        """Publish `error` to v2/fw/error and close the session (MqttTransportHandler.sendOtaPackageError)."""
        self.state.event(f"mqtt: OTA request from {device.name!r} refused with {error}, closing")
        self.publish(OTA_ERROR_TOPIC, error.encode(), self._qos(OTA_ERROR_TOPIC))
        await self.close_with(RC_IMPLEMENTATION_SPECIFIC_ERROR)
        raise _Closed()

    def _attribute_request(self, device: Device, payload: bytes) -> dict:
        if not payload:
            raise PayloadError("empty attribute request")
        try:
            request = json.loads(payload)
        except ValueError:
            raise PayloadError("attribute request is not JSON") from None
        if not isinstance(request, dict):
            raise PayloadError("attribute request is not a JSON object")
        keys: dict[str, list[str] | None] = {}
        for field in ("clientKeys", "sharedKeys"):
            value = request.get(field)
            if value is None:
                keys[field] = None
            elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
                keys[field] = parse_keys(str(value))
            else:
                raise PayloadError(f"{field} must be a comma-separated string")
        return self.state.get_attributes(device, keys["clientKeys"], keys["sharedKeys"])

    # ------------------------------------------------------------------ pushes from the state

    def _on_push(self, kind: str, data: object) -> bool:
        """Publish a push the session subscribed to; True when it did (the state counts RPC deliveries)."""
        if kind == "deleted":
            self.state.event(f"mqtt: closing the session of deleted device {self.device.name!r}"
                             if self.device else "mqtt: closing a deleted device's session")
            self._announce_close(RC_ADMINISTRATIVE_ACTION)
            self.close()
            return False
        push_topic = self._push_topic(kind)
        if push_topic is None:
            return False
        if kind == "rpc":
            rpc_id, method, params = data  # type: ignore[misc]
            push_topic, data = push_topic.format(rpc_id), {"method": method, "params": params}
        self.publish(push_topic, json_bytes(data), self._qos(push_topic))
        return True


class MqttServer:
    """The emulator's MQTT listeners (plain and TLS) over one EmulatorState."""

    def __init__(self, state: EmulatorState, provision_close_after: float = 60.0,
                 inactivity_timeout: float = 600.0, write_timeout: float = 10.0,
                 max_write_buffer: int = 1 << 20) -> None:
        """`provision_close_after`: seconds from the provisioning answer to closing the session (ThingsBoard: 60)."""
        self.state = state
        self.provision_close_after = provision_close_after
        self.inactivity_timeout = inactivity_timeout
        self.write_timeout = write_timeout
        self.max_write_buffer = max_write_buffer
        self._servers: list[asyncio.base_events.Server] = []
        self._sessions: set[Session] = set()
        self._tasks: set[asyncio.Task] = set()

    async def listen(self, host: str, port: int, tls_context: SSL.Context | None = None) -> int:
        """Start a listener (TLS when `tls_context` is given, see tls.py) and return its bound port."""
        if tls_context is None:
            server = await asyncio.start_server(self._accept, host, port)
        else:
            server = await asyncio.get_running_loop().create_server(
                lambda: tls.TlsServerProtocol(tls_context, self._accept), host, port)
        self._servers.append(server)
        return server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = Session(self, reader, writer)
        self._sessions.add(session)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await session.run()
        finally:
            self._sessions.discard(session)
            if task is not None:
                self._tasks.discard(task)

    async def stop(self) -> None:
        """Stop listening and close every session."""
        for server in self._servers:
            server.close()
        for session in list(self._sessions):
            session.abort()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
