"""Command-line arguments of the subcommands: ``argparse`` types built on
:mod:`influencekit.validate`, and the options an estimator's constructor takes.

A bad value is refused while the command line is parsed, before any work starts: argparse then
prints ``argument --flag: <what is wrong>`` and :func:`influencekit.cli.main` returns 2.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .. import validate
from ..errors import InputError
from ..estimators import Estimator

T = TypeVar("T")


def checked(parse: Callable[[str], T], what: str,
            check: Callable[[T], Any] | None = None) -> Callable[[str], T]:
    """An argparse ``type``: ``parse(text)`` (a ``ValueError`` means "expected ``what``"), then
    ``check(value)``, whose :class:`InputError` becomes argparse's error message."""

    def convert(text: str) -> T:
        try:
            value = parse(text)
        except InputError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}.") from None
        if check is not None:
            try:
                check(value)
            except InputError as e:
                raise argparse.ArgumentTypeError(str(e)) from None
        return value

    convert.__name__ = what  # argparse names the type in some messages
    return convert


def count(minimum: int = 1) -> Callable[[str], int]:
    """An integer ``≥ minimum``."""
    return checked(int, "an integer",
                   lambda v: validate.integer("the value", v, minimum=minimum))


def number(minimum: float | None = None, *, strict: bool = False) -> Callable[[str], float]:
    """A finite number ``≥ minimum`` (``> minimum`` when ``strict``)."""
    return checked(float, "a number",
                   lambda v: validate.number("the value", v, minimum=minimum, strict=strict))


fraction = checked(float, "a number", lambda v: validate.fraction("the value", v))


def counts(minimum: int = 1) -> Callable[[str], tuple[int, ...]]:
    """Comma-separated integers ``≥ minimum`` (``"32,16"``; ``""`` is the empty tuple)."""

    def parse(text: str) -> tuple[int, ...]:
        return tuple(int(v) for v in text.split(",") if v.strip())

    return checked(parse, "comma-separated integers",
                   lambda vs: [validate.integer("each value", v, minimum=minimum) for v in vs])


def _folder_check(path: Path) -> None:
    for existing in (path, *path.parents):
        if existing.exists():
            if not existing.is_dir():
                raise InputError(f"{existing} exists and is not a folder; give a folder path "
                                 "(it is created when missing).")
            return


folder = checked(Path, "a folder path", _folder_check)
folder.__doc__ = "A folder that exists or can be created (no part of the path is a file)."


def constructor_options(factory: Callable[..., Any]) -> list[str] | None:
    """The keyword arguments ``factory(task, ...)`` takes (a class, following ``**kwargs`` up
    to its base classes, or a ``functools.partial`` of one); None when it takes any keyword.
    The :class:`~influencekit.estimators.Estimator` base's ``**unknown`` only refuses them."""
    while isinstance(factory, functools.partial):
        factory = factory.func
    inits = ([vars(k)["__init__"] for k in factory.__mro__ if "__init__" in vars(k)
              and k is not object] if isinstance(factory, type) else [factory])
    names: list[str] = []
    for init in inits:
        params = inspect.signature(init).parameters
        names += [k for k, p in params.items() if k not in ("self", "task", *names)
                  and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if init is Estimator.__init__ or not any(
                p.kind is p.VAR_KEYWORD for p in params.values()):
            return names
    return None


def add_run_options(p: argparse.ArgumentParser | Any, command: str, cache_help: str) -> None:
    """The options every study subcommand shares: ``--threads``, ``--out``, ``--cache-dir``,
    ``--no-progress``."""
    p.add_argument("--threads", type=count(), default=None, help="torch CPU threads")
    p.add_argument("--out", type=folder, default=None,
                   help=f"output folder (runs/{command}/DATA-MODEL)")
    p.add_argument("--cache-dir", type=folder,
                   default=str(Path.home() / ".cache" / "influencekit"), help=cache_help)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def log(msg: str) -> None:
    """A progress message on standard error (results go to standard output)."""
    print(msg, file=sys.stderr, flush=True)


def command_line(command: str, args: argparse.Namespace) -> str:
    """``influencekit COMMAND --flag=value ...``: the command line that reproduces a run (built
    from the parsed arguments, so it is right for in-process calls too)."""
    out = [f"influencekit {command}"]
    for k, v in vars(args).items():
        if k in ("run", "command") or v is None or v is False:
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(v, tuple):
            v = ",".join(map(str, v))
        out.append(flag if v is True else f"{flag}={v}")
    return " ".join(out)
