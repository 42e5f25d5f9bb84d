# The connected part of a tbfleet.Device's life: connect, send telemetry every interval, and hand what the server
# sends in between (RPC requests, shared attribute changes) to the user's handlers, with the built-in ones (the
# status RPC, the telemetry_interval attribute). app imports this module only once the board has credentials.
import gc
import json
import sys
import time

from micropython import const

from tbfleet import __version__, log, telemetry, unload

_LISTEN_MS = const(1000)  # the longest single wait for the server between messages
_MAX_INTERVAL = const(604800)  # the telemetry_interval range config.json allows, for the shared attribute too


def about():
    # What the board publishes as client attributes at each connect, and the start of the status RPC's answer.
    impl = sys.implementation
    return {"firmware": __version__, "board": impl._machine, "micropython": "%d.%d.%d" % impl.version[:3]}


def serve(dev, max_messages):
    # Connects (the client attributes, the request for the current shared attributes and the first telemetry go
    # with it), then sends every dev.interval seconds and handles what the server sends in between, until dev.sent
    # reaches max_messages (None: for ever).
    cfg = dev.cfg
    if "rssi" in cfg.sensors and cfg.wifi_ssid:
        from tbfleet import net

        # net stays loaded while sending only on a board with Wi-Fi; elsewhere it is not kept at all.
        if net.has_wifi():
            dev.rssi = net.rssi
        else:
            unload("net")
        del net  # a local would keep the module alive for the whole loop
    link = dev.get_link()
    dev.next_at = time.ticks_add(time.ticks_ms(), int(dev.interval * 1000))
    link.open(dev.creds, json.dumps(about()).encode(), payload(reading(dev)))
    dev.connected = True
    dev.sent += 1
    dev.accepted()  # credentials from config.json are saved now: they work
    log.info("connected to %s:%d as %s", cfg.host, cfg.port, cfg.device_name)
    log.info("telemetry %d sent", dev.sent)
    dispatch(dev)
    while max_messages is None or dev.sent < max_messages:
        # Between messages, and at least once per message (an interval of 0 leaves no time between them).
        link.listen(max(0, min(time.ticks_diff(dev.next_at, time.ticks_ms()), _LISTEN_MS)))
        dispatch(dev)
        if time.ticks_diff(dev.next_at, time.ticks_ms()) > 0:
            continue
        # Behind schedule, the next message goes now, without catching up.
        dev.next_at = time.ticks_add(time.ticks_ms(), int(dev.interval * 1000))
        send(dev, reading(dev))
        log.info("telemetry %d sent", dev.sent)


def send(dev, values):
    # One telemetry message of values over dev's open link; then what arrived meanwhile goes to the handlers.
    dev.link.send_telemetry(payload(values))
    dev.sent += 1
    dispatch(dev)


def reading(dev):
    # The built-in sensors' values joined by every @telemetry function's; one that raises is logged and left out.
    values = telemetry.read(dev, dev.rssi)
    for fn in dev.readers:
        try:
            values.update(fn())
        except Exception as e:  # noqa: BLE001 - the user's code must not stop the board
            log.error("telemetry %s: %s", fn.__name__, log.describe(e))
    return values


def payload(values):
    # {"ts": ms since 1970, "values": values}; without ts (clock unset) the server stamps the message on arrival.
    ts = telemetry.now_ms(time.gmtime(0)[0])
    return json.dumps(values if ts is None else {"ts": ts, "values": values}).encode()


def dispatch(dev):
    # Hands what the link received to the handlers; an RPC's reply goes back at once.
    events = dev.link.events
    while events:
        kind, rid, body = events.pop(0)
        try:
            data = json.loads(body)
            if kind == "rpc":
                answer(dev, data["id"] if rid is None else rid, data)
            else:
                if kind == "current":  # {"client": {...}, "shared": {...}}: the shared ones are ours
                    data = data.get("shared", {})
                changed(dev, data)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            log.warn("bad %s from the server: %s", kind, log.describe(e))


def answer(dev, rid, request):
    # Replies to RPC rid with its handler's return value; {"error": ...} when there is no handler or it raised.
    method = request.get("method")
    handler = dev.handlers.get(method)
    reply = error = None
    if handler is None:
        error = "no handler for method %s" % method
    else:
        try:
            reply = json.dumps(handler(request.get("params")))
        except Exception as e:  # noqa: BLE001 - the user's code must not stop the board
            log.error("rpc %s: %s", method, log.describe(e))
            error = log.describe(e)
    if error is not None:
        reply = json.dumps({"error": error})
    dev.link.reply(rid, str(reply).encode())


def changed(dev, values):
    # Shared attributes changed (or arrived after a connect): the built-in interval first, then the callbacks.
    if "telemetry_interval" in values:
        set_interval(dev, values["telemetry_interval"])
    elif "telemetry_interval" in values.get("deleted", ()):
        set_interval(dev, None)
    for fn in dev.watchers:
        try:
            fn(values)
        except Exception as e:  # noqa: BLE001 - the user's code must not stop the board
            log.error("attributes %s: %s", fn.__name__, log.describe(e))


def set_interval(dev, seconds):
    # The shared attribute telemetry_interval: takes effect at once and is saved for the next boot; deleted (None),
    # config.json's interval again.
    if seconds is None:
        seconds = dev.cfg.telemetry_interval
    elif type(seconds) not in (int, float) or not 0 <= seconds <= _MAX_INTERVAL:
        log.warn("telemetry_interval %r ignored: not a number in 0..%d", seconds, _MAX_INTERVAL)
        return
    if seconds == dev.interval:
        return
    # Due counted from the last message, as if the new interval had been there all along.
    dev.next_at = time.ticks_add(dev.next_at, int((seconds - dev.interval) * 1000))
    dev.interval = seconds
    log.info("telemetry interval %s s", seconds)
    from tbfleet import app

    with open(app.SETTINGS, "w") as f:
        json.dump({"telemetry_interval": seconds}, f)


def status(dev):
    # The built-in RPC "status": what a person diagnosing the board asks first.
    import machine

    reply = about()
    reply["uptime"] = dev.uptime_ms() // 1000
    reply["free_heap"] = gc.mem_free()
    reply["rssi"] = dev.rssi() if dev.rssi else None
    reply["reset_cause"] = None  # the Unix port has none
    if hasattr(machine, "reset_cause"):
        reply["reset_cause"] = machine.reset_cause()  # its number: machine.PWRON_RESET ...
    reply["last_error"] = dev.last_error
    return reply
