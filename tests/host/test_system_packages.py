"""dev/system_packages.sh, the first step of `make test`: missing Debian packages are installed as root and named,
with the command that installs them, otherwise; make stops there, before any test."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Relative to ROOT, where every run starts: "nobody" may not pass through the folders above a clone (mktemp -d makes
# them 0700), but it can read what lies below a working directory it was given.
SCRIPT = "dev/system_packages.sh"
MISSING = "tbfleet-no-such-package"
# Run as "nobody" when the tests run as root, so that the unprivileged path is tested either way.
UNPRIVILEGED = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []


@pytest.fixture
def stand_ins() -> Iterator[Path]:
    """A folder "nobody" can reach too (pytest's tmp_path lies below a 0700 folder of root's), removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="tbfleet-packages-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


@pytest.fixture
def fake_apt(stand_ins: Path) -> tuple[Path, Path]:
    """(an apt-get stand-in that records its arguments, the file it records them in)."""
    calls = stand_ins / "calls"
    apt = stand_ins / "apt-get"
    apt.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    apt.chmod(0o755)
    return apt, calls


def run(args: list[str], apt: Path, prefix: list[str] = (), **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**os.environ, "APT_GET": str(apt), **env})


def test_nothing_is_done_when_every_package_is_there(fake_apt):
    apt, calls = fake_apt
    proc = run(["sh", SCRIPT, "dpkg", "coreutils"], apt)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    assert not calls.exists()


def test_without_root_the_missing_packages_and_the_command_are_named(fake_apt):
    apt, calls = fake_apt
    proc = run(["sh", SCRIPT, "dpkg", MISSING, "tbfleet-other-missing"], apt, UNPRIVILEGED)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr == (f"make test needs the Debian packages {MISSING} tbfleet-other-missing, which are not "
                           "installed. Install them with:\n"
                           f"    sudo apt-get update && sudo apt-get install -y {MISSING} tbfleet-other-missing\n")
    assert not calls.exists()


def test_a_python_that_cannot_make_a_venv_brings_python3_venv(fake_apt, stand_ins):
    apt, calls = fake_apt
    no_ensurepip = stand_ins / "python3"
    no_ensurepip.write_text("#!/bin/sh\nexit 1\n")  # as Debian's python3 without python3-venv fails the import
    no_ensurepip.chmod(0o755)
    proc = run(["sh", SCRIPT, "dpkg"], apt, UNPRIVILEGED, PYTHON=str(no_ensurepip))
    assert proc.returncode == 1
    assert "sudo apt-get update && sudo apt-get install -y python3-venv\n" in proc.stderr


def test_make_test_without_root_stops_before_any_set_up_or_test(fake_apt):
    apt, calls = fake_apt
    proc = run(["make", "--no-print-directory", "test", f"SYSTEM_PACKAGES=mosquitto {MISSING}"], apt, UNPRIVILEGED)
    assert proc.returncode != 0
    assert f"sudo apt-get update && sudo apt-get install -y {MISSING}\n" in proc.stderr
    # Neither the venv, nor lint, nor pytest ran.
    assert "pip" not in proc.stdout + proc.stderr and "ruff" not in proc.stdout and "pytest" not in proc.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="installing is what root does; this run is not root")
def test_as_root_the_missing_packages_are_installed_with_apt_get(fake_apt):
    apt, calls = fake_apt
    proc = run(["sh", SCRIPT, "dpkg", MISSING], apt)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"installing the Debian packages the tests use: {MISSING}\n"
    assert calls.read_text() == f"update -qq\ninstall -y -qq {MISSING}\n"


def test_make_test_installs_the_package_of_every_tool_the_tests_start():
    proc = subprocess.run(["make", "-s", "-f", "-", "print"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          input="include Makefile\nprint:\n\t@echo $(SYSTEM_PACKAGES)\n")
    packages = proc.stdout.split()
    for tool in ("mosquitto", "mosquitto_passwd", "mosquitto_pub", "mosquitto_sub", "coap-client-notls",
                 "coap-server-notls"):
        path = shutil.which(tool, path=os.environ["PATH"] + ":/usr/sbin:/sbin")
        assert path, f"{tool} is not installed: make test should have installed it"
        owner = subprocess.run(["dpkg", "-S", os.path.realpath(path)], capture_output=True, text=True, timeout=60)
        assert owner.stdout.split(":")[0] in packages, (tool, owner.stdout, packages)
