"""`python -m host_tools emulator`: run the local ThingsBoard device-API emulator (MQTT, HTTP, CoAP).

When every listener is up, the first stdout line is one JSON object:
`{"event": "ready", "mqtt": P, "http": P, "coap": P}` (plus `"mqtts": P` with --mqtts-port). After that one
readable line per event goes to stderr; secrets never appear. SIGTERM or SIGINT stop it cleanly (exit 0).
A bad config file or option is refused at start with a message naming it (exit 2).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys

from host_tools.emulator import certs, coap, http, limits, rest
from host_tools.emulator.mqtt import MqttServer
from host_tools.emulator.state import ConfigError, EmulatorState, load_config, parse_version

log = logging.getLogger(__name__)

DEFAULT_VERSION = "4.3.1.3"
"""The newest release the model describes (the REST reference is read at v4.3.1.3); the pinned tb-rest-client 4.4
reads a device by name with /api/tenant/device, which came in 4.3.1.2."""
DEFAULT_TLS_DIR = ".cache/emulator-tls"


def _version(text: str) -> tuple[int, ...]:
    try:
        return parse_version(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range 0-65535: {port}")
    return port


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds: {text}")
    return value


def _rate_limit(text: str) -> str:
    try:
        limits.parse(text)
    except limits.LimitSyntaxError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


# Options setting the tenant profile's per-device rate limits: option -> tenantProfile field of the config file.
RATE_LIMIT_OPTIONS = {
    "--msg-rate-limit": "transportDeviceMsgRateLimit",
    "--telemetry-msg-rate-limit": "transportDeviceTelemetryMsgRateLimit",
    "--telemetry-data-points-rate-limit": "transportDeviceTelemetryDataPointsRateLimit",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The emulator's options (port 0 picks a free port)."""
    parser.add_argument("--config", required=True, metavar="FILE",
                        help="JSON file with the device profiles and pre-provisioned devices")
    parser.add_argument("--bind", default="127.0.0.1", metavar="ADDR", help="address to listen on (127.0.0.1)")
    parser.add_argument("--mqtt-port", type=_port, default=1883, metavar="N", help="MQTT port (1883)")
    parser.add_argument("--http-port", type=_port, default=8080, metavar="N", help="HTTP port (8080)")
    parser.add_argument("--coap-port", type=_port, default=5683, metavar="N", help="CoAP UDP port (5683)")
    parser.add_argument("--mqtts-port", type=_port, default=None, metavar="N",
                        help="also serve MQTT over TLS on this port (ThingsBoard: 8883); off unless given")
    parser.add_argument("--tls-dir", default=DEFAULT_TLS_DIR, metavar="DIR",
                        help=f"where the generated CA and server certificate are kept ({DEFAULT_TLS_DIR})")
    parser.add_argument("--db", default=":memory:", metavar="FILE",
                        help="SQLite database keeping the state across restarts (default: in memory)")
    parser.add_argument("--server-version", type=_version, default=parse_version(DEFAULT_VERSION),
                        metavar="X.Y[.Z[.W]]",
                        help=f"ThingsBoard version whose behaviour to emulate ({DEFAULT_VERSION})")
    parser.add_argument("--coap-separate", action="store_true",
                        help="CoAP answers with an empty ACK first and the response separately")
    parser.add_argument("--provision-close-after", type=_seconds, default=60.0, metavar="S",
                        help="seconds after a provisioning answer until the MQTT session is closed (60)")
    for option, field in RATE_LIMIT_OPTIONS.items():
        parser.add_argument(option, type=_rate_limit, default=None, metavar="CAP:SECONDS,...", dest=field,
                            help=f"each device's {limits.FIELDS[field]} rate limit, e.g. 200:1,6000:60 (the config's "
                                 f"tenantProfile.{field}; default: none, as on a self-hosted ThingsBoard)")


async def _serve(args: argparse.Namespace, state: EmulatorState) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    mqtt = MqttServer(state, provision_close_after=args.provision_close_after)
    ports: dict[str, object] = {"event": "ready"}
    try:
        ports["mqtt"] = await mqtt.listen(args.bind, args.mqtt_port)
        ports["http"] = await http.start(state, args.bind, args.http_port, rest=rest.RestApi(state).handle)
        ports["coap"] = await coap.start(state, args.bind, args.coap_port, separate=args.coap_separate)
        if args.mqtts_port is not None:
            files = certs.ensure_server_files(args.tls_dir)
            context = certs.server_context(files)
            ports["mqtts"] = await mqtt.listen(args.bind, args.mqtts_port, context)
        sys.stdout.write(json.dumps(ports) + "\n")
        sys.stdout.flush()
        log.info("emulating ThingsBoard %s on %s", ".".join(map(str, state.server_version)), args.bind)
        await stop.wait()
    finally:
        await mqtt.stop()
        await http.stop()
        await coap.stop()


def run(args: argparse.Namespace) -> int:
    """Run the emulator until SIGTERM/SIGINT; 0 on a clean stop, 2 for a bad config, 1 if a port is taken."""
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"emulator: bad config file: {e}", file=sys.stderr)
        return 2
    for field in RATE_LIMIT_OPTIONS.values():
        if getattr(args, field) is not None:
            config.setdefault("tenantProfile", {})[field] = getattr(args, field)
    try:
        state = EmulatorState(config, args.db, args.server_version)
    except ConfigError as e:
        version = ".".join(map(str, args.server_version))
        print(f"emulator: config does not fit the database {args.db} or ThingsBoard {version}: {e}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(args, state))
    except OSError as e:
        print(f"emulator: cannot listen: {e}", file=sys.stderr)
        return 1
    finally:
        state.close()
    return 0
