"""The whole MQTT lifecycle of the real firmware (main.py on the Unix port) against the scripted MQTT peer.

The peer plays ThingsBoard's MQTT transport as the reference describes it and records every packet, so these
tests check what the board puts on the wire across boots, not only that telemetry arrives.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from firmware_board import FirmwareBoard
from mqtt_peer import (ACCESS_TOKEN_ANSWER, PINGRESP, REQUEST_TOPIC, MqttPeer,
                       publish_packet)

KEY, SECRET = "fleet-key-4f2a", "fleet-secret-9c1e"
TOKEN = "Pe3rT0kenA1b2C3d4E5f"


def config(peer: MqttPeer, **fields) -> dict:
    data = {"host": "127.0.0.1", "port": peer.port, "provision_key": KEY, "provision_secret": SECRET,
            "device_name": "orchard-17", "credentials_type": "SERVER_GENERATED", "telemetry_interval": 0.1,
            "timeout": 2,
            "sensors": ["uptime", "free_heap"]}
    data.update(fields)
    return data


def connects(peer: MqttPeer) -> list:
    return [p for p in peer.packets if p.name == "CONNECT"]


def test_first_boot_provisions_second_boot_reuses(tmp_path: Path) -> None:
    with MqttPeer(provision_answer=ACCESS_TOKEN_ANSWER % TOKEN.encode(), tokens={TOKEN}) as peer:
        board = FirmwareBoard(tmp_path / "b", config(peer))
        with board.boot() as run:
            run.wait_for("telemetry 3 sent")
        first = connects(peer)
        assert [(c.client_id, c.username) for c in first[:2]] == [("orchard-17", "provision"),
                                                                   ("orchard-17", TOKEN)]
        request = next(p for p in peer.packets if p.name == "PUBLISH" and p.topic == REQUEST_TOPIC)
        assert request.qos == 1
        assert json.loads(request.payload) == {"deviceName": "orchard-17", "provisionDeviceKey": KEY,
                                               "provisionDeviceSecret": SECRET}
        # Pre-3.9 servers never answer a SUBSCRIBE in a provisioning session.
        assert not [p for p in peer.packets if p.name == "SUBSCRIBE" and p.conn == first[0].conn]
        session = [p for p in peer.packets if p.conn == first[1].conn]
        assert [(p.name, p.topic) for p in session[:5]] == [
            ("CONNECT", None), ("SUBSCRIBE", None), ("PUBLISH", "v1/devices/me/attributes"),
            ("PUBLISH", "v1/devices/me/attributes/request/1"), ("PUBLISH", "v1/devices/me/telemetry")]
        assert session[1].filters == [("v1/devices/me/attributes", 1), ("v1/devices/me/rpc/request/+", 1)]
        assert set(json.loads(session[2].payload)) == {"firmware", "board", "micropython"}
        assert board.credentials["token"] == TOKEN
        telemetry = [json.loads(t) for t in peer.telemetry]
        assert len(telemetry) >= 3
        assert set(telemetry[0]) == {"ts", "values"} and set(telemetry[0]["values"]) == {"uptime", "free_heap"}
        assert abs(telemetry[0]["ts"] - time.time() * 1000) < 60_000

        before = len(peer.packets)
        with board.boot() as run:
            run.wait_for("telemetry 2 sent")
        later = peer.packets[before:]
        assert [p.username for p in later if p.name == "CONNECT"] == [TOKEN]
        assert not [p for p in later if p.name == "PUBLISH" and p.topic == REQUEST_TOPIC]


def test_answer_found_past_stray_packets(tmp_path: Path) -> None:
    prelude = publish_packet("v1/devices/me/attributes", b'{"fw":"1.2"}', qos=1, pid=7) + PINGRESP
    with MqttPeer(provision_answer=ACCESS_TOKEN_ANSWER % TOKEN.encode(), provision_prelude=prelude,
                  tokens={TOKEN}) as peer:
        board = FirmwareBoard(tmp_path / "b", config(peer))
        with board.boot() as run:
            run.wait_for("telemetry 1 sent")
        assert board.credentials["token"] == TOKEN


def test_silent_server_then_answer(tmp_path: Path) -> None:
    with MqttPeer(provision_answer=None, tokens={TOKEN}) as peer:
        board = FirmwareBoard(tmp_path / "b", config(peer, timeout=0.5))
        with board.boot(retry_ms=100) as run:
            run.wait_for("provisioning got NO_ANSWER")
            assert board.credentials is None
            peer.provision_answer = ACCESS_TOKEN_ANSWER % TOKEN.encode()
            run.wait_for("telemetry 1 sent")


def test_revoked_token_is_set_aside_and_the_board_provisions_again(tmp_path: Path) -> None:
    new = "N3wT0kenA1b2C3d4E5f6"
    peer = MqttPeer(provision_answer=ACCESS_TOKEN_ANSWER % TOKEN.encode(), tokens={TOKEN})
    # Revoking closes the live session as ThingsBoard does for a deleted device: the next publish is refused.
    revoked = []
    peer.reject_telemetry = lambda payload: bool(revoked) and revoked.pop()
    with peer:
        board = FirmwareBoard(tmp_path / "b", config(peer))
        with board.boot(retry_ms=50) as run:
            run.wait_for("telemetry 2 sent")
            peer.provision_answer = ACCESS_TOKEN_ANSWER % new.encode()
            peer.tokens = {new}
            revoked.append(True)
            run.wait_for(r"refused the credentials \(5 not authorized\), 3 in a row", timeout=20)
            run.wait_for("provisioned orchard-17", timeout=20)
            run.wait_for("connected to", timeout=20)
        assert board.credentials["token"] == new
        assert json.loads((board.path / "creds.json.bad").read_text())["token"] == TOKEN


def test_telemetry_rejected_by_close_reconnects(tmp_path: Path) -> None:
    rejected = []

    def reject_second(payload: bytes) -> bool:
        rejected.append(payload)
        return len(rejected) == 2

    with MqttPeer(provision_answer=ACCESS_TOKEN_ANSWER % TOKEN.encode(), tokens={TOKEN},
                  reject_telemetry=reject_second) as peer:
        board = FirmwareBoard(tmp_path / "b", config(peer))
        with board.boot(retry_ms=50) as run:
            run.wait_for("Rejected")
            run.wait_for("telemetry 3 sent")
        assert len([c for c in connects(peer) if c.username == TOKEN]) >= 2
