"""What every SDK script shares: parameters from stdin, JSON lines on stdout, waiting with a deadline.

Runs in .venv-tbsdk (see tests/host/tbsdk.py), so it uses the standard library only.
"""

import json
import logging
import sys
import threading
import time
import urllib.request

_params = None


def params():
    """The script's parameters: the JSON object the test wrote on stdin."""
    global _params
    if _params is None:
        _params = json.loads(sys.stdin.read())
        logging.basicConfig(level=logging.DEBUG if _params.get("debug") else logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return _params


def emit(event, **fields):
    """One JSON line on stdout: {"event": event, **fields}."""
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def wait(condition, timeout, what):
    """Poll `condition()` until it is true; exit 3 with a message naming `what` after `timeout` seconds."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            emit("timeout", waiting_for=what)
            sys.exit(3)
        time.sleep(0.02)


class Inbox:
    """What callbacks delivered, collected from the SDK's threads."""

    def __init__(self):
        self.items = []
        self._lock = threading.Lock()

    def put(self, item):
        with self._lock:
            self.items.append(item)

    def __len__(self):
        with self._lock:
            return len(self.items)


def connect(client, timeout=15):
    """Connect a TBDeviceMqttClient and wait until the server has answered the SDK's own SUBSCRIBEs; their codes.

    The SDK subscribes to four topics when its CONNACK arrives and does not wait for the SUBACKs: counting them
    tells when pushes can be sent. (The SDK's connect callback cannot serve: connect() sets it only after starting
    paho's thread, so a quick CONNACK finds none.) The SDK does not use paho's on_subscribe.
    """
    subacks = Inbox()
    client._client.on_subscribe = lambda _c, _u, _mid, codes, _props: subacks.put([int(c.value) for c in codes])
    client.connect(min_reconnect_delay=1, timeout=5)
    wait(client.is_connected, timeout, "CONNACK")
    wait(lambda: len(subacks) >= 4, timeout, "the SDK's four SUBACKs")
    return subacks.items


def inspection(http_port, method, path, body=None):
    """Call the emulator's inspection API on 127.0.0.1 (the server side of a test); the decoded JSON or None."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{http_port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        raw = response.read()
    return json.loads(raw) if raw else None
