"""A power cut at random moments of a board's first provisioning never strands it (issue: 33 of 600 boards came
back with no credentials while the server had created the device, and then waited 15 minutes for ever).

The real firmware (main.py on the Unix port) provisions against the emulator with the default configuration (a
token the board chooses and saves before the request leaves) and is killed (SIGKILL, as a pulled plug) a seeded
random time after it logged that it is provisioning; it is then booted again and must end up connected: its
telemetry stored by the emulator under its own name. Which moment a delay hits moves with the machine's load; what
is asserted holds for every moment. `CUTS` boards per transport here; `TBFLEET_POWERCUTS=N` runs N.
"""

from __future__ import annotations

import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from emulator_fixtures import ALLOW_KEY, ALLOW_SECRET, CONFIG
from firmware_board import FirmwareBoard
from host_tools.emulator.process import EmulatorProcess

CUTS = int(os.environ.get("TBFLEET_POWERCUTS", "30"))
SEED = 10
CUT_WINDOW_S = 0.05  # after the "provisioning" line: the exchange, the answer and the save take about that long


@pytest.fixture(scope="module")
def emulator():
    with EmulatorProcess(CONFIG) as emu:
        yield emu


def cut_and_recover(emu: EmulatorProcess, root: Path, transport: str, k: int, delay: float) -> dict:
    """Boot board k, kill it `delay` s after it starts provisioning, boot it again; what happened."""
    name = f"cut-{transport}-{k:03d}"
    board = FirmwareBoard(root / name, {
        "host": "127.0.0.1", "port": emu.ports[transport], "transport": transport, "provision_key": ALLOW_KEY,
        "provision_secret": ALLOW_SECRET, "device_name": name, "telemetry_interval": 0.2, "timeout": 3,
        "sensors": ["uptime"]})
    with board.boot() as run:
        run.wait_for(f"provisioning {name}")
        time.sleep(delay)
    created = name in [d["name"] for d in emu.devices()]
    saved = board.credentials is not None
    with board.boot(retry_ms=100) as run:
        run.wait_for("telemetry 1 sent", timeout=30)
    emu.wait_for_telemetry(name, 1, timeout=10)
    return {"created": created, "saved": saved, "log": run.output}


@pytest.mark.parametrize("transport", ["mqtt", "http", "coap"])
def test_no_board_is_stranded_by_a_power_cut_during_its_first_provisioning(emulator, tmp_path: Path,
                                                                             transport: str) -> None:
    rng = random.Random(f"{SEED}-{transport}")
    delays = [rng.uniform(0, CUT_WINDOW_S) for _ in range(CUTS)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda kd: cut_and_recover(emulator, tmp_path, transport, *kd), enumerate(delays)))
    assert len(results) == CUTS  # every board connected again (cut_and_recover raises otherwise)
    # The window the issue found: device created on the server, credentials not yet saved. The boards cut there
    # connected with the token they had saved before the request left, or the store finished the save the cut
    # interrupted (its temporary file was whole).
    window = [r for r in results if r["created"] and not r["saved"]]
    recovered = ("trying the board's own credentials", "provisioned", "completed the cut save")
    for r in window:
        assert any(line in r["log"] for line in recovered), r["log"]
