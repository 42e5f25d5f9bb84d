import sys

# ESP32 searches /lib already; the Unix port, run in the board's directory, needs to be told.
if "/lib" not in sys.path:
    sys.path.append("lib")

from tbfleet import app  # noqa: E402

sys.exit(app.main())
