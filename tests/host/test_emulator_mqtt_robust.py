"""The MQTT transport keeps serving everybody else when one client misbehaves."""

from __future__ import annotations

import logging
import random
import socket
import struct
import time

import pytest

from emulator_fixtures import RawMqtt, connect_packet, mqtt_emulator, mqtt_packet, publish_packet, \
    subscribe_packet

TOKEN = "preTokenValue0000001"
CONNACK_OK = (0x20, b"\x00\x00")


def assert_still_serving(port: int) -> None:
    """A well-behaved device can connect and have its telemetry acknowledged."""
    with RawMqtt(port) as c:
        c.send(connect_packet("healthy", TOKEN))
        assert c.read_packet() == CONNACK_OK
        c.send(publish_packet("v1/devices/me/telemetry", b'{"ok":1}', packet_id=1))
        assert c.read_packet() == (0x40, b"\x00\x01")


@pytest.fixture
def no_session_crash(caplog):
    caplog.set_level(logging.INFO, logger="host_tools.emulator.mqtt")
    yield caplog
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "a session hit an unexpected error"


@pytest.mark.parametrize("garbage", [
    b"\xff\xff\xff\xff garbage",
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x10\xff\xff\xff\xff\x01",                     # remaining length longer than 4 bytes
    b"\x10\x0a\x00\x04MQTT\x04\x01\x00\x3c",        # reserved CONNECT flag set
    b"\x10\x04\x00\x09MQ",                          # string longer than the packet
    b"\x16\x00",                                    # CONNECT with flags in the fixed header
])
def test_garbage_before_or_as_connect_closes_only_that_connection(garbage, no_session_crash):
    with mqtt_emulator() as emu, RawMqtt(emu.port) as c:
        c.send(garbage)
        assert c.closed_by_server()
        assert_still_serving(emu.port)


def test_oversized_length_closes_without_waiting_for_the_body(no_session_crash):
    with mqtt_emulator() as emu, RawMqtt(emu.port) as c:
        c.send(connect_packet("d", TOKEN))
        assert c.read_packet() == CONNACK_OK
        started = time.monotonic()
        c.send(b"\x30\xff\xff\xff\x7f")  # a PUBLISH announcing 268 MB
        assert c.closed_by_server(2)
        assert time.monotonic() - started < 1.5
        assert_still_serving(emu.port)


def test_random_packets_after_connect_never_break_the_server(no_session_crash):
    rng = random.Random(1234)
    with mqtt_emulator() as emu:
        for _ in range(40):
            with RawMqtt(emu.port, timeout=2) as c:
                c.send(connect_packet("fuzz", TOKEN))
                assert c.read_packet() == CONNACK_OK
                first = rng.choice([0x30, 0x32, 0x34, 0x36, 0x40, 0x82, 0xA2, 0xC0, 0xE0, 0x00, 0xF0, 0x62, 0x80])
                body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40)))
                c.send(mqtt_packet(first, body) + bytes(rng.randrange(256) for _ in range(rng.randrange(0, 8))))
                c.sock.settimeout(0.2)
                try:
                    while c.sock.recv(4096):
                        pass
                except (socket.timeout, ConnectionError):
                    pass
        assert_still_serving(emu.port)


def test_half_open_connections_do_not_block_others_and_expire(no_session_crash):
    with mqtt_emulator(inactivity_timeout=0.5) as emu:
        silent = socket.create_connection(("127.0.0.1", emu.port))
        partial = socket.create_connection(("127.0.0.1", emu.port))
        try:
            partial.sendall(connect_packet("p", TOKEN)[:7])
            assert_still_serving(emu.port)
            for s in (silent, partial):
                s.settimeout(3)
                assert s.recv(10) == b"", "an inactive connection is closed after the inactivity timeout"
        finally:
            silent.close()
            partial.close()


def _stalled_subscriber(port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(connect_packet("stalled", TOKEN) + subscribe_packet(1, ("v1/devices/me/attributes", 0)))
    return s


def test_client_that_stops_reading_pushes_is_dropped(no_session_crash):
    with mqtt_emulator(max_write_buffer=64 * 1024, write_timeout=0.5) as emu:
        stalled = _stalled_subscriber(emu.port)
        try:
            time.sleep(0.2)
            big = "x" * 20000
            for i in range(200):
                emu.call(lambda s, i=i: s.set_shared_attributes("pre-token", {"blob": big, "n": i}))
                if any(r.getMessage().endswith("not reading, dropping it") for r in no_session_crash.records):
                    break
            assert any("not reading" in r.getMessage() for r in no_session_crash.records)
            assert_still_serving(emu.port)
        finally:
            stalled.close()


def test_client_that_stops_reading_answers_is_dropped_after_the_write_timeout(no_session_crash):
    with mqtt_emulator(write_timeout=0.3) as emu:
        emu.call(lambda s: s.set_shared_attributes("pre-token", {"blob": "y" * 60000}))
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", emu.port))
        try:
            s.sendall(connect_packet("stalled", TOKEN))
            started = time.monotonic()
            request = publish_packet("v1/devices/me/attributes/request/1", b"{}", qos=0)
            s.settimeout(0.5)
            try:
                for _ in range(200):
                    s.sendall(request)
            except (socket.timeout, ConnectionError):
                pass
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not any(
                    "not reading" in r.getMessage() for r in no_session_crash.records):
                time.sleep(0.05)
            assert any("not reading" in r.getMessage() for r in no_session_crash.records)
            assert time.monotonic() - started < 5
            assert_still_serving(emu.port)
        finally:
            s.close()


def test_many_bad_clients_at_once_and_good_ones_still_served(no_session_crash):
    with mqtt_emulator() as emu:
        bad = []
        try:
            for i in range(30):
                s = socket.create_connection(("127.0.0.1", emu.port))
                s.sendall([b"\x00\x00", b"\x10\x7f", struct.pack("!B", 0x30) + b"\xff\xff\xff\xff"][i % 3])
                bad.append(s)
            for _ in range(3):
                assert_still_serving(emu.port)
            assert len(emu.call(lambda s: s.telemetry("pre-token"))) == 3
        finally:
            for s in bad:
                s.close()
