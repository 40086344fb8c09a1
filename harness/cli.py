"""`python -m harness <command>`: wires the command modules under harness/commands."""
from __future__ import annotations

import argparse
import importlib
import sys

from harness.errors import HarnessError

# name -> module exposing `register(subparsers)`; each sets `func(args) -> int` on its parser.
COMMANDS = {
    "cknna": "harness.commands.cknna",
    "data": "harness.commands.data",
    "extract": "harness.commands.extract",
    "run": "harness.commands.run",
    "success": "harness.commands.success",
}


class OneLineErrors(argparse.ArgumentParser):
    """Argument mistakes as one line (what is wrong, the allowed values), exit 2: the
    usage block argparse prints first buries the line that matters."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(prog="harness", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for module_name in COMMANDS.values():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name == module_name:  # command not built yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except HarnessError as err:
        message = " ".join(str(err).split())  # always one line
        print(f"harness {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
