# The stock application as a function, for the benchmark's boots and the tests' boards (firmware/main.py is the same
# in one line: tbfleet.Device().run()). In a module of its own, as a user's application never needs it (bench: the
# application lifecycle needs 0.1-0.45 KB less heap than with it in app; the stock one 0.4 KB less to 0.5 KB more).
import sys

from tbfleet import log, unload
from tbfleet.app import Device, imported_since


def main(path="config.json", max_messages=None):
    # The stock application with an exit code (max_messages: stop after that many). A bad config stops here with
    # one message and exit code 2; it is not retried.
    loaded = list(sys.modules)
    from tbfleet import config

    try:
        device = Device(path)
    except config.ConfigError as e:
        log.error("%s", e)
        return 2
    finally:
        del config
        unload("config", "board")
    try:
        device.run(max_messages)
    finally:
        # What the run imported (transport, session) goes when main returns, so that calling main again starts
        # from the heap a reboot would give, not from one fragmented by the last run.
        unload(*imported_since(loaded))
    return 0
