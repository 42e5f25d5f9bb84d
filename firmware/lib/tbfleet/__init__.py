# tbfleet: import it and make a tbfleet.Device (README.md, "Your own application"). Also what every phase of the
# firmware shares: giving a module's RAM back once its work is done, and the kinds of
# failure every transport raises, so that the application acts on the kind, not on the protocol. (Here rather than
# in a module of their own: each module costs RAM for as long as it is loaded, and these always are.)
import gc
import sys

__version__ = "0.2.0"


def unload(*names):
    # Drop tbfleet modules (their strings stay interned); the next import loads them again.
    package = sys.modules["tbfleet"].__dict__
    for name in names:
        sys.modules.pop("tbfleet." + name, None)
        package.pop(name, None)
    gc.collect()


class NoAnswer(OSError):
    # The server could not be reached, closed the connection, or did not answer before the deadline.
    pass


class BadAnswer(ValueError):
    # The server answered, but with something that is not what the protocol allows.
    pass


class Refused(Exception):
    # The server refused our credentials (MQTT CONNACK 2/4/5, HTTP 401, CoAP 4.01).
    # args: (code, reason) where code is the protocol's own number and reason a short name.
    pass


class Rejected(Exception):
    # The server took the request but refused its content (HTTP 413/500, CoAP 4.00/5.00, MQTT close on publish).
    # args: (code, reason)
    pass


from tbfleet.app import Device  # noqa: E402, F401 - the public API; app uses the names above
