# Wi-Fi bring-up against a scripted network module (the Unix port has none), including a reload of tbfleet.net
# between bring-up and the RSSI sensor, as app does.
import json
import sys

from mptest import eq, raises
from tbfleet import NoAnswer, unload


class WLAN:
    # Like ESP32's: network.WLAN(STA_IF) always answers the same interface.
    the = None

    def __new__(cls, kind):
        if cls.the is None:
            cls.the = object.__new__(cls)
            cls.the.connected = False
            cls.the.joins = []
            cls.the.joins_after = 0  # isconnected() polls before a join takes effect; None: never
            cls.the.polls = 0
        return cls.the

    def __init__(self, kind):
        pass

    def active(self, on):
        pass

    def connect(self, ssid, password):
        self.joins.append(ssid)

    def disconnect(self):
        self.connected = False

    def isconnected(self):
        if self.joins and not self.connected and self.joins_after is not None:
            self.polls += 1
            self.connected = self.polls > self.joins_after
        return self.connected

    def ifconfig(self):
        return ("192.168.4.2", "255.255.255.0", "192.168.4.1", "192.168.4.1")

    def status(self, what):
        eq(what, "rssi")
        return -58


class network:
    STA_IF = 0
    WLAN = WLAN


class Cfg:
    wifi_ssid = "greenhouse"
    wifi_password = "w1f1-pa55"
    timeout = 0.1  # 300 ms to join: the bring-up polls every 100 ms


def fresh_net():
    unload("net")
    from tbfleet import net

    return net


sys.modules["network"] = network


def test_rssi_after_a_reload_comes_from_the_joined_interface():
    net = fresh_net()
    assert net.has_wifi()
    eq(net.rssi(), None)  # not joined yet
    WLAN(0).joins_after = 1
    net.up(Cfg)
    eq(WLAN(0).joins, ["greenhouse"])
    net = fresh_net()
    eq(net.rssi(), -58)
    net.up(Cfg)  # still joined: no second join
    eq(WLAN(0).joins, ["greenhouse"])


def test_a_wifi_that_never_joins_is_no_answer_within_the_deadline():
    WLAN(0).joins_after = None
    net = fresh_net()
    e = raises(NoAnswer, net.up, Cfg)
    assert "greenhouse" in str(e) and "w1f1" not in str(e)
    eq(WLAN(0).connected, False)


class Link:
    def __init__(self):
        self.payloads = []

    def send(self, payload, rid=None):
        self.payloads.append(json.loads(payload))

    def open(self, creds, burst):
        self.events = []
        self.send(burst.pop())


def device(sensors):
    # An app.Device past onboarding, over a link that records its payloads.
    from tbfleet import app, config

    cfg = config.validate({"host": "127.0.0.1", "provision_key": "k", "provision_secret": "s", "device_name": "d",
                           "wifi_ssid": "greenhouse", "sensors": sensors, "telemetry_interval": 0})
    dev = app.Device(cfg, Link())
    dev.creds = {"type": "ACCESS_TOKEN", "token": "t"}
    return dev


def values(device):
    sent = device.link.payloads[0]
    return sent.get("values", sent)


def test_net_is_loaded_for_sending_only_when_rssi_is_configured():
    from tbfleet import session

    unload("net")
    dev = device(["uptime", "free_heap"])
    session.serve(dev, 1)
    eq(sorted(values(dev)), ["free_heap", "uptime"])
    assert "tbfleet.net" not in sys.modules
    WLAN(0).joins_after = 0
    WLAN(0).connect("greenhouse", "w1f1-pa55")
    dev = device(["uptime", "rssi"])
    session.serve(dev, 1)
    assert "tbfleet.net" in sys.modules  # a board with Wi-Fi keeps net while sending
    eq(values(dev)["rssi"], -58)
