"""Errors that name the problem and the fix."""

from __future__ import annotations

import torch


class InfluenceError(Exception):
    """Base class of influencekit's errors."""


class InputError(InfluenceError, ValueError):
    """The data, model or arguments given cannot be used as they are."""


class NumericalError(InfluenceError, FloatingPointError):
    """A loss, gradient or solver produced NaN/inf or diverged."""


class CurvatureError(NumericalError):
    """The curvature is not usable by the chosen solver (singular, indefinite)."""


class ArtifactError(InfluenceError):
    """A stored artifact is missing, stale or corrupted."""


def check_finite(t: torch.Tensor, what: str, fix: str) -> torch.Tensor:
    """Raise :class:`NumericalError` if ``t`` holds NaN or inf. One pass: NaN/inf anywhere makes
    the sum non-finite (only then are the elements checked one by one, since finite values can
    also overflow the sum); ``isfinite(t).all()`` costs several passes and temporaries."""
    if t.is_floating_point() and t.numel() and bool(torch.isfinite(t.sum())):
        return t
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).sum().item()
        raise NumericalError(f"{what} contains {bad} NaN/inf value(s). {fix}")
    return t
