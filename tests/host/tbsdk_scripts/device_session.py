"""A device's life with the official SDK: provision, connect, telemetry, attributes, a server-side RPC.

Parameters (JSON on stdin):
  host, port, http_port         the emulator's MQTT port and its HTTP port (for the inspection API)
  protocol                      "5" (the SDK's default) or "3.1.1"
  provision                     {"key", "secret", "device_name"}: provision first (the SDK's ProvisionClient)
  token                         or: connect with this access token
  device_name                   the device's name on the server (for the inspection API)
Lines written: provisioned, connected, telemetry, attributes_response, attribute_update, rpc_request, done.
"""

import paho.mqtt.client as paho
from tb_device_mqtt import TBDeviceMqttClient

from sdkio import Inbox, connect, emit, inspection, params, wait

p = params()
host, port, http_port, name = p["host"], p["port"], p["http_port"], p["device_name"]

if "provision" in p:
    credentials = TBDeviceMqttClient.provision(host, p["provision"]["key"], p["provision"]["secret"], port=port,
                                               device_name=name)
    emit("provisioned", credentials=credentials)
    if not credentials:
        raise SystemExit(2)
    token = credentials["credentialsValue"]
else:
    token = p["token"]

client = TBDeviceMqttClient(host, port, username=token)
if p["protocol"] == "3.1.1":
    # The SDK builds its paho client for MQTT 5 only; this is how a user points it at a 3.1.1-only server
    # (a 3.1.1 paho client also needs a clean-session flag, which MQTT 5 clients do not have).
    client._client._protocol = paho.MQTTv311
    client._client._clean_session = True
emit("connected", protocol=client._client._protocol, subacks=connect(client))

info = client.send_telemetry({"temperature": 21.5, "sdk": True})
info.get()
emit("telemetry", published=all(i.is_published() for i in info.message_info)
     if isinstance(info.message_info, list) else info.message_info.is_published())

client.send_attributes({"firmwareVersion": "1.0.0"}).get()
inspection(http_port, "POST", f"/emulator/devices/{name}/attributes/shared", {"targetTemperature": 22})
responses = Inbox()
client.request_attributes(client_keys=["firmwareVersion"], shared_keys=["targetTemperature"],
                          callback=lambda content, error: responses.put(content))
wait(lambda: len(responses), 10, "attributes response")
emit("attributes_response", content=responses.items[0])

updates = Inbox()
client.subscribe_to_attribute("mode", lambda content, error: updates.put(content))
inspection(http_port, "POST", f"/emulator/devices/{name}/attributes/shared", {"mode": "eco"})
wait(lambda: len(updates), 10, "attribute update")
emit("attribute_update", content=updates.items[0])

requests = Inbox()


def on_rpc(request_id, request):
    requests.put((request_id, request))
    client.send_rpc_reply(request_id, {"echo": request.get("params")})


client.set_server_side_rpc_request_handler(on_rpc)
sent = inspection(http_port, "POST", f"/emulator/devices/{name}/rpc", {"method": "ping", "params": {"n": 7}})
wait(lambda: len(requests), 10, "server-side RPC")
request_id, request = requests.items[0]
emit("rpc_request", id=request_id, sent_id=sent["id"], request=request)
wait(lambda: inspection(http_port, "GET", f"/emulator/devices/{name}/rpc"), 10, "RPC reply on the server")

client.disconnect()
client.stop()
emit("done")
