"""How well scores predict ground truth: Spearman per query, LOO correlation, LDS, AUC.

Sign convention (as everywhere): ``score(q, x) > 0`` means training on ``x`` lowers the query's
measurement ``m(q)``. So removing ``x`` should *raise* ``m(q)`` by about ``score/N`` and
including a subset ``S`` should lower ``m(q)`` by about ``Σ_{x∈S} score``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.stats import rankdata

from ..errors import InputError

ArrayLike = torch.Tensor | np.ndarray


def as_numpy(a: ArrayLike) -> np.ndarray:
    """A tensor or array as a float64 numpy array."""
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().double().numpy()
    return np.asarray(a, dtype=np.float64)


def rowwise_spearman(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Spearman rank correlation between ``a[i]`` and ``b[i]`` for every row ``i`` (ties get
    average ranks); NaN for a row where either side is constant."""
    a, b = as_numpy(a), as_numpy(b)
    if a.shape != b.shape or a.ndim != 2:
        raise InputError(f"rowwise_spearman needs two 2-D arrays of one shape, got {a.shape} "
                         f"and {b.shape}.")
    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    denom = np.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (ra * rb).sum(1) / np.where(denom > 0, denom, 1.0), np.nan)


def pearson(a: ArrayLike, b: ArrayLike) -> float:
    """Pearson correlation of two flat arrays; NaN when either is constant."""
    a, b = as_numpy(a), as_numpy(b)
    a, b = a - a.mean(), b - b.mean()
    d = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / d) if d > 0 else math.nan


def spearman(a: ArrayLike, b: ArrayLike) -> float:
    """Spearman rank correlation of two flat arrays (ties get average ranks); NaN when either
    is constant."""
    return pearson(rankdata(as_numpy(a).ravel()), rankdata(as_numpy(b).ravel()))


def _mean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def mean_spearman(a: ArrayLike, b: ArrayLike) -> float:
    """Average over rows of :func:`rowwise_spearman` (rows with a constant side skipped)."""
    return _mean(rowwise_spearman(a, b))


def loo_correlation(scores: ArrayLike, delta: ArrayLike) -> float:
    """Leave-one-out correlation: for each query ``q``, Spearman across the removed examples
    ``k`` between ``scores[q, k]`` and the actual change ``delta[k, q] = m_{−k}(q) − m(q)``;
    averaged over queries.

    Args:
        scores: ``[Q, K]`` scores of the removed examples. delta: ``[K, Q]``.
    """
    s, d = as_numpy(scores), as_numpy(delta)
    if d.shape != s.shape[::-1]:
        raise InputError(f"scores are {s.shape} (queries × removed) but delta is {d.shape}; "
                         "delta must be removed × queries.")
    return mean_spearman(s, d.T)


def lds(scores: ArrayLike, subsets: ArrayLike, values: ArrayLike) -> float:
    """Linear datamodeling score.

    For each query ``q``, Spearman across the ``M`` retrained subsets between the predicted
    effect ``Σ_{x∈S_m} score[q, x]`` and the measured ``−values[m, q]`` (a higher sum of scores
    predicts a lower measurement); averaged over queries.

    Args:
        scores: ``[Q, N]``. subsets: ``[M, N]`` 0/1 membership. values: ``[M, Q]`` the
            measurement of each query for the model trained on each subset.
    """
    s, z, v = as_numpy(scores), as_numpy(subsets), as_numpy(values)
    if z.shape[1] != s.shape[1] or v.shape != (z.shape[0], s.shape[0]):
        raise InputError(f"lds: scores {s.shape} (Q × N), subsets {z.shape} (M × N) and values "
                         f"{v.shape} (M × Q) do not fit together.")
    predicted = z @ s.T  # [M, Q]
    return mean_spearman(predicted.T, -v.T)


def auc(scores: ArrayLike, positives: ArrayLike) -> float:
    """Area under the ROC curve of ``scores`` for detecting ``positives`` (ties count ½)."""
    s = as_numpy(scores).reshape(-1)
    pos = as_numpy(positives).reshape(-1).astype(bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if s.shape != pos.shape or n_pos == 0 or n_neg == 0:
        raise InputError("auc needs scores and labels of one length with both classes present.")
    ranks = rankdata(s)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def fraction_found(scores: ArrayLike, positives: ArrayLike, inspect: float = 0.1) -> float:
    """Fraction of the positives among the top ``inspect`` fraction of examples by score."""
    s = as_numpy(scores).reshape(-1)
    pos = as_numpy(positives).reshape(-1).astype(bool)
    if not 0 < inspect <= 1:
        raise InputError(f"inspect must lie in (0, 1], got {inspect}.")
    if not pos.any():
        raise InputError("fraction_found needs at least one positive.")
    k = max(1, int(round(inspect * len(s))))
    top = np.argsort(-s, kind="stable")[:k]
    return float(pos[top].sum() / pos.sum())
