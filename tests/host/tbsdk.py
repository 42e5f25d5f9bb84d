"""Run scripts that use the official ThingsBoard Python SDK (`tb-mqtt-client`) against the emulator.

The SDK lives in its own virtual environment, `.venv-tbsdk` (`make sdk-venv`, which `make test` depends on): it
replaces paho-mqtt's package with ThingsBoard's fork and pip-installs whatever it misses when imported, so it must
never enter the project's `.venv`. Everything it would install is pre-installed there, pinned
(tests/host/tbsdk-requirements.txt), and its scripts run with `PIP_NO_INDEX=1`, so an import that tried to
install anything would fail loudly instead of changing the environment.

A script is a file in tests/host/tbsdk_scripts/. It reads its parameters as one JSON object on stdin
(`sdkio.params()`), writes one JSON object per line on stdout (`sdkio.emit(event, **fields)`), logs to stderr,
and exits 0 when it ran to its end. `sdkio.connect(client)` connects a TBDeviceMqttClient and waits for the
SUBACKs of the SDK's own subscriptions (the SDK's connect callback is racy: see there).
`SdkRunner.run(script, params)` returns the lines as a list of dicts; a non-zero exit, a timeout or a line that
is not JSON fails the test with the script's stderr.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

from support import ROOT

log = logging.getLogger(__name__)

SDK_VENV = ROOT / ".venv-tbsdk"
SDK_PYTHON = SDK_VENV / "bin" / "python"
SDK_REQUIREMENTS = ROOT / "tests" / "host" / "tbsdk-requirements.txt"
SCRIPTS = Path(__file__).resolve().parent / "tbsdk_scripts"


class SdkScriptError(AssertionError):
    """An SDK script failed, timed out or wrote something that is not a JSON line."""


def sdk_venv_problem() -> str | None:
    """Why the SDK's venv cannot be used (missing, or built from other requirements), or None when it can."""
    stamp = SDK_VENV / ".installed"  # a copy of the requirements it was built from
    if not SDK_PYTHON.exists() or not stamp.exists():
        return f"{SDK_VENV.name} is missing: run `make sdk-venv` (make test does it)"
    if stamp.read_text() != SDK_REQUIREMENTS.read_text():
        return f"{SDK_VENV.name} was built from other requirements than {SDK_REQUIREMENTS.name}: run `make sdk-venv`"
    return None


class SdkRunner:
    """Runs tests/host/tbsdk_scripts/* with the SDK venv's Python."""

    def run(self, script: str, params: dict[str, Any], timeout: float = 60.0) -> list[dict[str, Any]]:
        """Run `script` (a file name in tbsdk_scripts/) with `params` on stdin; its JSON lines, in order."""
        path = SCRIPTS / script
        if not path.is_file():
            raise FileNotFoundError(path)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_", "VIRTUAL_ENV"))}
        env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONUNBUFFERED="1")
        try:
            done = subprocess.run([str(SDK_PYTHON), str(path)], input=json.dumps(params), capture_output=True,
                                  text=True, timeout=timeout, cwd=SCRIPTS, env=env)
        except subprocess.TimeoutExpired as e:
            raise SdkScriptError(f"{script} did not finish within {timeout} s\nstdout:\n{_text(e.stdout)}\n"
                                 f"stderr:\n{_text(e.stderr)[-4000:]}") from None
        if done.returncode != 0:
            raise SdkScriptError(f"{script} exited {done.returncode}\nstdout:\n{done.stdout}\n"
                                 f"stderr:\n{done.stderr[-4000:]}")
        lines = []
        for line in done.stdout.splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                raise SdkScriptError(f"{script} wrote a line that is not JSON: {line!r}\n"
                                     f"stderr:\n{done.stderr[-4000:]}") from None
        log.debug("%s stderr:\n%s", script, done.stderr)
        return lines


def _text(data: str | bytes | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else data or ""


def events(lines: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """The lines whose "event" is `name`."""
    return [line for line in lines if line.get("event") == name]
