"""Argument checks shared by every public entry point: each raises an
:class:`~influencekit.errors.InputError` that names the argument, what was wrong and the fix."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

from .errors import InputError


def _hint(fix: str | None) -> str:
    return f" {fix}" if fix else ""


def integer(name: str, value: Any, *, minimum: int | None = None, fix: str | None = None) -> int:
    """``value`` as an ``int`` (a bool or a non-integral float is refused), ``≥ minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise InputError(
                f"{name} must be an integer, got {value!r} ({type(value).__name__})."
                + _hint(fix))
    value = int(value)
    if minimum is not None and value < minimum:
        raise InputError(f"{name} must be ≥ {minimum}, got {value}." + _hint(fix))
    return value


def positive_int(name: str, value: Any, fix: str | None = None) -> int:
    """An integer ``≥ 1``."""
    return integer(name, value, minimum=1, fix=fix)


def optional_positive_int(name: str, value: Any, fix: str | None = None) -> int | None:
    return None if value is None else positive_int(name, value, fix)


def number(name: str, value: Any, *, minimum: float | None = None, strict: bool = False,
           maximum: float | None = None, finite: bool = True, fix: str | None = None) -> float:
    """``value`` as a finite ``float`` (NaN always refused), within the bounds
    (``strict``: ``> minimum``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{name} must be a number, got {value!r} ({type(value).__name__})."
                         + _hint(fix))
    value = float(value)
    if math.isnan(value) or (finite and math.isinf(value)):
        raise InputError(f"{name} must be a finite number, got {value}." + _hint(fix))
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise InputError(
            f"{name} must be {'>' if strict else '≥'} {minimum:g}, got {value:g}." + _hint(fix))
    if maximum is not None and value > maximum:
        raise InputError(f"{name} must be ≤ {maximum:g}, got {value:g}." + _hint(fix))
    return value


def non_negative(name: str, value: Any, fix: str | None = None) -> float:
    return number(name, value, minimum=0.0, fix=fix)


def positive(name: str, value: Any, fix: str | None = None) -> float:
    return number(name, value, minimum=0.0, strict=True, fix=fix)


def fraction(name: str, value: Any, fix: str | None = None) -> float:
    """A number strictly between 0 and 1."""
    value = number(name, value, fix=fix)
    if not 0.0 < value < 1.0:
        raise InputError(f"{name} must lie strictly between 0 and 1, got {value:g}." + _hint(fix))
    return value


def choice(name: str, value: Any, options: Iterable[str]) -> str:
    """One of ``options`` (the message lists them)."""
    options = tuple(options)
    if value not in options:
        raise InputError(f"{name} must be one of {', '.join(map(repr, options))}; got {value!r}.")
    return value


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"{name} must be True or False, got {value!r}.")
    return value
