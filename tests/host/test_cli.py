"""The one CLI: every command is reachable and documents itself; a bad command is refused."""

import os
import subprocess
import sys

import pytest

from host_tools.cli import COMMANDS
from support import ROOT
from vboard_fixtures import MAKE_VARIABLES


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "host_tools", command, "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m host_tools " + command)


def test_unknown_command_is_refused() -> None:
    proc = subprocess.run([sys.executable, "-m", "host_tools", "flsh"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert "invalid choice: 'flsh'" in proc.stderr


def _make(target: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`make <target>` with only `env` among the make variables (the venv stamp taken as made)."""
    full = {k: v for k, v in os.environ.items() if k not in MAKE_VARIABLES}
    full.update(env)
    return subprocess.run(["make", "-s", "-o", ".venv/.installed", target], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_make_flash_without_board_asks_for_one() -> None:
    proc = _make("flash", {"PORT": "/dev/ttyNOSUCH0"})
    assert proc.returncode != 0
    assert "no board given: pass BOARD=<name>" in proc.stderr, proc.stderr
    assert "this host" not in proc.stderr


def test_make_fleet_without_board_treats_the_ports_as_esp32s() -> None:
    proc = _make("fleet", {"PORTS": "/dev/ttyNOSUCH0 /dev/ttyNOSUCH1", "TB_HOST": "127.0.0.1",
                           "PROVISION_KEY": "k", "PROVISION_SECRET": "s"})
    assert proc.returncode != 0
    assert "WIFI_SSID is not set: board esp32 needs a Wi-Fi network" in proc.stderr, proc.stderr
