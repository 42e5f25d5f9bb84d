# What a board does for the server with no user code besides telemetry: the "status" RPC and the telemetry_interval
# shared attribute (saved for the next boot). Both are rare, so session imports this module only when the server asks
# for one of them, Device once to read the saved interval, and both unload it after (bench: 0.25-1 KB less heap for
# every lifecycle than with them loaded while connected).
import gc
import json

from micropython import const

from tbfleet import log

_MAX_INTERVAL = const(604800)  # the telemetry_interval range config.json allows, for the shared attribute too
SETTINGS = "settings.json"  # what ThingsBoard set that outlives a reboot: the telemetry interval


def status(dev):
    # The RPC "status": what a person diagnosing the board asks first.
    import machine

    from tbfleet import session

    reply = session.about()
    reply["uptime"] = dev.uptime_ms() // 1000
    reply["free_heap"] = gc.mem_free()
    reply["rssi"] = dev.rssi() if dev.rssi else None
    reply["reset_cause"] = None  # the Unix port has none
    if hasattr(machine, "reset_cause"):
        reply["reset_cause"] = machine.reset_cause()  # its number: machine.PWRON_RESET ...
    reply["last_error"] = dev.last_error
    return reply


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
    import time

    # Due counted from the last message, as if the new interval had been there all along.
    dev.next_at = time.ticks_add(dev.next_at, int((seconds - dev.interval) * 1000))
    dev.interval = seconds
    log.info("telemetry interval %s s", seconds)
    with open(SETTINGS, "w") as f:
        json.dump({"telemetry_interval": seconds}, f)


def saved_interval(cfg):
    # The telemetry interval to start with: the one saved by set_interval, else (none saved, unreadable, out of
    # config.json's range) config.json's.
    try:
        with open(SETTINGS) as f:
            saved = json.load(f)["telemetry_interval"]
        if type(saved) in (int, float) and 0 <= saved <= _MAX_INTERVAL:
            return saved
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return cfg.telemetry_interval
