# Network bring-up: Wi-Fi and the clock on boards that have them; nothing to do on the Unix port. app loads this
# module only around each bring-up (and for the RSSI sensor), so nothing here may rely on staying loaded: the
# interface is asked of the network module each time (ESP32 answers the same one).
from tbfleet import log

try:
    import network
except ImportError:
    network = None


def has_wifi():
    return network is not None


def up(cfg):
    # Join the configured Wi-Fi (within cfg.timeout) and set the clock; NoAnswer when the network is not there.
    if network is None:
        return
    wlan = network.WLAN(network.STA_IF)
    wlan.active(True)
    if wlan.isconnected():
        return
    log.info("joining Wi-Fi %s", cfg.wifi_ssid)
    wlan.connect(cfg.wifi_ssid, cfg.wifi_password or "")
    import time

    # Joining may take three network waits; asked every 100 ms.
    for _ in range(int(cfg.timeout * 30)):
        if wlan.isconnected():
            break
        time.sleep_ms(100)
    else:
        wlan.disconnect()
        from tbfleet import NoAnswer

        raise NoAnswer("Wi-Fi %s not joined" % cfg.wifi_ssid)
    log.info("Wi-Fi up, address %s", wlan.ifconfig()[0])
    try:
        import ntptime

        ntptime.settime()
    except Exception as e:  # noqa: BLE001 - no clock only means the server stamps the telemetry
        log.warn("clock not set (%s): the server stamps telemetry", e)


def rssi():
    if network is None:
        return None
    wlan = network.WLAN(network.STA_IF)
    return wlan.status("rssi") if wlan.isconnected() else None
