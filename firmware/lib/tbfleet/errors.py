# Failure kinds shared by every transport, so that the application acts on the kind, not on the protocol.


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
