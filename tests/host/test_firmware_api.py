"""dev/firmware_api.py, the check of firmware/ against each board's MicroPython API: it passes on the tree, fails
naming a call a port lacks, and accepts port-specific code only inside a guard and only where a port has the API."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dev import firmware_api
from dev.firmware_api import Board, CheckError, Finding

ROOT = Path(__file__).resolve().parents[2]
BOARDS = [Board("esp32", "esp32", "1.29.0", "e"), Board("esp32c3", "esp32c3", "1.29.0", "c3"),
          Board("unix", "unix", "1.29.0", "u")]


def run_check(firmware: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "dev" / "firmware_api.py"), "--firmware", str(firmware)],
                          capture_output=True, text=True, timeout=300)


def test_the_tree_passes():
    clean = run_check(ROOT / "firmware")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "firmware API check: clean" in clean.stdout


def test_a_call_a_port_lacks_fails_naming_it(tmp_path):
    firmware = tmp_path / "firmware"
    shutil.copytree(ROOT / "firmware", firmware, ignore=shutil.ignore_patterns("__pycache__"))
    app = firmware / "lib" / "tbfleet" / "app.py"
    app.write_text(app.read_text() + "\n\nimport machine\n\n\ndef probe():\n    machine.no_such_call()\n")
    # Inside a guard the firmware uses for port-only code, a name no ESP32 port has still fails.
    session = firmware / "lib" / "tbfleet" / "session.py"
    session.write_text(session.read_text() + "\n\ndef probe():\n    try:\n        import esp32\n\n"
                         "        esp32.raw_temprature()\n    except ImportError:\n        pass\n")
    dirty = run_check(firmware)
    assert dirty.returncode == 1, dirty.stdout + dirty.stderr
    lines = dirty.stdout.splitlines()
    [call] = [line for line in lines if "no_such_call" in line]
    assert call.startswith("firmware/lib/tbfleet/app.py:")
    assert '"no_such_call" is not a known attribute of module "machine"' in call
    assert "(on esp32, esp32c3, esp32s3, unix)" in call
    [typo] = [line for line in lines if "raw_temprature" in line]
    assert "(on esp32, esp32c3, esp32s3)" in typo
    assert lines[-1].startswith("firmware API check: 2 finding(s)")


def test_guards_are_try_bodies_catching_a_missing_api_and_hasattr_ifs():
    source = """\
try:
    import network
except ImportError:
    network = None
try:
    x = 1
except ValueError:
    pass
if hasattr(machine, "reset"):
    machine.reset()
    done = True
try:
    import esp32
    esp32.mcu_temperature()
except (OSError, AttributeError):
    pass
"""
    assert firmware_api.guards(source) == [(2, 2), (10, 11), (13, 14)]


def finding(board: str, line: int, message: str = "m", rule: str = "reportAttributeAccessIssue") -> Finding:
    return Finding(board, "lib/tbfleet/x.py", line, 5, rule, message)


def judged(tmp_path: Path, source: str, findings: list[Finding]) -> list[Finding]:
    (tmp_path / "lib" / "tbfleet").mkdir(parents=True)
    (tmp_path / "lib" / "tbfleet" / "x.py").write_text(source)
    return firmware_api.judge(findings, BOARDS, tmp_path)


GUARDED = """\
try:
    import esp32
    esp32.mcu_temperature()
except ImportError:
    pass
machine.reset()
"""


def test_a_finding_in_a_guard_is_accepted_where_another_port_runs_that_code_clean(tmp_path):
    # unix lacks esp32 (so it knows nothing of line 3), esp32 lacks mcu_temperature, esp32c3 has both.
    findings = [finding("unix", 2, rule="reportMissingImports"), finding("esp32", 3)]
    assert judged(tmp_path, GUARDED, findings) == []


def test_a_finding_in_a_guard_fails_when_no_port_that_runs_it_is_clean(tmp_path):
    # The unix port is clean on line 3 only because it could not import esp32: it does not count.
    findings = [finding("unix", 2, rule="reportMissingImports"), finding("esp32", 3), finding("esp32c3", 3)]
    assert judged(tmp_path, GUARDED, findings) == findings[1:]


def test_an_import_no_port_has_fails_and_does_not_hide_the_others(tmp_path):
    findings = [finding(b.name, 2, rule="reportMissingImports") for b in BOARDS]
    assert judged(tmp_path, GUARDED, findings) == findings


def test_a_finding_outside_a_guard_fails_on_the_port_that_has_it(tmp_path):
    findings = [finding("unix", 6)]
    assert judged(tmp_path, GUARDED, findings) == findings


def test_a_board_whose_micropython_has_no_pinned_stubs_is_named(tmp_path):
    board = tmp_path / "newboard"
    board.mkdir()
    (board / "board.json").write_text(json.dumps({"chip": "esp32s3", "micropython": {"version": "1.30.0"}}))
    with pytest.raises(CheckError, match=r"newboard.*MicroPython 1\.30\.0 on esp32s3 needs "
                                         r"micropython-esp32-esp32-generic-s3-stubs==1\.30\.0\.postN"):
        firmware_api.read_boards(tmp_path, firmware_api.read_pins())
    (board / "board.json").write_text(json.dumps({"chip": "esp32p4", "micropython": {"version": "1.29.0"}}))
    with pytest.raises(CheckError, match="no MicroPython stubs known for chip 'esp32p4'"):
        firmware_api.read_boards(tmp_path, firmware_api.read_pins())


def test_every_board_has_its_port_stubs_pinned():
    boards = firmware_api.read_boards(ROOT / "boards", firmware_api.read_pins())
    assert {b.name: b.stubs for b in boards} == {
        "esp32": "micropython-esp32-esp32-generic-stubs==1.29.0.post1",
        "esp32c3": "micropython-esp32-esp32-generic-c3-stubs==1.29.0.post1",
        "esp32s3": "micropython-esp32-esp32-generic-s3-stubs==1.29.0.post1",
        "unix": "micropython-unix-stubs==1.29.0.post1",
    }
