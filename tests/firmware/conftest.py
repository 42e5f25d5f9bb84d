"""Runs the MicroPython test modules in this folder inside the Unix port.

Each top-level `def test_*()` of a module here is one pytest item, executed in its own `micropython` process
with a fresh temporary directory as its working directory (the board's filesystem). A test passes when the
process exits 0; otherwise the MicroPython traceback becomes the pytest failure report.
"""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

from support import MICROPYTHON, micropython_env

HERE = Path(__file__).resolve().parent
RUNNER = "import sys\nm = __import__(sys.argv[1])\ngetattr(m, sys.argv[2])()\n"


class MicroPythonFailure(Exception):
    """A MicroPython test function raised, or its process did not exit cleanly."""


class MicroPythonModule(pytest.File):
    def collect(self):
        tree = ast.parse(self.path.read_text(), filename=str(self.path))
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                yield MicroPythonItem.from_parent(self, name=node.name)


class MicroPythonItem(pytest.Item):
    def runtest(self):
        workdir = self.config._tmp_path_factory.mktemp(self.name[:40])
        proc = subprocess.run(
            [MICROPYTHON, "-c", RUNNER, self.path.stem, self.name],
            cwd=workdir, env=micropython_env(self.path.parent), capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise MicroPythonFailure(f"exit code {proc.returncode}\n{proc.stdout}{proc.stderr}")

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, MicroPythonFailure):
            return f"MicroPython test {self.path.name}::{self.name} failed: {excinfo.value}"
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, f"{self.path.name}::{self.name}"


def pytest_pycollect_makemodule(module_path, parent):
    if module_path.parent == HERE and module_path.name.startswith("test_"):
        return MicroPythonModule.from_parent(parent, path=module_path)
    return None
