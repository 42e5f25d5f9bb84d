# The device's life: load the config and the saved credentials, provision when there are none, connect, send
# telemetry every interval, and act on each kind of failure.
import random
import time

from tbfleet import board, config, log, net, provision, store, telemetry
from tbfleet.errors import BadAnswer, NoAnswer, Refused, Rejected

# Module attributes rather than const() so that tests can shorten them.
RETRY_FIRST_MS = 1000  # first wait after a failure; doubles per failure, with jitter
RETRY_CAP_MS = 300000
LONG_WAIT_MS = 900000  # after NOT_FOUND or FAILURE: waiting will not help soon, a person has to act
REFUSALS_BEFORE_REPROVISION = 3


class Backoff:
    def __init__(self, first_ms, cap_ms):
        self.first_ms = first_ms
        self.cap_ms = cap_ms
        self.reset()

    def reset(self):
        self.delay_ms = self.first_ms

    def next_ms(self):
        # Between half and all of the current delay, so that a fleet that lost its server does not return in step.
        delay = self.delay_ms
        self.delay_ms = min(delay * 2, self.cap_ms)
        half = delay // 2
        return half + random.getrandbits(20) % (half + 1)


def _link_class(transport):
    # Only the configured transport is imported: a board that speaks MQTT never loads the HTTP or CoAP client.
    if transport == "mqtt":
        from tbfleet.via_mqtt import Link
    elif transport == "http":
        from tbfleet.via_http import Link
    else:
        from tbfleet.via_coap import Link
    return Link


def configured_credentials(cfg):
    # The credentials config.json supplies itself (None for a server-generated token).
    ctype = cfg.credentials_type
    if ctype == "ACCESS_TOKEN":
        return {"type": ctype, "token": cfg.token}
    if ctype == "MQTT_BASIC":
        return {"type": ctype, "client_id": cfg.client_id or "", "username": cfg.username or "",
                "password": cfg.password or ""}
    if ctype == "X509_CERTIFICATE":
        return {"type": ctype}
    return None


def saved_credentials(cfg):
    record = store.load()
    if record is None:
        return None
    if record.get("device") != cfg.device_name or record.get("host") != cfg.host:
        log.warn("saved credentials belong to %s at %s, not %s at %s: provisioning again",
                 record.get("device"), record.get("host"), cfg.device_name, cfg.host)
        store.discard("config.json names another device or server")
        return None
    return record


def save_credentials(cfg, creds):
    record = dict(creds)
    record["device"] = cfg.device_name
    record["host"] = cfg.host
    store.save(record)
    return record


def provision_once(link, cfg):
    # Returns (credentials, whether they still need saving, ms to wait first when there are none).
    log.info("provisioning %s over %s at %s:%d", cfg.device_name, cfg.transport, cfg.host, cfg.port)
    outcome = provision.provision(link, cfg)
    status = outcome.status
    if status == provision.SUCCESS:
        log.info("provisioned %s with %s credentials", cfg.device_name, outcome.creds["type"])
        return save_credentials(cfg, outcome.creds), False, 0
    if status == provision.NOT_FOUND:
        log.error("provisioning refused (NOT_FOUND: %s): check provision_key and provision_secret, and that the "
                  "device profile allows provisioning; nothing saved", outcome.message)
        return None, False, LONG_WAIT_MS
    if status == provision.FAILURE:
        own = configured_credentials(cfg)
        if own:
            log.warn("provisioning answered FAILURE (%s): %s exists already; trying the credentials from "
                     "config.json", outcome.message, cfg.device_name)
            return own, True, 0
        log.error("provisioning failed (FAILURE: %s): %s already exists on the server, or is not "
                  "pre-provisioned there, or was provisioned before; delete it on the server or change "
                  "device_name", outcome.message, cfg.device_name)
        return None, False, LONG_WAIT_MS
    log.warn("provisioning got %s: %s", status, outcome.message)
    return None, False, None


def _idle(link, ms):
    # Wait ms while keeping the connection alive (MQTT answers pings and server pushes meanwhile).
    poll = getattr(link, "poll", None)
    if poll is None:
        time.sleep_ms(ms)
        return
    end = time.ticks_add(time.ticks_ms(), ms)
    while True:
        left = time.ticks_diff(end, time.ticks_ms())
        if left <= 0:
            return
        poll(left)


def send_loop(link, cfg, sensors, sent, max_messages):
    # Sends every cfg.telemetry_interval seconds until max_messages (None: for ever); returns the count sent.
    interval_ms = int(cfg.telemetry_interval * 1000)
    next_at = time.ticks_ms()
    while True:
        link.send_telemetry(telemetry.payload(sensors.read(), telemetry.now_ms()))
        sent += 1
        log.info("telemetry %d sent", sent)
        if max_messages is not None and sent >= max_messages:
            return sent
        next_at = time.ticks_add(next_at, interval_ms)
        wait = time.ticks_diff(next_at, time.ticks_ms())
        if wait < 0:
            next_at = time.ticks_ms()
        else:
            _idle(link, wait)


def run(cfg, max_messages=None):
    # The device loop; returns the number of telemetry messages sent once max_messages were sent.
    Link = _link_class(cfg.transport)
    link = Link(cfg)
    retry = Backoff(RETRY_FIRST_MS, RETRY_CAP_MS)
    sensors = telemetry.Sensors(cfg.sensors, net.rssi if net.has_wifi() else None)
    refusals = 0
    sent = 0
    while True:
        wait_ms = None
        unsaved = False
        try:
            net.up(cfg)
            creds = saved_credentials(cfg)
            if creds is None:
                creds, unsaved, wait_ms = provision_once(link, cfg)
            if creds is not None:
                link.open(creds)
                log.info("connected to %s:%d as %s", cfg.host, cfg.port, cfg.device_name)
                if unsaved:
                    creds = save_credentials(cfg, creds)
                retry.reset()
                refusals = 0
                sent = send_loop(link, cfg, sensors, sent, max_messages)
                link.close()
                return sent
        except Refused as e:
            refusals += 1
            log.warn("server refused the credentials (%s %s), %d in a row", e.args[0], e.args[1], refusals)
            if unsaved:
                log.error("the server refused the credentials from config.json too; fix them or delete %s on "
                          "the server", cfg.device_name)
                wait_ms = LONG_WAIT_MS
                refusals = 0
            elif refusals >= REFUSALS_BEFORE_REPROVISION:
                store.discard("refused %d times in a row" % refusals)
                refusals = 0
        except (NoAnswer, BadAnswer, Rejected) as e:
            log.warn("%s: %s", type(e).__name__, e)
        except OSError as e:
            log.warn("network error: %s", e)
        link.close()
        wait_ms = retry.next_ms() if wait_ms is None else wait_ms
        log.info("retrying in %d ms", wait_ms)
        time.sleep_ms(wait_ms)


def main(path="config.json"):
    # Entry point of main.py. A bad config stops here with one message; it is not retried.
    try:
        cfg = config.load(path)
    except config.ConfigError as e:
        log.error("%s", e)
        return 2
    log.level = {"debug": log.DEBUG, "info": log.INFO, "warn": log.WARN, "error": log.ERROR}[cfg.log_level]
    try:
        run(cfg)
    except Exception as e:  # noqa: BLE001 - a board must come back by itself, whatever went wrong
        log.error("unexpected %s: %s", type(e).__name__, e)
        if not board.can_reset():
            raise
        time.sleep_ms(RETRY_FIRST_MS * 10)
        board.reset()
    return 0
