"""`python -m host_tools emulator` as a process: the ready line, events, options, bad configs, mosquitto's clients."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from tb_rest_client.rest_client import RestClient

from emulator_fixtures import ALLOW_KEY, ALLOW_SECRET, CONFIG, Paho, RawMqtt, connect_packet, emulator_process, \
    publish_packet, subscribe_packet
from support import ROOT

DEMO = ROOT / "host_tools" / "emulator" / "demo.json"


def inspect(emu, path: str, body: dict | None = None) -> object:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{emu.ports['http']}/emulator/devices{path}", data=data,
                                     method="POST" if data else "GET")
    with urllib.request.urlopen(request, timeout=5) as response:
        text = response.read()
    return json.loads(text) if text else None


def run_cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "host_tools", "emulator", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_the_default_version_serves_the_pinned_rest_client_as_the_readme_starts_it():
    with emulator_process(DEMO) as emu:
        rest = RestClient(f"http://127.0.0.1:{emu.ports['http']}")
        rest.login("tenant@thingsboard.org", "tenant")
        device = rest.get_tenant_device("demo-device-1")  # /api/tenant/device, ThingsBoard 4.3.1.2+
        assert rest.get_device_credentials_by_device_id(device.id).credentials_id == "demoDeviceToken00001"


def test_ready_line_events_and_clean_sigterm():
    with emulator_process(DEMO) as emu:
        assert set(emu.ports) == {"mqtt", "http", "coap"}
        assert all(isinstance(p, int) and p > 0 for p in emu.ports.values())
        with Paho(emu.ports["mqtt"], "provision") as p:
            p.publish("/provision/request", json.dumps({"deviceName": "cli-dev", "provisionDeviceKey":
                                                        "demo-provision-key",
                                                        "provisionDeviceSecret": "demo-provision-secret"}))
            token = json.loads(p.message().payload)["credentialsValue"]
        with Paho(emu.ports["mqtt"], "c", token) as d:
            d.publish("v1/devices/me/telemetry", b'{"t":1}')
        emu.wait_event("provisioned device 'cli-dev' over mqtt")
        emu.wait_event("device 'cli-dev' connected")
        emu.wait_event("telemetry from 'cli-dev'")
        os.kill(emu.proc.pid, signal.SIGTERM)
        assert emu.proc.wait(timeout=10) == 0
        text = "\n".join(emu.events)
        assert token not in text and "demo-provision-secret" not in text


def _listening(port: int) -> set[str]:
    """The local addresses (hex, as /proc/net shows them) of the TCP listeners and UDP sockets on `port`."""
    found = set()
    for table in ("tcp", "tcp6", "udp", "udp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].rsplit(":", 1)
            if int(port_hex, 16) == port and (table.startswith("udp") or fields[3] == "0A"):
                found.add(address)
    return found


def test_it_listens_on_127_0_0_1_only_unless_bind_says_otherwise():
    cmd = [sys.executable, "-m", "host_tools", "emulator", "--config", str(DEMO), "--mqtt-port", "0",
           "--http-port", "0", "--coap-port", "0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        ports = json.loads(proc.stdout.readline())
        for name in ("mqtt", "http", "coap"):
            assert _listening(ports[name]) == {"0100007F"}, name  # 127.0.0.1, no IPv6 or wildcard socket
    finally:
        proc.terminate()
        proc.wait(10)


def test_sigint_stops_cleanly_too():
    with emulator_process(DEMO) as emu:
        os.kill(emu.proc.pid, signal.SIGINT)
        assert emu.proc.wait(timeout=10) == 0


@pytest.mark.parametrize("mutate, field", [
    (lambda c: c["profiles"][0].update(provisionType="MAYBE"), "profiles[0].provisionType"),
    (lambda c: c["devices"][0].update(profile="ghost"), "devices[0].profile"),
    (lambda c: c["devices"][1].update(credentialsValue=[]), "devices[1].credentialsValue"),
])
def test_bad_config_is_refused_naming_the_field(tmp_path, mutate, field):
    config = json.loads(json.dumps(CONFIG))
    mutate(config)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(config))
    result = run_cli("--config", str(path), "--mqtt-port", "0", "--http-port", "0", "--coap-port", "0")
    assert result.returncode == 2
    assert field in result.stderr and result.stdout == ""


def test_unreadable_or_invalid_config_and_bad_options(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    assert "not valid JSON" in run_cli("--config", str(broken)).stderr
    missing = run_cli("--config", str(tmp_path / "missing.json"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    version = run_cli("--config", str(DEMO), "--server-version", "four")
    assert version.returncode == 2 and "--server-version" in version.stderr
    port = run_cli("--config", str(DEMO), "--mqtt-port", "70000")
    assert port.returncode == 2 and "--mqtt-port" in port.stderr


def test_port_in_use_fails_with_a_message():
    with emulator_process(DEMO) as emu:
        result = run_cli("--config", str(DEMO), "--mqtt-port", str(emu.ports["mqtt"]), "--http-port", "0",
                         "--coap-port", "0")
        assert result.returncode == 1 and "cannot listen" in result.stderr


def test_server_version_option_reaches_the_mqtt_session():
    with emulator_process(DEMO, "--server-version", "3.8") as emu, RawMqtt(emu.ports["mqtt"]) as c:
        c.send(connect_packet("provision"))
        assert c.read_packet() == (0x20, b"\x00\x00")
        c.send(subscribe_packet(1, ("/provision/response", 1)))
        assert c.silent(0.3)


def test_provision_close_after_option():
    with emulator_process(DEMO, "--provision-close-after", "0.3") as emu, RawMqtt(emu.ports["mqtt"]) as c:
        c.send(connect_packet("provision"))
        c.read_packet()
        c.send(publish_packet("/provision/request", json.dumps({
            "provisionDeviceKey": "demo-provision-key", "provisionDeviceSecret": "demo-provision-secret"}).encode()))
        c.read_packet()
        c.read_publish()
        assert c.closed_by_server(3)


def test_db_keeps_devices_across_restarts(tmp_path):
    db = str(tmp_path / "emulator.db")
    with emulator_process(DEMO, "--db", db) as emu, Paho(emu.ports["mqtt"], "provision") as p:
        p.publish("/provision/request", json.dumps({"deviceName": "kept", "provisionDeviceKey": "demo-provision-key",
                                                    "provisionDeviceSecret": "demo-provision-secret"}))
        token = json.loads(p.message().payload)["credentialsValue"]
    with emulator_process(DEMO, "--db", db) as emu:
        with Paho(emu.ports["mqtt"], "c", token) as d:
            assert d.rc == 0
        assert "kept" in [d["name"] for d in inspect(emu, "")]


def test_db_with_a_renamed_profile_keeping_its_key_exits_2(tmp_path):
    db = str(tmp_path / "emulator.db")
    with emulator_process(DEMO, "--db", db):
        pass
    config = json.loads(DEMO.read_text())
    old = config["profiles"][0]["name"]
    config["profiles"][0]["name"] = "renamed"
    for device in config["devices"]:
        if device["profile"] == old:
            device["profile"] = "renamed"
    path = tmp_path / "renamed.json"
    path.write_text(json.dumps(config))
    result = run_cli("--config", str(path), "--db", db, "--mqtt-port", "0", "--http-port", "0", "--coap-port", "0")
    assert result.returncode == 2
    assert "profiles[0].provisionDeviceKey" in result.stderr and "Traceback" not in result.stderr


def test_mqtts_listener_with_generated_certificates(tmp_path):
    tls_dir = tmp_path / "tls"
    with emulator_process(DEMO, "--mqtts-port", "0", "--tls-dir", str(tls_dir)) as emu:
        assert {"mqtts", "mqtt", "http", "coap"} == set(emu.ports)
        assert sorted(p.name for p in tls_dir.iterdir()) == ["ca-key.pem", "ca.der", "ca.pem", "server-key.pem",
                                                            "server.pem"]
        with Paho(emu.ports["mqtts"], "c", "demoDeviceToken00001",
                  tls={"ca_certs": str(tls_dir / "ca.pem"), "cert_reqs": ssl.CERT_REQUIRED}) as d:
            assert d.rc == 0


def test_mosquitto_clients_provision_publish_and_receive_pushes(tmp_path):
    """mosquitto_pub/sub read credentials from their XDG options file and the request from a file, not argv."""
    xdg = tmp_path / "xdg"
    xdg.mkdir()
    env = {**os.environ, "XDG_CONFIG_HOME": str(xdg)}
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"deviceName": "mosq", "provisionDeviceKey": ALLOW_KEY,
                                   "provisionDeviceSecret": ALLOW_SECRET, "credentialsType": "MQTT_BASIC",
                                   "clientId": "mosq-client", "username": "mosq-user", "password": "mosq-pass"}))
    with emulator_process(CONFIG) as emu:
        port = str(emu.ports["mqtt"])
        (xdg / "mosquitto_pub").write_text("-u provision\n")
        subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", port, "-q", "1", "-t", "/provision/request",
                        "-f", str(request)], env=env, check=True, timeout=10)
        device = next(d for d in inspect(emu, "") if d["name"] == "mosq")
        assert device["credentialsValue"] == {"clientId": "mosq-client", "userName": "mosq-user",
                                              "password": "mosq-pass"}
        for tool in ("mosquitto_pub", "mosquitto_sub"):
            (xdg / tool).write_text("-i mosq-client\n-u mosq-user\n-P mosq-pass\n")
        subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", port, "-q", "1", "-t", "v1/devices/me/telemetry",
                        "-m", '{"temperature":21.5}'], env=env, check=True, timeout=10)
        assert inspect(emu, "/mosq/telemetry")[0]["values"] == {"temperature": 21.5}
        sub = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", port, "-q", "1", "-C", "1", "-W", "10",
                                "-t", "v1/devices/me/attributes"], env=env, stdout=subprocess.PIPE, text=True)
        try:
            emu.wait_event("device 'mosq' subscribed to v1/devices/me/attributes", timeout=5)
            inspect(emu, "/mosq/attributes/shared", {"interval": 15})
            out, _ = sub.communicate(timeout=10)
        finally:
            if sub.poll() is None:
                os.kill(sub.pid, signal.SIGTERM)
                sub.wait(timeout=5)
        assert json.loads(out) == {"interval": 15}
        (xdg / "mosquitto_pub").write_text("-i mosq-client\n-u mosq-user\n-P wrong-pass\n")
        refused = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", port, "-t", "v1/devices/me/telemetry",
                                  "-m", "{}"], env=env, capture_output=True, text=True, timeout=10)
        assert refused.returncode != 0 and "not authorised" in refused.stderr.lower()
        assert "mosq-pass" not in "\n".join(emu.events) and "wrong-pass" not in "\n".join(emu.events)


def test_demo_config_is_valid_and_has_both_strategies():
    demo = json.loads(Path(DEMO).read_text())
    types = {p["provisionType"] for p in demo["profiles"]}
    assert {"ALLOW_CREATE_NEW_DEVICES", "CHECK_PRE_PROVISIONED_DEVICES"} <= types
    assert any(p["provisionDeviceKey"] == "demo-provision-key" for p in demo["profiles"])
