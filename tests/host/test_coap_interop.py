"""The firmware's CoAP client, running on the MicroPython Unix port, against real third-party CoAP servers:
libcoap's coap-server-notls (its /time, dynamic resources and /async separate responses) and an aiocoap server
defined here that answers like ThingsBoard, including separate responses (aiocoap sends an empty ACK when a
render takes longer than its EMPTY_ACK_DELAY of 0.1 s)."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import aiocoap
import aiocoap.resource
import pytest

from support import MICROPYTHON, micropython_env, run_micropython

TOKEN = "tok-ENC/1"  # holds a "/" so a wrong split into segments would be seen


def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_firmware(tmp_path: Path, body: str, port: int) -> dict:
    """Run `body` on the Unix port with `port` in scope; the script prints one JSON object, returned here."""
    script = tmp_path / "interop.py"
    script.write_text("import sys, json\nfrom tbfleet import via_coap\nport = int(sys.argv[1])\n"
                      "def code_str(code):\n    return '%d.%02d' % (code >> 5, code & 31)\n"
                      "class Cfg:\n    host = '127.0.0.1'\n    tls = False\n    timeout = 3.0\n"
                      "Cfg.port = port\n" + body)
    proc = run_micropython([str(script), str(port)], cwd=tmp_path, timeout=60, env=micropython_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- libcoap -------------------------------------------------------------------------------------------------

def start_libcoap(exe: str) -> tuple[int, subprocess.Popen] | None:
    """Start coap-server-notls on a free port and wait until it answers a CoAP ping; None if the port was
    taken meanwhile (another test's server may grab it between our probe and the server's bind)."""
    port = free_udp_port()
    proc = subprocess.Popen([exe, "-A", "127.0.0.1", "-p", str(port), "-d", "4", "-v", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ping = b"\x40\x00\x12\x34"  # an empty CON: a CoAP server answers RST
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.05)
        until = time.monotonic() + 5
        while proc.poll() is None and time.monotonic() < until:
            s.sendto(ping, ("127.0.0.1", port))
            try:
                if s.recv(64)[:1] == b"\x70":
                    return port, proc
            except (socket.timeout, ConnectionRefusedError):
                pass
    stop(proc)
    return None


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def libcoap_server():
    """(port, Popen) of a coap-server-notls on 127.0.0.1, stopped afterwards."""
    exe = shutil.which("coap-server-notls")
    if exe is None:
        pytest.fail("coap-server-notls is not installed (Debian package libcoap3-bin)")
    for _ in range(5):
        started = start_libcoap(exe)
        if started:
            break
    else:
        pytest.fail("coap-server-notls did not come up")
    try:
        yield started
    finally:
        stop(started[1])


def test_libcoap_get_put_post_and_separate_response(libcoap_server, tmp_path):
    got = run_firmware(tmp_path, """
c = via_coap.Link(Cfg())
out = {}
code, body = c.request(1, ("time",))
out["time"] = [code_str(code), body.decode()]
code, body = c.request(3, ("dyn",), b"hello", 0)  # PUT creates a dynamic resource
out["put"] = code_str(code)
code, body = c.request(1, ("dyn",))
out["get"] = [code_str(code), body.decode()]
code, body = c.request(2, ("made",), b"x")
out["post"] = code_str(code)
code, body = c.request(1, ("async",), None, None, ("1",))  # libcoap answers after 1 s, separately
out["async"] = [code_str(code), body.decode()]
code, body = c.request(1, ("no", "such", "thing"))
out["missing"] = code_str(code)
c.close()
print(json.dumps(out))
""", libcoap_server[0])
    assert got["time"][0] == "2.05" and len(got["time"][1]) >= 8
    assert got["put"] == "2.01"
    assert got["get"] == ["2.05", "hello"]
    assert got["post"] == "2.01"
    assert got["async"] == ["2.05", "done"]
    assert got["missing"] == "4.04"


def test_libcoap_stopped_mid_run_is_no_answer(libcoap_server, tmp_path):
    # The server answers, then is stopped: the ICMP port unreachable ends the next exchange at once.
    port, server = libcoap_server
    script = tmp_path / "gone.py"
    script.write_text("""import sys
from tbfleet import NoAnswer, via_coap
class Cfg:
    host = "127.0.0.1"
    port = int(sys.argv[1])
    tls = False
    timeout = 0.5
c = via_coap.Link(Cfg())
c.ack_ms = 50
print(c.request(1, ("time",))[0])
sys.stdin.readline()
try:
    c.request(1, ("time",))
except NoAnswer as e:
    print(e)
""")
    proc = subprocess.Popen([MICROPYTHON, str(script), str(port)], cwd=tmp_path, env=micropython_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "69"  # 2.05
        server.terminate()
        server.wait(5)
        out, err = proc.communicate("go\n", timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "failed" in out and "ECONNREFUSED" in out, out


# --- aiocoap, answering like ThingsBoard -----------------------------------------------------------------------

class ThingsBoardLike(aiocoap.resource.Resource, aiocoap.resource.PathCapable):
    """/api/v1/provision, /api/v1/<token>/telemetry and .../attributes with ThingsBoard's codes (document section 5);
    GET on .../attributes and .../rpc answers {} (the device has no shared attributes, no RPC comes)."""

    def __init__(self) -> None:
        super().__init__()
        self.telemetry: list[tuple[str, bytes]] = []
        self.types: list[str] = []
        self.attributes: list[tuple[str, bytes]] = []

    async def render_get(self, request):
        path = request.opt.uri_path
        if len(path) == 2 and path[1] in ("attributes", "rpc"):  # no notification ever follows
            return aiocoap.Message(code=aiocoap.CONTENT if path[0] == TOKEN else aiocoap.UNAUTHORIZED, payload=b"{}")
        return aiocoap.Message(code=aiocoap.BAD_REQUEST)

    async def render_post(self, request):
        path = request.opt.uri_path
        self.types.append(str(request.mtype))
        if path == ("provision",):
            req = json.loads(request.payload)
            if req.get("deviceName") == "slow":
                await asyncio.sleep(0.4)  # past EMPTY_ACK_DELAY: an empty ACK, then a separate CON response
            if req.get("provisionDeviceKey") == "key":
                body = {"credentialsValue": TOKEN, "credentialsType": "ACCESS_TOKEN", "status": "SUCCESS"}
                return aiocoap.Message(code=aiocoap.CREATED, payload=json.dumps(body).encode(), content_format=0)
            body = {"errorMsg": "Provision data was not found!", "status": "NOT_FOUND"}
            return aiocoap.Message(code=aiocoap.BAD_REQUEST, payload=json.dumps(body).encode(), content_format=0)
        if len(path) == 2 and path[1] == "attributes":
            self.attributes.append((path[0], request.payload))
            return aiocoap.Message(code=aiocoap.CREATED if path[0] == TOKEN else aiocoap.UNAUTHORIZED)
        if len(path) == 2 and path[1] == "telemetry":
            if path[0] != TOKEN:
                return aiocoap.Message(code=aiocoap.UNAUTHORIZED)
            try:
                json.loads(request.payload)
            except ValueError:
                return aiocoap.Message(code=aiocoap.BAD_REQUEST)
            self.telemetry.append((path[0], request.payload))
            return aiocoap.Message(code=aiocoap.CREATED)
        return aiocoap.Message(code=aiocoap.BAD_REQUEST)


@pytest.fixture
def aiocoap_server():
    """(port, resource): an aiocoap server in its own thread and event loop, shut down afterwards."""
    tb = ThingsBoardLike()
    site = aiocoap.resource.Site()
    site.add_resource(["api", "v1"], tb)
    loop = asyncio.new_event_loop()
    holder = {}

    async def start(port: int) -> None:
        holder["ctx"] = await aiocoap.Context.create_server_context(site, bind=("127.0.0.1", port))

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        for _ in range(5):  # the probed port may be taken by a parallel test before aiocoap binds it
            port = free_udp_port()
            try:
                asyncio.run_coroutine_threadsafe(start(port), loop).result(10)
                break
            except OSError:
                continue
        else:
            pytest.fail("aiocoap could not bind a free port")
        yield port, tb
    finally:
        if "ctx" in holder:
            asyncio.run_coroutine_threadsafe(holder["ctx"].shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


ADAPTER = """
from tbfleet import Refused, Rejected
link = via_coap.Link(Cfg())
out = {}
"""


def test_aiocoap_thingsboard_lifecycle(aiocoap_server, tmp_path):
    port, tb = aiocoap_server
    got = run_firmware(tmp_path, ADAPTER + """
out["wrong"] = json.loads(link.provision(b'{"deviceName":"d","provisionDeviceKey":"nope","provisionDeviceSecret":"s"}'))
out["ok"] = json.loads(link.provision(b'{"deviceName":"d","provisionDeviceKey":"key","provisionDeviceSecret":"s"}'))
link.open({"type": "ACCESS_TOKEN", "token": out["ok"]["credentialsValue"]}, [b'{"fw":"1"}', b'{"n":0}'])
for i in range(1, 3):
    link.send(b'{"n":%d}' % i)
try:
    link.send(b'not json')
except Rejected as e:
    out["bad"] = list(e.args)
try:
    link.open({"type": "ACCESS_TOKEN", "token": "revoked"}, [b'{"fw":"1"}', b'{"n":9}'])
except Refused as e:
    out["revoked"] = list(e.args)
link.close()
print(json.dumps(out))
""", port)
    assert got["wrong"] == {"errorMsg": "Provision data was not found!", "status": "NOT_FOUND"}
    assert got["ok"]["status"] == "SUCCESS" and got["ok"]["credentialsValue"] == TOKEN
    assert tb.telemetry == [(TOKEN, b'{"n":0}'), (TOKEN, b'{"n":1}'), (TOKEN, b'{"n":2}')]
    assert got["bad"] == [400, "4.00"]
    assert got["revoked"] == [401, "unauthorized"]
    assert tb.attributes == [(TOKEN, b'{"fw":"1"}'), ("revoked", b'{"fw":"1"}')]
    assert set(tb.types) == {"CON"}


def test_aiocoap_separate_response(aiocoap_server, tmp_path):
    # aiocoap sends the empty ACK after 0.1 s and the answer as a CON at 0.4 s; if our client did not ACK that
    # CON, aiocoap would retransmit it and the next request's answer would arrive behind it.
    port, tb = aiocoap_server
    got = run_firmware(tmp_path, ADAPTER + """
import time
t0 = time.ticks_ms()
out["slow"] = json.loads(link.provision(
    b'{"deviceName":"slow","provisionDeviceKey":"key","provisionDeviceSecret":"s"}'))
out["ms"] = time.ticks_diff(time.ticks_ms(), t0)
link.open({"type": "ACCESS_TOKEN", "token": out["slow"]["credentialsValue"]}, [b"{}", b'{"after":1}'])
link.close()
print(json.dumps(out))
""", port)
    assert got["slow"]["status"] == "SUCCESS"
    assert 350 <= got["ms"] < 1900, got["ms"]  # well before a retransmission (ACK_TIMEOUT 2 s) would be needed
    assert tb.telemetry == [(TOKEN, b'{"after":1}')]
