# Network bring-up: Wi-Fi and the clock on boards that have them; nothing to do on the Unix port. app loads this
# module only around each bring-up (and for the RSSI sensor), so nothing here may rely on staying loaded: the
# interface is asked of the network module again after a reload.
import time

from tbfleet import log
from tbfleet.errors import NoAnswer

try:
    import network
except ImportError:
    network = None

_wlan = None


def has_wifi():
    return network is not None


def up(cfg):
    # Join the configured Wi-Fi (within cfg.timeout) and set the clock; NoAnswer when the network is not there.
    if network is None:
        return
    wlan = _iface()
    wlan.active(True)
    if not wlan.isconnected():
        log.info("joining Wi-Fi %s", cfg.wifi_ssid)
        wlan.connect(cfg.wifi_ssid, cfg.wifi_password or "")
        start = time.ticks_ms()
        while not wlan.isconnected():
            if time.ticks_diff(time.ticks_ms(), start) > cfg.timeout * 3000:
                wlan.disconnect()
                raise NoAnswer("Wi-Fi %s not joined" % cfg.wifi_ssid)
            time.sleep_ms(100)
        log.info("Wi-Fi up, address %s", wlan.ifconfig()[0])
        _sync_clock()


def _iface():
    global _wlan
    if _wlan is None:
        _wlan = network.WLAN(network.STA_IF)
    return _wlan


def _sync_clock():
    try:
        import ntptime

        ntptime.settime()
        log.info("clock set from NTP")
    except Exception as e:  # noqa: BLE001 - no clock only means the server stamps the telemetry
        log.warn("clock not set (%s); the server will stamp telemetry", e)


def rssi():
    if network is None:
        return None
    wlan = _iface()
    if not wlan.isconnected():
        return None
    return wlan.status("rssi")
