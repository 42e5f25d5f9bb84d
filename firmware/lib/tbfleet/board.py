# Facts about the board the firmware runs on, with the same answers on ESP32 and on the Unix port.
try:
    import machine
except ImportError:
    machine = None

_UID_FILE = "uid.txt"


def uid():
    # Hex of the chip's unique id (the Wi-Fi MAC on ESP32). The Unix port has none: one is made up once and kept
    # on the board's filesystem, so a virtual board keeps its identity across restarts.
    fn = getattr(machine, "unique_id", None)
    if fn:
        return "".join("%02x" % b for b in fn())
    try:
        with open(_UID_FILE) as f:
            value = f.read().strip()
        if len(value) == 12:
            return value
    except OSError:
        pass
    import os

    value = "".join("%02x" % b for b in os.urandom(6))
    with open(_UID_FILE, "w") as f:
        f.write(value)
    return value


def can_reset():
    return hasattr(machine, "reset")


def reset():
    machine.reset()
