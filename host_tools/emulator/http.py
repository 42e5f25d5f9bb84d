"""HTTP side of the emulator: ThingsBoard's device API (`/api/v1/...`) and the inspection API (`/emulator/...`).

A small asyncio HTTP/1.1 server of its own (stdlib only, no framework): keep-alive, Content-Length and chunked
request bodies, pipelined requests answered in order. It answers as ThingsBoard's `DeviceApiController` behind
Spring/Tomcat does (reference section 4): 200 for every provisioning outcome, 401 with an empty body for an unknown
token, 500 with the parser message for bad JSON, 413 from the header alone over the payload limits, 408 when a long
poll times out. Client-side RPC (`POST /{token}/rpc`) is not emulated: 501, as CoAP answers 5.01; a claiming request
is accepted (200) and only logged. Every wait has a deadline so that garbage, slow or stuck clients cost one
connection, never the server: the request head must arrive within `header_timeout` (slowloris, half-open and idle
keep-alive connections are closed then), the body within `body_timeout`, and a client that stops reading is dropped
after `write_timeout`.
Request bodies share one byte budget (`BODY_BUDGET`): a body is read only once its size fits in what is left, and
its bytes stay counted until its answer is written, so that concurrent large uploads wait their turn (in the
kernel's socket buffers) instead of each taking its own 50 MB of memory.

Tokens travel in the URL path, so request paths are redacted before they are logged.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs, unquote, urlsplit

from host_tools.emulator import ota
from host_tools.emulator.ota import OtaError
from host_tools.emulator.state import Device, EmulatorState, PayloadError, RateLimited, RequestError, json_bytes, \
    parse_keys

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 8192
"""Request line plus headers; Tomcat's default `max-http-request-header-size`, which answers 400 beyond it."""

API_PAYLOAD_LIMIT = 52428800
"""`transport.http.max_payload_size` for `/api/v1/**`."""

RPC_PAYLOAD_LIMIT = 65536
"""`transport.http.max_payload_size` for `/api/v1/*/rpc/**` (checked first, so it wins for RPC paths)."""

BODY_BUDGET = 64 * 1024 * 1024
"""Bytes of request bodies held at once, over all connections: one body at the 50 MB limit plus small ones."""

DEFAULT_POLL_TIMEOUT_MS = 60000
"""`transport.http.request_timeout`: how long a long poll waits when the client gives no `timeout`."""

_LINGER_SECONDS = 1.0
_LINGER_BYTES = 2 * 1024 * 1024
_JSON = "application/json"
_TEXT = "text/plain;charset=UTF-8"
_OTA_SHAPES = (("firmware",), ("software",))  # the OTA downloads, from ThingsBoard 3.3 on


@dataclass
class Request:
    """One parsed HTTP request."""

    method: str
    path: str
    segments: list[str]
    query: dict[str, list[str]]
    version: str
    headers: dict[str, str]
    body: bytes = b""

    @property
    def keep_alive(self) -> bool:
        """Whether the connection stays open after the answer (HTTP/1.1 default, HTTP/1.0 only on request)."""
        conn = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return conn == "keep-alive"
        return conn != "close"

    def param(self, name: str) -> str | None:
        """The first value of query parameter `name`, or None."""
        values = self.query.get(name)
        return values[0] if values else None


@dataclass
class Response:
    """An answer: status, body and its content type."""

    status: int
    body: bytes = b""
    content_type: str | None = None
    headers: tuple[tuple[str, str], ...] = ()

    def encode(self, keep_alive: bool) -> bytes:
        """The bytes on the wire (a header character outside Latin-1 is sent as '?', as Tomcat does)."""
        lines = [f"HTTP/1.1 {self.status} {HTTPStatus(self.status).phrase}"]
        if self.content_type and self.body:
            lines.append(f"Content-Type: {self.content_type}")
        lines += [f"{name}: {value}" for name, value in self.headers]
        lines.append(f"Content-Length: {len(self.body)}")
        if not keep_alive:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + self.body


class BodyBudget:
    """The bytes of request bodies held at once, over all connections of one listener."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.left = total
        self._freed = asyncio.Condition()

    async def take(self, n: int) -> None:
        """Wait until `n` more bytes fit in what is left (`n` at most `total`), then count them as held."""
        async with self._freed:
            await self._freed.wait_for(lambda: n <= self.left)
            self.left -= n

    async def give(self, n: int) -> None:
        """Give back `n` bytes taken earlier."""
        if n:
            async with self._freed:
                self.left += n
                self._freed.notify_all()


class BadRequest(Exception):
    """The request cannot be parsed; answered with `status` and the connection is closed."""

    def __init__(self, status: int, reason: str, body: bytes = b""):
        super().__init__(reason)
        self.status = status
        self.body = body


def redact(path: str) -> str:
    """`path` with the access token of a device API path replaced, safe to log."""
    parts = path.split("?", 1)[0].split("/")
    if len(parts) > 3 and parts[1:3] == ["api", "v1"] and parts[3] != "provision":
        parts[3] = "<token>"
    return "/".join(parts)


def payload_limit(path: str) -> int | None:
    """The byte limit ThingsBoard's PayloadSizeFilter applies to `path`, or None when it applies none."""
    parts = path.split("/")
    if parts[1:3] != ["api", "v1"]:
        return None
    if len(parts) >= 5 and parts[4] == "rpc":
        return RPC_PAYLOAD_LIMIT
    return API_PAYLOAD_LIMIT


def error_json(status: int, message: str, error_code: int) -> Response:
    """ThingsBoard's ThingsboardErrorResponse, in its field order."""
    body = {"status": status, "message": message, "errorCode": error_code, "timestamp": int(time.time() * 1000)}
    return Response(status, json_bytes(body), _JSON)


def _inspection_error(status: int, message: str) -> Response:
    return Response(status, json_bytes({"error": message}), _JSON)


class HttpApi:
    """The HTTP listener of one emulator: device API and inspection API over one `EmulatorState`."""

    def __init__(self, state: EmulatorState, *, header_timeout: float = 20.0, body_timeout: float = 20.0,
                 write_timeout: float = 20.0, body_budget: int = BODY_BUDGET,
                 rest: Callable[[Request], Awaitable[Response]] | None = None):
        """`rest` answers the other `/api/` paths (the REST API, host_tools.emulator.rest); without it they are 404."""
        self.state = state
        self.rest = rest
        self.budget = BodyBudget(body_budget)
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.write_timeout = write_timeout
        # Device API routes after the token: feature path ("*" = the RPC request id) -> method -> handler.
        self._routes: dict[tuple[str, ...], dict[str, Callable[[Request, Device, list[str]], Any]]] = {
            ("telemetry",): {"POST": self._post_telemetry},
            ("attributes",): {"POST": self._post_attributes, "GET": self._get_attributes},
            ("attributes", "updates"): {"GET": functools.partial(self._long_poll, "attributes")},
            ("rpc",): {"GET": functools.partial(self._long_poll, "rpc"), "POST": _not_emulated},
            ("rpc", "*"): {"POST": self._rpc_reply},
            ("claim",): {"POST": self._claim},
            ("firmware",): {"GET": functools.partial(self._ota_download, ota.FIRMWARE)},
            ("software",): {"GET": functools.partial(self._ota_download, ota.SOFTWARE)},
        }
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task] = set()

    async def start(self, host: str, port: int) -> int:
        """Listen on `host`:`port` (0 picks a free port) and return the bound port."""
        self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_HEAD_BYTES)
        bound = self._server.sockets[0].getsockname()[1]
        log.info("HTTP device API listening on %s:%d", host, bound)
        return bound

    async def stop(self) -> None:
        """Stop listening and close every open connection (long polls included)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # --- connection handling -------------------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections.add(task)
        peer = writer.get_extra_info("peername")
        try:
            await self._serve_requests(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            log.debug("HTTP client %s went away", peer)
        except TimeoutError:
            log.info("HTTP client %s timed out; connection closed", peer)
        finally:
            self._connections.discard(task)
            if writer.transport.get_write_buffer_size():
                writer.transport.abort()  # a client that stopped reading: drop what it never took
            else:
                writer.close()

    async def _serve_requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            held = [0]  # bytes of the body budget this request holds, given back once it is answered
            try:
                if not await self._serve_request(reader, writer, held):
                    return
            finally:
                await self.budget.give(held[0])

    async def _serve_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                             held: list[int]) -> bool:
        """Read, dispatch and answer one request; whether the connection stays open for another. The body's
        bytes are taken from the budget (and added to held[0]) before they are read."""
        try:
            head = await asyncio.wait_for(self._read_head(reader), self.header_timeout)
            if head is None:
                return False
            request = _parse_head(head)
            limit = payload_limit(request.path)
            length = _content_length(request.headers)
            if limit is not None and length is not None and length > limit:
                raise _too_large(limit)  # PayloadSizeFilter looks at the header only, never at the body
            if length is not None and length > self.budget.total:
                raise _too_large(self.budget.total)  # paths without a payload limit: this emulator's own
            if length:
                # Waiting for other bodies to be answered is not the client's slowness: outside body_timeout.
                await self.budget.take(length)
                held[0] = length
            if request.headers.get("expect", "").lower() == "100-continue":
                await self._write(writer, b"HTTP/1.1 100 Continue\r\n\r\n")

            async def take(n: int) -> None:  # a chunked body takes its bytes chunk by chunk
                await self.budget.take(n)
                held[0] += n

            request.body = await asyncio.wait_for(
                _read_body(reader, request.headers, length, min(limit or API_PAYLOAD_LIMIT, self.budget.total),
                           take), self.body_timeout)
        except BadRequest as e:
            log.info("HTTP bad request from %s: %s", writer.get_extra_info("peername"), e)
            await self._write(writer, Response(e.status, e.body, _JSON).encode(False))
            await self._linger(reader, writer)
            return False
        response = await self._dispatch(request)
        keep = request.keep_alive
        log.debug("HTTP %s %s -> %d", request.method, redact(request.path), response.status)
        await self._write(writer, response.encode(keep))
        return keep

    async def _read_head(self, reader: asyncio.StreamReader) -> bytes | None:
        """The request head up to the blank line; None on a clean close between requests."""
        try:
            return await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError as e:
            raise BadRequest(400, "request head too large") from e
        except asyncio.IncompleteReadError as e:
            if not e.partial.strip():
                return None
            raise BadRequest(400, "connection closed inside the request head") from e

    async def _write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        await asyncio.wait_for(writer.drain(), self.write_timeout)

    async def _linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Half-close, then swallow what the client still sends for a moment so it can read our answer."""
        with contextlib.suppress(OSError, RuntimeError):
            writer.write_eof()
        deadline = asyncio.get_running_loop().time() + _LINGER_SECONDS
        swallowed = 0
        with contextlib.suppress(TimeoutError, ConnectionError):
            while swallowed < _LINGER_BYTES:
                left = deadline - asyncio.get_running_loop().time()
                chunk = await asyncio.wait_for(reader.read(65536), max(left, 0))
                if not chunk:
                    return
                swallowed += len(chunk)

    # --- routing -------------------------------------------------------------------------------------------------

    async def _dispatch(self, request: Request) -> Response:
        try:
            seg = request.segments
            if seg[:2] == ["api", "v1"] and len(seg) > 2:
                return await self._device_api(request, seg[2:])
            if seg[:2] == ["emulator", "devices"]:
                return self._inspection(request, seg[2:])
            if seg[:2] in (["emulator", "ota"], ["emulator", "profiles"]):
                return self._ota_inspection(request, seg[1:])
            if seg[:1] == ["api"] and self.rest is not None:
                return await self.rest(request)
            return error_json(404, "No static resource " + request.path.lstrip("/") + ".", 32)
        except Exception:
            log.exception("HTTP %s %s failed", request.method, redact(request.path))
            return Response(500)

    async def _device_api(self, request: Request, seg: list[str]) -> Response:
        method = request.method
        if seg == ["provision"]:
            if method != "POST":
                return _method_not_allowed(method)
            if not request.body:
                return error_json(400, "Required request body is missing", 31)
            try:
                answer = self.state.provision(request.body, "http")
            except RequestError as e:
                return error_json(500, str(e), 2)
            return Response(200, json_bytes(answer), _negotiate(request))
        token, feature = seg[0], seg[1:]
        shape = tuple(feature[:1]) + (("*",) if feature[:1] == ["rpc"] and len(feature) == 2 else tuple(feature[1:]))
        handlers = self._routes.get(shape) if shape not in _OTA_SHAPES or self.state.at_least(3, 3) else None
        if handlers is None:
            return error_json(404, "No static resource " + redact(request.path).lstrip("/") + ".", 32)
        handler = handlers.get(method)
        if handler is None:
            return _method_not_allowed(method)
        if method == "POST" and not request.body and shape != ("claim",):  # a claim's body is optional (§6.4)
            return error_json(400, "Required request body is missing", 31)
        if shape in _OTA_SHAPES:
            refused = _ota_parameters(request)  # Spring binds them before the token is looked at
            if refused is not None:
                return refused
        device = self.state.device_by_token(token)
        if device is None:
            return Response(401)
        try:
            result = handler(request, device, feature)
            if asyncio.iscoroutine(result):
                result = await result
        except PayloadError as e:
            return Response(500, str(e).encode(), _TEXT)  # the parser's message, as DeviceAuthCallback.onError
        except RateLimited:
            return Response(500)  # over the device's rate limits: 500 with an empty body (reference §8)
        return result

    def _claim(self, request: Request, device: Device, _feature: list[str]) -> Response:
        self.state.claim(device, request.body)
        return Response(200)

    def _post_telemetry(self, request: Request, device: Device, _feature: list[str]) -> Response:
        self.state.post_telemetry(device, request.body)
        return Response(200)

    def _post_attributes(self, request: Request, device: Device, _feature: list[str]) -> Response:
        self.state.post_attributes(device, request.body)
        return Response(200)

    def _get_attributes(self, request: Request, device: Device, _feature: list[str]) -> Response:
        client = parse_keys(request.param("clientKeys"))
        shared = parse_keys(request.param("sharedKeys"))
        return Response(200, json_bytes(self.state.get_attributes(device, client, shared)), _JSON)

    def _rpc_reply(self, request: Request, device: Device, feature: list[str]) -> Response:
        try:
            request_id = int(feature[1])
        except ValueError:
            return error_json(400, f"Failed to convert value of type 'java.lang.String' to required type "
                                    f"'java.lang.Integer'; For input string: \"{feature[1]}\"", 31)
        self.state.record_rpc_reply(device, request_id, request.body)
        return Response(200)

    def _ota_download(self, ota_type: str, request: Request, device: Device, _feature: list[str]) -> Response:
        """GET /{token}/firmware|software?title=&version=[&size=&chunk=] (DeviceApiController.getOtaPackageCallback):
        the bytes with the package's content type and file name; 404 when the device has no package (or a URL
        one), 400 when title or version differ from it; a chunk past the end is an empty 200."""
        status, package = self.state.ota_request(device, ota_type)
        if status != "SUCCESS" or package is None:
            return Response(404)
        if (request.param("title"), request.param("version")) != (package.title, package.version):
            return Response(400)
        data = self.state.package_data(package.id) or b""
        body = ota.chunk(data, int(request.param("size") or 0), int(request.param("chunk") or 0))
        return Response(200, body, package.content_type,
                        (("Content-Disposition", f"attachment;filename={package.file_name}"),
                         ("x-filename", package.file_name or "")))

    async def _long_poll(self, kind: str, request: Request, device: Device, _feature: list[str]) -> Response:
        """Wait for one `kind` event of `device`: 200 with it, 408 on timeout, 403 if the device is deleted."""
        try:
            timeout_ms = int(request.param("timeout") or DEFAULT_POLL_TIMEOUT_MS)
        except ValueError:
            return error_json(400, "Failed to convert value of type 'java.lang.String' to required type 'long'",
                               31)
        loop = asyncio.get_running_loop()
        arrived: asyncio.Future = loop.create_future()

        def on_event(event_kind: str, data: Any) -> bool:
            if event_kind in (kind, "deleted") and not arrived.done():
                arrived.set_result((event_kind, data))
                return True
            return False

        handle = self.state.listen(device.name, on_event)
        if kind == "rpc":
            self.state.rpc_subscribed(device.name)  # a long poll for RPC is a subscription: it gets a waiting one
        try:
            event_kind, data = await asyncio.wait_for(arrived, max(timeout_ms, 0) / 1000)
        except TimeoutError:
            return Response(408)
        finally:
            self.state.unlisten(handle)
        if event_kind == "deleted":
            return Response(403, b"Device was deleted!", _TEXT)
        if event_kind == "rpc":
            rpc_id, rpc_method, params = data
            data = {"id": rpc_id, "method": rpc_method, "params": params}
        return Response(200, json_bytes(data), _JSON)

    def _inspection(self, request: Request, seg: list[str]) -> Response:
        state, method = self.state, request.method
        if not seg:
            return Response(200, json_bytes(state.devices()), _JSON) if method == "GET" \
                else _method_not_allowed(method)
        name, rest = seg[0], seg[1:]
        if state.device(name) is None:
            return _inspection_error(404, f"no device named {name!r}")
        if not rest and method == "GET":
            entry = next(d for d in state.devices() if d["name"] == name)
            return Response(200, json_bytes(entry), _JSON)
        if not rest and method == "DELETE":
            state.delete_device(name)
            return Response(200)
        if rest == ["telemetry"] and method == "GET":
            return Response(200, json_bytes(state.telemetry(name)), _JSON)
        if rest == ["attributes"] and method == "GET":
            return Response(200, json_bytes(state.attributes(name)), _JSON)
        if rest == ["attributes", "shared"] and method == "POST":
            values = _json_body(request)
            if not isinstance(values, dict) or not values:
                return _inspection_error(400, "body must be a non-empty JSON object of shared attributes")
            state.set_shared_attributes(name, values)
            return Response(200)
        if rest == ["attributes", "shared"] and method == "DELETE":
            keys = parse_keys(request.param("keys"))
            if not keys:
                return _inspection_error(400, "query parameter 'keys' (comma-separated) is required")
            state.delete_shared_attributes(name, keys)
            return Response(200)
        if rest == ["rpc"] and method == "POST":
            call = _json_body(request)
            if not isinstance(call, dict) or not isinstance(call.get("method"), str) or not call["method"]:
                return _inspection_error(400, 'body must be a JSON object {"method": "<name>", "params": ...}')
            rpc_id = state.send_rpc(name, call["method"], call.get("params", {}))
            return Response(200, json_bytes({"id": rpc_id}), _JSON)
        if rest == ["rpc"] and method == "GET":
            return Response(200, json_bytes(state.rpc_replies(name)), _JSON)
        if rest == ["ota"]:
            return self._ota_assignment(request, "device", name)
        return _inspection_error(404, f"no inspection resource {method} {request.path}")

    def _ota_inspection(self, request: Request, seg: list[str]) -> Response:
        """`/emulator/ota[/{id}[/data]]` (packages) and `/emulator/profiles/{name}/ota` (a profile's packages)."""
        state, method = self.state, request.method
        if seg[0] == "profiles":
            if len(seg) == 3 and seg[2] == "ota":
                return self._ota_assignment(request, "profile", seg[1])
            return _inspection_error(404, f"no inspection resource {method} {request.path}")
        if len(seg) == 1 and method == "GET":
            return Response(200, json_bytes([p.info() for p in state.packages()]), _JSON)
        if len(seg) == 1 and method == "POST":
            return self._ota_create(request)
        package = state.package(seg[1]) if len(seg) in (2, 3) else None
        if package is None:
            return _inspection_error(404, f"no inspection resource {method} {request.path}" if len(seg) > 3
                                     else f"no OTA package with id {seg[1]!r}")
        if len(seg) == 2 and method == "GET":
            return Response(200, json_bytes(package.info()), _JSON)
        if len(seg) == 2 and method == "DELETE":
            try:
                state.delete_package(package.id)
            except OtaError as e:
                return _inspection_error(400, str(e))
            return Response(200)
        if seg[2:] == ["data"] and method == "GET":
            data = state.package_data(package.id)
            if data is None:
                return _inspection_error(404, "the package has no data")
            return Response(200, data, package.content_type)
        return _inspection_error(404, f"no inspection resource {method} {request.path}")

    def _ota_create(self, request: Request) -> Response:
        """POST /emulator/ota: create a package and, with "text" or "base64", upload its data in the same call."""
        body = _json_body(request)
        if not isinstance(body, dict):
            return _inspection_error(400, "body must be a JSON object describing the package")
        for field in ("title", "version", "profile", "tag", "url", "fileName", "contentType", "checksum"):
            if body.get(field) is not None and not isinstance(body[field], str):
                return _inspection_error(400, f"'{field}' must be a string")
        if not isinstance(body.get("additionalInfo", {}), dict):
            return _inspection_error(400, "'additionalInfo' must be an object")
        if "text" in body and "base64" in body:
            return _inspection_error(400, "give the data as 'text' or as 'base64', not both")
        data = None
        if isinstance(body.get("text"), str):
            data = body["text"].encode()
        elif "text" in body:
            return _inspection_error(400, "'text' must be a string")
        elif "base64" in body:
            try:
                data = base64.b64decode(body["base64"], validate=True)
            except (TypeError, ValueError):
                return _inspection_error(400, "'base64' must be a string of base64")
        state = self.state
        try:
            package = state.create_package(body.get("title"), body.get("version"), body.get("type"),
                                           body.get("profile"), tag=body.get("tag"), url=body.get("url"),
                                           additional_info=body.get("additionalInfo"))
            if data is not None:
                try:
                    package = state.upload_package_data(
                        package.id, data, file_name=body.get("fileName") or f"{package.title}-{package.version}.bin",
                        content_type=body.get("contentType") or "application/octet-stream",
                        checksum_algorithm=body.get("checksumAlgorithm", "SHA256"), checksum=body.get("checksum"))
                except OtaError:
                    state.delete_package(package.id)  # one call, one outcome: no half-made package stays
                    raise
        except OtaError as e:
            return _inspection_error(400, str(e))
        return Response(200, json_bytes(package.info()), _JSON)

    def _ota_assignment(self, request: Request, owner: str, name: str) -> Response:
        """GET or POST the packages of a device or a profile: POST {"type": "FIRMWARE", "package": id or null}."""
        state = self.state
        if request.method == "GET":
            if owner == "device":
                device = state.device(name)
                assert device is not None
                info = {t: {"device": state.device_package_id(name, t),
                            "profile": state.profile_package_id(device.profile, t),
                            "target": (p.info() if (p := state.resolve_package(name, t)) else None)}
                        for t in ota.TYPES}
            else:
                info = {t: state.profile_package_id(name, t) for t in ota.TYPES}
            return Response(200, json_bytes(info), _JSON)
        if request.method != "POST":
            return _method_not_allowed(request.method)
        body = _json_body(request)
        if not isinstance(body, dict) or body.get("type") not in ota.TYPES or \
                not (body.get("package") is None or isinstance(body["package"], str)):
            return _inspection_error(400, 'body must be {"type": "FIRMWARE" or "SOFTWARE", "package": id or null}')
        assign = state.assign_device_package if owner == "device" else state.assign_profile_package
        try:
            assign(name, body["type"], body.get("package"))
        except KeyError:
            return _inspection_error(404, f"no {owner} named {name!r}")
        except OtaError as e:
            return _inspection_error(400, str(e))
        return Response(200)


def _negotiate(request: Request) -> str:
    """Spring's choice for a String body: JSON only when the client asks for it, else text/plain."""
    return _JSON if _JSON in request.headers.get("accept", "") else _TEXT


def _ota_parameters(request: Request) -> Response | None:
    """Spring's 400 for a firmware download whose title or version is missing or whose size or chunk is no int."""
    for name in ("title", "version"):
        if request.param(name) is None:
            return error_json(400, f"Required request parameter '{name}' for method parameter type String is not "
                                    "present", 31)
    for name in ("size", "chunk"):
        value = request.param(name)
        if value and ota.java_int(value) is None:
            return error_json(400, f"Failed to convert value of type 'java.lang.String' to required type 'int'; "
                                    f"For input string: \"{value}\"", 31)
    return None


def _not_emulated(_request: Request, _device: Device, feature: list[str]) -> Response:
    return Response(501, f"{feature[0]} is not emulated over HTTP".encode(), _TEXT)


def _method_not_allowed(method: str) -> Response:
    return error_json(405, f"Request method '{method}' is not supported", 2)


def _json_body(request: Request) -> Any:
    try:
        return json.loads(request.body)
    except ValueError:
        return None


def _parse_head(head: bytes) -> Request:
    """Parse the request line and headers; BadRequest (400) on anything malformed."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError as e:
        raise BadRequest(400, "undecodable request head") from e
    lines = text[:-4].split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[0].isupper() or not parts[1].startswith("/"):
        raise BadRequest(400, "malformed request line")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise BadRequest(505 if version.startswith("HTTP/") else 400, "unsupported protocol version")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or any(c in name for c in " \t"):
            raise BadRequest(400, "malformed header line")
        key = name.lower()
        value = value.strip()
        if key in headers and key in ("content-length", "transfer-encoding", "host"):
            raise BadRequest(400, f"repeated {name} header")
        headers[key] = value
    split = urlsplit(target)
    segments = [unquote(s) for s in split.path.split("/")[1:]]
    if segments and segments[-1] == "":
        segments.pop()
    return Request(method, split.path, segments, parse_qs(split.query, keep_blank_values=True), version, headers)


def _too_large(limit: int) -> BadRequest:
    message = f"Payload size exceeds the limit of {limit} bytes"
    return BadRequest(413, message, json_bytes(message))


def _content_length(headers: dict[str, str]) -> int | None:
    if "transfer-encoding" in headers:
        if "content-length" in headers:
            raise BadRequest(400, "both Content-Length and Transfer-Encoding")
        if headers["transfer-encoding"].lower() != "chunked":
            raise BadRequest(501, "unsupported Transfer-Encoding")
        return None
    value = headers.get("content-length")
    if value is None:
        return 0
    if not value.isdigit():
        raise BadRequest(400, "invalid Content-Length")
    return int(value)


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str], length: int | None,
                     limit: int, take: Callable[[int], Any]) -> bytes:
    """The body by Content-Length, or de-chunked; a chunked body over `limit` is refused with 413, and each of its
    chunks is first taken from the body budget by awaiting `take(size)`."""
    if length is not None:
        return await reader.readexactly(length) if length else b""
    chunks = []
    total = 0
    while True:
        try:
            size_line = await reader.readuntil(b"\r\n")
        except asyncio.LimitOverrunError as e:
            raise BadRequest(400, "chunk size line too long") from e
        size_text = size_line.split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError as e:
            raise BadRequest(400, "invalid chunk size") from e
        if size < 0:
            raise BadRequest(400, "invalid chunk size")
        if size == 0:
            break
        total += size
        if total > limit:
            raise _too_large(limit)
        await take(size)
        chunks.append(await reader.readexactly(size))
        if await reader.readexactly(2) != b"\r\n":
            raise BadRequest(400, "chunk not followed by CRLF")
    while (await reader.readuntil(b"\r\n")) != b"\r\n":
        pass  # trailer fields carry nothing the device API uses
    return b"".join(chunks)


_servers: dict[asyncio.AbstractEventLoop, list[HttpApi]] = {}


async def start(state: EmulatorState, host: str, port: int, **options: Any) -> int:
    """Start the HTTP API on the running loop and return the bound port; `options` are HttpApi's keywords."""
    api = HttpApi(state, **options)
    bound = await api.start(host, port)
    _servers.setdefault(asyncio.get_running_loop(), []).append(api)
    return bound


async def stop() -> None:
    """Stop every HTTP API started on the running loop."""
    for api in _servers.pop(asyncio.get_running_loop(), []):
        await api.stop()
