"""`python -m host_tools <command>` (or `tbfleet <command>`): one CLI over every host tool.

Each command lives in its own module, which provides `add_arguments(parser)` and `run(args) -> int`; modules are
imported only when their command runs, so `emulator` does not pay for esptool and `flash` not for aiocoap.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

COMMANDS: dict[str, tuple[str, str]] = {
    "emulator": ("host_tools.emulator.server", "run the local ThingsBoard device-API emulator"),
    "flash": ("host_tools.flash", "write a board's MicroPython image with esptool"),
    "deploy": ("host_tools.deploy", "compile and copy the firmware and its config.json to a board"),
    "fleet": ("host_tools.fleet", "deploy many boards in parallel and write an inventory"),
    "vboard": ("host_tools.vboard", "run a virtual board: the Unix port behind a pty speaking the REPL protocol"),
    "bench": ("host_tools.bench", "measure heap, flash footprint, latency and wire bytes per transport"),
}


def main(argv: list[str] | None = None) -> int:
    """Parse `argv`, run the chosen command and return its exit status."""
    argv = sys.argv[1:] if argv is None else argv
    # Named as it was called: `python -m host_tools`, or the `tbfleet` command of an installed package.
    prog = "python -m host_tools" if sys.argv[0].endswith("__main__.py") else Path(sys.argv[0]).name
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return importlib.import_module(COMMANDS[args.command][0]).run(args)
    except KeyboardInterrupt:
        return 130
