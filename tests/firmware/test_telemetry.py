# Telemetry payloads, timestamps since 1970 whatever the port's epoch, and the sensors.
import json
import time

from mptest import eq
from tbfleet import app, config, session


def test_now_ms_is_milliseconds_since_1970():
    ms = session.now_ms(time.gmtime(0)[0])
    # The Unix port's epoch is 1970: now_ms must agree with time.time() there, and be after 2024.
    assert abs(ms - time.time() * 1000) < 2000, ms
    assert ms > 1704067200000


def test_esp32_epoch_offset():
    eq(time.gmtime(0)[0], 1970)
    # The same clock reading counting from 2000 (ESP32) is 946684800 s later in Unix time.
    offset = session.now_ms(2000) - session.now_ms(1970)
    assert abs(offset - 946684800000) < 1000, offset


def test_no_timestamp_while_the_clock_is_unset():
    # An ESP32 that never got the time reads about 2000-01-01 plus its uptime: before 2024, so no "ts".
    class UnsetClock:
        @staticmethod
        def time_ns():
            return 3600 * 10**9  # one hour after the port's epoch

        gmtime = staticmethod(time.gmtime)

    session.time = UnsetClock
    try:
        eq(session.now_ms(2000), None)
        eq(session.now_ms(1970), None)
    finally:
        session.time = time


class Device:
    # What session.sensors asks of app.Device.
    def __init__(self, sensors=("heap_used",), ticked=None):
        self.cfg = type("Cfg", (), {"sensors": sensors, "telemetry_interval": 0, "wifi_ssid": None})
        self.ticked = time.ticks_ms() if ticked is None else ticked
        self.up_ms = 0

    uptime_ms = app.Device.uptime_ms


def device(**fields):
    data = {"host": "127.0.0.1", "provision_key": "k", "provision_secret": "s", "device_name": "greenhouse-7"}
    data.update(fields)
    return app.Device(config.validate(data))


def test_payload_shapes():
    # {"ts": ms since 1970, "values": {...}} while the clock is set; the bare values (stamped by the server) before.
    first = json.loads(session.payload({"heap_used": 5}))
    eq(sorted(first), ["ts", "values"])
    assert abs(first["ts"] - time.time() * 1000) < 2000 and first["values"] == {"heap_used": 5}, first

    class UnsetClock:
        @staticmethod
        def time_ns():
            return 3600 * 10**9

        gmtime = staticmethod(time.gmtime)

    session.time = UnsetClock
    try:
        eq(json.loads(session.payload({"heap_used": 5})), {"heap_used": 5})
    finally:
        session.time = time


def test_sensors_on_the_unix_port():
    values = session.sensors(Device(["uptime", "free_heap", "heap_used", "rssi", "mcu_temp"]))
    eq(sorted(values), ["free_heap", "heap_used", "uptime"])  # no Wi-Fi and no temperature sensor here
    assert values["free_heap"] > 0 and values["heap_used"] > 0


def test_rssi_when_there_is_wifi():
    eq(session.sensors(Device(["rssi"]), lambda: -61), {"rssi": -61})


def test_uptime_survives_tick_wraparound():
    # Each reading adds the ticks since the last one, so a counter that wrapped in between still adds up.
    dev = Device(["uptime"])
    dev.ticked = time.ticks_add(time.ticks_ms(), -5500)
    eq(session.sensors(dev), {"uptime": 5})
    dev.ticked = time.ticks_add(time.ticks_ms(), -3000)
    eq(session.sensors(dev), {"uptime": 8})


def test_uptime_counts_from_the_boot():
    # The app starts sending only once connected, but uptime counts from the device's start.
    dev = device(sensors=["uptime"])
    dev.ticked = time.ticks_add(time.ticks_ms(), -7200)
    eq(session.reading(dev), {"uptime": 7})
