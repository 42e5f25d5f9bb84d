# Facts about the board the firmware runs on, with the same answers on ESP32 and on the Unix port.
import binascii
import machine


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
    import os

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
