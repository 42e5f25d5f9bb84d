# Telemetry payloads, timestamps since 1970 whatever the port's epoch, and the sensors.
import json
import time

from mptest import eq
from tbfleet import telemetry


def test_now_ms_is_milliseconds_since_1970():
    ms = telemetry.now_ms(time.gmtime(0)[0])
    # The Unix port's epoch is 1970: now_ms must agree with time.time() there, and be after 2024.
    assert abs(ms - time.time() * 1000) < 2000, ms
    assert ms > 1704067200000


def test_esp32_epoch_offset():
    eq(time.gmtime(0)[0], 1970)
    # The same clock reading counting from 2000 (ESP32) is 946684800 s later in Unix time.
    offset = telemetry.now_ms(2000) - telemetry.now_ms(1970)
    assert abs(offset - 946684800000) < 1000, offset


def test_no_timestamp_while_the_clock_is_unset():
    # An ESP32 that never got the time reads about 2000-01-01 plus its uptime: before 2024, so no "ts".
    class UnsetClock:
        @staticmethod
        def time_ns():
            return 3600 * 10**9  # one hour after the port's epoch

    telemetry.time = UnsetClock
    try:
        eq(telemetry.now_ms(2000), None)
        eq(telemetry.now_ms(1970), None)
    finally:
        telemetry.time = time


def test_payload_shapes():
    eq(json.loads(telemetry.payload({"uptime": 5}, 1767225600000)), {"ts": 1767225600000, "values": {"uptime": 5}})
    eq(json.loads(telemetry.payload({"uptime": 5})), {"uptime": 5})


def test_sensors_on_the_unix_port():
    s = telemetry.Sensors(["uptime", "free_heap", "heap_used", "rssi", "mcu_temp"])
    values = s.read()
    eq(sorted(values), ["free_heap", "heap_used", "uptime"])  # no Wi-Fi and no temperature sensor here
    assert values["free_heap"] > 0 and values["heap_used"] > 0


def test_rssi_when_there_is_wifi():
    s = telemetry.Sensors(["rssi"], rssi=lambda: -61)
    eq(s.read(), {"rssi": -61})


def test_uptime_survives_tick_wraparound():
    # Each reading adds the ticks since the last one, so a counter that wrapped in between still adds up.
    s = telemetry.Sensors(["uptime"])
    s._last = time.ticks_add(time.ticks_ms(), -5500)
    eq(s.read(), {"uptime": 5})
    s._last = time.ticks_add(time.ticks_ms(), -3000)
    eq(s.read(), {"uptime": 8})


def test_uptime_counts_from_a_given_tick():
    # The app makes its sensors only when it starts sending, but uptime counts from the boot.
    s = telemetry.Sensors(["uptime"], None, time.ticks_add(time.ticks_ms(), -7200))
    eq(s.read(), {"uptime": 7})
