"""Scoring an estimator against every ground truth at once, with its time and peak memory
(used by ``influencekit evaluate``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..batching import Batch
from ..estimators import Estimator
from ..groundtruth import (
    LDSResult,
    LOOResult,
    PBRFResult,
    auc,
    fraction_found,
    lds,
    loo_correlation,
    mean_spearman,
)
from ..profiling import peak_memory
from ..task import Task


@dataclass
class GroundTruth:
    """Everything an estimator is compared with (each part optional)."""

    train: Batch
    queries: Batch
    loo: dict[str, LOOResult] = field(default_factory=dict)  # "warm" / "scratch"
    lds: LDSResult | None = None
    pbrf: PBRFResult | None = None
    noisy_task: Task | None = None  # a model trained with flipped labels
    noisy_train: Batch | None = None
    flipped: torch.Tensor | None = None
    inspect: float = 0.1


@dataclass
class MethodResult:
    method: str
    metrics: dict[str, float] = field(default_factory=dict)
    time_s: float = float("nan")  # fit + scores on the reference model
    mislabel_time_s: float = float("nan")  # fit + self-influence on the noisy model
    peak_mb: float = float("nan")
    error: str | None = None
    scores: torch.Tensor | None = None  # [Q, N], kept for the comparison with the reference


def evaluate_method(name: str, make: Callable[[Task], Estimator], task: Task,
                    gt: GroundTruth, reference: torch.Tensor | None = None,
                    mislabel: bool = True) -> MethodResult:
    """Fit ``make(task)`` on the training data, score the queries, and compare with ``gt``.

    ``reference`` ([Q, N], e.g. the exact scores) gives the "Spearman vs exact" column;
    ``mislabel=False`` skips the self-influence run (costly for iterative solvers).
    """
    mislabel = mislabel and gt.noisy_task is not None
    res = MethodResult(name)
    with peak_memory() as mem:
        start = time.perf_counter()
        est = make(task)
        scores = est.fit(gt.train).scores(gt.queries).double().cpu()
        res.time_s = time.perf_counter() - start
        if mislabel:
            start = time.perf_counter()
            noisy = make(gt.noisy_task)
            self_inf = noisy.fit(gt.noisy_train).self_influence().double().cpu()
            res.mislabel_time_s = time.perf_counter() - start
    res.peak_mb = mem["peak_mb"]
    res.scores = scores
    res.metrics = compare(scores, gt, reference)
    if mislabel:
        res.metrics["mislabel_auc"] = auc(self_inf, gt.flipped)
        res.metrics[f"mislabel_found@{gt.inspect:g}"] = fraction_found(self_inf, gt.flipped,
                                                                      gt.inspect)
    return res


def compare(scores: torch.Tensor, gt: GroundTruth,
            reference: torch.Tensor | None = None) -> dict[str, float]:
    """All correlation metrics of ``scores [Q, N]`` against the ground truths present."""
    m: dict[str, float] = {}
    if reference is not None:
        m["spearman_vs_exact"] = mean_spearman(scores, reference)
    for mode, loo in gt.loo.items():
        m[f"loo_{mode}"] = loo_correlation(scores[:, loo.removed], loo.delta)
    if gt.lds is not None:
        m["lds"] = lds(scores, gt.lds.subsets, gt.lds.values)
    if gt.pbrf is not None:
        m["pbrf"] = loo_correlation(scores[:, gt.pbrf.removed], gt.pbrf.delta_measure)
    return m


def describe_error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def summary(res: MethodResult) -> dict[str, Any]:
    """A JSON-able row."""
    return {"method": res.method, **res.metrics, "time_s": res.time_s,
            "mislabel_time_s": res.mislabel_time_s, "peak_mb": res.peak_mb, "error": res.error}
