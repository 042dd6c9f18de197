"""The ``influencekit`` command.

Each subcommand lives in its own module and registers itself with ``add_parser(subparsers)``
and a ``run(args)`` function; this file only wires them together. Bad arguments (refused while
parsing) and :class:`~influencekit.errors.InfluenceError` s (found later) end the command with a
one-line message and exit status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import InfluenceError

# subcommand name -> module under influencekit.experiments (with add_parser and run)
SUBCOMMANDS = {  # in the order `influencekit --help` lists them
    "reproduce": "influencekit.experiments.reproduce",
    "evaluate": "influencekit.experiments.evaluate",
    "dynamics": "influencekit.experiments.dynamics",
    "diagnose": "influencekit.experiments.diagnose",
    "correct": "influencekit.experiments.correct",
    "demo": "influencekit.experiments.demo",
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
    """Run ``influencekit ARGV``; returns the exit status: 0 on success, 2 for a bad argument or
    input (a one-line message on stderr, no traceback), 130 when interrupted."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad argument (2; argparse printed why)
        return int(e.code or 0)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        return int(args.run(args) or 0)
    except InfluenceError as e:
        print(f"influencekit {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"influencekit {args.command}: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
