"""A firmware update with the official SDK: it asks for the fw_* attributes, downloads the package over MQTT
(v2/fw/request/...), verifies the checksum and reports each state as telemetry.

Parameters (JSON on stdin):
  host, port                    the emulator's MQTT port
  token                         the device's access token
  protocol                      "5" (the SDK's default) or "3.1.1"
  chunk_size                    the SDK's chunk size (0: the whole file in one message)
Lines written: connected, firmware (what the SDK handed to its on-firmware-received callback), done.
"""

import hashlib

import paho.mqtt.client as paho
from tb_device_mqtt import TBDeviceMqttClient, TBFirmwareState

from sdkio import Inbox, connect, emit, params, wait

p = params()
client = TBDeviceMqttClient(p["host"], p["port"], username=p["token"], chunk_size=p["chunk_size"])
if p["protocol"] == "3.1.1":
    # As in device_session.py: the SDK builds its paho client for MQTT 5 only.
    client._client._protocol = paho.MQTTv311
    client._client._clean_session = True
received = Inbox()


def on_firmware(sdk, data, version):
    # Only called once the SDK has verified the checksum (TBDeviceMqttClient.__process_firmware). The UPDATED report
    # is queued before the main thread hears of the firmware, so that its disconnect goes out after it.
    sdk.update_firmware_info(title=sdk.firmware_info.get("fw_title"), version=version,
                             state=TBFirmwareState.UPDATED)
    received.put((data, version))


client.set_on_firmware_received_callback(on_firmware)
emit("connected", subacks=connect(client))
client.get_firmware_update()
wait(lambda: len(received), 30, "the verified firmware")
data, version = received.items[0]
# A barrier before disconnecting: the SDK may hold the UPDATED report in its own send queue (its rate limits), and
# sends in order; once this QoS 1 marker is acknowledged, the report before it was taken too.
marker = client.send_telemetry({"sdk_script": "done"}, quality_of_service=1).message_info
wait(lambda: all(info.is_published() for info in (marker if isinstance(marker, list) else [marker])), 30,
     "the PUBACK of the marker sent after the UPDATED report")
emit("firmware", version=version, size=len(data), sha256=hashlib.sha256(data).hexdigest(),
     state=client.current_firmware_info)
client.disconnect()
client.stop()
emit("done")
