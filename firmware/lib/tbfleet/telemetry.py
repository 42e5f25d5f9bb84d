# Sensor readings turned into ThingsBoard telemetry: {"ts": <ms since 1970>, "values": {...}}, and the send loop.
import gc
import json
import time

from micropython import const

from tbfleet import log, unload

# ESP32 counts time from 2000, ThingsBoard from 1970.
_EPOCH_2000_S = const(946684800)
# Before this (2024-01-01) the clock has not been set: let the server stamp the data instead of sending 2000-01-01.
_CLOCK_SET_AFTER_S = const(1704067200)
_POLL_EVERY_MS = const(1000)


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
    # where there is no Wi-Fi. Uptime is summed on dev (up_ms, and ticked: the ticks_ms it counts to) from tick
    # differences: ticks_ms wraps (about 12.4 days on ESP32), so no single reading is trusted.
    values = {}
    for name in dev.cfg.sensors:
        if name == "uptime":
            now = time.ticks_ms()
            dev.up_ms += time.ticks_diff(now, dev.ticked)
            dev.ticked = now
            value = dev.up_ms // 1000
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


def send(dev, max_messages):
    # app's loop once connected (here, so that it takes no RAM while provisioning): sends over dev.link every
    # telemetry_interval seconds until dev.sent reaches max_messages (None: for ever).
    link = dev.link
    cfg = dev.cfg
    rssi = None
    if "rssi" in cfg.sensors and cfg.wifi_ssid:
        # net stays loaded while sending only on a board with Wi-Fi; elsewhere it is not kept at all.
        from tbfleet import net

        if net.has_wifi():
            rssi = net.rssi
        else:
            unload("net")
        del net  # a local would keep the module alive for the whole loop
    # While waiting, MQTT answers pings and takes server pushes; HTTP and CoAP have nothing to poll.
    poll = getattr(link, "poll", None)
    interval_ms = int(cfg.telemetry_interval * 1000)
    epoch_year = time.gmtime(0)[0]
    next_at = time.ticks_ms()
    first = True
    while max_messages is None or dev.sent < max_messages:
        values = read(dev, rssi)
        ts = now_ms(epoch_year)
        # Without ts (clock unset) the server stamps the message on arrival.
        link.send_telemetry(json.dumps(values if ts is None else {"ts": ts, "values": values}).encode())
        dev.sent += 1
        if first:
            dev.accepted()
            first = False
        log.info("telemetry %d sent", dev.sent)
        next_at = time.ticks_add(next_at, interval_ms)
        left = time.ticks_diff(next_at, time.ticks_ms())
        if left < 0:
            next_at = time.ticks_ms()  # behind schedule: the next message goes now, without catching up
        while left >= 0:
            if poll:
                poll()
            left = time.ticks_diff(next_at, time.ticks_ms())
            if left <= 0:
                break
            time.sleep_ms(min(left, _POLL_EVERY_MS))
