"""The scripted MQTT peer (tests/host/mqtt_peer.py), checked with a real third-party client: paho-mqtt."""

from __future__ import annotations

import json
import queue
import socket
import subprocess
import threading
from typing import Iterator

import paho.mqtt.client as paho
import pytest

from mqtt_peer import ACCESS_TOKEN_ANSWER, PINGRESP, MqttPeer, publish_packet
from support import MICROPYTHON, micropython_env

TOKEN = "Xq3kT9vLm2RcW8pZa1Yb"
ANSWER = ACCESS_TOKEN_ANSWER % TOKEN.encode()
TELEMETRY = b'{"ts":1732300000000,"values":{"uptime":42,"free_heap":81234}}'


class Paho:
    """A paho-mqtt client driven by a thread of ours (paho's own loop thread sleeps a whole second before it can
    stop once the server closed the connection), with its events turned into queues."""

    def __init__(self, peer: MqttPeer, client_id: str, username: str | None = None, password: str | None = None):
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=paho.MQTTv311)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.connacks: queue.Queue = queue.Queue()
        self.messages: queue.Queue = queue.Queue()
        self.disconnected = threading.Event()
        self.client.on_connect = lambda c, u, flags, rc, props: self.connacks.put(rc)
        self.client.on_message = lambda c, u, msg: self.messages.put((msg.topic, msg.payload, msg.qos))
        self.client.on_disconnect = lambda c, u, flags, rc, props: self.disconnected.set()
        self.client.connect(peer.host, peer.port, keepalive=60)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.client.loop(timeout=0.02) != paho.MQTT_ERR_SUCCESS:
                self._stop.wait(0.02)

    def connack(self) -> str:
        """paho reports 3.1.1 return codes as MQTT 5 reason codes; their names are the same for both."""
        return self.connacks.get(timeout=5).getName()

    def close(self) -> None:
        self.client.disconnect()
        self._stop.set()
        self._thread.join(timeout=5)


@pytest.fixture
def clients() -> Iterator[list[Paho]]:
    made: list[Paho] = []
    yield made
    for c in made:
        c.close()


def connect(clients: list[Paho], peer: MqttPeer, *args: str | None) -> Paho:
    c = Paho(peer, *args)
    clients.append(c)
    return c


def test_provisioning_answer_after_prelude(clients):
    stray = publish_packet("v1/devices/me/attributes", b'{"x":1}', 1, 77) + PINGRESP
    with MqttPeer(provision_answer=ANSWER, provision_prelude=stray) as peer:
        c = connect(clients, peer, "esp32-a1b2c3", "provision")
        assert c.connack() == "Success"
        c.client.publish("/provision/request", b'{"provisionDeviceKey":"k","provisionDeviceSecret":"s"}',
                         qos=1).wait_for_publish(5)
        assert c.messages.get(timeout=5) == ("v1/devices/me/attributes", b'{"x":1}', 1)
        assert c.messages.get(timeout=5) == ("/provision/response", ANSWER, 1)
        ack = peer.wait_for(lambda p: p.name == "PUBACK" and p.pid == 77)
        assert ack.raw == b"\x40\x02\x00\x4d"
        connect_pkt = peer.packets[0]
        assert (connect_pkt.client_id, connect_pkt.username, connect_pkt.password) == \
            ("esp32-a1b2c3", "provision", None)
        assert connect_pkt.clean_session and connect_pkt.keepalive == 60
        request = peer.packets[1]
        assert (request.topic, request.qos) == ("/provision/request", 1)


def test_provisioning_never_answered_and_subscribe_ignored(clients):
    with MqttPeer(provision_answer=None) as peer:
        c = connect(clients, peer, "provision")
        assert c.connack() == "Success"
        _, mid = c.client.subscribe("/provision/response", qos=1)
        c.client.publish("/provision/request", b"{}", qos=1).wait_for_publish(5)
        sub = peer.wait_for(lambda p: p.name == "SUBSCRIBE")
        assert sub.filters == [("/provision/response", 1)] and sub.pid == mid
        with pytest.raises(queue.Empty):
            c.messages.get(timeout=0.3)
        assert peer.open_sessions() == 1
        assert [p.name for p in peer.packets] == ["CONNECT", "SUBSCRIBE", "PUBLISH"]


def test_provisioning_suback_like_new_servers(clients):
    granted = queue.Queue()
    with MqttPeer(provision_answer=ANSWER, suback_in_provision=True) as peer:
        c = connect(clients, peer, "dev", "provision")
        c.client.on_subscribe = lambda cl, u, mid, codes, props: granted.put([r.value for r in codes])
        assert c.connack() == "Success"
        c.client.subscribe([("/provision/response", 1), ("other/#", 1)])
        assert granted.get(timeout=5) == [1, 0x80]


def test_provisioning_other_topic_is_acknowledged_then_closed(clients):
    with MqttPeer(provision_answer=ANSWER) as peer:
        c = connect(clients, peer, "dev", "provision")
        assert c.connack() == "Success"
        c.client.publish("v1/devices/me/telemetry", b"{}", qos=1)
        assert c.disconnected.wait(5)


def test_token_accepted_telemetry_recorded_and_acknowledged(clients):
    with MqttPeer(tokens={TOKEN}) as peer:
        c = connect(clients, peer, "esp32-a1b2c3", TOKEN)
        assert c.connack() == "Success"
        for qos in (1, 0, 1):
            c.client.publish("v1/devices/me/telemetry", TELEMETRY, qos=qos).wait_for_publish(5)
        assert peer.telemetry == [TELEMETRY] * 3
        assert [p.qos for p in peer.packets if p.name == "PUBLISH"] == [1, 0, 1]


@pytest.mark.parametrize("client_id, username, password, code", [
    ("esp32-a1b2c3", "WRONG_TOKEN_000000000", None, "Not authorized"),
    ("esp32-a1b2c3", None, None, "Client identifier not valid"),
    ("c1", "u1", "wrong", "Not authorized"),
])
def test_unknown_credentials_refused_like_thingsboard(clients, client_id, username, password, code):
    with MqttPeer(tokens={TOKEN}, basic={("c1", "u1", "p1")}) as peer:
        c = connect(clients, peer, client_id, username, password)
        assert c.connack() == code
        assert c.disconnected.wait(5)


def test_basic_credentials_and_forced_code(clients):
    with MqttPeer(basic={("c1", "u1", "p1")}) as peer:
        assert connect(clients, peer, "c1", "u1", "p1").connack() == "Success"
        peer.connack_code = 3
        assert connect(clients, peer, "c1", "u1", "p1").connack() == "Server unavailable"
        assert peer.connections == 2


def test_rejected_telemetry_closes_instead_of_puback(clients):
    with MqttPeer(tokens={TOKEN}, reject_telemetry=lambda payload: not payload.startswith(b"{")) as peer:
        c = connect(clients, peer, "dev", TOKEN)
        assert c.connack() == "Success"
        c.client.publish("v1/devices/me/telemetry", TELEMETRY, qos=1).wait_for_publish(5)
        c.client.publish("v1/devices/me/telemetry", b"not json", qos=1)
        assert c.disconnected.wait(5)
        assert peer.telemetry == [TELEMETRY, b"not json"]
        assert [p.name for p in peer.packets].count("PUBLISH") == 2


def test_subscribe_ping_and_pushes_in_a_device_session(clients):
    granted = queue.Queue()
    with MqttPeer(tokens={TOKEN}) as peer:
        c = connect(clients, peer, "dev", TOKEN)
        c.client.on_subscribe = lambda cl, u, mid, codes, props: granted.put([r.value for r in codes])
        assert c.connack() == "Success"
        c.client.subscribe([("v1/devices/me/attributes", 2), ("v1/devices/me/rpc/request/+", 0)])
        assert granted.get(timeout=5) == [1, 0]
        assert peer.publish("v1/devices/me/attributes", b'{"interval":5}', qos=1) == 1
        assert c.messages.get(timeout=5) == ("v1/devices/me/attributes", b'{"interval":5}', 1)
        peer.wait_for(lambda p: p.name == "PUBACK" and p.pid == 1)


def test_pingreq_answered_and_malformed_input_recorded():
    with MqttPeer() as peer:
        with socket.create_connection((peer.host, peer.port), timeout=5) as s:
            s.sendall(b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x3c\x00\x01p" + b"\xc0\x00")
            assert s.recv(4) == b"\x20\x02\x00\x02"  # no user name, client id "p": identifier rejected
        with socket.create_connection((peer.host, peer.port), timeout=5) as s:
            s.sendall(b"\x10\x18\x00\x04MQTT\x04\x82\x00\x3c\x00\x01p\x00\x09provision" + b"\xc0\x00")
            got = b""
            while len(got) < 6:
                got += s.recv(6 - len(got))
            assert got == b"\x20\x02\x00\x00" + PINGRESP
            s.sendall(b"\x30\xff\xff\xff\xff")
            assert s.recv(1) == b""
        peer.wait_for(lambda p: p.name == "PINGREQ")
        assert peer.errors == ["connection 2: remaining length longer than 4 bytes"]


def test_stop_closes_open_connections(clients):
    peer = MqttPeer(tokens={TOKEN}).start()
    try:
        c = connect(clients, peer, "dev", TOKEN)
        assert c.connack() == "Success"
        assert peer.open_sessions() == 1
    finally:
        peer.stop()
    assert c.disconnected.wait(5)
    assert peer.open_sessions() == 0


# The firmware's adapter (tbfleet.via_mqtt on the Unix port) against the peer over real TCP.
PROVISION_SCRIPT = """
import json, sys, time
from tbfleet import BadAnswer, NoAnswer, via_mqtt

class Cfg:
    pass

cfg = Cfg()
for k, v in json.loads(sys.stdin.read()).items():
    setattr(cfg, k, v)
t0 = time.ticks_ms()
try:
    print(json.dumps({"answer": via_mqtt.Link(cfg).provision(b'{"provisionDeviceKey":"k"}').decode()}))
except (NoAnswer, BadAnswer) as e:
    print(json.dumps({"error": type(e).__name__, "ms": time.ticks_diff(time.ticks_ms(), t0)}))
"""


def provision_with_firmware(peer: MqttPeer, tmp_path, timeout: float = 2.0) -> dict:
    cfg = {"host": peer.host, "port": peer.port, "tls": False, "ca_file": None, "cert_file": None, "key_file": None,
           "device_name": "esp32-a1b2c3", "qos": 1, "timeout": timeout, "keepalive": 60}
    proc = subprocess.run([MICROPYTHON, "-c", PROVISION_SCRIPT], input=json.dumps(cfg), cwd=tmp_path,
                          env=micropython_env(), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def test_firmware_provisions_past_stray_packets(tmp_path):
    stray = publish_packet("v1/devices/me/attributes", b'{"x":1}', 1, 9) + PINGRESP + publish_packet("x", b"", 0)
    with MqttPeer(provision_answer=ANSWER, provision_prelude=stray) as peer:
        assert provision_with_firmware(peer, tmp_path) == {"answer": ANSWER.decode()}
        peer.wait_for(lambda p: p.name == "DISCONNECT")
        assert [p.name for p in peer.packets] == ["CONNECT", "PUBLISH", "PUBACK", "PUBACK", "DISCONNECT"]
        assert [p.pid for p in peer.packets if p.name == "PUBACK"] == [9, 1]


def test_firmware_gives_up_on_a_silent_server_at_its_deadline(tmp_path):
    with MqttPeer(provision_answer=None) as peer:
        out = provision_with_firmware(peer, tmp_path, timeout=0.3)
        assert out["error"] == "NoAnswer" and 280 <= out["ms"] < 1500, out
        assert "SUBSCRIBE" not in [p.name for p in peer.packets]


def test_firmware_junk_before_the_answer_is_bad_answer(tmp_path):
    with MqttPeer(provision_answer=ANSWER, provision_prelude=b"\xf0\x00") as peer:
        assert provision_with_firmware(peer, tmp_path)["error"] == "BadAnswer"
