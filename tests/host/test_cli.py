"""The one CLI: every command is reachable and documents itself; a bad command is refused."""

import subprocess
import sys

import pytest

from host_tools.cli import COMMANDS
from support import ROOT


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
