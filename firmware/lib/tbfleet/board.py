# Facts about the board the firmware runs on, with the same answers on ESP32 and on the Unix port, and the count of
# crashes in a row that Device.on_error keeps in flash.
import binascii
import machine
import os

_CRASHES = "crashes.txt"  # resets in a row after an unexpected exception; gone once the board runs well (app)


def uid():
    # Hex of the chip's unique id (the Wi-Fi MAC on ESP32). The Unix port has none: one is made up once and kept
    # on the board's filesystem, so a virtual board keeps its identity across restarts.
    if hasattr(machine, "unique_id"):
        return binascii.hexlify(machine.unique_id()).decode()
    try:
        with open("uid.txt") as f:
            value = f.read().strip()
        if len(value) == 12:
            return value
    except OSError:
        pass
    value = binascii.hexlify(os.urandom(6)).decode()
    with open("uid.txt", "w") as f:
        f.write(value)
    return value


def can_reset():
    return hasattr(machine, "reset")


def reset():
    # Callers ask can_reset() first; the guard here also tells lint's API check that this runs only where the port has
    # machine.reset (not on the Unix port).
    if hasattr(machine, "reset"):
        machine.reset()


def crashed():
    # Counts one more crash in a row in flash; returns the count, this one included.
    try:
        with open(_CRASHES) as f:
            count = int(f.read())
    except (OSError, ValueError):  # none yet, or a file a power cut left empty
        count = 0
    count += 1
    with open(_CRASHES, "w") as f:
        f.write(str(count))
    return count


def recovered():
    # The board runs well again: the next crash is the first in a row.
    try:
        os.remove(_CRASHES)
    except OSError:
        pass
