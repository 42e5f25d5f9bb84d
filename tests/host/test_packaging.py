"""pyproject.toml: the host tools install as the `tbfleet` package and command, with the firmware and board files,
and work outside a checkout; requirements.txt pins exactly what pyproject.toml pins."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile

from support import ROOT
from vboard_fixtures import MAKE_VARIABLES


def test_requirements_pin_the_dependencies_and_extras_of_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        declared += extra
    pinned = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert sorted(pinned) == sorted(declared)
    assert all("==" in requirement for requirement in pinned)


def test_an_installed_tbfleet_deploys_the_local_demo_outside_a_checkout(tmp_path):
    # What `pip install .` builds, from only the files the build takes, installed where no checkout is near. The
    # dependencies are this environment's (the same pins), so that the test needs no network.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "host_tools", "firmware", "boards"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree
                                        else {}))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, capture_output=True, timeout=120)
    [wheel] = (tmp_path / "dist").glob("tbfleet-*.whl")
    # Every file of the host tools, the firmware and the board files is in the package (a new subpackage or data
    # file needs its line in pyproject.toml).
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if not name.startswith("tbfleet-")}
    wanted = {f"host_tools/{p.relative_to(src / 'host_tools').as_posix()}"
              for p in (src / "host_tools").rglob("*") if p.is_file()}
    for folder in ("firmware", "boards"):
        wanted |= {f"host_tools/{p.relative_to(src).as_posix()}" for p in (src / folder).rglob("*") if p.is_file()}
    assert sorted(wanted - shipped) == [] and sorted(shipped - wanted) == []
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, capture_output=True,
                   timeout=120)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in MAKE_VARIABLES and k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    tbfleet = str(site / "bin" / "tbfleet")

    helped = subprocess.run([tbfleet, "--help"], cwd=work, env=env, capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: tbfleet ")
    for command in ("emulator", "flash", "deploy", "fleet", "vboard", "bench"):
        assert command in helped.stdout

    # The firmware, the board files and the demo config come from the installed package.
    where = subprocess.run([sys.executable, "-c", "from host_tools import boards, build, deploy; "
                            "print(build.FIRMWARE, deploy.DEMO_CONFIG, boards.names())"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=60)
    assert where.stdout.split(" ", 2) == [str(site / "host_tools" / "firmware"),
                                          str(site / "host_tools" / "emulator" / "demo.json"),
                                          "['esp32', 'esp32c3', 'esp32s3', 'unix']\n"], where.stderr

    env.update(COUNT="1", INTERVAL="0.3", TRANSPORT="http")
    demo = subprocess.run([tbfleet, "deploy"], cwd=work, env=env, capture_output=True, text=True, timeout=90,
                          stdin=subprocess.DEVNULL)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    # COUNT=1 stops the demo once the emulator stored at least one message (another may arrive before it stops).
    assert re.search(r"the emulator stored [1-9]\d* telemetry messages from unix-", demo.stdout + demo.stderr), (
        demo.stdout + demo.stderr)
