"""The ``influencekit`` command.

Each subcommand lives in its own module and registers itself with ``add_parser(subparsers)``
and a ``run(args)`` function; this file only wires them together.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import InfluenceError

# subcommand name -> module under influencekit.experiments (with add_parser and run)
SUBCOMMANDS = {
    "demo": "influencekit.experiments.demo",
    "evaluate": "influencekit.experiments.evaluate",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="influencekit",
        description="Influence functions for deep networks: estimate, diagnose, act.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMANDS.values():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:  # not written yet
                continue
            raise
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        return int(args.run(args) or 0)
    except InfluenceError as e:
        print(f"influencekit {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
