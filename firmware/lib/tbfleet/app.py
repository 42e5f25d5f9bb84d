# The board's life as a library: tbfleet.Device loads config.json and the saved credentials, provisions when there
# are none, connects, sends telemetry (the built-in sensors' values joined by the user's) every interval, answers
# server-side RPC and hands shared attributes to the user's callbacks. The failure policy is in its on_* methods and
# retry_ms, which a subclass may override.
import gc
import sys
import time

from tbfleet import BadAnswer, NoAnswer, Refused, Rejected, log, unload

# Module attributes rather than const() so that tests can shorten them.
RETRY_FIRST_MS = 1000  # first wait after a failure; doubles per failure, with jitter
RETRY_CAP_MS = 300000
LONG_WAIT_MS = 900000  # after NOT_FOUND or FAILURE: waiting will not help soon, a person has to act
CRASH_FIRST_MS = 10000  # before the reset after an unexpected exception; doubles per crash in a row


def imported_since(loaded):
    # The tbfleet modules (short names) imported since sys.modules held the names in loaded.
    return [n[8:] for n in sys.modules if n.startswith("tbfleet.") and n not in loaded]


def unload_onboarding():
    # The one place the onboarding modules go, as a group (onboard.credentials lets store and provision go before
    # the provisioning exchange too), with the failure policy: the transport's exchange and the telemetry loop need
    # their RAM (bench: without it every lifecycle needs about 6 KB more heap).
    unload("onboard", "store", "provision", "policy")


class Device:
    # config: the path of the config file (None: config.json), or a tbfleet.config.Config already loaded. link: a
    # transport link to use instead of the configured one (tests). A bad config raises config.ConfigError naming
    # the field.
    def __init__(self, config=None, link=None):
        # A collection after every 512 bytes allocated: left to run only when the heap is full, garbage lies between
        # the blocks that stay, and a module loaded later finds no room large enough (the lifecycle needs 0.8-2.3 KB
        # more heap without it; one collection of a 24 KB heap takes about 12 us on the Unix port).
        gc.threshold(512)
        if config is None or type(config) is str:
            from tbfleet import config as loader

            try:
                cfg = loader.load(config or "config.json")
            finally:
                del loader
                unload("config", "board")
        else:
            cfg = config
        self.cfg = cfg
        self.app = cfg.app  # config.json's "app" object: the user's own settings
        # By its initial: debug, info, warn, error (a tuple of the four names would be one more object in RAM).
        log.level = "diwe".index(cfg.log_level[0])
        self.link = link  # made on first use: a board with saved credentials checks them before the transport loads
        self.link_modules = None  # what making the link imported; None for a link passed in
        self.delay_ms = RETRY_FIRST_MS  # the next retry's wait; doubles per failure up to RETRY_CAP_MS
        self.ticked = time.ticks_ms()  # uptime is counted (in up_ms) from boot to here, by telemetry
        self.up_ms = 0
        self.refusals = 0
        self.sent = 0
        self.creds = None  # kept in RAM once known, so reconnects touch neither flash nor provisioning
        self.unsaved = False  # creds came from config.json: saved once the server accepts them
        self.last_error = None
        # What an operator was told to do (_OPERATOR), sent with the first telemetry once the board is connected again.
        self.operator_action = None
        self.connected = False
        from tbfleet import builtin

        try:
            self.interval = builtin.saved_interval(cfg)  # the telemetry_interval ThingsBoard set, else config.json's
        finally:
            del builtin
            unload("builtin")
        self.next_at = time.ticks_ms()  # when the next telemetry message is due
        self.readers = []
        self.handlers = {}  # besides the built-in "status" RPC (tbfleet.builtin)
        self.watchers = []
        self.rssi = None

    # -- the public API ----------------------------------------------------------------------------------------------

    def telemetry(self, fn):
        # Decorator: fn() returns a dict of values that joins each telemetry message.
        self.readers.append(fn)
        return fn

    def rpc(self, method):
        # Decorator factory: the function answers server-side RPC `method`; it takes the params, returns the reply.
        def register(fn):
            self.handlers[method] = fn
            return fn

        return register

    def attributes(self, fn):
        # Decorator: fn(changed) gets the current shared attributes after each connect, then every change
        # ({"key": value, ...}, or {"deleted": [keys]}).
        self.watchers.append(fn)
        return fn

    def send(self, values):
        # One telemetry message of these values now; NoAnswer when not connected.
        if not self.connected:
            raise NoAnswer("not connected")
        from tbfleet import session

        session.send(self, values)

    def run(self, max_messages=None):
        # Provision when needed, connect, send and listen for ever (max_messages: return once that many were sent,
        # with their count). What ends a pass goes to failed, which says how long to wait before the next. The
        # waits are inside the try, and run is the one frame with an exception handler under a pass: such a frame
        # goes on the heap, as a pass's own did (288 bytes while every pass ran).
        wait_ms = 0
        while True:
            try:
                if wait_ms:
                    log.info("retrying in %d ms", wait_ms)
                    time.sleep_ms(wait_ms)
                wait_ms = self.attempt(max_messages)
                if wait_ms is None:
                    return self.sent
            except Exception as e:  # noqa: BLE001 - a board must come back by itself, whatever went wrong
                wait_ms = self.failed(e)

    def uptime_ms(self):
        # Summed from tick differences: ticks_ms wraps (about 12.4 days on ESP32), so no single reading is trusted.
        now = time.ticks_ms()
        self.up_ms += time.ticks_diff(now, self.ticked)
        self.ticked = now
        return self.up_ms

    # -- the failure policy: override in a subclass to change it (the defaults are in tbfleet.policy) -------------

    def retry_ms(self):
        # The wait before the next attempt: between half and all of the current delay, so that a fleet that lost
        # its server does not return in step; the delay doubles per failure.
        delay = self.delay_ms
        self.delay_ms = min(delay * 2, RETRY_CAP_MS)
        half = delay // 2
        import random

        return half + random.getrandbits(20) % (half + 1)

    def on_provisioning_failed(self, status, message):
        # Provisioning gave no credentials. status: NOT_FOUND, FAILURE, NO_ANSWER, BAD_ANSWER (or another status
        # the server sent); returns the ms to wait before provisioning again. Default: LONG_WAIT_MS after NOT_FOUND
        # and FAILURE (a person has to act: operator_action says what), retry_ms() after the others.
        from tbfleet import policy

        return policy.provisioning_failed(self, status, message)

    def on_refused(self, error, refusals):
        # The server refused the credentials (error: Refused), `refusals` times in a row. True forgets them (saved
        # ones are set aside, so that the next attempt provisions again). Default: config.json's at once (with
        # operator_action), saved ones after 3, as one refusal may be the server's passing state.
        from tbfleet import policy

        return policy.refused(self, error, refusals)

    def on_error(self, error):
        # What run does with an exception nothing else handled. Default: log it; reset a board that can (after a
        # wait that doubles per crash in a row), raise elsewhere.
        from tbfleet import policy

        policy.crashed(error)

    # -- the core ----------------------------------------------------------------------------------------------------

    def get_link(self):
        if self.link is None:
            loaded = list(sys.modules)
            transport = self.cfg.transport
            # A block held while the transport's code loads and let go before the link is made: a module's code
            # leaves no free block as large as the link's buffer (bench: the MQTT and CoAP application lifecycles need
            # 0.2-0.3 KB less heap than without).
            room = bytearray(512)
            # Only the configured transport is imported: a board that speaks MQTT never loads HTTP or CoAP.
            if transport == "mqtt":
                from tbfleet import via_mqtt as via
            elif transport == "http":
                from tbfleet import via_http as via
            else:
                from tbfleet import via_coap as via
            del room
            self.link = via.Link(self.cfg)
            self.link_modules = imported_since(loaded)
        return self.link

    def onboard(self):
        # Sets self.creds: the saved ones, else provisioned (tbfleet.onboard). Returns None, or the ms to wait when
        # there are none.
        from tbfleet import onboard

        try:
            return onboard.credentials(self)
        finally:
            del onboard
            unload_onboarding()

    def accepted(self):
        # Called once a connection's first telemetry went through: the proof that the credentials work (HTTP and
        # CoAP have no connect step).
        if self.unsaved:
            from tbfleet import onboard

            try:
                self.creds = onboard.keep(self.creds, self.cfg)
            finally:
                del onboard
                unload_onboarding()
            self.unsaved = False
        # The board runs well: a count of crashes in a row goes (board is loaded only when there is one).
        try:
            open("crashes.txt").close()
            from tbfleet import board

            board.recovered()
            del board
            unload("board")
        except OSError:
            pass
        self.delay_ms = RETRY_FIRST_MS
        self.refusals = 0

    def attempt(self, max_messages):
        # One pass: credentials (saved or provisioned), connect, send and listen. Returns the ms to wait before the
        # next pass when there are no credentials, or None once max_messages were sent; run hands what it raises to
        # failed.
        if self.cfg.wifi_ssid:
            # Wi-Fi and the clock; a joined Wi-Fi stays joined, as the interface belongs to the network module.
            from tbfleet import net

            net.up(self.cfg)  # should it fail, the next pass finds net loaded and calls it again
            del net
            unload("net")
        if self.creds is None:
            wait_ms = self.onboard()
            if wait_ms is not None:
                return wait_ms
        # session (the connected part) is imported only now: while onboarding, its RAM is better spent on store
        # and provision (bench: the HTTP and CoAP lifecycles need about 1 KB less heap than with it in app).
        from tbfleet import session

        session.serve(self, max_messages)
        self.disconnect()
        return None

    def failed(self, error):
        # What ended a pass, the link closed: returns the ms to wait before the next pass. A refusal goes to
        # on_refused (through onboard.refused: the handling of a rare event is loaded only then, not kept in Device;
        # bench: the MQTT application lifecycle needs 0.25-0.5 KB less heap). A failure of the network or the server
        # is retried after retry_ms(). Anything else, and an exception on the way (an override's too), goes to
        # on_error; when that returns, retry_ms() follows.
        self.disconnect()
        try:
            if isinstance(error, Refused):
                from tbfleet import onboard

                return onboard.refused(self, error)
            # NoAnswer is an OSError. MemoryError: an answer too large for what the heap has left; what it held is
            # garbage once the link is closed.
            if isinstance(error, (OSError, BadAnswer, Rejected, MemoryError)):
                self.last_error = log.describe(error)
                log.warn("%s", self.last_error)
                return self.retry_ms()
        except Exception as e:  # noqa: BLE001 - an override that fails is one more unexpected error
            error = e
        self.on_error(error)
        return self.retry_ms()

    def disconnect(self):
        # The end of a pass: the link closed, and what it held collected, so that the next pass starts from a
        # collected heap.
        self.connected = False
        if self.link:
            self.link.close()
        gc.collect()
