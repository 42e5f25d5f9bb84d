"""The virtual board behaves like a MicroPython board for real mpremote and pyserial (a fake firmware is enough)."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import serial

from host_tools.vboard import VirtualBoard, board_mac
from support import ROOT
from vboard_fixtures import vboard  # noqa: F401 - fixture

# A main.py that counts its runs in a file, says so on the console, then works until interrupted.
COUNTING_MAIN = """\
try:
    with open("runs") as f:
        n = int(f.read())
except OSError:
    n = 0
with open("runs", "w") as f:
    f.write(str(n + 1))
print("main run", n + 1)
import time
while True:
    time.sleep(0.05)
"""


def mpremote(port: str, *args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mpremote", "connect", port, *args], capture_output=True,
                          text=True, timeout=timeout)


def wait_for(predicate, timeout: float = 10, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


def runs(flash: Path) -> int:
    path = flash / "runs"
    return int(path.read_text()) if path.exists() else 0


def test_mpremote_file_commands_work_on_the_flash_directory(vboard: VirtualBoard, tmp_path: Path) -> None:
    src = tmp_path / "blob.bin"
    src.write_bytes(bytes(range(256)) * 40)
    proc = mpremote(vboard.port, "fs", "mkdir", ":lib", "+", "fs", "cp", str(src), ":lib/blob.bin",
                    "+", "fs", "sha256sum", ":lib/blob.bin", "+", "fs", "ls", ":lib")
    assert proc.returncode == 0, proc.stderr
    assert (vboard.flash_dir / "lib" / "blob.bin").read_bytes() == src.read_bytes()
    assert hashlib.sha256(src.read_bytes()).hexdigest() in proc.stdout
    assert "blob.bin" in proc.stdout
    # A second mpremote can open the port (pyserial's TIOCEXCL was cleared), sees the same files, removes one.
    (vboard.flash_dir / "note.txt").write_text("written on the host side\n")
    proc = mpremote(vboard.port, "fs", "cat", ":note.txt")
    assert proc.returncode == 0 and proc.stdout == "written on the host side\n"
    proc = mpremote(vboard.port, "fs", "rm", ":lib/blob.bin", "+", "exec", "import os; print(os.listdir('/lib'))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("[]")
    assert not (vboard.flash_dir / "lib" / "blob.bin").exists()


def test_boot_runs_main_and_ctrl_c_stops_it_for_mpremote(tmp_path: Path) -> None:
    flash = tmp_path / "flash"
    flash.mkdir()
    (flash / "main.py").write_text(COUNTING_MAIN)
    with VirtualBoard(flash, console_log=tmp_path / "console.log") as board:
        wait_for(lambda: runs(flash) == 1, what="main.py at power-on")
        started = time.monotonic()
        proc = mpremote(board.port, "exec", "print(6 * 7)")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "42"
        assert time.monotonic() - started < 5
        # mpremote's soft reset came back in the raw REPL without running main.py, as on a real board.
        assert runs(flash) == 1
        proc = mpremote(board.port, "soft-reset", "+", "exec", "print('after reset')")
        assert proc.returncode == 0, proc.stderr
        assert "after reset" in proc.stdout and runs(flash) == 1
        # A soft reset from the friendly REPL runs main.py again, and its output reaches the port and the log.
        with serial.serial_for_url(board.port, timeout=0.1) as conn:
            conn.write(b"\x02")
            time.sleep(0.1)
            conn.write(b"\x04")
            seen = b""
            end = time.monotonic() + 10
            while b"main run 2" not in seen and time.monotonic() < end:
                seen += conn.read(256)
        assert b"soft reboot" in seen and b"main run 2" in seen
        assert runs(flash) == 2
    assert b"main run 2" in (tmp_path / "console.log").read_bytes()


def test_machine_identity_and_reset(vboard: VirtualBoard) -> None:
    proc = mpremote(vboard.port, "exec", "import machine, binascii; print(binascii.hexlify(machine.unique_id()))")
    assert proc.returncode == 0, proc.stderr
    assert board_mac(vboard.flash_dir).hex() in proc.stdout
    assert board_mac(vboard.flash_dir)[0] & 0x02  # locally administered, so it never collides with a real MAC
    (vboard.flash_dir / "main.py").write_text(COUNTING_MAIN)
    proc = mpremote(vboard.port, "reset")
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: runs(vboard.flash_dir) == 1, what="main.py after machine.reset()")
    proc = mpremote(vboard.port, "exec", "print('still here')")
    assert proc.returncode == 0 and "still here" in proc.stdout


def test_cli_prints_port_and_stops_on_sigterm(tmp_path: Path) -> None:
    flash = tmp_path / "flash"
    proc = subprocess.Popen([sys.executable, "-m", "host_tools", "vboard", "--flash-dir", str(flash)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = json.loads(proc.stdout.readline())
        assert ready["event"] == "ready" and ready["mac"] == board_mac(flash).hex(":")
        result = mpremote(ready["port"], "exec", "import os; print(os.getcwd(), os.listdir())")
        assert result.returncode == 0, result.stderr
        assert result.stdout.split()[0] == "/"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        proc.stdout.close()
        proc.stderr.close()
