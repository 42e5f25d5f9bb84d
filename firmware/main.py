# The stock application: the board's health figures (config.json's "sensors") every telemetry interval, with the
# built-in "status" RPC and telemetry_interval shared attribute. Your own main.py replaces this file (README.md,
# "Your own application"); `make deploy APP=...` copies it.
import sys

# ESP32 searches /lib already; the Unix port, run in the board's directory, needs to be told.
if "/lib" not in sys.path:
    sys.path.append("lib")

import tbfleet  # noqa: E402

tbfleet.Device().run()
