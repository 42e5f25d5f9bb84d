"""The real firmware (main.py on the Unix port) against hostile servers: it neither crashes nor waits past its bound.

Each server runs on 127.0.0.1 on a free port, is bounded in time and is stopped by its test. What a test asserts
does not depend on the machine's load: that the board's wait ended by its deadline ("no answer in time") while the
server was still sending (it would otherwise end with "connection closed" once the server gives up), that the board
logged the answer as a bad one and retries, that it never logged an unexpected exception or exited.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from firmware_board import BoardRun, FirmwareBoard
from mqtt_peer import ACCESS_TOKEN_ANSWER, MqttPeer

KEY, SECRET = "hostile-key", "hostile-secret"
TOKEN = "H0stileT0kenA1b2C3d4"
DRIP_SECONDS = 30  # how long a dripping server keeps going: far past the board's timeout of 1 s


def config(port: int, transport: str = "mqtt", **fields) -> dict:
    data = {"host": "127.0.0.1", "port": port, "transport": transport, "provision_key": KEY,
            "provision_secret": SECRET, "device_name": "hostile-1", "telemetry_interval": 0.1, "timeout": 1,
            "sensors": ["uptime"]}
    data.update(fields)
    return data


def assert_alive(run: BoardRun) -> None:
    """The board is still running and never met an exception it did not expect."""
    assert run.proc.poll() is None, run.output
    assert "unexpected" not in run.output and "Traceback" not in run.output, run.output


@contextlib.contextmanager
def tcp_server(handler: Callable[[socket.socket], None]) -> Iterator[int]:
    """A TCP server on a free port calling handler(conn) for each connection on its own thread; yields the port.
    Leaving the block closes the listener and every connection, then joins the threads."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.1)
    stop = threading.Event()
    conns: list[socket.socket] = []
    threads: list[threading.Thread] = []

    def serve(conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            handler(conn)
        conn.close()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(None)
            conns.append(conn)
            t = threading.Thread(target=serve, args=(conn,), daemon=True)
            threads.append(t)
            t.start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        acceptor.join(5)
        listener.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        for t in threads:
            t.join(5)


def drip_tls_handshake(conn: socket.socket) -> None:
    """Take the ClientHello, then announce a 16 000-byte handshake record and send it one byte every 0.1 s."""
    conn.recv(4096)
    conn.sendall(bytes((22, 3, 3, 0x3E, 0x80)))
    end = time.monotonic() + DRIP_SECONDS
    while time.monotonic() < end:
        time.sleep(0.1)
        conn.sendall(b"\x02")


@pytest.mark.parametrize("transport", ["mqtt", "http"])
def test_a_dripped_tls_handshake_ends_at_the_timeout(tmp_path: Path, transport: str) -> None:
    with tcp_server(drip_tls_handshake) as port:
        board = FirmwareBoard(tmp_path / "b", config(port, transport, tls=True))
        with board.boot() as run:
            run.wait_for("provisioning got NO_ANSWER: no answer in time")
            run.wait_for("retrying in")
            assert_alive(run)


def deep(n: int) -> bytes:
    return b"[" * n


@pytest.mark.parametrize("answer, why", [
    (deep(16000), "not a provisioning answer"),  # nested deeper than the heap can parse
    (ACCESS_TOKEN_ANSWER % (b"t" * 4096), "credentials that cannot be saved"),  # over the store's 2 KB
    (b'{"credentialsType":"MQTT_BASIC","credentialsValue":{"clientId":5,"userName":"u","password":"p"},'
     b'"status":"SUCCESS"}', "credentials that cannot be saved"),  # a client id that is no string
])
def test_mqtt_answers_that_cannot_be_parsed_or_kept_are_bad_answers(tmp_path: Path, answer: bytes, why: str) -> None:
    with MqttPeer(provision_answer=answer) as peer:
        board = FirmwareBoard(tmp_path / "b", config(peer.port))
        with board.boot(heap=1024 * 1024) as run:
            run.wait_for("BAD_ANSWER.*" + why)
            run.wait_for("retrying in")
            run.wait_for("provisioning hostile-1")  # and it tries again
            assert_alive(run)
        assert board.credentials is None


def test_mqtt_a_16_kb_header_at_an_80_kb_heap(tmp_path: Path) -> None:
    # The header announces 16 KB (within the protocol cap), more than this heap can hold (a quarter of what is
    # free): refused as soon as the header is read, before anything is allocated for it.
    with MqttPeer(provision_answer=None, provision_prelude=b"\x30\x80\x80\x01") as peer:
        board = FirmwareBoard(tmp_path / "b", config(peer.port))
        with board.boot(heap=80 * 1024) as run:
            run.wait_for("provisioning got BAD_ANSWER: too long: 16384 bytes")
            run.wait_for("provisioning hostile-1", timeout=10)
            assert_alive(run)


def test_mqtt_a_16_kb_push_during_telemetry_at_an_80_kb_heap(tmp_path: Path) -> None:
    with MqttPeer(provision_answer=ACCESS_TOKEN_ANSWER % TOKEN.encode(), tokens={TOKEN}) as peer:
        board = FirmwareBoard(tmp_path / "b", config(peer.port))
        with board.boot(heap=80 * 1024) as run:
            run.wait_for("telemetry 2 sent")
            peer.publish("v1/devices/me/attributes", b'{"k":"' + b"x" * 16340 + b'"}', 1)
            run.wait_for("BadAnswer: too long: 16376 bytes")
            run.wait_for("connected to", timeout=10)  # it connects again
            run.wait_for("telemetry [0-9]+ sent")
            assert_alive(run)


def http_answer(body: bytes) -> Callable[[socket.socket], None]:
    def handler(conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(4096)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n" % len(body) + body)
        time.sleep(0.5)
    return handler


def test_http_deep_json_at_a_256_kb_heap(tmp_path: Path) -> None:
    with tcp_server(http_answer(deep(8000))) as port:
        board = FirmwareBoard(tmp_path / "b", config(port, "http"))
        with board.boot(heap=256 * 1024) as run:
            run.wait_for("BAD_ANSWER")
            run.wait_for("retrying in")
            assert_alive(run)


@contextlib.contextmanager
def coap_server(payload: bytes) -> Iterator[int]:
    """A UDP server answering every confirmable request with a piggybacked 2.01 carrying payload."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, peer = sock.recvfrom(2048)
            except (TimeoutError, OSError):
                continue
            if len(data) >= 4 and data[0] >> 4 & 3 == 0:
                tkl = data[0] & 15
                sock.sendto(bytes((0x60 | tkl, 65)) + data[2:4] + data[4:4 + tkl] + b"\xff" + payload, peer)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield sock.getsockname()[1]
    finally:
        stop.set()
        t.join(5)
        sock.close()


def test_coap_deep_json_at_a_64_kb_heap(tmp_path: Path) -> None:
    with coap_server(deep(1100)) as port:
        board = FirmwareBoard(tmp_path / "b", config(port, "coap"))
        with board.boot(heap=64 * 1024) as run:
            run.wait_for("BAD_ANSWER")
            run.wait_for("retrying in")
            assert_alive(run)

