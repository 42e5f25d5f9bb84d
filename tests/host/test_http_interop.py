"""The firmware's HTTP/1.1 client and ThingsBoard adapter (tbfleet.via_http), running on the MicroPython Unix port,
against Python's http.server (Content-Length, chunked and close-framed answers, a ThingsBoard-like device API, over
plain TCP and TLS with certificate verification) and against raw sockets that linger or never answer."""

from __future__ import annotations

import json
import logging
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest

from host_tools.emulator import certs
from support import FIRMWARE_TESTS, micropython_env, run_micropython

log = logging.getLogger(__name__)
TOKEN = "tok 1/é"  # a space, a slash and a non-ASCII letter: the adapter must escape them into one segment
LIMIT = 64


class Handler(BaseHTTPRequestHandler):
    """Answers like ThingsBoard's /api/v1 (section 4 of the device API document), plus framing test pages."""

    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args) -> None:
        log.debug(fmt, *args)

    def _answer(self, status: int, body: bytes = b"") -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        self.server.requests.append((self.path, dict(self.headers), length))
        if length > LIMIT and self.path.endswith("/telemetry"):  # checked on the header alone, before reading
            self.close_connection = True
            self._answer(413, b'"Payload size exceeds the limit of %d bytes"' % LIMIT)
            return
        body = self.rfile.read(length)
        if self.path == "/api/v1/provision":
            req = json.loads(body)
            if req.get("provisionDeviceKey") == "key":
                out = {"credentialsValue": TOKEN, "credentialsType": "ACCESS_TOKEN", "status": "SUCCESS"}
            else:
                out = {"errorMsg": "Provision data was not found!", "status": "NOT_FOUND"}
            self._answer(200, json.dumps(out).encode())
            return
        parts = self.path.split("/")
        if len(parts) == 5 and parts[4] == "attributes":
            self._answer(200 if unquote(parts[3]) == TOKEN else 401)
            return
        if len(parts) == 5 and parts[4] == "telemetry":
            if unquote(parts[3]) != TOKEN:
                self._answer(401)
                return
            try:
                self.server.telemetry.append(json.loads(body))
            except ValueError as e:
                self._answer(500, str(e).encode())
                return
            self._answer(200)
            return
        self._answer(404)

    def do_GET(self) -> None:
        if self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"7;ext=1\r\n{\"a\":1,\r\n")
            self.wfile.write(b"b\r\n\"b\":\"chunk\"\r\n1\r\n}\r\n")
            self.wfile.write(b"0\r\nX-Checksum: 0\r\n\r\n")
        elif self.path == "/close":
            self.close_connection = True
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"until the end " * 20)
        elif self.path.endswith("/attributes"):
            self._answer(200, b'{"shared":{"led":true}}')
        else:
            self._answer(404)


def serve(tls: certs.ServerFiles | None = None):
    """Start an http.server on 127.0.0.1:0 in a thread; returns (server, stop function)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.requests = []
    server.telemetry = []
    if tls is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(tls.server_pem, tls.server_key)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)
    return server, stop


@pytest.fixture
def http_server():
    server, stop = serve()
    try:
        yield server
    finally:
        stop()


def run_firmware(tmp_path: Path, body: str, port: int, *args: str) -> dict:
    """Run `body` on the Unix port with `port` in scope (and `args` from sys.argv[2:]); the script prints one
    JSON object, returned here."""
    script = tmp_path / "interop.py"
    script.write_text("import sys, json, time\nfrom httpclient import request\n"
                      "from tbfleet import BadAnswer, NoAnswer, Refused, Rejected, via_http\n"
                      "port = int(sys.argv[1])\n" + body)
    proc = run_micropython([str(script), str(port), *args], cwd=tmp_path, timeout=60,
                           env=micropython_env(FIRMWARE_TESTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


ADAPTER = """
class Cfg:
    host = "127.0.0.1"
    tls = False
    ca_file = None
    timeout = 3.0
Cfg.port = port
link = via_http.Link(Cfg())
out = {}
"""


def test_thingsboard_like_lifecycle(http_server, tmp_path):
    got = run_firmware(tmp_path, ADAPTER + """
out["wrong"] = json.loads(link.provision(b'{"deviceName":"d","provisionDeviceKey":"no","provisionDeviceSecret":"s"}'))
out["ok"] = json.loads(link.provision(b'{"deviceName":"d","provisionDeviceKey":"key","provisionDeviceSecret":"s"}'))
link.open({"type": "ACCESS_TOKEN", "token": out["ok"]["credentialsValue"]}, [b'{"fw":"1"}', b'{"n":0}'])
out["events"] = [list(e) for e in link.events]
for i in range(1, 3):
    link.send(b'{"n":%d}' % i)
for name, payload in (("big", b'{"x":"' + b"y" * 80 + b'"}'), ("bad", b"{not json")):
    try:
        link.send(payload)
    except Rejected as e:
        out[name] = list(e.args)
try:
    link.open({"type": "ACCESS_TOKEN", "token": "revoked"}, [b'{"fw":"1"}', b'{"n":9}'])
except Refused as e:
    out["revoked"] = list(e.args)
print(json.dumps(out))
""", http_server.server_port)
    assert got["wrong"]["status"] == "NOT_FOUND"
    assert got["ok"] == {"credentialsValue": TOKEN, "credentialsType": "ACCESS_TOKEN", "status": "SUCCESS"}
    assert http_server.telemetry == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert got["big"] == [413, '"Payload size exceeds the limit of %d bytes"' % LIMIT]
    assert got["bad"][0] == 500 and got["bad"][1]
    assert got["revoked"] == [401, "unauthorized"]
    assert got["events"] == [["current", None, '{"shared":{"led":true}}']]
    path, headers, length = http_server.requests[3]
    assert path == "/api/v1/tok%201%2F%C3%A9/telemetry"
    assert headers["Content-Type"] == "application/json" and headers["Connection"] == "close"
    assert headers["Host"] == f"127.0.0.1:{http_server.server_port}" and length == 7


def test_chunked_and_close_framed_answers(http_server, tmp_path):
    got = run_firmware(tmp_path, """
out = {}
for path in ("/chunked", "/close", "/missing"):
    status, body = request("GET", "127.0.0.1", port, path, timeout_ms=3000)
    out[path] = [status, body.decode()]
try:
    request("GET", "127.0.0.1", port, "/close", timeout_ms=3000, limit=100)
except BadAnswer as e:
    out["limit"] = str(e)
print(json.dumps(out))
""", http_server.server_port)
    assert got["/chunked"] == [200, '{"a":1,"b":"chunk"}']
    assert got["/close"] == [200, "until the end " * 20]
    assert got["/missing"] == [404, ""]
    assert "larger than 100" in got["limit"]


@pytest.fixture
def raw_server():
    """A TCP listener whose behaviour the test sets: 'linger' answers then keeps the connection open, 'silent'
    never answers. Yields (port, mode dict); every socket is closed afterwards."""
    listener = socket.create_server(("127.0.0.1", 0))
    mode = {"kind": "linger"}
    done = threading.Event()
    conns: list[socket.socket] = []

    def run() -> None:
        listener.settimeout(0.05)
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except (socket.timeout, OSError):
                continue
            conns.append(conn)
            conn.settimeout(2)
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(1024)
            if mode["kind"] == "linger":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], mode
    finally:
        done.set()
        thread.join(5)
        for c in conns:
            c.close()
        listener.close()


def test_content_length_answer_does_not_wait_for_close(raw_server, tmp_path):
    port, _ = raw_server
    got = run_firmware(tmp_path, """
t0 = time.ticks_ms()
status, body = request("POST", "127.0.0.1", port, "/x", b"{}", timeout_ms=3000)
print(json.dumps({"answer": [status, body.decode()], "ms": time.ticks_diff(time.ticks_ms(), t0)}))
""", port)
    assert got["answer"] == [200, "ok"]
    assert got["ms"] < 1000, got["ms"]


def test_silent_server_is_no_answer_at_the_deadline(raw_server, tmp_path):
    port, mode = raw_server
    mode["kind"] = "silent"
    got = run_firmware(tmp_path, """
t0 = time.ticks_ms()
try:
    request("POST", "127.0.0.1", port, "/x", b"{}", timeout_ms=300)
except NoAnswer as e:
    print(json.dumps({"error": str(e), "ms": time.ticks_diff(time.ticks_ms(), t0)}))
""", port)
    assert "in time" in got["error"]
    assert 290 <= got["ms"] < 1500, got["ms"]


def test_tls_verified_against_the_ca_and_refused_with_another(tmp_path):
    good = certs.ensure_server_files(tmp_path / "good")
    other = certs.ensure_server_files(tmp_path / "other")
    server, stop = serve(good)
    try:
        got = run_firmware(tmp_path, ADAPTER.replace("tls = False", "tls = True") + """
Cfg.ca_file = sys.argv[2]
out["ok"] = json.loads(link.provision(b'{"deviceName":"d","provisionDeviceKey":"key","provisionDeviceSecret":"s"}'))
link.open({"type": "ACCESS_TOKEN", "token": out["ok"]["credentialsValue"]}, [b"{}", b'{"tls":1}'])
Cfg.ca_file = sys.argv[3]
other = via_http.Link(Cfg())
try:
    other.provision(b'{}')
except (NoAnswer, ValueError) as e:  # tbfleet.tcp.connect lets the ssl module's ValueError through today
    out["other"] = str(e)
print(json.dumps(out))
""", server.server_port, str(good.ca_der), str(other.ca_der))
    finally:
        stop()
    assert got["ok"]["status"] == "SUCCESS"
    assert server.telemetry == [{"tls": 1}]
    assert "not correctly signed" in got["other"]
