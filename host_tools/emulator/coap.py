"""CoAP side of the emulator: ThingsBoard's `/api/v1/...` CoAP resources over UDP (RFC 7252), reference section 5.

Why a small UDP server of its own rather than aiocoap's server: the emulator must reproduce the message layer the
way ThingsBoard's Californium stack behaves and let tests steer it, and aiocoap decides those things itself. Here
the separate-response path (empty ACK first, then a CON response retransmitted until ACKed) is a switch rather than
a timing accident, the exchange cache is ours (a duplicate is answered with the very same bytes and never
processed twice), malformed datagrams get exactly the RFC 7252 treatment (RST for a rejected CON, silence for the
rest), and version differences (2.05/2.03 codes before 3.2.2, always-separate before 3.4) are plain conditions.
aiocoap and libcoap remain the clients that check this server's fidelity in the tests.

Block-wise transfer (RFC 7959) works on every resource as Californium does it for ThingsBoard (blockwise.py). OTA
packages are served on `/fw/{token}` and `/sw/{token}` (reference §5.8) as OtaPackageTransportResource serves them.
Server-side RPC: GET on `.../rpc` with Observe=0 subscribes; the request gets only its ACK (empty), and each RPC
then arrives as a 2.05 notification `{"id", "method", "params"}`; Observe=1 unsubscribes.

Not emulated: DTLS, protobuf payloads, block-wise observe notifications (a notification goes out whole). GET on
`.../rpc` without Observe or on `.../rpc/{id}` and POST on `.../rpc` (client-side RPC) are answered 5.01 Not
Implemented; a claiming request (POST on `.../claim`) is accepted (2.01) and only logged.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from host_tools.emulator import ota
from host_tools.emulator.blockwise import BLOCK1, BLOCK2, MAX_RESOURCE_BODY_SIZE, Answer, Blockwise
from host_tools.emulator.state import Device, EmulatorState, PayloadError, RateLimited, RequestError, json_bytes, \
    parse_keys

log = logging.getLogger(__name__)

# Message types (RFC 7252 section 3).
CON, NON, ACK, RST = 0, 1, 2, 3

# Codes: class << 5 | detail.
EMPTY, GET, POST, PUT, DELETE = 0x00, 0x01, 0x02, 0x03, 0x04
CREATED, DELETED, VALID, CONTENT = 0x41, 0x42, 0x43, 0x45
BAD_REQUEST, UNAUTHORIZED, BAD_OPTION, NOT_FOUND, METHOD_NOT_ALLOWED = 0x80, 0x81, 0x82, 0x84, 0x85
INTERNAL_SERVER_ERROR, NOT_IMPLEMENTED = 0xA0, 0xA1

# Option numbers.
URI_HOST, OBSERVE, URI_PORT, URI_PATH, CONTENT_FORMAT, MAX_AGE, URI_QUERY, ACCEPT = 3, 6, 7, 11, 12, 14, 15, 17
SIZE2, SIZE1 = 28, 60
_UNDERSTOOD = frozenset({URI_HOST, 4, OBSERVE, URI_PORT, URI_PATH, CONTENT_FORMAT, MAX_AGE, URI_QUERY, ACCEPT,
                         BLOCK2, BLOCK1, SIZE2, SIZE1})

TEXT_PLAIN, APPLICATION_JSON = 0, 50

MAX_DATAGRAM = 2048
"""Californium's UDP datagram size: a longer datagram arrives truncated and is discarded."""

EXCHANGE_LIFETIME = 247.0
"""RFC 7252 4.8.2: how long a message id stays in the exchange cache."""

MAX_EXCHANGES = 10000
"""Upper bound of the exchange cache, so a flood of requests cannot grow it without limit."""

_FEATURES = ("attributes", "telemetry", "rpc", "claim", "provision")


class FormatError(ValueError):
    """A datagram that is not a well-formed CoAP message."""


@dataclass
class Message:
    """One CoAP message; `options` are (number, raw value) in order."""

    mtype: int
    code: int
    mid: int
    token: bytes = b""
    options: list[tuple[int, bytes]] = field(default_factory=list)
    payload: bytes = b""

    def option_values(self, number: int) -> list[bytes]:
        """Every value of option `number`, in order."""
        return [v for n, v in self.options if n == number]

    def uint_option(self, number: int) -> int | None:
        """The first value of a uint option, or None when absent."""
        values = self.option_values(number)
        return int.from_bytes(values[0], "big") if values else None


def decode(data: bytes) -> Message:
    """Parse a datagram (RFC 7252 section 3); FormatError when it is malformed."""
    if len(data) < 4:
        raise FormatError("shorter than the 4-byte header")
    if data[0] >> 6 != 1:
        raise FormatError("unknown version")
    mtype, tkl, code, mid = (data[0] >> 4) & 3, data[0] & 15, data[1], int.from_bytes(data[2:4], "big")
    if tkl > 8:
        raise FormatError("token length 9-15 is reserved")
    if len(data) < 4 + tkl:
        raise FormatError("truncated token")
    token = data[4:4 + tkl]
    pos, number, options = 4 + tkl, 0, []
    while pos < len(data):
        if data[pos] == 0xFF:
            if pos + 1 == len(data):
                raise FormatError("payload marker without payload")
            return _checked(Message(mtype, code, mid, token, options, data[pos + 1:]))
        delta, length = data[pos] >> 4, data[pos] & 15
        pos += 1
        delta, pos = _extended(data, pos, delta)
        length, pos = _extended(data, pos, length)
        if pos + length > len(data):
            raise FormatError("option value runs past the datagram")
        number += delta
        options.append((number, data[pos:pos + length]))
        pos += length
    return _checked(Message(mtype, code, mid, token, options))


def _extended(data: bytes, pos: int, nibble: int) -> tuple[int, int]:
    if nibble < 13:
        return nibble, pos
    if nibble == 15:
        raise FormatError("reserved option nibble 15")
    size = 1 if nibble == 13 else 2
    if pos + size > len(data):
        raise FormatError("truncated extended option field")
    return int.from_bytes(data[pos:pos + size], "big") + (13 if size == 1 else 269), pos + size


def _checked(msg: Message) -> Message:
    if msg.code == EMPTY and (msg.token or msg.options or msg.payload):
        raise FormatError("empty message with token, options or payload")
    if msg.code >> 5 in (1, 6, 7):
        raise FormatError("reserved code class")
    return msg


def encode(msg: Message) -> bytes:
    """The datagram for `msg`; options are written in number order."""
    out = bytearray([0x40 | msg.mtype << 4 | len(msg.token), msg.code])
    out += msg.mid.to_bytes(2, "big") + msg.token
    previous = 0
    for number, value in sorted(msg.options, key=lambda o: o[0]):
        delta, length = number - previous, len(value)
        previous = number
        head = bytearray([0])
        ext = bytearray()
        for shift, amount in ((4, delta), (0, length)):
            if amount < 13:
                head[0] |= amount << shift
            elif amount < 269:
                head[0] |= 13 << shift
                ext.append(amount - 13)
            else:
                head[0] |= 14 << shift
                ext += (amount - 269).to_bytes(2, "big")
        out += head + ext + value
    if msg.payload:
        out += b"\xff" + msg.payload
    return bytes(out)


def uint(value: int) -> bytes:
    """A uint option value in its shortest form (0 is empty)."""
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


@dataclass
class Reply:
    """What a resource answers: code, payload, options; `observe` registers the request as an observer of the
    `feature` ("attributes" or "rpc").

    `separate`: the resource accepted the exchange first (an empty ACK to a CON), the answer follows on its own; a
    `code` of EMPTY then means that no answer follows at all.
    """

    code: int
    payload: bytes = b""
    options: list[tuple[int, bytes]] = field(default_factory=list)
    observe: Device | None = None
    separate: bool = False
    feature: str = "attributes"


@dataclass
class _Observation:
    addr: tuple
    token: bytes
    mtype: int
    device: str
    handle: object
    feature: str
    seq: int = 2


class CoapServer(asyncio.DatagramProtocol):
    """One emulator's CoAP endpoint over one `EmulatorState`.

    `separate` forces the separate-response path for every CON request (ThingsBoard before 3.4 always did that);
    `ack_timeout` and `max_retransmit` govern retransmission of our own CON messages (RFC 7252 4.2).
    """

    def __init__(self, state: EmulatorState, separate: bool = False, ack_timeout: float = 2.0,
                 max_retransmit: int = 4, max_body_size: int = MAX_RESOURCE_BODY_SIZE):
        self.state = state
        self._blockwise = Blockwise(max_body_size)
        self.separate = separate or not state.at_least(3, 4)
        self._posted = CREATED if state.at_least(3, 2, 2) else VALID  # what an accepted upload is answered with
        self.ack_timeout = ack_timeout
        self.max_retransmit = max_retransmit
        self.transport: asyncio.DatagramTransport | None = None
        self._exchanges: OrderedDict[tuple, tuple[float, bytes]] = OrderedDict()
        # (addr, message id) of our unacknowledged CONs -> (retransmission timer, observation it notifies)
        self._pending: dict[tuple, tuple[asyncio.TimerHandle, tuple | None]] = {}
        self._observations: dict[tuple, _Observation] = {}
        self._mid = random.randrange(0x10000)

    async def start(self, host: str, port: int) -> int:
        """Bind `host`:`port` (0 picks a free port) and return the bound port."""
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self, local_addr=(host, port))
        bound = self.transport.get_extra_info("sockname")[1]
        log.info("CoAP device API listening on %s:%d%s", host, bound, " (separate responses)" if self.separate
                 else "")
        return bound

    async def stop(self) -> None:
        """Cancel retransmissions and observations and close the socket."""
        for handle, _ in self._pending.values():
            handle.cancel()
        self._pending.clear()
        for obs in list(self._observations.values()):
            self.state.unlisten(obs.handle)
        self._observations.clear()
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    # --- asyncio.DatagramProtocol --------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def error_received(self, exc: Exception) -> None:
        log.debug("CoAP socket error: %s", exc)

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        try:
            self._receive(data, addr)
        except Exception:
            log.exception("CoAP datagram from %s could not be handled", addr)

    # --- message layer -------------------------------------------------------------------------------------------

    def _send(self, data: bytes, addr: tuple) -> None:
        if self.transport is not None:
            self.transport.sendto(data, addr)

    def _next_mid(self) -> int:
        self._mid = (self._mid + 1) & 0xFFFF
        return self._mid

    def _receive(self, data: bytes, addr: tuple) -> None:
        if len(data) > MAX_DATAGRAM:
            log.debug("CoAP: %d-byte datagram from %s discarded (over %d)", len(data), addr, MAX_DATAGRAM)
            return
        try:
            msg = decode(data)
        except FormatError as e:
            # RFC 7252 4.2/4.3: reject a malformed CON with RST when its id is readable, ignore anything else.
            if len(data) >= 4 and data[0] >> 6 == 1 and (data[0] >> 4) & 3 == CON:
                self._send(encode(Message(RST, EMPTY, int.from_bytes(data[2:4], "big"))), addr)
            log.debug("CoAP: malformed datagram from %s: %s", addr, e)
            return
        if msg.mtype in (ACK, RST):
            self._acknowledged(msg, addr)
            return
        if msg.code == EMPTY or msg.code >> 5 != 0:
            # A CON ping, or a response nobody asked for: RST for CON, silence for NON.
            if msg.mtype == CON:
                self._send(encode(Message(RST, EMPTY, msg.mid)), addr)
            return
        self._request(msg, addr)

    def _acknowledged(self, msg: Message, addr: tuple) -> None:
        pending = self._pending.pop((addr, msg.mid), None)
        if pending is None:
            return
        handle, obs_key = pending
        handle.cancel()
        if msg.mtype == RST and obs_key is not None:
            self._cancel_observation(obs_key)  # RFC 7641 3.6: RST to a notification ends the observation

    def _request(self, msg: Message, addr: tuple) -> None:
        key = (addr, msg.mid)
        now = time.monotonic()
        self._expire(now)
        cached = self._exchanges.get(key)
        if cached is not None:
            log.debug("CoAP: duplicate message id %d from %s answered from the exchange cache", msg.mid, addr)
            self._send(cached[1], addr)
            return
        request = self._blockwise.receive(msg, addr)
        if isinstance(request, Answer):  # the block-wise layer answers by itself, always piggybacked
            reply, separate = Reply(request.code, request.payload, list(request.options)), False
        else:
            try:
                handled = self._handle(request, addr)
            except RateLimited:
                handled = Reply(INTERNAL_SERVER_ERROR)  # a device's message over its rate limits: 5.00 (reference §8)
            reply = self._blockwise.respond(request, addr, handled)
            separate = (self.separate or reply.separate) and msg.mtype == CON
        if msg.mtype == CON and not separate:
            answer = Message(ACK, reply.code, msg.mid, msg.token, reply.options, reply.payload)
        elif separate:
            answer = Message(ACK, EMPTY, msg.mid)
        else:
            answer = Message(NON, reply.code, self._next_mid(), msg.token, reply.options, reply.payload)
        first = encode(answer)
        self._exchanges[key] = (now, first)
        if reply.code != EMPTY or msg.mtype == CON:
            self._send(first, addr)
        obs_key = None
        if reply.observe is not None:
            obs_key = self._observe(msg, addr, reply.observe, reply.feature)
        if separate and reply.code != EMPTY:
            response = Message(CON, reply.code, self._next_mid(), msg.token, reply.options, reply.payload)
            self._send_confirmable(response, addr, obs_key)

    def _expire(self, now: float) -> None:
        while self._exchanges:
            key, (born, _) = next(iter(self._exchanges.items()))
            if now - born < EXCHANGE_LIFETIME and len(self._exchanges) < MAX_EXCHANGES:
                break
            del self._exchanges[key]

    def _send_confirmable(self, msg: Message, addr: tuple, obs_key: tuple | None = None) -> None:
        """Send a CON and retransmit it with exponential back-off until it is ACKed or RST (RFC 7252 4.2)."""
        data = encode(msg)
        loop = asyncio.get_running_loop()
        timeout = self.ack_timeout * random.uniform(1.0, 1.5)

        def retransmit(attempt: int, wait: float) -> None:
            if attempt > self.max_retransmit:
                self._pending.pop((addr, msg.mid), None)
                log.debug("CoAP: CON %d to %s never acknowledged", msg.mid, addr)
                if obs_key is not None:
                    self._cancel_observation(obs_key)
                return
            self._send(data, addr)
            self._pending[(addr, msg.mid)] = (loop.call_later(wait, retransmit, attempt + 1, wait * 2), obs_key)

        retransmit(0, timeout)

    # --- resources (reference 5.3-5.7) ---------------------------------------------------------------------------

    def _handle(self, msg: Message, addr: tuple) -> Reply:
        unknown = [n for n, _ in msg.options if n & 1 and n not in _UNDERSTOOD]
        if unknown:
            return Reply(BAD_OPTION, f"Unrecognized critical option {unknown[0]}".encode(), [(CONTENT_FORMAT, b"")])
        path = [v.decode("utf-8", "replace") for v in msg.option_values(URI_PATH)]
        if path[:1] in (["fw"], ["sw"]) and self.state.at_least(3, 3):  # OTA came with ThingsBoard 3.3
            return self._ota(msg, path)
        if path[:2] != ["api", "v1"]:
            return Reply(NOT_FOUND)
        rest = path[2:]
        if rest == ["provision"]:
            return self._provision(msg) if msg.code == POST else self._wrong_method(msg)
        if len(rest) < 2 or rest[1] not in _FEATURES:
            if len(rest) == 1 and rest[0] in _FEATURES:
                return Reply(UNAUTHORIZED)  # a token-less path needs a DTLS X.509 session, which there is not
            return Reply(BAD_REQUEST)
        token, feature = rest[0], rest[1:]
        device = self.state.device_by_token(token)
        if device is None:
            return Reply(UNAUTHORIZED)
        if not self.state.transport_allowed(device, "COAP"):
            return Reply(INTERNAL_SERVER_ERROR)  # the credential check fails (DefaultTransportService.doProcess)
        method = msg.code
        if method == POST and feature in (["telemetry"], ["attributes"]):
            post = self.state.post_telemetry if feature == ["telemetry"] else self.state.post_attributes
            try:
                post(device, msg.payload)
            except PayloadError as e:
                log.debug("CoAP: %s refused: %s", feature[0], e)
                return Reply(BAD_REQUEST)
            return Reply(self._posted)
        if method == POST and feature == ["claim"]:
            try:
                self.state.claim(device, msg.payload)
            except PayloadError:
                return Reply(BAD_REQUEST)
            return Reply(self._posted)
        if method == POST and feature[0] == "rpc" and len(feature) == 2:
            try:
                self.state.record_rpc_reply(device, int(feature[1]), msg.payload)
            except (ValueError, PayloadError):
                return Reply(BAD_REQUEST)
            return Reply(self._posted)
        if method == GET and feature == ["attributes"]:
            if msg.uint_option(OBSERVE) == 1:
                self._cancel_observation((addr, device.name, "attributes"))
            return self._get_attributes(msg, device)
        if method == GET and feature == ["rpc"] and msg.uint_option(OBSERVE) is not None:
            if msg.uint_option(OBSERVE) == 1:
                self._cancel_observation((addr, device.name, "rpc"))
                return Reply(CONTENT)
            return Reply(EMPTY, observe=device, feature="rpc", separate=True)
        if method in (GET, POST) and feature[0] == "rpc":
            return Reply(NOT_IMPLEMENTED, f"{feature[0]} is not emulated over CoAP".encode(),
                         [(CONTENT_FORMAT, b"")])
        return self._wrong_method(msg)

    @staticmethod
    def _wrong_method(msg: Message) -> Reply:
        # CoapTransportResource answers GET and POST on the wrong feature with 4.00; Californium 4.05 for the rest.
        return Reply(BAD_REQUEST if msg.code in (GET, POST) else METHOD_NOT_ALLOWED)

    def _provision(self, msg: Message) -> Reply:
        try:
            answer = self.state.provision(msg.payload, "coap")
        except RequestError:
            return Reply(BAD_REQUEST)
        body = json_bytes(answer)
        if not self.state.at_least(3, 2, 2):
            code = CONTENT
        else:
            code = CREATED if answer["status"] == "SUCCESS" else BAD_REQUEST
        return Reply(code, body, [(CONTENT_FORMAT, uint(TEXT_PLAIN))])

    def _ota(self, msg: Message, path: list[str]) -> Reply:
        """OtaPackageTransportResource: GET /fw/{token} or /sw/{token} [?title=&version=&size=&chunk=] (§5.8).

        Any method but GET is 4.05. A GET is accepted at once (an empty ACK) and answered separately: 4.01 for a
        path that is not exactly fw|sw/{token} or an unknown token, 4.04 without a package (or with a URL one), 4.00
        when a title or version is given and differs, 5.00 for a size or chunk that is no int, else 2.05 with the
        bytes (block-wise when over 1024). An empty chunk (past the end) is never answered: ThingsBoard sends nothing.
        """
        if msg.code != GET:
            return Reply(METHOD_NOT_ALLOWED)
        device = self.state.device_by_token(path[1]) if len(path) == 2 else None
        if device is None:
            return Reply(UNAUTHORIZED, separate=True)
        status, package = self.state.ota_request(device, ota.FIRMWARE if path[0] == "fw" else ota.SOFTWARE)
        if status != "SUCCESS" or package is None:
            return Reply(NOT_FOUND, separate=True)
        query = _query(msg)
        if query.get("title", package.title) != package.title or \
                query.get("version", package.version) != package.version:
            return Reply(BAD_REQUEST, separate=True)
        size, number = ota.java_int(query.get("size") or "0"), ota.java_int(query.get("chunk") or "0")
        if size is None or number is None:
            return Reply(INTERNAL_SERVER_ERROR, separate=True)
        data = ota.chunk(self.state.package_data(package.id) or b"", size, number)
        return Reply(CONTENT, data, separate=True) if data else Reply(EMPTY, separate=True)

    def _get_attributes(self, msg: Message, device: Device) -> Reply:
        fmt = msg.uint_option(CONTENT_FORMAT)
        options = [(CONTENT_FORMAT, uint(APPLICATION_JSON if fmt is None else fmt))]
        observe = msg.uint_option(OBSERVE)
        if observe == 0:
            current = self.state.get_attributes(device, None, None).get("shared", {})
            return Reply(CONTENT, json_bytes(current), options + [(OBSERVE, uint(1))], observe=device)
        query = _query(msg)
        client = parse_keys(query.get("clientKeys"))
        shared = parse_keys(query.get("sharedKeys"))
        found = self.state.get_attributes(device, client, shared)
        if not found:
            return Reply(NOT_FOUND)
        return Reply(CONTENT, json_bytes(found), options)

    # --- observe (RFC 7641) on shared attributes -----------------------------------------------------------------

    def _observe(self, msg: Message, addr: tuple, device: Device, feature: str) -> tuple:
        key = (addr, device.name, feature)
        old = self._observations.get(key)
        if old is not None and old.token != msg.token:
            # ThingsBoard ends the replaced observation with 2.02 Deleted.
            self._cancel_observation(key)
            self._send(encode(Message(NON, DELETED, self._next_mid(), old.token)), addr)
        elif old is not None:
            self.state.unlisten(old.handle)

        def on_event(kind: str, data: Any) -> bool:
            return self._notify(key, kind, data)

        handle = self.state.listen(device.name, on_event)
        self._observations[key] = _Observation(addr, msg.token, msg.mtype, device.name, handle, feature)
        return key

    def _notify(self, key: tuple, kind: str, data: Any) -> bool:
        """Send the event to the observer; True when it was one for this observation (delivered, as state counts)."""
        obs = self._observations.get(key)
        if obs is None or kind not in (obs.feature, "deleted"):
            return False
        if kind == "deleted":
            # A non-2.xx notification ends the observation (RFC 7641 3.2).
            self._cancel_observation(key)
            self._deliver(Message(obs.mtype, NOT_FOUND, self._next_mid(), obs.token), obs.addr)
            return True
        if kind == "rpc":
            rpc_id, method, params = data  # type: ignore[misc]
            data = {"id": rpc_id, "method": method, "params": params}
        options = [(OBSERVE, uint(obs.seq)), (CONTENT_FORMAT, uint(APPLICATION_JSON))]
        obs.seq = (obs.seq + 1) & 0xFFFFFF
        self._deliver(Message(obs.mtype, CONTENT, self._next_mid(), obs.token, options, json_bytes(data)), obs.addr,
                      key)
        return True

    def _deliver(self, msg: Message, addr: tuple, obs_key: tuple | None = None) -> None:
        """Send a notification: reliably when the observer registered with CON."""
        if msg.mtype == CON:
            self._send_confirmable(msg, addr, obs_key)
        else:
            self._send(encode(msg), addr)

    def _cancel_observation(self, key: tuple) -> None:
        obs = self._observations.pop(key, None)
        if obs is not None:
            self.state.unlisten(obs.handle)


def _query(msg: Message) -> dict[str, str]:
    """The Uri-Query options as name -> value; the first of repeated names wins (getQueryParameter)."""
    query: dict[str, str] = {}
    for option in msg.option_values(URI_QUERY):
        name, _, value = option.decode("utf-8", "replace").partition("=")
        query.setdefault(name, value)
    return query


_servers: dict[asyncio.AbstractEventLoop, list[CoapServer]] = {}


async def start(state: EmulatorState, host: str, port: int, separate: bool = False, **options: float) -> int:
    """Start the CoAP endpoint on the running loop and return the bound UDP port.

    `separate` selects the separate-response path; `options` are CoapServer's `ack_timeout`, `max_retransmit` and
    `max_body_size`.
    """
    server = CoapServer(state, separate, **options)
    bound = await server.start(host, port)
    _servers.setdefault(asyncio.get_running_loop(), []).append(server)
    return bound


async def stop() -> None:
    """Stop every CoAP endpoint started on the running loop."""
    for server in _servers.pop(asyncio.get_running_loop(), []):
        await server.stop()
