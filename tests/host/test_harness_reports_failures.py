"""A MicroPython test that fails must fail the pytest run, with the MicroPython traceback in the report."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_failing_micropython_test_fails_pytest(tmp_path: Path) -> None:
    fw_tests = tmp_path / "tests" / "firmware"
    fw_tests.mkdir(parents=True)
    (tmp_path / "tests" / "support.py").write_text((ROOT / "tests" / "support.py").read_text())
    (fw_tests / "conftest.py").write_text((ROOT / "tests" / "firmware" / "conftest.py").read_text())
    (fw_tests / "test_sample.py").write_text(
        "def test_good():\n    pass\n\n"
        "def helper():\n    raise ValueError('deliberate %d' % 42)\n\n"
        "def test_bad():\n    helper()\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-o", "pythonpath=tests",
                           str(fw_tests)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 failed, 1 passed" in proc.stdout
    assert "ValueError: deliberate 42" in proc.stdout
    assert "in helper" in proc.stdout
