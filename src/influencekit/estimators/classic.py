"""Classic estimators: exact (dense curvature), conjugate gradients, LiSSA, gradient dot/cosine."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from ..autodiff import CURVATURES
from ..batching import Data
from ..curvature import CurvatureOperator, Eigenpairs, SpectralFilter, as_filter
from ..errors import CurvatureError, InputError, NumericalError
from ..progress import progress_bar
from ..task import Task
from ..validate import (
    boolean,
    choice,
    integer,
    optional_positive_int,
    positive,
    positive_int,
)
from .base import Estimator


class ExactInfluence(Estimator):
    """The full eigendecomposition of the dense curvature (``P × P``) under a spectral filter:
    the oracle for small models.

    Args:
        curvature: ``"hessian"`` or ``"ggn"``.
        filter: ``"inverse"`` (default: ``(H + λI)⁻¹``), ``"horizon"`` or a
            :class:`~influencekit.curvature.SpectralFilter` (e.g. ``HorizonFilter(lr, steps)``:
            the effect of ``steps`` of gradient descent instead of the converged response).
        max_params: refuse models larger than this (the matrix costs ``8·P²`` bytes).
    """

    name = "exact"

    def __init__(self, task: Task, *, damping: float = 0.0, curvature: str = "hessian",
                 filter: str | SpectralFilter = "inverse", max_params: int = 20_000, **kw: Any):
        super().__init__(task, damping=damping, **kw)
        self.curvature = choice("curvature", curvature, CURVATURES)
        self.filter = as_filter(filter)
        max_params = positive_int("max_params", max_params)
        if task.num_params > max_params:
            raise InputError(
                f"ExactInfluence builds a {task.num_params}² matrix; that is above max_params="
                f"{max_params}. Use ArnoldiInfluence or CGInfluence, restrict params=, or raise "
                "max_params."
            )
        self.eigen: Eigenpairs | None = None
        self._weights: tuple[torch.Tensor, float] | None = None

    def _fit(self, train: Data) -> None:
        h = CurvatureOperator(self.task, train, self.curvature,
                              micro_batch_size=self.batch_size
                              ).dense(progress=self.progress)
        values, vectors = torch.linalg.eigh(h)
        self.eigen = Eigenpairs(values, vectors.T.contiguous())
        self._weights = self.filter.weights(values, self.damping)

    @property
    def eigenvalues(self) -> torch.Tensor:
        return self.eigen.values

    def precondition(self, g: torch.Tensor) -> torch.Tensor:
        f, c = self._weights
        return self.eigen.apply(g, f, c)


class CGInfluence(Estimator):
    """``(H + λI)⁻¹ g`` by conjugate gradients, one block of queries at a time.

    Each iteration applies the curvature of the *mean* loss over the whole training set.
    Raises :class:`~influencekit.errors.CurvatureError` when ``H + λI`` is not positive definite
    along a search direction.

    Args:
        curvature: ``"hessian"`` or ``"ggn"`` (the GGN is positive semi-definite).
        max_iter: iteration limit; tol: relative residual at which a column stops.
        micro_batch_size: examples per curvature-product evaluation (memory only).
    """

    name = "cg"

    def __init__(self, task: Task, *, damping: float = 0.0, curvature: str = "hessian",
                 max_iter: int = 100, tol: float = 1e-6, micro_batch_size: int = 256,
                 **kw: Any):
        super().__init__(task, damping=damping, **kw)
        self.curvature = choice("curvature", curvature, CURVATURES)
        self.max_iter = positive_int("max_iter", max_iter)
        self.tol = positive("tol", tol)
        self.micro_batch_size = positive_int("micro_batch_size", micro_batch_size)
        self.iterations_used = 0
        self.operator: CurvatureOperator | None = None

    def _fit(self, train: Data) -> None:
        self.operator = CurvatureOperator(self.task, train, self.curvature,
                                          micro_batch_size=self.micro_batch_size)

    def _apply(self, v: torch.Tensor) -> torch.Tensor:
        return self.operator(v) + self.damping * v

    def precondition(self, g: torch.Tensor) -> torch.Tensor:
        b = g.to(torch.float64)
        x = torch.zeros_like(b)
        r = b.clone()
        p = r.clone()
        rs = (r * r).sum(1)
        target = self.tol * b.norm(dim=1)
        active = rs.sqrt() > target
        bar = progress_bar(range(self.max_iter), desc="CG", progress=self.progress)
        self.iterations_used = 0
        for _ in bar:
            if not active.any():
                break
            self.iterations_used += 1
            idx = active.nonzero().squeeze(1)
            ap = self._apply(p[idx]).to(b.device)
            pap = (p[idx] * ap).sum(1)
            if (pap <= 0).any():
                raise CurvatureError(
                    "H + λI is not positive definite (CG met a direction of non-positive "
                    f"curvature, pᵀAp = {pap.min().item():.3g}). Add damping (e.g. a small "
                    "fraction of the largest eigenvalue), use curvature='ggn', or use "
                    "ExactInfluence / ArnoldiInfluence, which accept indefinite curvature."
                )
            alpha = rs[idx] / pap
            x[idx] += alpha[:, None] * p[idx]
            r[idx] -= alpha[:, None] * ap
            rs_new = (r[idx] * r[idx]).sum(1)
            p[idx] = r[idx] + (rs_new / rs[idx])[:, None] * p[idx]
            rs[idx] = rs_new
            active[idx] = rs_new.sqrt() > target[idx]
        else:
            if active.any():
                warnings.warn(
                    f"CG did not converge in {self.max_iter} iterations for {int(active.sum())} "
                    "queries; raise max_iter or damping.", stacklevel=2)
        bar.close()
        return x


class LiSSAInfluence(Estimator):
    """Stochastic Neumann-series inverse (Agarwal et al. 2017; Koh & Liang 2017).

    ``h_t = g + (I − (H_t + λI)/scale) h_{t−1}``, ``(H + λI)⁻¹ g ≈ h_T / scale``, with ``H_t``
    the curvature on a random mini-batch; averaged over ``repeats`` runs. It converges only when
    ``H + λI ≻ 0`` and ``scale`` exceeds half its largest eigenvalue. ``fit`` checks both ends of
    the spectrum by power iteration on the full-batch curvature and raises a
    :class:`~influencekit.CurvatureError` when ``H + λI`` has a negative eigenvalue (the
    recursion would grow without bound); divergence during the recursion is raised too.

    Args:
        scale: ``None`` estimates ``1.5 × λ_max(H + λI)`` by power iteration at fit time.
        depth: recursion steps; repeats: independent recursions averaged.
        curvature_batch: examples per mini-batch curvature product, sampled with replacement;
            ``None`` uses the whole training set every step (deterministic).
        check_definite: run the negative-eigenvalue check at fit (30 full-batch products).
        seed: seeds the mini-batch sampling.
    """

    name = "lissa"

    def __init__(self, task: Task, *, damping: float = 0.0, scale: float | None = None,
                 depth: int = 1000, repeats: int = 1, curvature_batch: int | None = 64,
                 curvature: str = "hessian", check_definite: bool = True, seed: int = 0,
                 **kw: Any):
        super().__init__(task, damping=damping, **kw)
        self.curvature = choice("curvature", curvature, CURVATURES)
        self.scale = None if scale is None else positive(
            "scale", scale, fix="Leave scale=None to estimate it from the largest eigenvalue.")
        self.depth = positive_int("depth", depth)
        self.repeats = positive_int("repeats", repeats)
        self.curvature_batch = optional_positive_int("curvature_batch", curvature_batch)
        self.check_definite = boolean("check_definite", check_definite)
        self.seed = integer("seed", seed)
        self.last_relative_change: float | None = None
        self.lambda_max: float | None = None
        self.lambda_min: float | None = None

    def _fit(self, train: Data) -> None:
        full = CurvatureOperator(self.task, train, self.curvature)
        if self.scale is None or self.check_definite:
            self.lambda_max = full.power_iteration()
        if self.scale is None:
            self.scale = 1.5 * (abs(self.lambda_max) + self.damping)
        if self.check_definite:
            top = abs(self.lambda_max)
            # H − top·I has eigenvalues in [−2·top, 0]; its largest in magnitude is λ_min − top.
            # A Rayleigh quotient never undershoots, so neither does λ_min (no false alarms).
            self.lambda_min = top + full.power_iteration(shift=top)
            if self.lambda_min + self.damping < -1e-6 * max(top, self.damping):
                raise CurvatureError(
                    f"H + λI is not positive definite (smallest eigenvalue of H ≈ "
                    f"{self.lambda_min:.3g}, damping {self.damping:.3g}): the LiSSA recursion "
                    f"would grow without bound. Use damping > {-self.lambda_min:.2g}, "
                    "curvature='ggn', or ArnoldiInfluence / ExactInfluence (which accept "
                    "indefinite curvature); check_definite=False skips this check.")
        if self.curvature_batch is None:
            self._operator = full
        else:
            self._operator = CurvatureOperator(self.task, train, self.curvature,
                                               sampling="sampled", batch=self.curvature_batch,
                                               seed=self.seed)

    def precondition(self, g: torch.Tensor) -> torch.Tensor:
        b = g.to(torch.float64)
        if self.curvature_batch is not None:  # the same draws for every query chunk
            self._operator.gen.manual_seed(self.seed)
        b_norm = b.norm(dim=1).clamp_min(1e-300)
        total = torch.zeros_like(b)
        bar = progress_bar(total=self.repeats * self.depth, desc="LiSSA", progress=self.progress)
        for _ in range(self.repeats):
            h = b.clone()
            prev = h
            for t in range(self.depth):
                hv = self._operator(h).to(b.device) + self.damping * h
                prev, h = h, b + h - hv / self.scale
                growth = (h.norm(dim=1) / b_norm).max().item()
                if not math.isfinite(growth) or growth > 10 * (t + 2):
                    raise NumericalError(
                        f"LiSSA diverged at step {t + 1} (‖h_t‖/‖g‖ = {growth:.3g}): scale="
                        f"{self.scale:.3g} is below the largest curvature eigenvalue or H + λI "
                        "is not positive definite. Increase scale (leave scale=None to "
                        "estimate it) and/or add damping."
                    )
                bar.update(1)
            total += h
            rel = ((h - prev).norm() / h.norm().clamp_min(1e-300)).item()
            self.last_relative_change = rel
        bar.close()
        noisy = self.curvature_batch is not None
        if self.last_relative_change is not None and self.last_relative_change > (
                0.1 if noisy else 1e-3):
            warnings.warn(
                f"LiSSA has not converged after depth={self.depth} (last relative change "
                f"{self.last_relative_change:.2g}); increase depth or damping.", stacklevel=2)
        return total / (self.repeats * self.scale)


class GradDot(Estimator):
    """``⟨∇m(q), ∇ℓ(x)⟩``: no curvature (the limit of short fine-tuning)."""

    needs_fit = False
    name = "graddot"


class GradCos(Estimator):
    """Cosine of ``∇m(q)`` and ``∇ℓ(x)``; self-influence is 1 for every nonzero gradient."""

    needs_fit = False
    name = "gradcos"

    @staticmethod
    def _normalise(g: torch.Tensor) -> torch.Tensor:
        return g / g.norm(dim=1, keepdim=True).clamp_min(1e-30)

    def precondition(self, g: torch.Tensor) -> torch.Tensor:
        return self._normalise(g)

    def train_transform(self, g: torch.Tensor) -> torch.Tensor:
        return self._normalise(g)
