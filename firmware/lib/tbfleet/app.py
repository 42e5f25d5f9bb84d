# The device's life: load the config and the saved credentials, provision when there are none, connect, send
# telemetry every interval, and act on each kind of failure.
import gc
import random
import sys
import time

from tbfleet import BadAnswer, NoAnswer, Refused, Rejected, log, unload

# Module attributes rather than const() so that tests can shorten them.
RETRY_FIRST_MS = 1000  # first wait after a failure; doubles per failure, with jitter
RETRY_CAP_MS = 300000
LONG_WAIT_MS = 900000  # after NOT_FOUND or FAILURE: waiting will not help soon, a person has to act


def _imported_since(loaded):
    # The tbfleet modules (short names) imported since sys.modules held the names in loaded.
    return [n[8:] for n in sys.modules if n.startswith("tbfleet.") and n not in loaded]


def _step(name, fn, *args):
    # tbfleet.<name>.<fn>(*args), with that module and whatever it imports loaded only for the call. A module bound
    # to a local of a long-running frame would stay alive (with everything it imported) until that frame returns.
    loaded = list(sys.modules)
    # Module names are built at run time: a literal one would intern every transport's name on every board.
    name = "tbfleet." + name
    try:
        __import__(name)
        return getattr(sys.modules[name], fn)(*args)
    finally:
        unload(*_imported_since(loaded))


def _onboard(device, cfg):
    # (credentials, unsaved, wait long): the saved ones, else one provisioning exchange over the device's link.
    # onboard is unloaded during the exchange and the link (with its transport) dropped after it, so that the
    # transport shares RAM with neither onboard nor provision nor store.
    creds = _step("onboard", "saved", cfg)
    if creds is not None:
        return creds, False, False
    request = _step("onboard", "request", cfg)
    body = error = None
    try:
        body = device.get_link().provision(request)
    except (NoAnswer, BadAnswer) as e:
        error = e
    finally:
        # A link this device made goes, with the modules it imported, so that parsing and saving the answer get
        # the transport's RAM; get_link makes it again to connect. A link passed in is not the device's to drop.
        if device.link is not None:
            device.link.close()
            if device.link_modules is not None:
                device.link = None
                unload(*device.link_modules)
    return _step("onboard", "settle", body, error, cfg)


class Device:
    # The loop's state across reconnects: messages sent, refusals in a row, the retry delay.
    def __init__(self, cfg, link=None):
        self.cfg = cfg
        self.link = link  # made on first use: a board with saved credentials checks them before the transport loads
        self.link_modules = None  # what making the link imported; None for a link passed in
        self.delay_ms = RETRY_FIRST_MS  # the next retry's wait; doubles per failure up to RETRY_CAP_MS
        self.ticked = time.ticks_ms()  # uptime is counted (in up_ms) from boot to here, by telemetry
        self.up_ms = 0
        self.refusals = 0
        self.sent = 0
        self.creds = None  # kept in RAM once known, so reconnects touch neither flash nor provisioning
        self.unsaved = False  # creds came from config.json: saved once the server accepts them

    def get_link(self):
        if self.link is None:
            loaded = list(sys.modules)
            # Only the configured transport is imported: a board that speaks MQTT never loads HTTP or CoAP.
            name = "tbfleet.via_" + self.cfg.transport
            __import__(name)
            self.link = sys.modules[name].Link(self.cfg)
            self.link_modules = _imported_since(loaded)
        return self.link

    def accepted(self):
        # Called on the first telemetry a connection sent: the proof that the credentials work (HTTP and CoAP have
        # no connect step).
        if self.unsaved:
            _step("onboard", "keep", self.creds, self.cfg)
            self.unsaved = False
        self.delay_ms = RETRY_FIRST_MS
        self.refusals = 0

    def retry_ms(self):
        # Between half and all of the current delay, so that a fleet that lost its server does not return in step.
        delay = self.delay_ms
        self.delay_ms = min(delay * 2, RETRY_CAP_MS)
        half = delay // 2
        return half + random.getrandbits(20) % (half + 1)

    def attempt(self, max_messages):
        # One pass: credentials (saved or provisioned), connect, send. Returns ms to wait before the next pass,
        # or None when max_messages were sent.
        cfg = self.cfg
        try:
            if cfg.wifi_ssid:
                # Wi-Fi and the clock; a joined Wi-Fi stays joined, as the interface belongs to the network module.
                _step("net", "up", cfg)
            if self.creds is None:
                creds, self.unsaved, wait_long = _onboard(self, cfg)
                if creds is None:
                    return LONG_WAIT_MS if wait_long else self.retry_ms()
                self.creds = creds
            self.get_link().open(self.creds)
            log.info("connected to %s:%d as %s", cfg.host, cfg.port, cfg.device_name)
            # telemetry is imported only now: while onboarding, its RAM is better spent on store and provision.
            from tbfleet import telemetry

            telemetry.send(self, max_messages)
            return None
        except Refused as e:
            self.refusals += 1
            # What to do about refused credentials is onboard's, loaded only when it happens.
            if _step("onboard", "refused", cfg, e, self.refusals, self.unsaved):
                self.creds = None
                self.refusals = 0
                if self.unsaved:
                    return LONG_WAIT_MS  # config.json's own: a person has to act
        except (OSError, BadAnswer, Rejected) as e:  # NoAnswer is an OSError
            log.warn("%s: %s", type(e).__name__, e)
        finally:
            if self.link:
                self.link.close()
        return self.retry_ms()


def run(cfg, max_messages=None, link=None):
    # The device loop; returns the number of telemetry messages sent once max_messages were sent.
    device = Device(cfg, link)
    while True:
        wait_ms = device.attempt(max_messages)
        if wait_ms is None:
            return device.sent
        log.info("retrying in %d ms", wait_ms)
        time.sleep_ms(wait_ms)


def main(path="config.json", max_messages=None):
    # Entry point of main.py (max_messages: stop after that many, for benchmarks). A bad config stops here with
    # one message; it is not retried.
    # A collection after every 512 bytes allocated: left to run only when the heap is full, garbage lies between
    # the blocks that stay, and a module loaded later finds no room large enough (the lifecycle needs 0.8-2.3 KB
    # more heap without it; one collection of a 24 KB heap takes about 12 us on the Unix port).
    gc.threshold(512)
    loaded = list(sys.modules)
    from tbfleet import config

    try:
        cfg = config.load(path)
    except config.ConfigError as e:
        log.error("%s", e)
        return 2
    finally:
        del config
        unload("config", "board")
    log.level = ("debug", "info", "warn", "error").index(cfg.log_level)
    try:
        run(cfg, max_messages)
    except Exception as e:  # noqa: BLE001 - a board must come back by itself, whatever went wrong
        log.error("unexpected %s: %s", type(e).__name__, e)
        from tbfleet import board

        if not board.can_reset():
            raise
        time.sleep_ms(RETRY_FIRST_MS * 10)
        board.reset()
    finally:
        # What the run imported (transport, telemetry) goes when main returns, so that calling main again starts
        # from the heap a reboot would give, not from one fragmented by the last run.
        unload(*_imported_since(loaded))
    return 0
