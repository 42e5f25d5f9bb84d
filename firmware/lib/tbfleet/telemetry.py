# Sensor readings turned into ThingsBoard telemetry: {"ts": <ms since 1970>, "values": {...}}.
import gc
import time

from micropython import const

from tbfleet import log, unload

# ESP32 counts time from 2000, ThingsBoard from 1970.
_EPOCH_OFFSET_S = const(946684800)
# Before this (2024-01-01) the clock has not been set: let the server stamp the data instead of sending 2000-01-01.
_CLOCK_SET_AFTER_S = const(1704067200)
_POLL_EVERY_MS = const(1000)


def epoch_offset_s(first_year):
    # Seconds to add to this port's time.time() for Unix time, given the year its epoch starts in.
    return _EPOCH_OFFSET_S if first_year == 2000 else 0


def now_ms():
    # Milliseconds since 1970, or None while the board's clock is unset.
    ms = time.time_ns() // 1000000 + epoch_offset_s(time.gmtime(0)[0]) * 1000
    if ms < _CLOCK_SET_AFTER_S * 1000:
        return None
    return ms


class Uptime:
    # ticks_ms wraps (about 12.4 days on ESP32): accumulate differences instead of trusting one reading.
    # since: the ticks_ms value to count from (default now).
    def __init__(self, since=None):
        self._last = time.ticks_ms() if since is None else since
        self._total_ms = 0

    def seconds(self):
        now = time.ticks_ms()
        self._total_ms += time.ticks_diff(now, self._last)
        self._last = now
        return self._total_ms // 1000


def _mcu_temp():
    try:
        import esp32
    except ImportError:
        return None
    fn = getattr(esp32, "mcu_temperature", None)
    if fn:
        return fn()
    raw = getattr(esp32, "raw_temperature", None)
    if raw:
        return round((raw() - 32) / 1.8, 1)  # the original ESP32 reports degrees Fahrenheit
    return None


class Sensors:
    def __init__(self, names, rssi=None, since=None):
        self.names = names
        self.uptime = Uptime(since)
        self._rssi = rssi  # a function giving the Wi-Fi RSSI, or None where there is no Wi-Fi

    def read(self):
        # The values of every configured sensor that this board has.
        values = {}
        for name in self.names:
            if name == "uptime":
                value = self.uptime.seconds()
            elif name == "free_heap":
                value = gc.mem_free()
            elif name == "heap_used":
                value = gc.mem_alloc()
            elif name == "rssi":
                value = self._rssi() if self._rssi else None
            else:
                value = _mcu_temp()
            if value is not None:
                values[name] = value
        return values


def payload(values, ts=None):
    # JSON bytes of one telemetry message; without ts the server stamps it on arrival.
    import json

    if ts is None:
        return json.dumps(values).encode()
    return json.dumps({"ts": ts, "values": values}).encode()


def _idle(link, ms):
    # Wait ms while keeping the connection alive: MQTT answers pings and takes server pushes meanwhile.
    poll = getattr(link, "poll", None)
    end = time.ticks_add(time.ticks_ms(), ms)
    while True:
        if poll:
            poll()
        left = time.ticks_diff(end, time.ticks_ms())
        if left <= 0:
            return
        time.sleep_ms(min(left, _POLL_EVERY_MS))


def _rssi_source(names):
    # net.rssi when the rssi sensor is configured on a board with Wi-Fi (net then stays loaded while sending),
    # else None: without it, net is not loaded at all.
    if "rssi" not in names:
        return None
    from tbfleet import net

    if net.has_wifi():
        return net.rssi
    unload("net")
    return None


def send(dev, max_messages):
    # app's loop once connected (here, so that it takes no RAM while provisioning): sends over dev.link every
    # telemetry_interval seconds until dev.sent reaches max_messages (None: for ever).
    link = dev.link
    cfg = dev.cfg
    if dev.sensors is None:
        dev.sensors = Sensors(cfg.sensors, _rssi_source(cfg.sensors), dev.booted)
    interval_ms = int(cfg.telemetry_interval * 1000)
    next_at = time.ticks_ms()
    first = True
    while max_messages is None or dev.sent < max_messages:
        link.send_telemetry(payload(dev.sensors.read(), now_ms()))
        dev.sent += 1
        if first:
            dev.accepted()
            first = False
        log.info("telemetry %d sent", dev.sent)
        next_at = time.ticks_add(next_at, interval_ms)
        wait = time.ticks_diff(next_at, time.ticks_ms())
        if wait < 0:
            next_at = time.ticks_ms()
        else:
            _idle(link, wait)
