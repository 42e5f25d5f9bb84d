"""ThingsBoard's REST API (`/api/...`), the subset a fleet operator and the host tools use, over the emulator's state.

Paths, JSON shapes and error bodies are ThingsBoard 4.x's (docs/thingsboard-rest-api.md in the shared notes, and
docs/thingsboard-notes.md in this repository for what was read beyond them):
- login with a tenant administrator from the config file (`users`), JWT access and refresh tokens (HS512) sent as
  `X-Authorization: Bearer <token>`;
- device profiles with their provisioning configuration; devices with their credentials;
- latest telemetry and ranges of it, attributes, attribute writes and deletions (shared ones pushed to the device's
  sessions);
- server-side RPC, one-way and two-way, answered with the device's reply or the status ThingsBoard gives (a request
  waits for the device's RPC subscription until it expires);
- OTA packages: create, upload with a checksum, list, read, download, delete; assigning one is saving a device or
  a profile with its `firmwareId`/`softwareId` (the effects are the state's, host_tools/emulator/ota.py).
Errors are ThingsBoard's `{"status", "message", "errorCode", "timestamp"}` JSON, except where ThingsBoard itself
answers in plain text or with an empty body (telemetry, attributes and RPC endpoints).
"""

from __future__ import annotations

import asyncio
import base64
import decimal
import hmac
import io
import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, TypeVar

import jwt
import multipart

from host_tools.emulator import ota
from host_tools.emulator.http import Request, Response, error_json
from host_tools.emulator.ota import OtaError, OtaPackage
from host_tools.emulator.state import NULL_UUID, DataError, EmulatorState, VersionConflict, entity_uuid, json_bytes

_JSON = "application/json"
_TEXT = "text/plain;charset=UTF-8"
_ISSUER = "thingsboard.io"
_TENANT_ADMIN = "TENANT_ADMIN"
_REFRESH_TOKEN = "REFRESH_TOKEN"

DEFAULT_RPC_TIMEOUT_MS = 10000
"""`server.rest.server_side_rpc.default_timeout`: an RPC without `timeout` waits this long."""

MIN_RPC_TIMEOUT_MS = 5000
"""`server.rest.server_side_rpc.min_timeout`: a shorter `timeout` is raised to this."""

# Attribute scopes in the REST API and in the state.
_SCOPES = {"CLIENT_SCOPE": "client", "SHARED_SCOPE": "shared", "SERVER_SCOPE": "server"}
_DEVICE_NOT_FOUND = "Device with requested id wasn't found!"
_JAVA_INT = re.compile(r"[-+]?[0-9]+")

Handler = Callable[..., Awaitable[Response] | Response]
T = TypeVar("T")


class _Refusal(Exception):
    """Ends a request with `response` (an error found deep in a handler)."""

    def __init__(self, response: Response):
        super().__init__(response.status)
        self.response = response


def _ok(value: Any) -> Response:
    return Response(200, json_bytes(value), _JSON)


def _text(status: int, message: str) -> Response:
    return Response(status, message.encode(), _TEXT)


def _bad_request(message: str) -> _Refusal:
    return _Refusal(error_json(400, message, 31))


def _not_found(what: str, entity_id: str) -> _Refusal:
    return _Refusal(error_json(404, f"{what} with id [{entity_id}] is not found", 32))


def _uuid(text: str) -> str:
    """A path id as a canonical UUID; 400 "Invalid UUID string" otherwise (BaseController.toUUID)."""
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise _bad_request(f"Invalid UUID string: {text}") from None


def _find(what: str, lookup: Callable[[str], T | None], entity_id: str) -> T:
    """The entity `lookup` finds for a path id; 400 for a malformed id, 404 naming `what` for an unknown one."""
    entity_id = _uuid(entity_id)
    found = lookup(entity_id)
    if found is None:
        raise _not_found(what, entity_id)
    return found


def _auth_body(request: Request) -> dict:
    """The JSON object the login and refresh filters read; {} when unreadable; 401 for a method other than POST."""
    if request.method != "POST":
        raise _Refusal(error_json(401, "Authentication method not supported", 10))
    try:
        body = json.loads(request.body)
    except (ValueError, RecursionError):  # RecursionError: nesting too deep for the parser
        return {}
    return body if isinstance(body, dict) else {}


def _json_object(request: Request) -> dict:
    """The request body as a JSON object; 400 "Invalid request body" otherwise (HttpMessageNotReadable)."""
    try:
        body = json.loads(request.body)
    except (ValueError, RecursionError):
        body = None
    if not isinstance(body, dict):
        raise _bad_request("Invalid request body")
    return body


def _int_param(request: Request, name: str, bits: int = 32) -> int:
    """A required int (or with bits=64 long) query parameter as Spring binds it: ASCII digits and a sign."""
    java_type = "int" if bits == 32 else "long"
    text = request.param(name)
    if text is None:
        raise _bad_request(f"Required request parameter '{name}' for method parameter type {java_type} is not "
                           "present")
    if not _JAVA_INT.fullmatch(text) or not -2 ** (bits - 1) <= int(text) < 2 ** (bits - 1):
        raise _bad_request(f"Failed to convert value of type 'java.lang.String' to required type '{java_type}'; "
                           f"For input string: \"{text}\"")
    return int(text)


def _long_param(request: Request, name: str) -> int:
    return _int_param(request, name, 64)


def _strict(request: Request) -> bool:
    """useStrictDataTypes=true: native JSON values instead of strings."""
    return (request.param("useStrictDataTypes") or "").lower() == "true"


def _keys(request: Request) -> list[str] | None:
    """`keys=a,b` (or, from 4.3, repeated `key=`); None when neither is given."""
    keys = [k.strip() for k in (request.param("keys") or "").split(",") if k.strip()]
    keys += [k for k in request.query.get("key", []) if k]
    return keys or None


def java_double(value: float) -> str:
    """Java's Double.toString: plain from 10^-3 to below 10^7, else computerized scientific (1.0E7)."""
    if value == 0 or 1e-3 <= abs(value) < 1e7:
        return repr(value)
    sign, digits, exponent = decimal.Decimal(repr(value)).normalize().as_tuple()
    text = "".join(map(str, digits))
    power = len(digits) - 1 + exponent
    return ("-" if sign else "") + text[0] + "." + (text[1:] or "0") + f"E{power}"


def _as_string(value: Any) -> str:
    """A telemetry value as the REST API shows it without useStrictDataTypes (KvEntry.getValueAsString)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return java_double(value)
    if isinstance(value, (int, str)):
        return str(value)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def page(items: list[dict], request: Request, text_of: Callable[[dict], str],
         sort_keys: dict[str, Callable[[dict], Any]]) -> dict:
    """PageData of `items` for the request's pageSize, page, textSearch, sortProperty and sortOrder."""
    size = _int_param(request, "pageSize")
    number = _int_param(request, "page")
    if size < 1:
        raise _bad_request(f"Incorrect page link page size '{size}'. Page size must be greater than zero.")
    if number < 0:
        raise _bad_request(f"Incorrect page link page '{number}'. Page must be positive integer.")
    search = (request.param("textSearch") or "").lower()
    if search:
        items = [item for item in items if search in text_of(item).lower()]
    order = request.param("sortOrder") or "ASC"
    if order not in ("ASC", "DESC"):
        raise _bad_request(f"Unsupported sort order '{order}'! Only 'ASC' or 'DESC' types are allowed.")
    prop = request.param("sortProperty")
    if prop:
        if prop not in sort_keys:
            raise _bad_request(f"Unsupported sort property '{prop}'; one of {', '.join(sort_keys)}")
        # Nulls last ascending and first descending, as PostgreSQL sorts them.
        items = sorted(items, key=lambda item: (sort_keys[prop](item) is None, sort_keys[prop](item)),
                       reverse=order == "DESC")
    total = len(items)
    start = size * number
    return {"data": items[start:start + size], "totalPages": -(-total // size), "totalElements": total,
            "hasNext": start + size < total}


class RestApi:
    """The REST API of one emulator; `handle` answers every request under `/api/` but the device API."""

    def __init__(self, state: EmulatorState):
        self.state = state
        # (method, path pattern) -> handler; "{}" in a pattern matches one segment, passed to the handler.
        self._routes: list[tuple[str, tuple[str, ...], Handler]] = [
            ("POST", ("auth", "logout"), lambda _r, _u: Response(200)),
            ("GET", ("auth", "user"), self._current_user),
            ("GET", ("deviceProfiles",), self._list_profiles),
            ("GET", ("deviceProfileInfos",), self._list_profile_infos),
            ("GET", ("deviceProfile", "{}"), self._get_profile),
            ("GET", ("deviceProfileInfo", "{}"), self._get_profile_info),
            ("POST", ("deviceProfile",), self._save_profile),
            ("DELETE", ("deviceProfile", "{}"), self._delete_profile),
            ("GET", ("tenant", "devices"), self._list_devices),
            ("GET", ("tenant", "deviceInfos"), self._list_device_infos),
            ("GET", ("tenant", "device"), self._device_by_name),
            ("GET", ("device", "{}"), self._get_device),
            ("POST", ("device",), self._save_device),
            ("DELETE", ("device", "{}"), self._delete_device),
            ("GET", ("device", "{}", "credentials"), self._get_credentials),
            ("GET", ("plugins", "telemetry", "{}", "{}", "values", "timeseries"), self._latest_timeseries),
            ("GET", ("plugins", "telemetry", "{}", "{}", "values", "timeseries", "history"), self._history),
            ("GET", ("plugins", "telemetry", "{}", "{}", "keys", "timeseries"), self._timeseries_keys),
            ("GET", ("plugins", "telemetry", "{}", "{}", "values", "attributes"), self._attributes),
            ("GET", ("plugins", "telemetry", "{}", "{}", "values", "attributes", "{}"), self._attributes),
            ("GET", ("plugins", "telemetry", "{}", "{}", "keys", "attributes"), self._attribute_keys),
            ("GET", ("plugins", "telemetry", "{}", "{}", "keys", "attributes", "{}"), self._attribute_keys),
            ("POST", ("plugins", "telemetry", "{}", "{}", "attributes", "{}"), self._save_attributes),
            ("POST", ("plugins", "telemetry", "{}", "{}", "{}"), self._save_attributes),
            ("POST", ("plugins", "telemetry", "{}", "{}"), self._save_device_attributes),
            ("DELETE", ("plugins", "telemetry", "{}", "{}", "{}"), self._delete_attributes),
            ("DELETE", ("plugins", "telemetry", "{}", "{}"), self._delete_device_attributes),
            ("POST", ("plugins", "rpc", "{}", "{}"), self._rpc_v1),
            ("POST", ("rpc", "{}", "{}"), self._rpc_v2),
            ("POST", ("otaPackage",), self._save_package_info),
            ("POST", ("otaPackage", "{}"), self._save_package_data),
            ("GET", ("otaPackage", "{}"), self._get_package),
            ("DELETE", ("otaPackage", "{}"), self._delete_package),
            ("GET", ("otaPackage", "info", "{}"), self._get_package_info),
            ("GET", ("otaPackage", "{}", "download"), self._download_package),
            ("GET", ("otaPackages",), self._list_packages),
            ("GET", ("otaPackages", "{}", "{}"), self._list_profile_packages),
        ]

    async def handle(self, request: Request) -> Response:
        """Answer one request whose path starts with /api/ (and is not the device API /api/v1/)."""
        seg = request.segments[1:]
        try:
            if seg == ["auth", "login"]:
                return self._login(request)
            if seg == ["auth", "token"]:
                return self._refresh(request)
            user = self._authenticate(request)
            handler, args, allowed = self._route(request.method, seg)
            if handler is None:
                if allowed:
                    return error_json(405, f"Request method '{request.method}' is not supported", 2)
                return error_json(404, "No static resource " + request.path.lstrip("/") + ".", 32)
            result = handler(request, user, *args)
            return await result if asyncio.iscoroutine(result) else result
        except _Refusal as e:
            return e.response
        except (DataError, OtaError) as e:
            return error_json(400, str(e), 31)
        except VersionConflict as e:
            return error_json(409, str(e), 35)

    def _route(self, method: str, seg: list[str]) -> tuple[Handler | None, list[str], bool]:
        """(handler, its path arguments, whether the path exists for another method)."""
        allowed = False
        for route_method, pattern, handler in self._routes:
            if len(pattern) != len(seg) or any(p not in ("{}", s) for p, s in zip(pattern, seg, strict=True)):
                continue
            if route_method == method:
                return handler, [s for p, s in zip(pattern, seg, strict=True) if p == "{}"], True
            allowed = True
        return None, [], allowed

    # --- authentication ------------------------------------------------------------------------------------------

    def _user_id(self, email: str) -> str:
        return str(uuid.uuid5(uuid.UUID(self.state.tenant_id), email.lower()))

    def _token_pair(self, user: dict) -> dict:
        """JwtPair for `user`: an access token with the user's claims and a refresh token (JwtTokenFactory)."""
        now = int(time.time())
        settings = self.state.jwt_settings
        session = str(uuid.uuid4())
        common = {"sub": user["email"], "userId": self._user_id(user["email"]), "sessionId": session,
                  "iss": _ISSUER, "iat": now}
        access = {**common, "scopes": [_TENANT_ADMIN], "exp": now + settings["tokenExpirationTime"],
                  "firstName": user.get("firstName"), "lastName": user.get("lastName"), "enabled": True,
                  "isPublic": False, "tenantId": self.state.tenant_id, "customerId": NULL_UUID}
        refresh = {**common, "scopes": [_REFRESH_TOKEN], "exp": now + settings["refreshTokenExpTime"],
                   "isPublic": False, "jti": str(uuid.uuid4())}
        key = self.state.jwt_signing_key()
        return {"token": jwt.encode(access, key, "HS512"), "refreshToken": jwt.encode(refresh, key, "HS512")}

    def _login(self, request: Request) -> Response:
        """POST /api/auth/login; every failure is 401 with errorCode 10 (RestAwareAuthenticationFailureHandler)."""
        body = _auth_body(request)
        if not isinstance(body.get("username"), str) or not isinstance(body.get("password"), str) or \
                not body["username"].strip() or not body["password"]:
            return error_json(401, "Authentication failed", 10)
        user = self.state.users.get(body["username"].lower())
        if user is None or not _same(user["password"], body["password"]):
            self.state.event("REST login refused: invalid username or password")
            return error_json(401, "Invalid username or password", 10)
        self.state.event(f"REST login of {user['email']!r}")
        return _ok(self._token_pair(user))

    def _refresh(self, request: Request) -> Response:
        """POST /api/auth/token with {"refreshToken"}: a new pair (RefreshTokenProcessingFilter)."""
        token = _auth_body(request).get("refreshToken")
        if not isinstance(token, str) or not token.strip():
            return error_json(401, "Authentication failed", 10)
        claims = self._claims(token)
        if claims.get("scopes", [None])[0] != _REFRESH_TOKEN:
            return error_json(401, "Authentication failed", 10)
        return _ok(self._token_pair(self._user_of(claims)))

    def _claims(self, token: str) -> dict:
        """The verified claims of a token; 401 as ThingsBoard answers a bad or expired one."""
        try:
            return jwt.decode(token, self.state.jwt_signing_key(), algorithms=["HS512"], issuer=_ISSUER,
                              options={"require": ["exp", "sub", "scopes"]})
        except (jwt.ExpiredSignatureError, jwt.InvalidSignatureError):
            # JwtTokenFactory.parseTokenClaims reports a bad signature as an expired token too (4.3).
            raise _Refusal(error_json(401, "Token has expired", 11)) from None
        except jwt.InvalidTokenError:
            raise _Refusal(error_json(401, "Invalid username or password", 10)) from None

    def _user_of(self, claims: dict) -> dict:
        user = self.state.users.get(str(claims["sub"]).lower())
        if user is None or self._user_id(user["email"]) != claims.get("userId"):
            # A user no longer in the config: UsernameNotFoundException, answered as bad credentials.
            raise _Refusal(error_json(401, "Invalid username or password", 10))
        return user

    def _authenticate(self, request: Request) -> dict:
        """The user a request's bearer token names; 401 without one, 403 for a token that is no access token."""
        header = request.headers.get("x-authorization") or request.headers.get("authorization") or ""
        if not header.strip():
            raise _Refusal(error_json(401, "Authentication failed", 10))
        if self.state.at_least(4, 3) and not header.startswith("Bearer "):
            raise _Refusal(error_json(401, "Authentication failed", 10))
        claims = self._claims(header[len("Bearer "):])
        user = self._user_of(claims)
        if claims["scopes"] != [_TENANT_ADMIN]:
            raise _Refusal(error_json(403, "You don't have permission to perform this operation!", 20))
        return user

    def _current_user(self, _request: Request, user: dict) -> Response:
        return _ok({"id": {"entityType": "USER", "id": self._user_id(user["email"])}, "createdTime": 0,
                    "tenantId": {"entityType": "TENANT", "id": self.state.tenant_id},
                    "customerId": {"entityType": "CUSTOMER", "id": NULL_UUID}, "email": user["email"],
                    "authority": _TENANT_ADMIN, "firstName": user.get("firstName"),
                    "lastName": user.get("lastName"), "name": user["email"], "additionalInfo": {}})

    # --- device profiles -----------------------------------------------------------------------------------------

    _PROFILE_SORT = {"createdTime": lambda p: p["createdTime"], "name": lambda p: p["name"],
                     "type": lambda p: p["type"], "transportType": lambda p: p["transportType"],
                     "description": lambda p: p["description"], "isDefault": lambda p: p["default"]}

    def _list_profiles(self, request: Request, _user: dict) -> Response:
        return _ok(page(self.state.profiles(), request, lambda p: p["name"], self._PROFILE_SORT))

    def _list_profile_infos(self, request: Request, _user: dict) -> Response:
        infos = page(self.state.profiles(), request, lambda p: p["name"], self._PROFILE_SORT)
        infos["data"] = [_profile_info(p) for p in infos["data"]]
        return _ok(infos)

    def _profile(self, profile_id: str) -> dict:
        return _find("Device profile", self.state.profile_by_id, profile_id)

    def _get_profile(self, _request: Request, _user: dict, profile_id: str) -> Response:
        return _ok(self._profile(profile_id))

    def _get_profile_info(self, _request: Request, _user: dict, profile_id: str) -> Response:
        return _ok(_profile_info(self._profile(profile_id)))

    def _save_profile(self, request: Request, _user: dict) -> Response:
        body = _json_object(request)
        try:
            return _ok(self.state.save_profile(body))
        except KeyError as e:
            raise _not_found("Device profile", e.args[0]) from None

    def _delete_profile(self, _request: Request, _user: dict, profile_id: str) -> Response:
        self.state.delete_profile(self._profile(profile_id)["id"]["id"])
        return Response(200)

    # --- devices -------------------------------------------------------------------------------------------------

    _DEVICE_SORT = {"createdTime": lambda d: d["createdTime"], "name": lambda d: d["name"],
                    "deviceProfileName": lambda d: d["type"], "type": lambda d: d["type"],
                    "label": lambda d: d["label"], "customerTitle": lambda d: None}

    def _list_devices(self, request: Request, _user: dict) -> Response:
        """GET /api/tenant/devices: PageData (type = profile name), or one Device for ?deviceName=."""
        if request.param("deviceName") is not None and "pageSize" not in request.query:
            return self._device_by_name(request, _user)
        devices = self.state.device_entities()
        kind = request.param("type")
        if kind:
            devices = [d for d in devices if d["type"] == kind]
        return _ok(page(devices, request, lambda d: d["name"] + "\0" + (d["label"] or ""), self._DEVICE_SORT))

    def _device_by_name(self, request: Request, _user: dict) -> Response:
        """One Device by `deviceName` (GET /api/tenant/devices?deviceName=, and /api/tenant/device from 4.3.1.2)."""
        if request.segments[-1] == "device" and not self.state.at_least(4, 3, 1, 2):
            return error_json(404, "No static resource " + request.path.lstrip("/") + ".", 32)
        name = request.param("deviceName")
        if name is None:
            raise _bad_request("Required request parameter 'deviceName' for method parameter type String is not "
                               "present")
        found = next((d for d in self.state.device_entities() if d["name"] == name), None)
        if found is None:
            return error_json(404, "Requested item wasn't found!", 32)
        return _ok(found)

    def _list_device_infos(self, request: Request, _user: dict) -> Response:
        """GET /api/tenant/deviceInfos: by profile name (`type`) or, when it is absent, `deviceProfileId`."""
        devices = self.state.device_entities()
        kind, profile_id = request.param("type"), request.param("deviceProfileId")
        if kind:
            devices = [d for d in devices if d["type"] == kind]
        elif profile_id:
            profile_id = _uuid(profile_id)
            devices = [d for d in devices if d["deviceProfileId"]["id"] == profile_id]
        infos = [{**d, "customerTitle": None, "customerIsPublic": False, "deviceProfileName": d["type"],
                  "active": False} for d in devices]
        return _ok(page(infos, request, lambda d: d["name"] + "\0" + (d["label"] or "") + "\0" + d["type"],
                        self._DEVICE_SORT))

    def _device(self, device_id: str) -> dict:
        return _find("Device", self.state.device_entity, device_id)

    def _get_device(self, _request: Request, _user: dict, device_id: str) -> Response:
        return _ok(self._device(device_id))

    def _save_device(self, request: Request, _user: dict) -> Response:
        body = _json_object(request)
        try:
            return _ok(self.state.save_device_entity(body, request.param("accessToken")))
        except KeyError as e:
            raise _not_found("Device", e.args[0]) from None

    def _delete_device(self, _request: Request, _user: dict, device_id: str) -> Response:
        self.state.delete_device(self._device(device_id)["name"])
        return Response(200)

    def _get_credentials(self, _request: Request, _user: dict, device_id: str) -> Response:
        credentials = self.state.credentials_entity(self._device(device_id)["id"]["id"])
        assert credentials is not None
        return _ok(credentials)

    # --- telemetry and attributes (TelemetryController) ----------------------------------------------------------

    def _telemetry_device(self, entity_type: str, entity_id: str) -> str:
        """The device name behind a telemetry path; plain-text 404 for an unknown one (AccessValidator)."""
        if entity_type != "DEVICE":
            raise _bad_request(f"Entity type {entity_type} is not emulated; only DEVICE")
        name = self.state.device_name(_uuid(entity_id))
        if name is None:
            raise _Refusal(_text(404, _DEVICE_NOT_FOUND))
        return name

    def _latest_timeseries(self, request: Request, _user: dict, entity_type: str, entity_id: str) -> Response:
        """Latest values: {key: [{"ts", "value"}]}, values as strings unless useStrictDataTypes=true.

        With startTs and endTs (and `keys`, which the mapping requires before 4.3.1.2) it is the range query.
        """
        name = self._telemetry_device(entity_type, entity_id)
        keys = _keys(request)
        ranged = "startTs" in request.query and "endTs" in request.query
        if ranged and (keys is not None or self.state.at_least(4, 3, 1, 2)):
            return self._timeseries_range(request, name, keys)
        strict = _strict(request)
        latest = self.state.latest_telemetry(name)
        now = int(time.time() * 1000)
        answer = {}
        for key in keys if keys is not None else sorted(latest):
            ts, value = latest.get(key, (now, None))
            answer[key] = [{"ts": ts, "value": value if strict or value is None else _as_string(value)}]
        return _ok(answer)

    def _history(self, request: Request, _user: dict, entity_type: str, entity_id: str) -> Response:
        """GET .../values/timeseries/history (4.3.1.2+): the range query under its own path."""
        if not self.state.at_least(4, 3, 1, 2):
            return error_json(404, "No static resource " + request.path.lstrip("/") + ".", 32)
        name = self._telemetry_device(entity_type, entity_id)
        for required in ("startTs", "endTs"):
            if required not in request.query:
                raise _bad_request(f"Required request parameter '{required}' for method parameter type Long is "
                                   "not present")
        return self._timeseries_range(request, name, _keys(request))

    def _timeseries_range(self, request: Request, name: str, keys: list[str] | None) -> Response:
        """Raw points with startTs <= ts < endTs, per key at most `limit` (100), newest first unless orderBy=ASC.

        Only agg=NONE is emulated; keys without points are left out (DefaultTbTelemetryService.getTimeseries).
        """
        start, end = _long_param(request, "startTs"), _long_param(request, "endTs")
        limit = _int_param(request, "limit") if "limit" in request.query else 100
        agg = request.param("agg") or "NONE"
        if agg != "NONE":
            raise _bad_request(f"Aggregation {agg} is not emulated; only NONE")
        order = request.param("orderBy") or "DESC"
        if order not in ("ASC", "DESC"):
            raise _bad_request(f"Unsupported sort order '{order}'! Only 'ASC' or 'DESC' types are allowed.")
        strict = _strict(request)
        points = self.state.telemetry_points(name, start, end)
        answer = {}
        for key in keys if keys is not None else sorted(points):
            if key in points:
                stamps = sorted(points[key], reverse=order == "DESC")[:max(limit, 0)]
                answer[key] = [{"ts": ts, "value": points[key][ts] if strict else _as_string(points[key][ts])}
                               for ts in stamps]
        return _ok(answer)

    def _timeseries_keys(self, _request: Request, _user: dict, entity_type: str, entity_id: str) -> Response:
        return _ok(sorted(self.state.latest_telemetry(self._telemetry_device(entity_type, entity_id))))

    def _scope_entries(self, name: str, scope: str | None) -> list[tuple[str, Any, int]]:
        if scope is None:
            return [e for s in _SCOPES.values() for e in self.state.attribute_entries(name, s)]
        if scope not in _SCOPES:
            raise _bad_request(f"Failed to convert value of type 'java.lang.String' to required type "
                               f"'org.thingsboard.server.common.data.AttributeScope'; No enum constant "
                               f"org.thingsboard.server.common.data.AttributeScope.{scope}")
        return self.state.attribute_entries(name, _SCOPES[scope])

    def _attributes(self, request: Request, _user: dict, entity_type: str, entity_id: str,
                    scope: str | None = None) -> Response:
        """[{"lastUpdateTs", "key", "value"}] with native values; missing keys are left out."""
        name = self._telemetry_device(entity_type, entity_id)
        keys = _keys(request)
        return _ok([{"lastUpdateTs": ts, "key": key, "value": value}
                    for key, value, ts in self._scope_entries(name, scope) if keys is None or key in keys])

    def _attribute_keys(self, _request: Request, _user: dict, entity_type: str, entity_id: str,
                        scope: str | None = None) -> Response:
        name = self._telemetry_device(entity_type, entity_id)
        return _ok([key for key, _value, _ts in self._scope_entries(name, scope)])

    def _save_device_attributes(self, request: Request, user: dict, device_id: str, scope: str) -> Response:
        return self._save_attributes(request, user, "DEVICE", device_id, scope)

    def _save_attributes(self, request: Request, _user: dict, entity_type: str, entity_id: str, *rest: str
                         ) -> Response:
        """POST .../attributes/{scope} or .../{scope}: 200 with an empty body; plain-text 400 for bad input."""
        scope = rest[-1]
        name = self._telemetry_device(entity_type, entity_id)
        if scope not in _SCOPES:
            self._scope_entries(name, scope)  # raises the enum conversion error
        if scope == "CLIENT_SCOPE":
            return _text(400, f"Invalid scope: {scope}")
        try:
            values = json.loads(request.body)
        except (ValueError, RecursionError):
            return _text(400, "Invalid JSON")
        if not isinstance(values, dict):
            return _text(400, "Request is not a JSON object")
        if not values:
            return _text(400, "No attributes data found in request body!")
        if any(not key.strip() for key in values):
            return _text(400, "Key cannot be blank" if self.state.at_least(4, 2)
                         else "Key cannot be empty or contains only spaces")
        self.state.save_attributes(name, _SCOPES[scope], values)
        return Response(200)

    def _delete_device_attributes(self, request: Request, user: dict, device_id: str, scope: str) -> Response:
        return self._delete_attributes(request, user, "DEVICE", device_id, scope)

    def _delete_attributes(self, request: Request, _user: dict, entity_type: str, entity_id: str, scope: str
                           ) -> Response:
        """DELETE .../{scope}?keys=a,b (or repeated key=): 200 with an empty body; shared deletions are pushed."""
        name = self._telemetry_device(entity_type, entity_id)
        self._scope_entries(name, scope)  # an unknown scope is the enum conversion error
        keys = _keys(request)
        if keys is None:
            return _text(400, "Empty keys: []")
        self.state.delete_attributes(name, _SCOPES[scope], keys)
        return Response(200)

    # --- server-side RPC (RpcV1Controller, RpcV2Controller) ------------------------------------------------------

    def _rpc_v1(self, request: Request, _user: dict, kind: str, device_id: str) -> Awaitable[Response]:
        return self._rpc(request, kind, device_id, v2=False)

    def _rpc_v2(self, request: Request, _user: dict, kind: str, device_id: str) -> Awaitable[Response]:
        return self._rpc(request, kind, device_id, v2=True)

    async def _rpc(self, request: Request, kind: str, device_id: str, v2: bool) -> Response:
        """Send an RPC and wait for the reply (two-way) or the delivery (one-way) until it expires.

        Expiry: `expirationTime`, else now + max(timeout, 5 s). On expiry V2 answers 504; V1 answers 408 when the
        request reached a session subscribed to RPC and 409 when none was (ThingsBoard's NO_ACTIVE_CONNECTION).
        """
        if kind not in ("oneway", "twoway"):
            return error_json(404, "No static resource " + request.path.lstrip("/") + ".", 32)
        device_id = _uuid(device_id)
        body = _json_object(request)
        name = self.state.device_name(device_id)
        if name is None:
            return _text(404, _DEVICE_NOT_FOUND)
        method = body.get("method")
        if not isinstance(method, str) or not method:
            raise _bad_request("Invalid request body")
        if body.get("persistent"):
            raise _bad_request("Persistent RPC is not emulated")
        timeout_ms, expiration = body.get("timeout", DEFAULT_RPC_TIMEOUT_MS), body.get("expirationTime")
        for value in (timeout_ms, expiration):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise _bad_request("Invalid request body")
        now_ms = int(time.time() * 1000)
        deadline_ms = expiration if expiration else now_ms + max(timeout_ms or 0, MIN_RPC_TIMEOUT_MS)
        loop = asyncio.get_running_loop()
        # Resolved with ("reply", reply) for a two-way request, with ("sent", None) for a one-way one.
        outcome: asyncio.Future = loop.create_future()
        sent: dict[str, Any] = {}

        def on_event(event_kind: str, data: Any) -> bool:
            if outcome.done() or "id" not in sent:
                return False
            if event_kind == "rpc_reply" and data[0] == sent["id"]:
                outcome.set_result(("reply", data[1]))
            elif event_kind == "rpc_delivered" and data == sent["id"]:
                sent["delivered"] = True
                if kind == "oneway":
                    outcome.set_result(("sent", None))
            return False

        handle = self.state.listen(name, on_event)
        try:
            sent["id"], sent["delivered"] = self.state.call_rpc(name, method, body.get("params", {}), deadline_ms)
            if kind == "oneway" and sent["delivered"]:
                return Response(200)
            try:
                what, result = await asyncio.wait_for(outcome, max(deadline_ms - now_ms, 0) / 1000)
            except TimeoutError:
                status = 504 if v2 else 408 if sent["delivered"] else 409
                self.state.event(f"rpc {sent['id']} to {name!r} expired: REST answer {status}")
                return Response(status)
        finally:
            self.state.unlisten(handle)
            if "id" in sent:
                self.state.forget_rpc(name, sent["id"])
        return Response(200) if what == "sent" else _ok(result)

    # --- OTA packages (OtaPackageController) ---------------------------------------------------------------------

    _PACKAGE_SORT = {"createdTime": lambda p: p["createdTime"], "type": lambda p: p["type"],
                     "title": lambda p: p["title"], "version": lambda p: p["version"], "tag": lambda p: p["tag"],
                     "url": lambda p: p["url"], "fileName": lambda p: p["fileName"],
                     "dataSize": lambda p: p["dataSize"], "checksum": lambda p: p["checksum"]}

    def _package_json(self, package: OtaPackage) -> dict:
        """OtaPackageInfo as ThingsBoard shows it (`name` is the title)."""
        profile_id = self.state.profile_id(package.profile) if package.profile else None
        return {"id": {"entityType": "OTA_PACKAGE", "id": package.id}, "createdTime": package.created_time,
                "tenantId": {"entityType": "TENANT", "id": self.state.tenant_id},
                "deviceProfileId": profile_id and {"entityType": "DEVICE_PROFILE", "id": profile_id},
                "type": package.type, "title": package.title, "version": package.version, "tag": package.tag,
                "url": package.url, "hasData": package.has_data, "fileName": package.file_name,
                "contentType": package.content_type, "checksumAlgorithm": package.checksum_algorithm,
                "checksum": package.checksum, "dataSize": package.data_size, "externalId": None,
                "name": package.title, "additionalInfo": package.additional_info}

    def _package(self, package_id: str) -> OtaPackage:
        return _find("Ota package", self.state.package, package_id)

    def _save_package_info(self, request: Request, _user: dict) -> Response:
        """POST /api/otaPackage: a package without data yet (or a URL package, with `usesUrl`)."""
        body = _json_object(request)
        if body.get("id") is not None:
            self._package(_id_text(body["id"]))
            raise _bad_request("Updating an OTA package's info is not emulated; delete it and create it again")
        url = body.get("url") if body.get("usesUrl") else None
        if body.get("usesUrl") and (not isinstance(url, str) or not url.strip()):
            raise _bad_request("Ota package URL should be specified!")
        profile = None
        profile_id = entity_uuid(body.get("deviceProfileId"))
        if profile_id is not None:
            profile = self.state.profile_name(profile_id)
            if profile is None:
                raise _bad_request("OtaPackage is referencing to non-existent device profile!")
        info = body.get("additionalInfo")
        for field in ("title", "version", "tag"):
            if body.get(field) is not None and not isinstance(body[field], str):
                raise _bad_request(f"OtaPackage {field} must be a string")
        package = self.state.create_package(body.get("title"), body.get("version"), body.get("type"), profile,
                                            tag=body.get("tag"), url=url,
                                            additional_info=info if isinstance(info, dict) else None)
        return _ok(self._package_json(package))

    def _save_package_data(self, request: Request, _user: dict, package_id: str) -> Response:
        """POST /api/otaPackage/{id}?checksumAlgorithm=[&checksum=]: the file as multipart part `file`.

        checksumAlgorithm and checksum are query parameters; older clients send them as form fields, taken too.
        """
        package = self._package(package_id)
        form = _multipart(request)
        algorithm = request.param("checksumAlgorithm") or form.get("checksumAlgorithm")
        checksum = request.param("checksum") or form.get("checksum") or None
        if not algorithm:
            raise _bad_request("Required request parameter 'checksumAlgorithm' for method parameter type String "
                               "is not present")
        if algorithm not in ota.CHECKSUM_ALGORITHMS:
            raise _bad_request(f"No enum constant org.thingsboard.server.common.data.ota.ChecksumAlgorithm."
                               f"{algorithm}")
        part = form.get("file")
        if not isinstance(part, _FilePart):
            raise _bad_request("Required part 'file' is not present.")
        uploaded = self.state.upload_package_data(package.id, part.data, file_name=part.file_name,
                                                  content_type=part.content_type, checksum_algorithm=algorithm,
                                                  checksum=checksum)
        return _ok(self._package_json(uploaded))

    def _list_packages(self, request: Request, _user: dict) -> Response:
        packages = [self._package_json(p) for p in self.state.packages()]
        return _ok(page(packages, request, lambda p: p["title"], self._PACKAGE_SORT))

    def _list_profile_packages(self, request: Request, _user: dict, profile_id: str, ota_type: str) -> Response:
        """GET /api/otaPackages/{deviceProfileId}/{type}: the profile's packages of that type with data or a URL."""
        profile = self.state.profile_name(_uuid(profile_id))
        if ota_type not in ota.TYPES:
            raise _bad_request(f"No enum constant org.thingsboard.server.common.data.ota.OtaPackageType.{ota_type}")
        found = [] if profile is None else self.state.packages(profile, ota_type, assignable=True)
        return _ok(page([self._package_json(p) for p in found], request, lambda p: p["title"],
                        self._PACKAGE_SORT))

    def _get_package_info(self, _request: Request, _user: dict, package_id: str) -> Response:
        return _ok(self._package_json(self._package(package_id)))

    def _get_package(self, _request: Request, _user: dict, package_id: str) -> Response:
        """GET /api/otaPackage/{id}: OtaPackage, the info with `data` (base64, as Jackson writes a ByteBuffer)."""
        package = self._package(package_id)
        data = self.state.package_data(package.id)
        return _ok({**self._package_json(package),
                    "data": None if data is None else base64.b64encode(data).decode("ascii")})

    def _download_package(self, _request: Request, _user: dict, package_id: str) -> Response:
        """GET /api/otaPackage/{id}/download: the file; 400 with an empty body for a URL package."""
        package = self._package(package_id)
        if package.url:
            return Response(400)
        data = self.state.package_data(package.id)
        if data is None:
            return error_json(404, "Requested item wasn't found!", 32)
        name = _header_safe(package.file_name or "")
        return Response(200, data, _header_safe(package.content_type or "") or "application/octet-stream",
                        (("Content-Disposition", f"attachment;filename={name}"), ("x-filename", name)))

    def _delete_package(self, _request: Request, _user: dict, package_id: str) -> Response:
        self.state.delete_package(self._package(package_id).id)
        return Response(200)


def _id_text(entity_id: Any) -> str:
    """The id inside an `{"entityType", "id"}` object (or the id itself) as text."""
    return str(entity_id.get("id") if isinstance(entity_id, dict) else entity_id)


@dataclass
class _FilePart:
    """A file of a multipart/form-data body."""

    file_name: str
    content_type: str
    data: bytes


def _multipart(request: Request) -> dict[str, str | _FilePart]:
    """The fields of a multipart/form-data body by name: text, or a _FilePart for a part with a filename."""
    ctype, options = multipart.parse_options_header(request.headers.get("content-type", ""))
    if ctype != "multipart/form-data" or not options.get("boundary"):
        raise _bad_request("Current request is not a multipart request")
    size = len(request.body) + 1  # the body is in memory already: keep every part there, never spool to disk
    parser = multipart.MultipartParser(io.BytesIO(request.body), options["boundary"], len(request.body),
                                       memory_limit=size, spool_limit=size)
    fields: dict[str, str | _FilePart] = {}
    try:
        for part in parser:
            if part.filename is not None:
                fields[part.name] = _FilePart(part.filename, part.content_type or "", part.raw)
            else:
                fields[part.name] = part.value
    except multipart.MultipartError as e:
        raise _bad_request(f"Failed to parse multipart servlet request: {e}") from None
    return fields


def _header_safe(text: str) -> str:
    """`text` without control characters, fit for a response header."""
    return "".join(c for c in text if ord(c) >= 32 and ord(c) != 127)


def _profile_info(profile: dict) -> dict:
    """DeviceProfileInfo: the fields of a DeviceProfile the lists show."""
    return {key: profile[key] for key in ("id", "tenantId", "name", "image", "defaultDashboardId", "type",
                                          "transportType")}


def _same(a: str, b: str) -> bool:
    """Password comparison in constant time."""
    return hmac.compare_digest(a.encode(), b.encode())
