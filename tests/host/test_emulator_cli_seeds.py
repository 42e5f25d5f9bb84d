"""The ThingsBoard sample provisioning scripts (../shared/seeds/) in spirit, against the emulator process.

Each test sends the requests a sample script sends, with the same client library family (paho-mqtt, an HTTP
client, a CoAP client), and checks the answers reference §2.2, §3.3, §4.2 and §5.4 specify.
"""

from __future__ import annotations

import asyncio
import json
import queue
import subprocess
import urllib.request

import aiocoap
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from emulator_fixtures import emulator_process

KEY, SECRET = "u7piawkboq8v32dmcmpp", "jpmwdn8ptlswmf4m29bw"
SEED_CONFIG = {"profiles": [{"name": "seed", "provisionDeviceKey": KEY, "provisionDeviceSecret": SECRET,
                             "provisionType": "ALLOW_CREATE_NEW_DEVICES"}], "devices": []}
TO_PUBLISH = {"stringKey": "value1", "booleanKey": True, "doubleKey": 42.0, "longKey": 73,
              "jsonKey": {"someNumber": 42, "someArray": [1, 2, 3], "someNestedObject": {"key": "value"}}}
FAILURE = b'{"errorMsg":"Failed to provision device!","status":"FAILURE"}'


@pytest.fixture(scope="module")
def emu():
    with emulator_process(SEED_CONFIG) as running:
        yield running


def http_post(emu, path: str, body: bytes) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{emu.ports['http']}{path}", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.status, response.read()


def telemetry_of(emu, name: str) -> list:
    url = f"http://127.0.0.1:{emu.ports['http']}/emulator/devices/{name}/telemetry"
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def test_mqtt_seed_publishes_before_subscribing_and_still_gets_the_answer(emu):
    # seeds/004: publish right after connect (QoS 0), subscribe in on_connect, wait in the loop
    messages: queue.Queue = queue.Queue()
    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.on_connect = lambda c, u, f, rc, p: c.subscribe("/provision/response")
    client.on_message = lambda c, u, msg: messages.put(msg)
    client.username_pw_set("provision", "")
    client.connect("127.0.0.1", emu.ports["mqtt"], 60)
    client.publish("/provision/request", json.dumps({
        "deviceName": "ProvisionedDeviceWithAccessToken", "provisionDeviceKey": KEY, "provisionDeviceSecret": SECRET,
        "credentialsType": "ACCESS_TOKEN", "token": "testTOKEN"}))
    client.loop_start()
    try:
        msg = messages.get(timeout=5)
    finally:
        client.disconnect()
        client.loop_stop()
    assert msg.topic == "/provision/response"
    assert msg.payload == b'{"credentialsValue":"testTOKEN","credentialsType":"ACCESS_TOKEN","status":"SUCCESS"}'


def test_mqtt_seed_with_generated_name_then_connects_with_the_saved_token(emu):
    # seeds/002: subscribe then publish in on_connect, save credentialsValue, reconnect with it as username
    messages: queue.Queue = queue.Queue()
    connacks: queue.Queue = queue.Queue()

    def on_connect(c, u, f, rc, p):
        c.subscribe("/provision/response")
        c.publish("/provision/request", json.dumps({"provisionDeviceKey": KEY, "provisionDeviceSecret": SECRET}))

    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.on_connect = on_connect
    client.on_message = lambda c, u, msg: messages.put(msg)
    client.username_pw_set("provision")
    client.connect("127.0.0.1", emu.ports["mqtt"], 60)
    client.loop_start()
    try:
        answer = json.loads(messages.get(timeout=5).payload)
    finally:
        client.disconnect()
        client.loop_stop()
    assert answer["status"] == "SUCCESS" and len(answer["credentialsValue"]) == 20
    device = mqtt.Client(CallbackAPIVersion.VERSION2)
    device.on_connect = lambda c, u, f, rc, p: connacks.put(rc)
    device.username_pw_set(answer["credentialsValue"])
    device.connect("127.0.0.1", emu.ports["mqtt"], 60)
    device.loop_start()
    try:
        assert connacks.get(timeout=5) == 0
    finally:
        device.disconnect()
        device.loop_stop()


def test_http_seed_provisions_and_posts_telemetry(emu):
    # seeds/000: POST /api/v1/provision (json=...), then POST /api/v1/<token>/telemetry
    status, body = http_post(emu, "/api/v1/provision", json.dumps(
        {"provisionDeviceKey": KEY, "provisionDeviceSecret": SECRET, "deviceName": "http-seed"}).encode())
    answer = json.loads(body)
    assert status == 200 and answer["status"] == "SUCCESS" and answer["credentialsType"] == "ACCESS_TOKEN"
    status, body = http_post(emu, f"/api/v1/{answer['credentialsValue']}/telemetry", json.dumps(TO_PUBLISH).encode())
    assert (status, body) == (200, b"")
    assert telemetry_of(emu, "http-seed")[0]["values"] == TO_PUBLISH
    # seeds/004 HTTP: the same name again is FAILURE, still with 200
    assert http_post(emu, "/api/v1/provision", json.dumps(
        {"provisionDeviceKey": KEY, "provisionDeviceSecret": SECRET, "deviceName": "http-seed"}).encode()) == \
        (200, FAILURE)


def test_coap_seed_provisions_with_a_token_and_posts_telemetry(emu):
    # seeds/001: POST coap://host/api/v1/provision with credentialsType ACCESS_TOKEN and a token
    async def scenario() -> list:
        context = await aiocoap.Context.create_client_context()
        base = f"coap://127.0.0.1:{emu.ports['coap']}/api/v1"
        try:
            request = {"provisionDeviceKey": KEY, "provisionDeviceSecret": SECRET, "credentialsType": "ACCESS_TOKEN",
                       "token": "coapSeedToken", "deviceName": "coap-seed"}
            first = await context.request(aiocoap.Message(code=aiocoap.POST, uri=f"{base}/provision",
                                                          payload=json.dumps(request).encode())).response
            tele = await context.request(aiocoap.Message(code=aiocoap.POST, uri=f"{base}/coapSeedToken/telemetry",
                                                         payload=json.dumps(TO_PUBLISH).encode())).response
            again = await context.request(aiocoap.Message(code=aiocoap.POST, uri=f"{base}/provision",
                                                          payload=json.dumps(request).encode())).response
            return [first, tele, again]
        finally:
            await context.shutdown()

    first, tele, again = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert first.code == aiocoap.CREATED
    assert first.payload == b'{"credentialsValue":"coapSeedToken","credentialsType":"ACCESS_TOKEN","status":"SUCCESS"}'
    assert tele.code == aiocoap.CREATED
    assert again.code == aiocoap.BAD_REQUEST and again.payload == FAILURE
    assert telemetry_of(emu, "coap-seed")[0]["values"] == TO_PUBLISH


def test_coap_seed_with_libcoap_client_reading_the_request_from_a_file(emu, tmp_path):
    # seeds/003: {"provisionDeviceKey", "provisionDeviceSecret", "deviceName": "DEVICE_NAME"}
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"provisionDeviceKey": KEY, "provisionDeviceSecret": SECRET,
                                   "deviceName": "DEVICE_NAME"}))
    result = subprocess.run(["coap-client-notls", "-m", "post", "-B", "10", "-f", str(request),
                             f"coap://127.0.0.1:{emu.ports['coap']}/api/v1/provision"],
                            capture_output=True, timeout=20)
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["status"] == "SUCCESS" and answer["credentialsType"] == "ACCESS_TOKEN"
    assert len(answer["credentialsValue"]) == 20
