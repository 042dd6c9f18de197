"""Scoring an estimator against every ground truth at once, with its time and peak memory."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import resource
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..batching import Batch
from ..estimators import Estimator
from ..task import Task
from .metrics import auc, fraction_found, lds, loo_correlation, mean_spearman
from .pbrf import PBRFResult
from .retrain import LDSResult, LOOResult


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


def _trim() -> None:
    """Hand freed heap memory back to the OS (glibc), so the next peak is measured from a low
    base rather than hidden inside memory the allocator kept."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * resource.getpagesize() / 2**20
    except OSError:  # not Linux: the process high-water mark (KiB on Linux, bytes on macOS)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


@contextlib.contextmanager
def peak_memory(interval: float = 0.005) -> Iterator[dict[str, float]]:
    """Peak extra memory (MiB) while the block runs: resident set size sampled by a thread on
    CPU, ``torch.cuda.max_memory_allocated`` on GPU. Result in ``out["peak_mb"]``.

    On CPU this is approximate: peaks shorter than ``interval`` can be missed, and memory the
    allocator kept from earlier work is not counted."""
    out: dict[str, float] = {}
    gc.collect()
    _trim()
    base = _rss_mb()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_mb())
            stop.wait(interval)

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], _rss_mb())
        out["peak_mb"] = peak[0] - base
        if cuda:
            out["peak_mb"] = max(out["peak_mb"],
                                 (torch.cuda.max_memory_allocated() - cuda_base) / 2**20)


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
