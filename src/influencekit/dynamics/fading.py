"""Analyses of twin runs: divergence growth rate, the fading curve, the influence horizon.

- :func:`growth_rate`: slope of ``log ‖Δθ_t‖`` against the step (per step; ``ln 2 / rate`` is
  the doubling time), for the twins and for the data-order controls, with a confidence interval
  (bootstrap over curves; the regression's t-interval when there is a single curve).
- :func:`fading_curve`: at every recorded step, the correlation (Pearson and Spearman, pooled
  over all (example, query) pairs; and Spearman per query across examples, averaged) between
  the predicted change ``−δw · score / N`` (``+score/N`` for a removal) and the actual change
  ``m_B(q) − m_A(q)``; plus the magnitude of the actual change.
- :func:`influence_horizon`: the first recorded step where a correlation curve, having reached
  a threshold, falls below it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats

from .. import validate
from ..errors import InputError
from ..groundtruth.metrics import ArrayLike, as_numpy, mean_spearman, pearson, spearman
from .twins import TwinRuns


@dataclass
class Slope:
    """A growth rate ``d log y / d step`` with its ``level`` confidence interval."""

    rate: float
    low: float
    high: float
    n_curves: int

    @property
    def doubling_steps(self) -> float:
        """Steps for the quantity to double (``inf`` when it does not grow)."""
        return math.log(2) / self.rate if self.rate > 0 else math.inf


@dataclass
class GrowthRate:
    twins: Slope
    control: Slope | None

    def to_dict(self) -> dict[str, object]:
        return {"twins": vars(self.twins),
                "control": None if self.control is None else vars(self.control)}


def _slope(x: np.ndarray, y: np.ndarray) -> float:
    ok = np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 2:
        return math.nan
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc * xc).sum())


def log_slope(steps: ArrayLike, curves: ArrayLike, *, start: int | None = None,
              stop: int | None = None, level: float = 0.95, n_boot: int = 1000,
              seed: int = 0) -> Slope:
    """Slope of the mean over curves of ``log curves[t, j]`` against ``steps[t]`` (least
    squares), on the steps in ``[start, stop]``; non-positive values are skipped.

    The interval: percentile bootstrap over the curves (columns) when there are several, else
    the t-interval of the regression slope.
    """
    x, y = as_numpy(steps), as_numpy(curves)
    y = y.reshape(len(x), -1)
    if y.shape[1] == 0:
        raise InputError("log_slope needs at least one curve.")
    keep = np.ones(len(x), dtype=bool)
    if start is not None:
        keep &= x >= start
    if stop is not None:
        keep &= x <= stop
    x, y = x[keep], y[keep]
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.where(y > 0, np.log(np.where(y > 0, y, 1.0)), np.nan)

    def rate(cols: np.ndarray) -> float:
        with warnings.catch_warnings():  # a step where every curve is skipped: NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            return _slope(x, np.nanmean(logs[:, cols], axis=1))

    k = y.shape[1]
    est = rate(np.arange(k))
    alpha = 1 - validate.fraction("level", level)
    if k > 1:
        rng = np.random.default_rng(seed)
        boots = np.array([rate(rng.integers(0, k, k)) for _ in range(n_boot)])
        boots = boots[np.isfinite(boots)]
        low, high = np.quantile(boots, [alpha / 2, 1 - alpha / 2]) if len(boots) else (
            math.nan, math.nan)
    else:
        mean = logs[:, 0]
        ok = np.isfinite(mean)
        if ok.sum() > 2:
            res = stats.linregress(x[ok], mean[ok])
            half = stats.t.ppf(1 - alpha / 2, ok.sum() - 2) * res.stderr
            low, high = est - half, est + half
        else:
            low = high = math.nan
    return Slope(est, float(low), float(high), k)


def growth_rate(runs: TwinRuns, *, start: int | None = None, stop: int | None = None,
                level: float = 0.95, n_boot: int = 1000, seed: int = 0) -> GrowthRate:
    """Growth rate of ``log ‖θ_B − θ_A‖`` per step for the twins and the data-order controls."""
    twins = log_slope(runs.steps, runs.divergence, start=start, stop=stop, level=level,
                      n_boot=n_boot, seed=seed)
    control = None
    if runs.control_divergence.numel():
        control = log_slope(runs.steps, runs.control_divergence, start=start, stop=stop,
                            level=level, n_boot=n_boot, seed=seed)
    return GrowthRate(twins, control)


def predicted_effect(runs: TwinRuns, scores: ArrayLike) -> np.ndarray:
    """The change of ``m(q)`` an estimator predicts for each perturbation, ``[P, Q]``:
    ``−δw · score / N`` (``+score / N`` for a removal).

    Args:
        scores: ``[Q, n_train]`` (all training examples) or ``[Q, P]`` (the perturbed ones).
    """
    s = as_numpy(scores)
    q = runs.measure_ref.shape[1]
    p = len(runs.examples)
    if s.ndim != 2 or s.shape[0] != q or s.shape[1] not in (p, runs.n_train):
        raise InputError(f"scores must be [{q}, {runs.n_train}] (queries × training examples) "
                         f"or [{q}, {p}] (queries × perturbed examples), got {s.shape}.")
    if s.shape[1] == runs.n_train:
        s = s[:, as_numpy(runs.examples).astype(int)]
    return (-as_numpy(runs.delta_w)[:, None] * s.T) / runs.n_train


@dataclass
class FadingCurve:
    """Predicted vs actual measurement change at each recorded step."""

    steps: np.ndarray  # [R]
    pearson: np.ndarray  # [R] pooled over (example, query) pairs
    spearman: np.ndarray  # [R] pooled over pairs
    per_query_spearman: np.ndarray  # [R] across examples for each query, averaged
    actual_magnitude: np.ndarray  # [R] mean |actual change|
    predicted_magnitude: float  # mean |predicted change|

    @property
    def magnitude_ratio(self) -> np.ndarray:
        """``mean |actual| / mean |predicted|`` at each step."""
        return self.actual_magnitude / self.predicted_magnitude

    def horizon(self, threshold: float = 0.5, which: str = "spearman") -> float:
        """:func:`influence_horizon` of one of the correlation curves."""
        validate.choice("which", which, ("pearson", "spearman", "per_query_spearman"))
        return influence_horizon(self.steps, getattr(self, which), threshold)

    def to_dict(self) -> dict[str, object]:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in vars(self).items()}


def effect_magnitude(runs: TwinRuns) -> np.ndarray:
    """Mean ``|m_B(q) − m_A(q)|`` over (example, query) pairs at each recorded step, ``[R]``."""
    return np.abs(as_numpy(runs.effect)).reshape(len(runs.steps), -1).mean(axis=1)


def fading_curve(runs: TwinRuns, scores: ArrayLike) -> FadingCurve:
    """Correlation between predicted (from ``scores``, see :func:`predicted_effect`) and actual
    change of the measurement, as a function of the step."""
    pred = predicted_effect(runs, scores)  # [P, Q]
    actual = as_numpy(runs.effect)  # [R, P, Q]
    flat = pred.reshape(-1)
    linear, ranked, per_query = [], [], []
    for a in actual:
        linear.append(pearson(flat, a.reshape(-1)))
        ranked.append(spearman(flat, a))
        per_query.append(mean_spearman(pred.T, a.T) if pred.shape[0] > 1 else math.nan)
    return FadingCurve(as_numpy(runs.steps), np.array(linear), np.array(ranked),
                       np.array(per_query), effect_magnitude(runs),
                       float(np.abs(pred).mean()))


def influence_horizon(steps: ArrayLike, correlation: ArrayLike, threshold: float = 0.5) -> float:
    """The first step at which ``correlation``, after reaching ``threshold``, falls below it.

    Returns ``inf`` when it never falls below (the horizon lies beyond the recorded run) and
    ``0`` when it never reaches the threshold (not predictive at any recorded step). NaN values
    count as below.
    """
    x, c = as_numpy(steps), as_numpy(correlation)
    if x.shape != c.shape or x.ndim != 1:
        raise InputError(f"steps and correlation must be 1-D of one length, got {x.shape} and "
                         f"{c.shape}.")
    above = np.nan_to_num(c, nan=-np.inf) >= threshold
    if not above.any():
        return 0.0
    first = int(np.argmax(above))
    below = np.nonzero(~above[first:])[0]
    return float(x[first + below[0]]) if len(below) else math.inf
