"""`bench`: a lifecycle timing run that fails is an error naming the transport, never a figure."""

from __future__ import annotations

from pathlib import Path

import pytest

from host_tools.bench import MESSAGES, Bench


class StandInEmulator:
    """What Bench asks of the emulator: its ports and the telemetry stored per device."""

    def __init__(self, stored: int) -> None:
        self.ports = {"mqtt": 1}
        self.stored = stored

    def telemetry(self, name: str) -> list[dict]:
        return [{"n": i} for i in range(self.stored)]


def firmware(tmp_path: Path, main: str) -> Path:
    """A build tree whose tbfleet.stock.main runs `main` (the real firmware is not needed to time the plumbing)."""
    build = tmp_path / "build"
    (build / "lib" / "tbfleet").mkdir(parents=True)
    (build / "lib" / "tbfleet" / "__init__.py").write_text("")
    (build / "lib" / "tbfleet" / "stock.py").write_text(f"def main(max_messages):\n    {main}\n")
    return build


def test_a_failed_timing_run_raises_naming_the_transport(tmp_path: Path) -> None:
    bench = Bench(StandInEmulator(MESSAGES), firmware(tmp_path, "raise OSError(113)"), tmp_path)
    with pytest.raises(RuntimeError, match="mqtt: a timing run of the lifecycle failed"):
        bench.lifecycle_seconds("mqtt")


def test_a_run_whose_messages_were_not_all_stored_raises(tmp_path: Path) -> None:
    bench = Bench(StandInEmulator(MESSAGES), firmware(tmp_path, "pass"), tmp_path)
    with pytest.raises(RuntimeError, match="mqtt: a timing run"):
        bench.lifecycle_seconds("mqtt")


def test_a_passing_run_gives_its_wall_time(tmp_path: Path) -> None:
    bench = Bench(StandInEmulator(MESSAGES + 1), firmware(tmp_path, "pass"), tmp_path)
    seconds = bench.lifecycle_seconds("mqtt")
    assert 0 < seconds < 10


def test_a_board_that_logs_a_memory_error_fails_at_once(tmp_path: Path) -> None:
    # The firmware catches a MemoryError and retries after a backoff: the bench must not wait that out.
    main = 'print("W MemoryError: memory allocation failed"); import time; time.sleep(60)'
    bench = Bench(StandInEmulator(MESSAGES + 1), firmware(tmp_path, main), tmp_path)
    ok, wall = bench.lifecycle_passes("mqtt", None)
    assert not ok and wall < 30
