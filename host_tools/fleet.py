"""`python -m host_tools fleet` (`make fleet`): deploy many boards at once, each under its own device name.

Boards are the ports in PORTS="p1 p2 ..." (any pyserial URLs), or else every USB serial port present or appearing
within --wait seconds. Each board is deployed in its own thread through the same path as `deploy` (flash when
needed, change-only copy, config.json, reset); its device name is DEVICE_NAME (or the board's template) with
{uid} / {mac} replaced by the chip MAC read from the board. One board failing does not stop the others.
Progress is shown as each board moves on; the end brings a summary and rows appended to the inventory CSV
(INVENTORY=file): port, chip MAC, device name, result, time, seconds. No secret goes into either.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from host_tools import boards, deploy, devconfig
from host_tools.boards import Board, BoardError
from host_tools.deploy import BoardState, Console, DeployError, FirmwareBuild
from host_tools.devconfig import ConfigProblem, DeviceConfig

log = logging.getLogger(__name__)

INVENTORY_COLUMNS = ("port", "chip_mac", "device_name", "result", "time", "seconds")
_SCAN_EVERY = 0.5


@dataclass
class Row:
    """One board's line in the inventory."""

    port: str
    chip_mac: str = ""
    device_name: str = ""
    result: str = "pending"
    time: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when the board was deployed and reset."""
        return self.result == "ok"


class Progress:
    """Prints one line whenever a board moves on, with how many boards are done so far."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.done = 0
        self.total = 0
        self._lock = threading.Lock()

    def add(self) -> None:
        """One more board to deploy."""
        with self._lock:
            self.total += 1

    def show(self, message: str, finished: bool = False) -> None:
        """Report a board's step (`finished` when it is its last)."""
        with self._lock:
            self.done += finished
            self.console.show(f"[fleet {self.done}/{self.total}] ", message)


def parse_ports(text: str | None) -> list[str]:
    """PORTS as a list (space or comma separated, duplicates dropped, order kept)."""
    ports: list[str] = []
    for port in (text or "").replace(",", " ").split():
        if port not in ports:
            ports.append(port)
    return ports


def usb_ports() -> set[str]:
    """Serial ports with a USB identity (what a plugged-in board shows up as)."""
    from serial.tools import list_ports

    return {p.device for p in list_ports.comports() if p.vid is not None}


@dataclass
class Fleet:
    """Everything shared by the boards of a fleet, validated once before any board is touched."""

    board: Board
    template: DeviceConfig  # the device name still holds {uid}
    flasher: deploy.Flasher
    app: dict = field(default_factory=dict)  # the user's application files by board path (deploy.app_files)


def board_config(template: DeviceConfig, state: BoardState) -> DeviceConfig:
    """The config for the board that answered with `state`: the fleet's, named from its chip MAC."""
    if not state.uid:
        raise DeployError("the board has no machine.unique_id(): cannot tell its chip MAC")
    return template.for_uid(state.uid)


def deploy_one(fleet: Fleet, port: str, firmware: FirmwareBuild, progress: Progress, console: Console) -> Row:
    """Deploy one board and reset it into main.py; every failure becomes the row's result, never an exception."""
    row = Row(port)
    started = time.monotonic()

    def dc_for(state: BoardState) -> DeviceConfig:
        row.chip_mac = state.mac() or ""
        dc = board_config(fleet.template, state)
        row.device_name = dc.config["device_name"]
        progress.show(f"{port}: chip {row.chip_mac}, device {row.device_name}")
        return dc

    try:
        deploy.check_port(port)
        outcome = deploy.deploy_board(fleet.board, port, dc_for, fleet.flasher, firmware, progress=progress.show)
        deploy.reset_into_main(port).close()
        row.result = "ok"
        progress.show(f"{port}: deployed ({len(outcome.copied)} files copied"
                      f"{', flashed' if outcome.flashed else ''}) and reset", finished=True)
    except (DeployError, ConfigProblem) as e:
        row.result = "failed: " + console.scrub(str(e))
        progress.show(f"{port}: {row.result}", finished=True)
    except Exception as e:  # noqa: BLE001 - one board's surprise must not stop the fleet
        log.debug("%s", port, exc_info=True)
        row.result = f"failed: unexpected {type(e).__name__}: {console.scrub(str(e))}"
        progress.show(f"{port}: {row.result}", finished=True)
    row.seconds = round(time.monotonic() - started, 1)
    row.time = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return row


def validate(env: Mapping[str, str]) -> Fleet:
    """Check everything shared by all boards before any is touched; errors name the variable."""
    board = boards.load(devconfig.env_value(env, "BOARD") or "esp32")
    if not devconfig.env_value(env, "TB_HOST"):
        raise DeployError("TB_HOST is not set: a fleet needs the ThingsBoard server the boards will use")
    if not board.is_host and not devconfig.env_value(env, "WIFI_SSID"):
        raise DeployError(f"WIFI_SSID is not set: board {board.name} needs a Wi-Fi network to reach the server")
    flasher = deploy.check_flash_settings(env, board)
    template = devconfig.env_value(env, "DEVICE_NAME") or board.device_name
    if "{uid}" not in template and "{mac}" not in template:
        raise DeployError(f"DEVICE_NAME={template!r} has neither {{uid}} nor {{mac}}: every board of a fleet "
                          "needs its own name (ThingsBoard refuses a second device with the same name)")
    template = devconfig.from_env(env, board.device_name, board.sensors)
    # Every board's name differs only in the MAC's 12 hex digits: one check stands for them all.
    devconfig.firmware_check(template.for_uid("000000000000"))
    return Fleet(board, template, flasher, deploy.app_files(devconfig.env_value(env, "APP")))


def run_fleet(fleet: Fleet, ports: list[str] | None, console: Console, wait: float, jobs: int,
              discover: Callable[[], set[str]] = usb_ports) -> list[Row]:
    """Deploy `ports` (or every port `discover` shows within `wait` seconds) in parallel; one row per board."""
    progress = Progress(console)
    with FirmwareBuild(app=fleet.app) as firmware, \
            ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="fleet") as pool:
        futures = []

        def submit(port: str) -> None:
            progress.add()
            progress.show(f"{port}: starting")
            futures.append(pool.submit(deploy_one, fleet, port, firmware, progress, console))

        if ports is not None:
            for port in ports:
                submit(port)
        else:
            seen: set[str] = set()
            end = time.monotonic() + wait
            log.info("deploying every USB serial port that appears in the next %.0f s", wait)
            while time.monotonic() < end:
                for port in sorted(discover() - seen):
                    seen.add(port)
                    submit(port)
                time.sleep(_SCAN_EVERY)
            if not seen:
                raise DeployError(f"no serial port appeared within {wait:.0f} s (set PORTS to name them)")
        rows = [f.result() for f in futures]
    return rows


def write_inventory(path: Path, rows: list[Row]) -> None:
    """Append `rows` to the CSV at `path`, writing the header when the file is new."""
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(INVENTORY_COLUMNS)
        for r in rows:
            writer.writerow([r.port, r.chip_mac, r.device_name, r.result, r.time, f"{r.seconds:.1f}"])


def summary(rows: list[Row]) -> str:
    """A small table of every board and the totals."""
    width = max([len(r.port) for r in rows] + [4])
    lines = [f"{'port':<{width}}  {'chip MAC':<17}  {'device':<24}  {'time':>6}  result"]
    for r in rows:
        lines.append(f"{r.port:<{width}}  {r.chip_mac or '-':<17}  {r.device_name or '-':<24}  "
                     f"{r.seconds:>5.1f}s  {r.result}")
    ok = sum(r.ok for r in rows)
    lines.append(f"{ok} of {len(rows)} boards deployed, {len(rows) - ok} failed")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `fleet`; board settings and secrets come from the environment as for `deploy`."""
    parser.add_argument("--ports", default=os.environ.get("PORTS"),
                        help="ports to deploy, space separated (env PORTS); default: every USB serial port that "
                             "appears within --wait seconds")
    parser.add_argument("--inventory", type=Path, default=os.environ.get("INVENTORY") or None,
                        help="append one CSV row per board to this file (env INVENTORY)")
    parser.add_argument("--wait", type=float, default=60.0, help="seconds to watch for new ports (60)")
    parser.add_argument("--jobs", type=int, default=8, help="boards deployed at the same time (8)")


def run(args: argparse.Namespace) -> int:
    """Deploy the fleet; exit 0 when every board worked, 1 when any failed, 2 on bad input."""
    env = os.environ
    try:
        if args.jobs < 1 or args.wait <= 0:
            raise DeployError("--jobs must be at least 1 and --wait more than 0")
        shared = validate(env)
    except (DeployError, ConfigProblem, BoardError) as e:
        log.error("%s", e)
        return 2
    console = Console(shared.template.secrets())
    ports = parse_ports(args.ports) if args.ports else None
    try:
        rows = run_fleet(shared, ports, console, args.wait, args.jobs)
    except DeployError as e:
        log.error("%s", e)
        return 1
    sys.stdout.write(summary(rows) + "\n")
    if args.inventory:
        write_inventory(args.inventory, rows)
        log.info("inventory: %d rows appended to %s", len(rows), args.inventory)
    return 0 if all(r.ok for r in rows) else 1
