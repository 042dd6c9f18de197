"""Assumptions 1 and 2, from the curvature at the fitted point: convexity and numeric stability.

One :class:`CurvatureProbe` does the expensive work once: Lanczos (Arnoldi on the symmetric
operator) on the Hessian of the mean loss over a fixed subset of the training data, from both
ends of the spectrum, plus three more runs (another start vector, another subset, the GGN); one
pass of per-example gradients over a pool of training examples and the queries, projected on
every basis. Both sections read it:

- **convexity**: the largest and most negative Ritz values, the share of the spectrum's mass
  that is negative (stochastic Lanczos quadrature: the Ritz values weighted by the squared
  first components of their eigenvectors, averaged over ``probes`` start vectors), the damping
  that makes ``H + λI`` positive definite, Hessian vs GGN agreement of the scores, and the
  stationarity ratio ``‖∇L(θ)‖ / mean_i ‖∇ℓ_i(θ)‖`` (0 at a minimum of the training loss,
  near 1 where every example pulls the same way).
- **stability**: spectrum decay and the condition number of the kept eigenspace; how much the
  scores and the top-k proponents move when damping, rank, the eigensolver's seed or the
  curvature subset change (Spearman and Jaccard@k, averaged over queries); LiSSA's convergence
  at its default settings, in closed form from the spectrum.

Scores are ABIF's (the paper's estimator): ``Σ_j ⟨∇m(q), e_j⟩⟨∇ℓ(x), e_j⟩ / (λ_j + δ)`` over
the top ``rank`` Ritz pairs by ``|λ|``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..autodiff import iter_grads
from ..batching import Batch, Data, iter_batches, num_examples, take, to_device
from ..curvature import CurvatureOperator
from ..curvature.arnoldi import arnoldi
from ..curvature.spectral import InverseFilter, SpectralFilter
from ..errors import CurvatureError
from ..groundtruth.cache import Cache
from ..groundtruth.metrics import mean_spearman
from ..store import (
    architecture_fingerprint,
    data_fingerprint,
    hash_value,
    model_fingerprint,
    task_fingerprint,
)
from ..task import Task
from .verdicts import Section, grade, worst

LISSA_DEPTH = 1000  # LiSSAInfluence's default depth
LISSA_TOLERANCE = 1e-2  # residual on the slowest eigen-direction counted as converged


@dataclass
class Spectrum:
    """Ritz values of one Lanczos run (descending), the SLQ density of all its probes and,
    until they are projected away, the Ritz vectors ``[m, P]``."""

    values: torch.Tensor  # [m] float64, descending
    nodes: torch.Tensor  # SLQ nodes: Ritz values of every probe
    weights: torch.Tensor  # SLQ weights, summing to 1
    dim: int  # P
    examples: int  # examples the operator averages over
    vectors: torch.Tensor | None = None

    @property
    def lambda_max(self) -> float:
        return float(self.values.max())

    @property
    def lambda_min(self) -> float:
        return float(self.values.min())

    @property
    def complete(self) -> bool:
        """The Krylov space spans the whole parameter space (the Ritz values are exact)."""
        return len(self.values) >= self.dim

    def negative_mass(self) -> float:
        """``Σ_{λ<0} |λ| w / Σ |λ| w``: the share of the spectrum's absolute mass below 0."""
        a = self.nodes.abs() * self.weights
        total = float(a.sum())
        return float(a[self.nodes < 0].sum()) / total if total > 0 else 0.0

    def negative_fraction(self) -> float:
        """``Σ_{λ<0} w``: the estimated fraction of eigenvalues below 0."""
        return float(self.weights[self.nodes < 0].sum())

    def to_dict(self) -> dict[str, Any]:
        """Everything but the vectors (what the probe stores)."""
        return {"values": self.values, "nodes": self.nodes, "weights": self.weights,
                "dim": self.dim, "examples": self.examples}


def lanczos_spectrum(task: Task, data: Data, curvature: str = "hessian", *,
                     iterations: int = 40, batch: int = 256, data_seed: int = 0, seed: int = 0,
                     probes: int = 1, progress: bool | None = None) -> Spectrum:
    """Ritz pairs of the mean-loss curvature over ``batch`` examples of ``data`` (all of them
    when ``batch ≥ N``; else a fixed subset drawn with ``data_seed``): ``iterations`` Lanczos
    steps from a start vector drawn with ``seed``; ``probes`` start vectors for the density
    (the Ritz vectors are the first probe's)."""
    n = num_examples(data)
    op = CurvatureOperator(task, data, curvature, sampling="full" if batch >= n else "fixed",
                           batch=min(batch, n), seed=data_seed)
    p = task.num_params
    nodes, weights, first = [], [], None
    for j in range(max(1, probes)):
        k = arnoldi(op, p, min(iterations, p), seed=seed + j, device=task.device,
                    progress=progress)
        m = k.applied
        a = k.projected[:m, :m]
        values, u = torch.linalg.eigh((a + a.T) / 2)
        nodes.append(values)
        weights.append(u[0] ** 2)
        if first is None:
            vectors = u.T.to(k.basis.device) @ k.basis[:m].to(torch.float64)
            order = torch.argsort(values, descending=True)
            first = (values[order], vectors[order.to(vectors.device)].to(task.dtype))
    assert first is not None
    w = torch.cat(weights)
    return Spectrum(first[0], torch.cat(nodes), w / w.sum(), p, op.batch, first[1])


@dataclass
class Projections:
    """Per-example gradients of the pool and the queries, projected on each named basis."""

    pool: dict[str, torch.Tensor]  # name -> [n_pool, r] float64
    queries: dict[str, torch.Tensor]  # name -> [Q, r]
    pool_grad_norms: torch.Tensor  # [n_pool]


def project(task: Task, pool: Data, queries: Batch, bases: dict[str, torch.Tensor], *,
            batch_size: int = 64, progress: bool | None = None) -> Projections:
    """One pass of per-example gradients over ``pool`` (loss) and ``queries`` (measurement),
    each projected on every basis ``[r, P]`` of ``bases``."""
    names = list(bases)  # products in the model's precision (memory: float32 bases of a big
    stacked = torch.cat([bases[k].to(task.device, task.dtype) for k in names])  # model)
    sizes = [bases[k].shape[0] for k in names]

    def coords(data: Data, kind: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        out, norms = [], []
        for g in iter_grads(task, data, batch_size, kind, progress=progress, reuse=True):
            out.append((g.to(task.dtype) @ stacked.T).double().cpu())
            norms.append(g.double().norm(dim=1).cpu())
        c = torch.cat(out)
        return dict(zip(names, c.split(sizes, dim=1), strict=True)), torch.cat(norms)

    pool_c, norms = coords(pool, "loss")
    query_c, _ = coords(queries, "measurement")
    return Projections(pool_c, query_c, norms)


def spectral_scores(values: torch.Tensor, coords_q: torch.Tensor, coords_x: torch.Tensor,
                    rank: int, damping: float,
                    spectral_filter: SpectralFilter | None = None) -> torch.Tensor:
    """``[Q, N]`` scores ``Σ_j f(λ_j) c_q,j c_x,j`` over the top ``rank`` pairs (by ``|λ|``, or
    the largest positive ones when the filter needs them)."""
    filt = spectral_filter or InverseFilter(0.0)
    v = values.to(torch.float64)
    if filt.which == "positive":
        order = torch.argsort(v, descending=True)
        order = order[v[order] > 0]
    else:
        order = torch.argsort(v.abs(), descending=True)
    order = order[:rank]
    f, _ = filt.weights(v[order], damping)
    return (coords_q[:, order] * f) @ coords_x[:, order].T


def mean_gradient_norm(task: Task, data: Data, weight_decay: float = 0.0,
                       batch_size: int = 256) -> float:
    """``‖∇θ [mean_i ℓ_i(θ) + (weight_decay/2)‖θ‖²]‖`` over all of ``data``."""
    theta = {k: v.clone().requires_grad_(True) for k, v in task.theta().items()}
    total = [torch.zeros_like(v, dtype=torch.float64) for v in theta.values()]
    n = 0
    with task.evaluating():
        for batch in iter_batches(data, batch_size):
            batch = to_device(batch, task.device)
            losses = task.losses(theta, batch)
            grads = torch.autograd.grad(losses.sum(), list(theta.values()))
            for t, g in zip(total, grads, strict=True):
                t += g.to(torch.float64)
            n += losses.shape[0]
    decay = [weight_decay * v.detach().to(torch.float64) for v in theta.values()]
    return float(torch.sqrt(sum((t / n + w).pow(2).sum()
                                for t, w in zip(total, decay, strict=True))))


def topk_jaccard(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """Mean over rows of the Jaccard index of the ``k`` largest entries of ``a`` and ``b``."""
    k = min(k, a.shape[1])
    ta, tb = a.topk(k, dim=1).indices, b.topk(k, dim=1).indices
    out = []
    for x, y in zip(ta.tolist(), tb.tolist(), strict=True):
        sx, sy = set(x), set(y)
        out.append(len(sx & sy) / len(sx | sy))
    return float(np.mean(out))


class CurvatureProbe:
    """The curvature measurements both curvature sections read (see the module docstring).

    Args:
        task, train, queries: the fitted model, its training data and the queries.
        pool: training indices whose scores are computed (and perturbed by the other sections).
        damping: ``δ`` (default: ``weight_decay`` when positive, else ``1e-3 λ_max``);
        weight_decay: the L2 term of the training objective (the trainer's), counted in the
        stationarity check; rank: Ritz pairs kept; iterations: Lanczos steps per run;
        curvature_batch: examples the curvature averages over; probes: SLQ start vectors;
        seed: of everything random here.
        store: a folder where the measurements (Ritz values, projections; not the vectors) are
            kept, keyed by model, data, queries and settings: a rerun reads them back.
    """

    def __init__(self, task: Task, train: Data, queries: Batch, pool: torch.Tensor, *,
                 damping: float | None, rank: int, iterations: int, curvature_batch: int,
                 weight_decay: float = 0.0, probes: int = 1, seed: int = 0,
                 store: str | os.PathLike[str] | None = None, progress: bool | None = None):
        self.task, self.train, self.pool = task, train, pool
        self.n = num_examples(train)
        self.iterations, self.curvature_batch = iterations, min(curvature_batch, self.n)
        self.weight_decay = float(weight_decay)
        settings = {"iterations": iterations, "batch": self.curvature_batch, "probes": probes,
                    "seed": seed, "weight_decay": self.weight_decay}
        key = hash_value(architecture_fingerprint(task.model), model_fingerprint(task.model),
                         task_fingerprint(task), data_fingerprint(train), queries,
                         pool, settings)
        state = Cache(store).get_or_compute(
            "curvature-probe", key,
            lambda: self._measure(task, train, queries, pool, settings, progress))
        self.hessian = Spectrum(**state["hessian"])
        self.spectra = {k: Spectrum(**v) for k, v in state["spectra"].items()}
        self.ggn = self.spectra["ggn"]
        self.variants = {k: v for k, v in self.spectra.items() if k != "ggn"}
        self.proj = Projections(state["pool"], state["queries"], state["pool_grad_norms"])
        self.mean_grad = float(state["mean_grad"])
        self.seconds = float(state["seconds"])
        self.damping = (float(damping) if damping is not None else self.weight_decay
                        or 1e-3 * max(abs(self.hessian.lambda_max), 1e-12))
        self.rank = min(rank, len(self.hessian.values))

    def _measure(self, task: Task, train: Data, queries: Batch, pool: torch.Tensor,
                 settings: dict[str, Any], progress: bool | None) -> dict[str, Any]:
        t0 = time.perf_counter()
        seed = settings["seed"]
        kw = {"iterations": settings["iterations"], "batch": settings["batch"],
              "progress": progress}
        hessian = lanczos_spectrum(task, train, "hessian", data_seed=seed, seed=seed,
                                   probes=settings["probes"], **kw)
        spectra = {"ggn": lanczos_spectrum(task, train, "ggn", data_seed=seed, seed=seed, **kw),
                   "solver seed": lanczos_spectrum(task, train, "hessian", data_seed=seed,
                                                   seed=seed + 101, **kw)}
        if settings["batch"] < self.n:  # another subset of the same size
            spectra["curvature subset"] = lanczos_spectrum(task, train, "hessian",
                                                           data_seed=seed + 202, seed=seed, **kw)
        bases = {"hessian": hessian.vectors, **{k: v.vectors for k, v in spectra.items()}}
        proj = project(task, take(train, pool), queries, bases, progress=progress)
        return {"hessian": hessian.to_dict(),
                "spectra": {k: v.to_dict() for k, v in spectra.items()},
                "pool": proj.pool, "queries": proj.queries,
                "pool_grad_norms": proj.pool_grad_norms,
                "mean_grad": mean_gradient_norm(task, train, settings["weight_decay"]),
                "seconds": time.perf_counter() - t0}

    def scores(self, basis: str = "hessian", *, rank: int | None = None,
               damping: float | None = None,
               spectral_filter: SpectralFilter | None = None) -> torch.Tensor:
        """``[Q, n_pool]`` ABIF scores from one of the bases."""
        values = self.hessian.values if basis == "hessian" else self.spectra[basis].values
        return spectral_scores(values, self.proj.queries[basis], self.proj.pool[basis],
                               rank or self.rank, self.damping if damping is None else damping,
                               spectral_filter)


# --------------------------------------------------------------------------- convexity
def convexity_section(probe: CurvatureProbe) -> Section:
    """Assumption 1 (see the module docstring for the numbers)."""
    t0 = time.perf_counter()
    s = probe.hessian
    lmax, lmin = s.lambda_max, s.lambda_min
    negativity = max(0.0, -lmin) / max(abs(lmax), 1e-300)
    stationarity = probe.mean_grad / max(float(probe.proj.pool_grad_norms.mean()), 1e-300)
    try:
        agreement = mean_spearman(probe.scores("hessian"), probe.scores("ggn"))
    except CurvatureError:  # H + δI singular on the kept space
        agreement = math.nan
    g_neg = grade(negativity, 1e-3, 0.05)
    g_stat = grade(stationarity, 0.1, 0.3)
    g_agree = grade(agreement, 0.7, 0.3)
    covered = lmin + probe.damping > 0
    verdict = worst(g_neg if not covered or g_neg == "holds" else "weak", g_stat, g_agree)
    need = max(0.0, -lmin)
    numbers = {
        "lambda_max": lmax, "lambda_min": lmin, "negativity": negativity,
        "negative_mass": s.negative_mass(), "negative_fraction": s.negative_fraction(),
        "damping_for_positive_definite": need, "damping": probe.damping,
        "damping_covers_negative": covered,
        "mean_gradient_norm": probe.mean_grad,
        "mean_example_gradient_norm": float(probe.proj.pool_grad_norms.mean()),
        "stationarity": stationarity, "hessian_ggn_spearman": agreement,
        "krylov_dim": len(s.values), "exact_spectrum": s.complete,
        "curvature_examples": s.examples, "ritz_values": s.values.tolist(),
    }
    summary = (f"λ_max {lmax:.3g}, λ_min {lmin:.3g} (−λ_min/λ_max = {negativity:.2g}, "
               f"{100 * s.negative_mass():.1f}% of the spectral mass negative); mean gradient "
               f"{stationarity:.2g}× a typical example's; Hessian vs GGN score Spearman "
               f"{agreement:.2f}.")
    advice = []
    if g_neg != "holds":
        advice.append(f"use curvature='ggn', or damping ≥ {1.5 * need:.2g} (now "
                      f"{probe.damping:.2g}), or keep only positive eigenvalues")
    if g_stat != "holds":
        advice.append("the model is not at a minimum of its training loss: influence "
                      "approximates the effect of a short fine-tuning (see assumptions 3–4), "
                      "not of retraining")
    if g_agree != "holds" and g_neg == "holds":
        advice.append("Hessian and GGN scores disagree: prefer the GGN (always PSD)")
    return Section("convexity", verdict, summary,
                   "; ".join(advice) or "none: the Hessian is positive semi-definite at a "
                   "stationary point.", numbers,
                   rule="−λ_min/λ_max ≤ 1e-3 holds, > 0.05 fails (weak at most when the damping "
                        "exceeds −λ_min); stationarity ≤ 0.1 holds, > 0.3 fails; Hessian–GGN "
                        "Spearman ≥ 0.7 holds, < 0.3 fails; the verdict is the worst.",
                   seconds=time.perf_counter() - t0, figures={"spectrum": _spectrum_png(probe)})


# --------------------------------------------------------------------------- stability
def stability_section(probe: CurvatureProbe, top_k: int = 10) -> Section:
    """Assumption 2 (see the module docstring for the numbers)."""
    t0 = time.perf_counter()
    d = probe.damping
    values = probe.hessian.values
    kept = values[torch.argsort(values.abs(), descending=True)[:probe.rank]] + d
    condition = float(kept.abs().max() / kept.abs().min().clamp_min(1e-300))
    decay = float(values.abs().sort(descending=True).values[probe.rank - 1]
                  / values.abs().max().clamp_min(1e-300))
    moves: dict[str, dict[str, float]] = {}
    try:
        base = probe.scores()
        changes: dict[str, torch.Tensor] = {
            "damping ÷3": probe.scores(damping=d / 3), "damping ×3": probe.scores(damping=d * 3)}
        if 2 * probe.rank <= len(probe.hessian.values):
            changes["rank ×2"] = probe.scores(rank=2 * probe.rank)
        changes.update({k: probe.scores(k) for k in probe.variants})
        for name, other in changes.items():
            moves[name] = {"spearman": mean_spearman(base, other),
                           "jaccard": topk_jaccard(base, other, top_k)}
    except CurvatureError as e:  # singular H + δI on the kept space: unusable as is
        moves["singular"] = {"spearman": math.nan, "jaccard": math.nan, "error": str(e)}
    min_sp = min(m["spearman"] for m in moves.values())
    min_jac = min(m["jaccard"] for m in moves.values())
    worst_change = min(moves, key=lambda k: moves[k]["jaccard"]
                       if math.isfinite(moves[k]["jaccard"]) else -1.0)
    lissa = lissa_convergence(probe.hessian, d)
    verdict = worst(grade(min_jac, 0.5, 0.2), grade(min_sp, 0.7, 0.3),
                    grade(math.log10(condition), 4.0, 8.0))
    summary = (f"kept eigenspace condition number {condition:.3g} (λ_rank/λ_1 = {decay:.2g}); "
               f"top-{top_k} proponents overlap ≥ {min_jac:.2f} (Jaccard) and scores correlate "
               f"≥ {min_sp:.2f} (Spearman) across changes of damping, rank, seed and curvature "
               f"subset (least stable: {worst_change}); LiSSA at depth {LISSA_DEPTH}: "
               f"{lissa['status']}.")
    advice = []
    if grade(math.log10(condition), 4.0, 8.0) != "holds":
        advice.append(f"raise the damping (≥ {kept.abs().max() * 1e-4:.2g} keeps the condition "
                      "number ≤ 1e4) or lower the rank")
    if min(grade(min_jac, 0.5, 0.2), grade(min_sp, 0.7, 0.3),
           key=("fails", "weak", "holds").index) != "holds":
        advice.append(f"rankings depend on '{worst_change}': fix it explicitly, report scores "
                      "averaged over seeds/subsets, or use a larger rank and curvature batch")
    if lissa["status"] != "converges":
        advice.append(f"LiSSA: {lissa['advice']}")
    return Section("stability", verdict, summary,
                   "; ".join(advice) or "none: rankings are stable under every change tried.",
                   {"condition_number": condition, "decay": decay, "rank": probe.rank,
                    "damping": d, "top_k": top_k, "min_jaccard": min_jac,
                    "min_spearman": min_sp, "least_stable": worst_change, "changes": moves,
                    "lissa": lissa},
                   rule="min Jaccard@k ≥ 0.5 holds, < 0.2 fails; min Spearman ≥ 0.7 holds, "
                        "< 0.3 fails; log10 condition number ≤ 4 holds, > 8 fails; the "
                        "verdict is the worst.",
                   seconds=time.perf_counter() - t0)


def lissa_convergence(spectrum: Spectrum, damping: float, depth: int = LISSA_DEPTH,
                      tolerance: float = LISSA_TOLERANCE) -> dict[str, object]:
    """LiSSA's full-batch recursion in closed form: with ``scale = 1.5 (λ_max + δ)`` each
    eigen-direction's error shrinks by ``|1 − (λ + δ)/scale|`` per step; the slowest is at the
    smallest ``λ + δ`` (taken as ``min(λ_min, 0) + δ`` when the Krylov space does not cover the
    whole parameter space: unseen directions may be flat). Negative ``λ_min + δ``: diverges."""
    lmax = spectrum.lambda_max
    low = spectrum.lambda_min if spectrum.complete else min(spectrum.lambda_min, 0.0)
    scale = 1.5 * (abs(lmax) + damping)
    if low + damping <= 0:
        return {"status": "diverges", "scale": scale, "steps_needed": math.inf,
                "advice": f"H + δI is indefinite (λ_min ≈ {low:.3g}): add damping > "
                          f"{-low:.2g} or use curvature='ggn'"}
    rate = 1.0 - (low + damping) / scale
    steps = math.ceil(math.log(tolerance) / math.log(rate)) if rate > 0 else 1
    ok = steps <= depth
    return {"status": "converges" if ok else "too slow", "scale": scale, "rate": rate,
            "steps_needed": steps,
            "advice": "" if ok else f"needs ≈ {steps} steps to reach {tolerance:g} on the "
                                    f"flattest direction (default depth {depth}): raise the "
                                    f"damping or use ABIF"}


def _spectrum_png(probe: CurvatureProbe) -> bytes:
    from ..report.figures import png, pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.4))
    for name, vals in (("Hessian", probe.hessian.values), ("GGN", probe.ggn.values)):
        v = vals.sort(descending=True).values.numpy()
        ax.plot(np.arange(1, len(v) + 1), v, marker=".", lw=1, label=name)
    ax.axhline(0, color="k", lw=0.6)
    ax.axhline(-probe.damping, color="r", lw=0.6, ls="--", label="−damping")
    ax.set_yscale("symlog", linthresh=max(probe.damping, 1e-12))
    ax.set_xlabel("Ritz index (both ends of the spectrum)")
    ax.set_ylabel("eigenvalue")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return png(fig)
