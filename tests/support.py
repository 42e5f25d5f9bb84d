"""Where the repository's parts are and how to run the MicroPython Unix port (shared by all tests)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
FIRMWARE = ROOT / "firmware"
FIRMWARE_LIB = FIRMWARE / "lib"
FIRMWARE_TESTS = ROOT / "tests" / "firmware"  # the Unix-port tests and their helpers (fakes, httpclient)
MICROPYTHON = str(Path(sys.executable).with_name("micropython"))


def micropython_env(*extra_paths: os.PathLike | str) -> dict[str, str]:
    """Environment for a Unix-port process that imports the firmware package (and `extra_paths` first)."""
    env = dict(os.environ)
    env["MICROPYPATH"] = os.pathsep.join([*(str(p) for p in extra_paths), str(FIRMWARE_LIB), ".frozen"])
    return env


def install_firmware(board_dir: Path) -> Path:
    """Copy firmware/ into `board_dir`, as a deploy puts it onto a board's flash."""
    board_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(FIRMWARE, board_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    return board_dir


def run_micropython(args: list[str], cwd: Path, timeout: float = 60, heapsize: int | None = None,
                    env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the Unix port with `args` in `cwd`; `cwd` is the board's filesystem."""
    cmd = [MICROPYTHON]
    if heapsize:
        cmd += ["-X", f"heapsize={heapsize}"]
    return subprocess.run(cmd + args, cwd=cwd, env=env or dict(os.environ), capture_output=True,
                          text=True, timeout=timeout)
