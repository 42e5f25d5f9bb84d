# The connected part of a tbfleet.Device's life: connect, send telemetry every interval, and hand what the server
# sends in between (RPC requests, shared attribute changes) to the user's handlers, with the built-in ones (the
# status RPC, the telemetry_interval attribute: tbfleet.builtin). app imports this module only once the board has
# credentials. The built-in sensors and the timestamp are here too, not in a module of their own (bench: the HTTP
# and CoAP application lifecycles and the MQTT base one need 0.25 KB less heap so).
import gc
import json
import sys
import time

from micropython import const

from tbfleet import __version__, log, unload

_LISTEN_MS = const(1000)  # the longest single wait for the server between messages
# ESP32 counts time from 2000, ThingsBoard from 1970.
_EPOCH_2000_S = const(946684800)
# Before this (2024-01-01) the clock has not been set: let the server stamp the data instead of sending 2000-01-01.
_CLOCK_SET_AFTER_S = const(1704067200)


def about():
    # What the board publishes as client attributes at each connect, and the start of the status RPC's answer.
    impl = sys.implementation
    return {"firmware": __version__, "board": impl._machine, "micropython": "%d.%d.%d" % impl.version[:3]}


def serve(dev, max_messages):
    # Connects, then sends every dev.interval seconds and handles what the server sends in between, until dev.sent
    # reaches max_messages (None: for ever). connect is a function of its own, and this loop keeps to few locals,
    # so that neither frame needs more than 11 slots: a larger one goes on the heap, under everything the connection
    # does (serve's took 192 bytes).
    connect(dev)
    while max_messages is None or dev.sent < max_messages:
        # Between messages, and at least once per message (an interval of 0 leaves no time between them).
        wait_ms = time.ticks_diff(dev.next_at, time.ticks_ms())
        dev.link.listen(min(max(wait_ms, 0), _LISTEN_MS))
        dispatch(dev)
        if time.ticks_diff(dev.next_at, time.ticks_ms()) > 0:
            continue
        # Behind schedule, the next message goes now, without catching up.
        dev.next_at = time.ticks_add(time.ticks_ms(), int(dev.interval * 1000))
        send(dev, reading(dev))
        log.info("telemetry %d sent", dev.sent)


def connect(dev):
    # Opens dev's link: the client attributes, the request for the current shared attributes and the first
    # telemetry go with the connect.
    cfg = dev.cfg
    if "rssi" in cfg.sensors and cfg.wifi_ssid:
        from tbfleet import net

        # net stays loaded while sending only on a board with Wi-Fi; elsewhere it is not kept at all.
        if net.has_wifi():
            dev.rssi = net.rssi
        else:
            unload("net")
        del net  # a local would keep the module alive while connected
    link = dev.get_link()
    dev.next_at = time.ticks_add(time.ticks_ms(), int(dev.interval * 1000))
    # The client attributes and the first telemetry, in a list that open empties as they leave: neither is held
    # while it waits for the server (bench: the MQTT application lifecycle needs 0.4 KB less heap).
    burst = [json.dumps(about()).encode(), payload(reading(dev))]
    link.open(dev.creds, burst)
    dev.operator_action = None
    dev.connected = True
    dev.sent += 1
    dev.accepted()  # credentials from config.json are saved now: they work
    log.info("connected to %s:%d as %s", cfg.host, cfg.port, cfg.device_name)
    log.info("telemetry %d sent", dev.sent)
    dispatch(dev)


def send(dev, values):
    # One telemetry message of values over dev's open link; then what arrived meanwhile goes to the handlers.
    dev.link.send(payload(values))
    dev.sent += 1
    dispatch(dev)


def reading(dev):
    # The built-in sensors' values joined by every @telemetry function's (one that raises is logged and left out),
    # and what an operator was told to do, until a connection took it.
    values = sensors(dev, dev.rssi)
    for fn in dev.readers:
        try:
            values.update(fn())
        except Exception as e:  # noqa: BLE001 - the user's code must not stop the board
            log.error("telemetry %s: %s", fn.__name__, log.describe(e))
    if dev.operator_action:
        values["operator_action"] = dev.operator_action  # what kept the board away: on ThingsBoard once it is back
    return values


def payload(values):
    # {"ts": ms since 1970, "values": values}; without ts (clock unset) the server stamps the message on arrival.
    ts = now_ms(time.gmtime(0)[0])
    return json.dumps(values if ts is None else {"ts": ts, "values": values}).encode()


def dispatch(dev):
    # Hands what the link received to the handlers; an RPC's reply goes back at once. Other kinds (a provisioning
    # answer in a device's session) are dropped.
    events = dev.link.events
    while events:
        kind, rid, body = events.pop(0)
        try:
            data = json.loads(body)
            if kind == "rpc":
                if rid is None:
                    rid = data["id"]  # HTTP and CoAP carry it in the request
                # The reply leaves from here, when answer's frame (on the heap) is gone (bench: HTTP 0.5 KB).
                dev.link.send(answer(dev, data), rid)
            elif kind == "current":  # {"client": {...}, "shared": {...}}: the shared ones are ours
                changed(dev, data.get("shared", {}))
            elif kind == "attributes":
                changed(dev, data)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            log.warn("bad %s from the server: %s", kind, log.describe(e))


def answer(dev, request):
    # The reply (JSON bytes) to an RPC request: its handler's return value (the built-in "status" unless the user
    # has a handler of that name); {"error": ...} when there is no handler or it raised.
    method = request.get("method")
    handler = dev.handlers.get(method)
    reply = error = None
    if handler is None and method != "status":
        error = "no handler for method %s" % method
    else:
        try:
            if handler is None:
                from tbfleet import builtin

                try:
                    reply = builtin.status(dev)
                finally:
                    del builtin
                    unload("builtin")
            else:
                reply = handler(request.get("params"))
            reply = json.dumps(reply)
        except Exception as e:  # noqa: BLE001 - the user's code must not stop the board
            log.error("rpc %s: %s", method, log.describe(e))
            error = log.describe(e)
    if error is not None:
        reply = json.dumps({"error": error})
    return str(reply).encode()


def changed(dev, values):
    # Shared attributes changed (or arrived after a connect): the built-in interval first, then the callbacks.
    if "telemetry_interval" in values or "telemetry_interval" in values.get("deleted", ()):
        from tbfleet import builtin

        try:
            builtin.set_interval(dev, values.get("telemetry_interval"))  # None when deleted
        finally:
            del builtin
            unload("builtin")
    for fn in dev.watchers:
        try:
            fn(values)
        except Exception as e:  # noqa: BLE001 - the user's code must not stop the board
            log.error("attributes %s: %s", fn.__name__, log.describe(e))


def now_ms(epoch_year):
    # Milliseconds since 1970, or None while the board's clock is unset. epoch_year: the year this port's
    # clock counts from, time.gmtime(0)[0] (2000 on ESP32).
    ms = time.time_ns() // 1000000
    if epoch_year == 2000:
        ms += _EPOCH_2000_S * 1000
    if ms < _CLOCK_SET_AFTER_S * 1000:
        return None
    return ms


def sensors(dev, rssi=None):
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
                value = sensor() if sensor else round((esp32.raw_temperature() - 32) * 5 / 9, 1)
            except (ImportError, AttributeError):
                value = None
        if value is not None:
            values[name] = value
    return values
