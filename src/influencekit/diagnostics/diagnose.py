"""``ik.diagnose``: which of the paper's five assumptions hold on this model and data."""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

from .. import validate
from ..batching import Batch, batch_size_of
from ..errors import InputError
from ..progress import log_stage
from ..task import Task
from ..training import TrainConfig
from .curvature import CurvatureProbe, convexity_section, stability_section
from .training import (
    continued_runs,
    default_config,
    divergence_section,
    linearity_section,
    trajectory_section,
)
from .verdicts import Diagnosis, Section, skipped

SECTIONS = ("convexity", "stability", "trajectory", "divergence", "linearity")


def diagnose(
    task: Task,
    train: Batch,
    queries: Batch,
    *,
    config: TrainConfig | None = None,
    damping: float | None = None,
    rank: int = 20,
    iterations: int = 40,
    curvature_batch: int = 256,
    pool: int = 512,
    probes: int = 1,
    top_k: int = 10,
    n_removed: int = 6,
    upweights: Sequence[float] | None = None,
    n_upweighted: int = 3,
    random_groups: Sequence[int] | None = None,
    top_groups: Sequence[int] | None = None,
    unrolled: bool | str = "auto",
    sections: Sequence[str] = SECTIONS,
    seed: int = 0,
    store: str | os.PathLike[str] | None = None,
    progress: bool | None = None,
) -> Diagnosis:
    """Diagnose the five assumptions behind influence functions at ``task``'s model.

    Args:
        task: the fitted model (its current parameters are the point diagnosed), loss and
            measurement. train: its training data ``(inputs, labels, ...)`` in memory.
            queries: the test examples whose influence you care about.
        config: the continued training that sections 3–5 perturb (your fine-tuning recipe);
            default one epoch of plain SGD at ``lr = 1/λ_max``, batches of 64.
        damping: ``δ`` of the scores (default ``config.weight_decay`` when positive, else
            ``1e-3 λ_max``). rank: eigenpairs kept.
        iterations: Lanczos steps per curvature run (four runs); curvature_batch: examples
            the curvature averages over; pool: training examples scored (removed examples and
            groups come from it); probes: start vectors of the spectral density.
        top_k: proponent-set size of the stability section.
        n_removed: single-removal twin runs; upweights: the up-weights ``Δw`` tried on
            ``n_upweighted`` of them (default ``1, N/100, N/40``: ε up to 2.5%);
            random_groups: sizes of groups of the removed examples (default ``2`` and
            ``n_removed``); top_groups: sizes of top-influence groups (default ``N/200`` and
            ``N/50``, at least 2 and 4). The verdict covers these typical perturbations;
            pass larger ones to find where linearity breaks.
        unrolled: exact unrolled influence in section 3 (``"auto"``: when affordable).
        sections: which of ``convexity, stability, trajectory, divergence, linearity`` to run.
        seed: of the subsets, pool and start vectors.
        store: a folder where the curvature measurements and the twin and group runs are kept
            (a rerun resumes from them); default a temporary folder.

    Returns:
        a :class:`~influencekit.diagnostics.Diagnosis`: ``.trust`` (read this first),
        ``.sections`` (verdict, numbers, recommendation each), ``.save(folder)``.
    """
    if not isinstance(task, Task):
        raise InputError(f"task must be an influencekit Task, got {type(task).__name__}.")
    check_sections(sections)
    if config is not None and not isinstance(config, TrainConfig):
        raise InputError(f"config must be a TrainConfig, got {type(config).__name__}.")
    if unrolled not in (True, False, "auto"):
        raise InputError(f"unrolled must be True, False or 'auto', got {unrolled!r}.")
    if damping is not None:
        damping = validate.non_negative("damping", damping)
    for name, v in (("rank", rank), ("iterations", iterations),
                    ("curvature_batch", curvature_batch), ("pool", pool), ("probes", probes),
                    ("top_k", top_k), ("n_removed", n_removed), ("n_upweighted", n_upweighted)):
        validate.positive_int(name, v)
    train, queries = tuple(train), tuple(queries)
    task.check_batch(train)
    task.check_batch(queries)
    n = batch_size_of(train)
    if n < 2:
        raise InputError("diagnose needs at least 2 training examples.")
    upweights, random_groups, top_groups = perturbation_grid(n, n_removed, upweights,
                                                             random_groups, top_groups)
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(int(seed))
    pool_idx = torch.randperm(n, generator=gen)[:min(pool, n)]
    out: dict[str, Section] = {}
    timings: dict[str, float] = {}
    log_stage("curvature: Lanczos on the Hessian (both ends) and GGN", progress)
    probe = CurvatureProbe(task, train, queries, pool_idx, damping=damping, rank=rank,
                           iterations=iterations, curvature_batch=curvature_batch,
                           weight_decay=0.0 if config is None else config.weight_decay,
                           probes=probes, seed=seed, store=store, progress=progress)
    timings["curvature probe (Lanczos ×4, gradients)"] = probe.seconds
    if "convexity" in sections:
        out["convexity"] = convexity_section(probe)
    if "stability" in sections:
        out["stability"] = stability_section(probe, top_k)
    cfg = config or default_config(n, probe.hessian.lambda_max)
    dynamic = [s for s in ("trajectory", "divergence", "linearity") if s in sections]
    if dynamic:
        with _folder(store) as folder:
            log_stage(f"continued runs: {cfg.epochs} epoch(s) at lr {cfg.lr:.3g}, "
                      f"{min(n_removed, len(pool_idx))} removal twins + control", progress)
            t_runs = time.perf_counter()
            runs = continued_runs(task, train, queries, cfg, probe, n_removed, store=folder,
                                  progress=progress)
            timings["continued runs (removal twins, control)"] = time.perf_counter() - t_runs
            if "trajectory" in sections:
                out["trajectory"] = trajectory_section(runs, probe, unrolled=unrolled)
            if "divergence" in sections:
                out["divergence"] = divergence_section(runs, probe)
            if "linearity" in sections:
                log_stage("linearity: up-weights and group removals", progress)
                out["linearity"] = linearity_section(
                    runs, probe, weights=upweights, n_upweighted=n_upweighted,
                    random_groups=random_groups, top_groups=top_groups)
    ordered = {k: out.get(k) or skipped(k, "not requested") for k in SECTIONS}
    setup = {"n_train": n, "n_queries": batch_size_of(queries), "parameters": task.num_params,
             "damping": probe.damping, "rank": probe.rank, "iterations": iterations,
             "curvature_batch": probe.curvature_batch, "pool": len(pool_idx),
             "config": vars(cfg) if dynamic else None, "config_given": config is not None,
             "seed": seed, "seconds": time.perf_counter() - t0,
             "seconds_by_stage": {**timings, **{f"section {k}": v.seconds
                                                for k, v in out.items()}}}
    return Diagnosis(ordered, setup)


def check_sections(names: Sequence[str]) -> None:
    """Refuse an empty selection or a name outside :data:`SECTIONS`."""
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown or not names:
        raise InputError(f"sections must be a non-empty subset of {', '.join(SECTIONS)}; got "
                         f"{unknown or list(names)}.")


def perturbation_grid(n: int, n_removed: int, upweights: Sequence[float] | None,
                      random_groups: Sequence[int] | None, top_groups: Sequence[int] | None
                      ) -> tuple[list[float], list[int], list[int]]:
    """The perturbations of the linearity section, defaults scaled to ``N`` (checked)."""
    if upweights is None:
        upweights = sorted({1.0, float(max(2, round(n / 100))), float(max(4, round(n / 40)))})
    if random_groups is None:
        random_groups = sorted({2, n_removed})
    if top_groups is None:
        top_groups = sorted({max(2, math.ceil(n / 200)), max(4, math.ceil(n / 50))})
    up = [validate.number("up-weight", w, minimum=0.0, strict=True) for w in upweights]
    rg = [validate.integer("random group size", k, minimum=2) for k in random_groups]
    tg = [validate.integer("top group size", k, minimum=1) for k in top_groups]
    if any(k > n_removed for k in rg):
        raise InputError(f"random groups are drawn from the {n_removed} removed examples: "
                         f"sizes must be ≤ n_removed, got {rg}.")
    return up, rg, tg


def _folder(store: str | os.PathLike[str] | None) -> AbstractContextManager[str]:
    """The given store folder, or a temporary one removed afterwards."""
    if store is None:
        return tempfile.TemporaryDirectory(prefix="influencekit-diagnose-")
    Path(store).mkdir(parents=True, exist_ok=True)
    return nullcontext(str(store))
