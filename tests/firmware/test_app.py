# The application loop over a scripted link: what it does on each provisioning outcome and each failure.
import json
import sys

from mptest import eq
from tbfleet import NoAnswer, Refused, Rejected, app, builtin, config, log, stock, store

SECRET = "z9x8c7v6b5n4"
TOKEN = "Gh7TkN0aQ1bC2dE3fG4h"
OK = ('{"credentialsValue":"%s","credentialsType":"ACCESS_TOKEN","status":"SUCCESS"}' % TOKEN).encode()
NOT_FOUND = b'{"errorMsg":"Provision data was not found!","status":"NOT_FOUND"}'
FAILURE = b'{"errorMsg":"Failed to provision device!","status":"FAILURE"}'

app.RETRY_FIRST_MS = 2
app.RETRY_CAP_MS = 8
app.LONG_WAIT_MS = 5
LINES = []
log._emit = lambda severity, msg, args: LINES.append("DIWE"[severity] + " " + (msg % args if args else msg))


def cfg_with(**fields):
    data = {"host": "127.0.0.1", "provision_key": "u7i8k9l0p1o2", "provision_secret": SECRET,
            "device_name": "greenhouse-7", "telemetry_interval": 0}
    data.update(fields)
    return config.validate(data)


class Link:
    # Each list holds what the next call answers: bytes/None to return, an exception instance to raise.
    def __init__(self, provisions=(), opens=(), sends=(), pushes=()):
        self.provisions = list(provisions)
        self.opens = list(opens)
        self.sends = list(sends)
        self.requests = []
        self.opened = []
        self.payloads = []
        self.hellos = []
        self.events = []  # what the device takes after each call
        self.pushes = list(pushes)  # events that arrive while it listens, one per listen
        self.replies = []
        self.listened = 0

    def _next(self, answers):
        answer = answers.pop(0) if answers else None
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def provision(self, request):
        self.requests.append(json.loads(request))
        return self._next(self.provisions)

    def open(self, creds, burst):
        self.opened.append(creds)
        self.hellos.append(json.loads(burst.pop(0)))
        self._next(self.opens)
        self.send(burst.pop(0))

    def send(self, payload, rid=None):
        if rid is not None:
            self.replies.append((rid, json.loads(payload)))
            return
        self._next(self.sends)
        self.payloads.append(json.loads(payload))

    def listen(self, ms):
        self.listened += 1
        if self.pushes:
            self.events.append(self.pushes.pop(0))

    def close(self):
        pass


def run(cfg, max_messages, link):
    return app.Device(cfg, link).run(max_messages)


def test_first_boot_provisions_saves_and_sends_then_second_boot_reuses():
    cfg = cfg_with()
    link = Link(provisions=[OK])
    eq(run(cfg, 3, link), 3)
    eq(len(link.requests), 1)
    eq(link.opened[0]["token"], TOKEN)
    eq(len(link.payloads), 3)
    assert "ts" in link.payloads[0] and "uptime" in link.payloads[0]["values"]
    rec = store.load()
    eq((rec["type"], rec["token"], rec["device"]), ("ACCESS_TOKEN", TOKEN, "greenhouse-7"))
    second = Link()
    eq(run(cfg, 2, second), 2)
    eq(second.requests, [])
    eq(second.opened[0]["token"], TOKEN)


def test_not_found_saves_nothing_and_says_why():
    link = Link(provisions=[NOT_FOUND, OK])
    run(cfg_with(), 1, link)
    eq(len(link.requests), 2)
    assert any("NOT_FOUND" in line and "provision_key" in line for line in LINES), LINES


def test_not_found_leaves_nothing_on_flash():
    link = Link(provisions=[NOT_FOUND, NoAnswer("down")] * 3 + [OK])
    run(cfg_with(), 0, link)
    eq(len(link.requests), 7)


def test_failure_falls_back_to_configured_credentials_and_saves_them():
    cfg = cfg_with(credentials_type="ACCESS_TOKEN", token=TOKEN)
    link = Link(provisions=[FAILURE])
    eq(run(cfg, 1, link), 1)
    eq(link.opened, [{"type": "ACCESS_TOKEN", "token": TOKEN}])
    eq(store.load()["token"], TOKEN)


def test_failure_without_own_credentials_waits_long_and_retries():
    link = Link(provisions=[FAILURE, OK])
    run(cfg_with(credentials_type="SERVER_GENERATED"), 2, link)
    eq(len(link.requests), 2)
    assert "credentialsType" not in link.requests[0] and "token" not in link.requests[0], link.requests[0]
    assert any(line.startswith("E ") and "delete the device greenhouse-7" in line for line in LINES), LINES
    # Once connected again, the board puts what the operator was told on ThingsBoard, with its first telemetry only.
    action = link.payloads[0]["values"]["operator_action"]
    assert "operator_action" not in link.payloads[1]["values"], link.payloads
    assert "FAILURE: Failed to provision device!" in action and "delete the device greenhouse-7" in action, action


def test_no_operator_action_is_reported_when_nothing_was_asked():
    link = Link(provisions=[OK])
    run(cfg_with(), 2, link)
    assert all("operator_action" not in p["values"] for p in link.payloads), link.payloads


def test_no_answer_backs_off_and_retries():
    link = Link(provisions=[NoAnswer("no answer in time"), b"<html>", OK])
    eq(run(cfg_with(), 1, link), 1)
    eq(len(link.requests), 3)
    assert any("BAD_ANSWER" in line for line in LINES)


def test_repeated_refusals_set_credentials_aside_and_provision_again():
    cfg = cfg_with()
    run(cfg, 0, Link(provisions=[OK]))
    refused = Refused(5, "not authorized")
    new = OK.replace(TOKEN.encode(), b"NewT0kenNewT0kenNewT")
    link = Link(opens=[refused, refused, refused], provisions=[new])
    eq(run(cfg, 1, link), 1)
    eq(len(link.requests), 1)
    eq(store.load()["token"], "NewT0kenNewT0kenNewT")
    import os

    assert "creds.json.bad" in os.listdir()


def test_two_refusals_then_success_keeps_credentials():
    cfg = cfg_with()
    run(cfg, 0, Link(provisions=[OK]))
    refused = Refused(5, "not authorized")
    link = Link(opens=[refused, refused])
    run(cfg, 1, link)
    eq(link.requests, [])


def test_the_failure_policy_is_not_loaded_while_connected():
    # tbfleet.policy (the on_* defaults) is loaded when a failure happens and goes before the next connect.
    class Watching(Link):
        def send(self, payload, rid=None):
            self.loaded.append("tbfleet.policy" in sys.modules)
            Link.send(self, payload, rid)

    link = Watching(provisions=[NOT_FOUND, OK], opens=[Refused(5, "not authorized"), None])
    link.loaded = []
    eq(run(cfg_with(), 2, link), 2)
    eq(len(link.requests), 2)
    eq(link.loaded, [False, False])
    assert "tbfleet.policy" not in sys.modules
    assert any(line.startswith("E provisioning refused (NOT_FOUND") for line in LINES), LINES
    assert any(line.startswith("W server refused the credentials (5 not authorized), 1 in a row") for line in LINES)


def test_refused_on_send_counts_too():
    # HTTP and CoAP learn of revoked credentials only when telemetry is refused (401 / 4.01).
    cfg = cfg_with(transport="http")
    run(cfg, 0, Link(provisions=[OK]))
    refused = Refused(401, "unauthorized")
    link = Link(sends=[refused, refused, refused], provisions=[OK])
    run(cfg, 1, link)
    eq(len(link.requests), 1)


def test_connection_loss_and_rejection_reconnect():
    cfg = cfg_with()
    link = Link(provisions=[OK], sends=[None, NoAnswer("closed"), Rejected(413, "payload too large"), None])
    eq(run(cfg, 3, link), 3)
    eq(len(link.opened), 3)


def test_credentials_for_another_device_are_not_used():
    run(cfg_with(), 0, Link(provisions=[OK]))
    link = Link(provisions=[OK])
    run(cfg_with(device_name="greenhouse-8"), 0, link)
    eq(len(link.requests), 1)
    eq(link.requests[0]["deviceName"], "greenhouse-8")


def test_secrets_never_reach_the_log():
    cfg = cfg_with(credentials_type="ACCESS_TOKEN", token=TOKEN)
    run(cfg, 1, Link(provisions=[NOT_FOUND, FAILURE, FAILURE], opens=[Refused(5, "not authorized"), None]))
    text = "\n".join(LINES)
    assert SECRET not in text and TOKEN not in text, text


def test_backoff_doubles_with_jitter_up_to_the_cap():
    app.RETRY_FIRST_MS = 1000
    app.RETRY_CAP_MS = 8000
    d = app.Device(cfg_with())
    for ceiling in (1000, 2000, 4000, 8000, 8000):
        ms = d.retry_ms()
        assert ceiling // 2 <= ms <= ceiling, (ms, ceiling)
    d.accepted()  # the first message a connection sent resets the delay
    assert d.retry_ms() <= 1000
    delays = set(app.Device(cfg_with()).retry_ms() for _ in range(20))
    assert len(delays) > 1  # jitter: a fleet does not retry in step


def test_only_the_configured_transport_is_loaded():
    for name in ("http", "coap", "mqtt"):
        assert "tbfleet.via_" + name not in sys.modules
    app.Device(cfg_with(transport="coap")).get_link()
    assert "tbfleet.via_coap" in sys.modules
    assert "tbfleet.via_mqtt" not in sys.modules and "tbfleet.via_http" not in sys.modules


def test_main_stops_on_a_bad_config_with_one_message():
    with open("config.json", "w") as f:
        json.dump({"host": "127.0.0.1", "provision_key": "k", "provision_secret": SECRET, "port": "1883"}, f)
    eq(stock.main(), 2)
    eq([line for line in LINES if line.startswith("E ")], ["E config.json: port: must be an integer"])


def test_main_gives_back_the_modules_its_run_loaded():
    # Calling main again (as the benchmark's boots do) starts from the heap a reboot would give.
    links = []

    class Transport:
        # Stands in for tbfleet.via_coap in sys.modules, so main runs over a scripted link.
        @staticmethod
        def Link(cfg):
            links.append(Link(provisions=[OK]))
            return links[-1]

    sys.modules["tbfleet.via_coap"] = Transport
    with open("config.json", "w") as f:
        json.dump({"host": "127.0.0.1", "transport": "coap", "provision_key": "u7i8k9l0p1o2",
                   "provision_secret": SECRET, "device_name": "greenhouse-7", "telemetry_interval": 0}, f)
    assert "tbfleet.session" not in sys.modules
    eq(stock.main(max_messages=2), 0)
    # The provisioning link is dropped once the answer is in; connecting makes a new one.
    eq((len(links), len(links[0].requests), len(links[1].payloads)), (2, 1, 2))
    assert "tbfleet.session" not in sys.modules and "tbfleet.onboard" not in sys.modules
    assert sys.modules["tbfleet.via_coap"] is Transport  # there before main: not main's to unload
    eq(stock.main(max_messages=1), 0)  # saved credentials, session imported again
    eq((len(links), len(links[2].payloads), links[2].requests), (3, 1, []))


def test_a_link_the_device_made_goes_with_its_modules_after_provisioning():
    # Parsing and saving the answer get the transport's RAM; connecting makes the link again.
    made = []

    class Transport:
        # Stands in for tbfleet.via_http in sys.modules; what it imports is given back with it.
        @staticmethod
        def Link(cfg):
            import tbfleet.tls  # noqa: F401 - a module the transport loads, to be unloaded with it

            made.append(Link(provisions=[OK]))
            return made[-1]

    sys.modules["tbfleet.via_http"] = Transport
    device = app.Device(cfg_with(transport="http"))
    eq(device.onboard(), None)
    eq((device.creds["token"], device.unsaved, len(made)), (TOKEN, False, 1))
    assert device.link is None and "tbfleet.tls" not in sys.modules
    assert device.get_link() is not made[0] and len(made) == 2
    passed_in = Link(provisions=[OK])
    device = app.Device(cfg_with(device_name="greenhouse-9"), passed_in)
    device.onboard()
    eq(len(passed_in.requests), 1)
    assert device.get_link() is passed_in  # not the device's to drop


def test_wifi_is_brought_up_only_when_configured():
    # net (and its names) is loaded for each attempt where config.json names a Wi-Fi, never without one.
    calls = []

    class Net:
        @staticmethod
        def up(cfg):
            calls.append(cfg.wifi_ssid)

    sys.modules["tbfleet.net"] = Net
    try:
        run(cfg_with(sensors=["uptime"]), 1, Link(provisions=[OK]))
        eq(calls, [])
        cfg = cfg_with(wifi_ssid="greenhouse", device_name="greenhouse-8", sensors=["uptime"])
        run(cfg, 1, Link(provisions=[OK]))
        eq(calls, ["greenhouse"])
    finally:
        sys.modules.pop("tbfleet.net", None)


def test_the_interval_saved_from_thingsboard_outlives_a_reboot_and_a_bad_one_is_ignored():
    link = Link(provisions=[OK], pushes=[("attributes", None, b'{"telemetry_interval":0.01}')])
    device = app.Device(cfg_with(), link)
    device.run(3)
    eq(device.interval, 0.01)
    eq(app.Device(cfg_with(), Link()).interval, 0.01)
    for text in ('{"telemetry_interval":"5"}', '{"telemetry_interval":-1}', "not json"):
        with open(builtin.SETTINGS, "w") as f:
            f.write(text)
        eq(app.Device(cfg_with(telemetry_interval=7), Link()).interval, 7)


def test_rpc_replies_and_errors_and_attribute_callbacks_over_a_scripted_link():
    link = Link(provisions=[OK], pushes=[
        ("rpc", 3, b'{"method":"double","params":21}'), ("rpc", None, b'{"id":4,"method":"boom","params":null}'),
        ("rpc", 5, b'{"method":"nobody","params":{}}'), ("current", None, b'{"client":{"a":1},"shared":{"b":2}}'),
        ("provision", None, b'{"status":"SUCCESS"}'),  # a stray provisioning answer in a device's session: dropped
        ("attributes", None, b'{"deleted":["b"]}'), ("rpc", 6, b"not json")])
    device = app.Device(cfg_with(), link)
    seen = []
    device.rpc("double")(lambda params: params * 2)

    @device.rpc("boom")
    def boom(params):
        raise RuntimeError("relay stuck")

    @device.attributes
    def watch(changed):
        seen.append(changed)
        raise ValueError("a callback that raises is logged")

    device.run(8)
    eq(link.replies, [(3, 42), (4, {"error": "RuntimeError: relay stuck"}),
                      (5, {"error": "no handler for method nobody"})])
    eq(seen, [{"b": 2}, {"deleted": ["b"]}])
    assert any("attributes watch: ValueError" in line for line in LINES), LINES
    assert any(line.startswith("W bad rpc") for line in LINES), LINES


def test_an_unexpected_exception_resets_after_a_wait_that_doubles_per_crash_in_a_row():
    # A board with machine.reset (here a machine.py that stands in for it): each crash in a row is counted in
    # flash, so the wait before the reset doubles across resets instead of being 10 s for ever.
    with open("machine.py", "w") as f:
        f.write("from umachine import *\n\n\nclass Reset(BaseException):\n    pass\n\n\n"
                "def reset():\n    raise Reset()\n")

    def crash():
        # A new boot's Device meets an unexpected exception: on_error ends with the stand-in reset.
        try:
            app.Device(cfg_with(), Link()).on_error(KeyError("boom"))
        except BaseException as e:
            eq(type(e).__name__, "Reset")
            return
        raise AssertionError("on_error returned")

    first = app.CRASH_FIRST_MS
    app.CRASH_FIRST_MS, app.LONG_WAIT_MS = 1, 6
    try:
        for _ in range(5):
            crash()
        eq([line for line in LINES if "in a row" in line],
           ["E crash %d in a row: resetting in %d ms" % (n, ms) for n, ms in ((1, 1), (2, 2), (3, 4), (4, 6), (5, 6))])
        # A connection's first accepted message says the board runs well: the next crash is the first again.
        app.Device(cfg_with(), Link()).accepted()
        del LINES[:]
        crash()
        eq([line for line in LINES if "in a row" in line], ["E crash 1 in a row: resetting in 1 ms"])
    finally:
        app.CRASH_FIRST_MS, app.LONG_WAIT_MS = first, 5


def test_a_policy_override_that_fails_goes_to_on_error_and_one_that_returns_lets_the_board_go_on():
    # on_refused raises: on_error gets that exception; this on_error returns instead of resetting, and the board
    # goes on after retry_ms(): the next pass connects.
    class Mine(app.Device):
        def on_refused(self, error, refusals):
            raise KeyError("policy bug")

        def on_error(self, error):
            self.errors.append(repr(error))

    cfg = cfg_with()
    run(cfg, 0, Link(provisions=[OK]))
    link = Link(opens=[Refused(5, "not authorized"), NoAnswer("no answer in time")])
    dev = Mine(cfg, link)
    dev.errors = []
    eq(dev.run(1), 1)
    eq(dev.errors, ["KeyError('policy bug',)"])
    eq(len(link.opened), 3)  # the refusal, the transient failure, the pass that sent
    assert any(line.startswith("W NoAnswer: no answer in time") for line in LINES)


class PowerCut(BaseException):
    pass


def exists(path):
    import os

    try:
        os.stat(path)
        return True
    except OSError:
        return False


def test_the_board_chooses_its_token_and_saves_it_before_the_request_leaves():
    class Server(Link):
        # Answers SUCCESS with the token the request registers, as ThingsBoard does.
        def provision(self, request):
            self.ahead = json.load(open("ahead.json"))  # by the time the request leaves, its token is in flash
            self.requests.append(json.loads(request))
            return ('{"credentialsValue":"%s","credentialsType":"ACCESS_TOKEN","status":"SUCCESS"}'
                    % self.requests[-1]["token"]).encode()
    link = Server()
    eq(run(cfg_with(), 1, link), 1)
    req = link.requests[0]
    eq(req["credentialsType"], "ACCESS_TOKEN")
    token = req["token"]
    assert len(token) == 20 and token == link.ahead["token"], (token, link.ahead)
    eq(link.opened[0]["token"], token)
    eq(store.load()["token"], token)
    assert not exists("ahead.json")  # the saved record holds it now


def test_a_power_cut_after_the_request_left_is_answered_with_the_saved_token():
    # First boot: the request leaves, the server creates the device, the power goes before the answer is saved.
    cut = Link(provisions=[PowerCut()])
    try:
        run(cfg_with(), 1, cut)
        raise AssertionError("no power cut")
    except PowerCut:
        pass
    token = cut.requests[0]["token"]
    assert store.load() is None
    # Next boot: the same token is sent again; the server has the device already (FAILURE); the board connects
    # with the token it saved before the cut, and keeps it once the server took a message.
    link = Link(provisions=[FAILURE])
    eq(run(cfg_with(), 1, link), 1)
    eq(link.requests[0]["token"], token)
    eq(link.opened, [{"type": "ACCESS_TOKEN", "token": token}])
    eq(store.load()["token"], token)
    assert not exists("ahead.json")


def test_the_board_chooses_a_whole_mqtt_basic_triple():
    link = Link(provisions=[PowerCut()])
    try:
        run(cfg_with(credentials_type="MQTT_BASIC"), 1, link)
    except PowerCut:
        pass
    req = link.requests[0]
    eq(req["credentialsType"], "MQTT_BASIC")
    ahead = json.load(open("ahead.json"))
    eq((req["clientId"], req["username"], req["password"]),
       (ahead["client_id"], ahead["username"], ahead["password"]))
    assert len({req["clientId"], req["username"], req["password"]}) == 3
    link = Link(provisions=[FAILURE])
    run(cfg_with(credentials_type="MQTT_BASIC"), 1, link)
    eq(link.opened[0]["client_id"], req["clientId"])


