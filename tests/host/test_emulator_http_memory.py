"""The emulator's memory under concurrent large HTTP uploads: request bodies share one byte budget.

The real CLI, and its peak resident memory read from /proc (VmHWM) once 16 clients have each uploaded 45 MB at
the same time. Without the budget every body is held whole at once (16 x 45 MB, about 720 MB, and more while
asyncio copies them); with it, one 45 MB body at a time.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

from emulator_fixtures import CONFIG, emulator_process
from host_tools.emulator import http as tbhttp

UPLOADS = 16
SIZE = 45 * 1024 * 1024


def vm_hwm(pid: int) -> int:
    """Peak resident set size of process `pid`, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/%d/status" % pid)


def upload(port: int, body: memoryview, answers: list[bytes]) -> None:
    """POST body as telemetry under a token nobody has (answered 401 once the body was read)."""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        s.sendall(b"POST /api/v1/noSuchToken/telemetry HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
        s.sendall(body)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
        answers.append(answer)


def test_sixteen_concurrent_45_mb_uploads_stay_within_the_body_budget() -> None:
    body = memoryview(b"x" * SIZE)
    with emulator_process(CONFIG) as emu:
        pid = emu.proc.pid
        before = vm_hwm(pid)
        answers: list[bytes] = []
        threads = [threading.Thread(target=upload, args=(emu.ports["http"], body, answers)) for _ in range(UPLOADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        peak = vm_hwm(pid)
    assert len(answers) == UPLOADS and all(a.startswith(b"HTTP/1.1 401 ") for a in answers), answers
    # Held bodies stay within the budget; reading one costs at most a second copy of it (asyncio's buffer).
    assert peak - before < 2 * tbhttp.BODY_BUDGET + 32 * 1024 * 1024, (before, peak)
