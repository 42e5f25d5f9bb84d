"""Check firmware/ against the MicroPython API of every board in boards/, with basedpyright and the published stubs of
each board's port and MicroPython version (pinned in dev/stubs.txt, installed on first use into the environment).

A module, function, method or attribute the board's port does not have, or a call that does not fit its signature,
fails the check with a message naming it and the boards that lack it. Code that runs only on some ports is checked
against those ports; the check recognises the guards the firmware uses for that:

- the body of a `try:` whose `except` catches ImportError or AttributeError (or a base of them: Exception,
  BaseException, a bare except), as in `try: import network / except ImportError: network = None`;
- the body of an `if` whose test calls `hasattr(...)`, as in `if hasattr(machine, "unique_id"): ...`.

A finding inside a guard is accepted on one board when another board checks the same spot clean while resolving
every import of that file, that is, when the code runs on a port that has the API. A name that no board has still
fails on every board. Code that uses a module only some ports have, outside such guards (net.py's functions, which
run only once `network` imported), is checked on the ports where the import resolves; elsewhere the checker knows
nothing of the module and says nothing.

Only what is about the board's API is checked (imports, attributes, calls); type-level findings are ruff's and the
tests' business. Exit status: 0 clean, 1 findings, 2 the check could not run (a board without pinned stubs, pip).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PINS = Path(__file__).resolve().with_name("stubs.txt")
STDLIB = "micropython-stdlib-stubs"
# The stubs package of each chip a board file may name.
PORT_STUBS = {
    "esp32": "micropython-esp32-esp32-generic-stubs",
    "esp32c3": "micropython-esp32-esp32-generic-c3-stubs",
    "esp32s3": "micropython-esp32-esp32-generic-s3-stubs",
    "unix": "micropython-unix-stubs",
}
RULES = ("reportMissingImports", "reportAttributeAccessIssue", "reportCallIssue")
# Exceptions whose handler makes a try body a port guard.
GUARD_EXCEPTIONS = {"ImportError", "AttributeError", "Exception", "BaseException"}


class CheckError(RuntimeError):
    """The check could not run (as opposed to: it ran and found something)."""


@dataclass(frozen=True)
class Board:
    name: str
    chip: str
    micropython: str
    stubs: str  # package==version


@dataclass(frozen=True)
class Finding:
    board: str
    path: str  # relative to the firmware folder
    line: int  # 1-based
    column: int  # 1-based
    rule: str
    message: str


def read_pins(path: Path = PINS) -> dict[str, str]:
    """{package: version} from a pin file of `package==version` lines."""
    pins = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            if not sep:
                raise CheckError(f"{path}: {line!r} is not package==version")
            pins[name.strip()] = version.strip()
    return pins


def read_boards(boards_dir: Path, pins: dict[str, str]) -> list[Board]:
    """Every board of `boards_dir` with the stubs pinned for its chip and MicroPython version."""
    boards = []
    for path in sorted(boards_dir.glob("*/board.json")):
        data = json.loads(path.read_text())
        chip, version = data["chip"], data["micropython"]["version"]
        package = PORT_STUBS.get(chip)
        if package is None:
            raise CheckError(f"{path}: no MicroPython stubs known for chip {chip!r} (PORT_STUBS in {__file__})")
        pinned = pins.get(package)
        # Stub releases carry MicroPython's version, with .postN for later releases of stubs of that version.
        if pinned is None or pinned.split(".post")[0] != version:
            raise CheckError(f"{path}: MicroPython {version} on {chip} needs {package}=={version}.postN pinned in "
                             f"{PINS.relative_to(ROOT)} (pinned: {pinned or 'none'})")
        boards.append(Board(path.parent.name, chip, version, f"{package}=={pinned}"))
    if not boards:
        raise CheckError(f"no boards in {boards_dir}")
    return boards


def install(requirement: str, cache: Path) -> Path:
    """The folder holding `requirement` (package==version, no dependencies), installed there by pip on first use."""
    folder = cache / requirement.replace("==", "-")
    if folder.is_dir():
        return folder
    # Into a folder of this process's own, then renamed into place: checks running side by side (the tests run two)
    # never see a half-installed folder, and the one that comes second drops its copy.
    partial = cache / f"{folder.name}.{os.getpid()}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", "--no-deps",
                           "--target", str(partial), requirement], capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise CheckError(f"pip could not install {requirement}: {proc.stderr.strip()}")
    try:
        partial.rename(folder)
    except OSError:  # another check installed it meanwhile
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def guards(source: str) -> list[tuple[int, int]]:
    """The (first, last) line ranges of the port guards in a module's source (see the module docstring)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Try) and any(_catches_missing_api(h.type) for h in node.handlers):
            body = node.body
        elif isinstance(node, ast.If) and any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                                              and n.func.id == "hasattr" for n in ast.walk(node.test)):
            body = node.body
        else:
            continue
        found.append((body[0].lineno, body[-1].end_lineno or body[-1].lineno))
    return found


def _catches_missing_api(handler: ast.expr | None) -> bool:
    if handler is None:
        return True
    names = handler.elts if isinstance(handler, ast.Tuple) else [handler]
    return any(isinstance(n, ast.Name) and n.id in GUARD_EXCEPTIONS for n in names)


def run_checker(firmware: Path, boards: list[Board], folders: dict[str, Path], stdlib: Path,
                work: Path) -> list[Finding]:
    """Every finding of one basedpyright run over a copy of `firmware` per board, each with its port's stubs."""
    envs = []
    for board in boards:
        shutil.copytree(firmware, work / board.name, ignore=shutil.ignore_patterns("__pycache__"))
        envs.append({"root": board.name,
                     "extraPaths": [str(work / board.name / "lib"), str(folders[board.stubs]), str(stdlib)]})
    config = {"include": [b.name for b in boards], "typeshedPath": str(stdlib), "typeCheckingMode": "off",
              "pythonVersion": "3.11", "executionEnvironments": envs, "reportMissingModuleSource": "none",
              **{rule: "error" for rule in RULES}}
    (work / "pyrightconfig.json").write_text(json.dumps(config))
    checker = Path(sys.executable).with_name("basedpyright")
    proc = subprocess.run([str(checker), "--outputjson", "-p", str(work / "pyrightconfig.json")], cwd=work,
                          capture_output=True, text=True)
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        output = proc.stdout[-2000:] + proc.stderr[-2000:]
        raise CheckError(f"basedpyright failed (exit {proc.returncode}): {output}") from None
    findings = []
    for d in report["generalDiagnostics"]:
        rel = Path(d["file"]).resolve().relative_to(work.resolve())
        start = d["range"]["start"]
        findings.append(Finding(rel.parts[0], str(Path(*rel.parts[1:])), start["line"] + 1, start["character"] + 1,
                                d.get("rule", ""), " ".join(d["message"].split())))
    return findings


def judge(findings: list[Finding], boards: list[Board], firmware: Path) -> list[Finding]:
    """The findings that fail the check: outside a guard, or inside one with no board where that code is clean."""
    at = {(f.board, f.path, f.line, f.column) for f in findings}
    # A board runs a file's guarded code only if it resolves every import of the file that some board resolves (an
    # import no board resolves fails by itself).
    missing: dict[tuple[str, int, int], set[str]] = {}
    for f in findings:
        if f.rule == "reportMissingImports":
            missing.setdefault((f.path, f.line, f.column), set()).add(f.board)
    unresolved = {(b, path) for (path, _, _), names in missing.items() if len(names) < len(boards) for b in names}
    ranges = {}
    failing = []
    for f in findings:
        if f.path not in ranges:
            ranges[f.path] = guards((firmware / f.path).read_text())
        if any(first <= f.line <= last for first, last in ranges[f.path]) and any(
                b.name != f.board and (b.name, f.path) not in unresolved
                and (b.name, f.path, f.line, f.column) not in at for b in boards):
            continue
        failing.append(f)
    return failing


def report(failing: list[Finding]) -> list[str]:
    """One line per finding, naming every board that has it."""
    grouped: dict[tuple, list[str]] = {}
    for f in failing:
        grouped.setdefault((f.path, f.line, f.column, f.message, f.rule), []).append(f.board)
    lines = []
    for (path, line, column, message, rule), names in sorted(grouped.items()):
        lines.append(f"firmware/{path}:{line}:{column}: {message} (on {', '.join(sorted(names))}) [{rule}]")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run the check; print the findings that fail it (or one line saying it passed) and return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--firmware", type=Path, default=ROOT / "firmware", help="the firmware folder to check")
    parser.add_argument("--boards", type=Path, default=ROOT / "boards", help="the folder of board folders")
    parser.add_argument("--cache", type=Path, default=Path(sys.prefix) / "mpstubs",
                        help="where the stubs are installed (default: inside the running environment)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        pins = read_pins()
        boards = read_boards(args.boards, pins)
        if STDLIB not in pins:
            raise CheckError(f"{PINS}: {STDLIB} is not pinned")
        folders = {b.stubs: install(b.stubs, args.cache) for b in boards}
        stdlib = install(f"{STDLIB}=={pins[STDLIB]}", args.cache)
        with tempfile.TemporaryDirectory(prefix="firmware-api-") as tmp:
            findings = run_checker(args.firmware, boards, folders, stdlib, Path(tmp))
    except CheckError as e:
        print(f"firmware API check: {e}", file=sys.stderr)
        return 2
    failing = judge(findings, boards, args.firmware)
    lines = report(failing)
    for line in lines:
        print(line)
    verdict = f"{len(lines)} finding(s)" if lines else "clean"
    checked = ", ".join(f"{b.name} ({b.stubs})" for b in boards)
    print(f"firmware API check: {verdict}; checked against {checked} in {time.monotonic() - started:.1f} s")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
