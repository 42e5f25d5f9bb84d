"""OTA over the emulator's MQTT side (reference §6.5): the fw_* attributes pushed on assignment and the chunk
protocol on v2/fw/request/{id}/chunk/{n}, with paho-mqtt (a real client) and, for the exact packets of the error
paths, a byte-level client."""

from __future__ import annotations

import hashlib
import os
import queue

import paho.mqtt.client as mqtt
import pytest

from emulator_fixtures import Paho, RawMqtt, connect_packet, mqtt_emulator, publish_packet, subscribe_packet

TOKEN = "preTokenValue0000001"  # device "pre-token" of profile "check"
IMAGE = os.urandom(5000)


def add_package(state, version: str = "1.0", data: bytes = IMAGE, ota_type: str = "FIRMWARE") -> str:
    package = state.create_package("fw" if ota_type == "FIRMWARE" else "app", version, ota_type, "check")
    return state.upload_package_data(package.id, data, file_name="fw.bin", content_type="application/octet-stream",
                                     checksum_algorithm="SHA256").id


def assign(emu, version: str = "1.0", data: bytes = IMAGE, ota_type: str = "FIRMWARE") -> str:
    def job(state):
        package_id = add_package(state, version, data, ota_type)
        state.assign_device_package("pre-token", ota_type, package_id)
        return package_id
    return emu.call(job)


def download(client: Paho, size: int, request_id: int = 1, prefix: str = "fw") -> bytes:
    """The whole file in chunks of `size`, the size sent with the first chunk only, until an empty chunk."""
    data, number = b"", 0
    while True:
        client.publish(f"v2/{prefix}/request/{request_id}/chunk/{number}", str(size) if number == 0 else "")
        msg = client.message()
        assert msg.topic == f"v2/{prefix}/response/{request_id}/chunk/{number}"
        if not msg.payload:
            return data
        assert len(msg.payload) <= size
        data += msg.payload
        number += 1


def test_assigning_pushes_the_fw_attributes_to_a_subscribed_device():
    with mqtt_emulator() as emu, Paho(emu.port, "", TOKEN) as client:
        assert client.subscribe("v1/devices/me/attributes") == [1]
        assign(emu)
        deleted, values = client.message(), client.message()
        assert deleted.topic == values.topic == "v1/devices/me/attributes"
        assert deleted.payload == b'{"deleted":["fw_tag","fw_url"]}'
        assert values.payload == (b'{"fw_title":"fw","fw_version":"1.0","fw_size":5000,'
                                  b'"fw_checksum_algorithm":"SHA256","fw_checksum":"'
                                  + hashlib.sha256(IMAGE).hexdigest().encode() + b'"}')


@pytest.mark.parametrize("size", [1024, 4999, 5000, 65536])
def test_paho_downloads_the_firmware_in_chunks_and_the_checksum_matches(size):
    with mqtt_emulator() as emu, Paho(emu.port, "", TOKEN) as client:
        assign(emu)
        client.subscribe("v2/fw/response/+/chunk/+")
        data = download(client, size, request_id=7)
        assert hashlib.sha256(data).hexdigest() == hashlib.sha256(IMAGE).hexdigest()


def test_size_zero_is_the_whole_file_and_chunks_past_the_end_are_empty():
    with mqtt_emulator() as emu, Paho(emu.port, "", TOKEN) as client:
        assign(emu)
        client.subscribe("v2/fw/response/+/chunk/+")
        client.publish("v2/fw/request/1/chunk/0", "0")
        assert client.message().payload == IMAGE
        client.publish("v2/fw/request/2/chunk/3", "2000")
        assert client.message().payload == b""
        client.publish("v2/fw/request/2/chunk/2", "")  # the size this request id asked for before
        assert client.message().payload == IMAGE[4000:]


def test_a_request_id_keeps_the_package_it_started_with():
    new = os.urandom(300)
    with mqtt_emulator() as emu, Paho(emu.port, "", TOKEN) as client:
        assign(emu)
        client.subscribe("v2/fw/response/+/chunk/+")
        client.publish("v2/fw/request/1/chunk/0", "100")
        assert client.message().payload == IMAGE[:100]
        assign(emu, "2.0", new)
        client.publish("v2/fw/request/1/chunk/1", "100")
        assert client.message().payload == IMAGE[100:200]
        assert download(client, 100, request_id=2) == new


def test_software_is_served_on_sw_topics():
    app = b"software " * 100
    with mqtt_emulator() as emu, Paho(emu.port, "", TOKEN) as client:
        assign(emu, "1", app, "SOFTWARE")
        client.subscribe("v2/sw/response/+/chunk/+")
        assert download(client, 256, prefix="sw") == app


def raw_session(emu, *topics: str) -> RawMqtt:
    raw = RawMqtt(emu.port)
    raw.send(connect_packet("ota", TOKEN))
    assert raw.read_packet() == (0x20, b"\x00\x00")
    for i, topic in enumerate(topics, 1):
        raw.send(subscribe_packet(i, (topic, 1)))
        assert raw.read_packet()[0] == 0x90
    return raw


@pytest.mark.parametrize("topic, payload, assigned, error", [
    ("v2/fw/request/1/chunk/0", b"65537", True, b"PAYLOAD_TOO_LARGE"),
    ("v2/fw/request/1/chunk/0", b"1024", False, b"NOT_FOUND"),
    ("v2/sw/request/1/chunk/0", b"1024", True, b"NOT_FOUND"),  # software errors go to v2/fw/error too
])
def test_errors_are_published_on_v2_fw_error_then_the_session_closes_without_a_puback(topic, payload, assigned,
                                                                                         error):
    with mqtt_emulator() as emu:
        if assigned:
            assign(emu)
        with raw_session(emu, "v2/fw/error") as raw:
            raw.send(publish_packet(topic, payload, qos=1, packet_id=5))
            assert raw.read_publish()[:3] == ("v2/fw/error", error, 1)
            assert raw.closed_by_server()


def test_a_url_package_is_refused_with_failure():
    with mqtt_emulator() as emu:
        emu.call(lambda s: s.assign_device_package(
            "pre-token", "FIRMWARE", s.create_package("fw", "u", "FIRMWARE", "check", url="http://x.invalid/f").id))
        with raw_session(emu, "v2/fw/error") as raw:
            raw.send(publish_packet("v2/fw/request/1/chunk/0", b"10"))
            assert raw.read_publish()[:2] == ("v2/fw/error", b"FAILURE")
            assert raw.closed_by_server()


@pytest.mark.parametrize("topic, payload", [
    ("v2/fw/request/1/chunk/0", b"ten"),
    ("v2/fw/request/1/chunk/0", b" 10"),
    ("v2/fw/request/1/chunk/0", b"2147483648"),
    ("v2/fw/request/1/chunk/2147483648", b"10"),
])
def test_a_size_or_chunk_that_is_not_a_java_int_closes_the_session(topic, payload):
    with mqtt_emulator() as emu:
        assign(emu)
        with raw_session(emu, "v2/fw/response/+/chunk/+") as raw:
            raw.send(publish_packet(topic, payload))
            assert raw.closed_by_server()


def test_the_chunk_comes_after_the_puback_at_the_granted_qos():
    with mqtt_emulator() as emu:
        assign(emu)
        with raw_session(emu) as raw:
            raw.send(subscribe_packet(9, ("v2/fw/response/+/chunk/+", 0)))
            assert raw.read_packet() == (0x90, b"\x00\x09\x00")
            raw.send(publish_packet("v2/fw/request/42/chunk/1", b"+1000", packet_id=3))
            assert raw.read_packet() == (0x40, b"\x00\x03")
            assert raw.read_publish() == ("v2/fw/response/42/chunk/1", IMAGE[1000:2000], 0, 0)


def test_the_paho_session_survives_a_whole_download_and_keeps_serving_telemetry():
    with mqtt_emulator() as emu, Paho(emu.port, "", TOKEN) as client:
        assign(emu)
        client.subscribe("v2/fw/response/+/chunk/+")
        assert download(client, 512) == IMAGE
        client.publish("v1/devices/me/telemetry", '{"fw_state":"UPDATED","current_fw_version":"1.0"}')
        states = emu.call(lambda s: [t["values"].get("fw_state") for t in s.telemetry("pre-token")])
        assert states == ["QUEUED", "INITIATED", "UPDATED"]
        with pytest.raises(queue.Empty):
            client.message(timeout=0.2)


def test_before_3_3_the_chunk_topics_are_unknown():
    with mqtt_emulator(server_version=(3, 2)) as emu:
        with raw_session(emu, "v2/fw/response/+/chunk/+") as raw:
            raw.send(publish_packet("v2/fw/request/1/chunk/0", b"100", packet_id=4))
            assert raw.read_packet() == (0x40, b"\x00\x04")  # a PUBACK and nothing else: the topic means nothing
            raw.send(publish_packet("v1/devices/me/telemetry", b'{"after":1}', packet_id=5))
            assert raw.read_packet() == (0x40, b"\x00\x05")


def test_mqtt_5_download_and_an_error_ends_with_disconnect_0x83():
    with mqtt_emulator() as emu:
        assign(emu)
        with Paho(emu.port, "", TOKEN, protocol=mqtt.MQTTv5) as client:
            client.subscribe("v2/fw/response/+/chunk/+")
            client.subscribe("v2/fw/error")
            assert download(client, 2048) == IMAGE
            client.client.publish("v2/fw/request/9/chunk/0", "65537", qos=1)
            error = client.message()
            assert (error.topic, error.payload) == ("v2/fw/error", b"PAYLOAD_TOO_LARGE")
            assert client.disconnected.wait(5) and client.server_disconnect == 0x83
