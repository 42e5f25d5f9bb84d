# The built-in sensors' readings and the telemetry timestamp (ms since 1970).
import gc
import time

from micropython import const


# ESP32 counts time from 2000, ThingsBoard from 1970.
_EPOCH_2000_S = const(946684800)
# Before this (2024-01-01) the clock has not been set: let the server stamp the data instead of sending 2000-01-01.
_CLOCK_SET_AFTER_S = const(1704067200)


def now_ms(epoch_year):
    # Milliseconds since 1970, or None while the board's clock is unset. epoch_year: the year this port's
    # clock counts from, time.gmtime(0)[0] (2000 on ESP32).
    ms = time.time_ns() // 1000000
    if epoch_year == 2000:
        ms += _EPOCH_2000_S * 1000
    if ms < _CLOCK_SET_AFTER_S * 1000:
        return None
    return ms


def read(dev, rssi=None):
    # The values of every sensor dev.cfg names that this board has. rssi: a function giving the Wi-Fi RSSI, None
    # where there is no Wi-Fi.
    values = {}
    for name in dev.cfg.sensors:
        if name == "uptime":
            value = dev.uptime_ms() // 1000
        elif name == "free_heap":
            value = gc.mem_free()
        elif name == "heap_used":
            value = gc.mem_alloc()
        elif name == "rssi":
            value = rssi() if rssi else None
        else:  # mcu_temp, where the chip has a sensor
            try:
                import esp32

                sensor = getattr(esp32, "mcu_temperature", None)
                # The original ESP32 has only raw_temperature, in degrees Fahrenheit.
                value = sensor() if sensor else round((esp32.raw_temperature() - 32) / 1.8, 1)
            except (ImportError, AttributeError):
                value = None
        if value is not None:
            values[name] = value
    return values
