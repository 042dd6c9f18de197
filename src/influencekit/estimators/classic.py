"""Classic estimators: exact (dense curvature), conjugate gradients, LiSSA, gradient dot/cosine."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from ..autodiff import CURVATURES
from ..batching import Data
from ..curvature import (
    CurvatureOperator,
    Eigenpairs,
    InverseFilter,
    SpectralFilter,
    as_filter,
)
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
    """The dense curvature (``P × P``) under a spectral filter: the oracle for small models.

    With the plain inverse filter (the default) ``(H + λI)⁻¹ g`` is a solve with a Cholesky
    factor of ``H + λI`` (an LU factor when it is indefinite); the eigendecomposition is computed
    only for other filters, when ``H + λI`` is (estimated) near-singular — where the inverse
    filter decides whether to refuse it — or lazily when :attr:`eigenvalues` / :attr:`eigen` is
    read (the dense matrix is rebuilt from the training data then).

    Args:
        curvature: ``"hessian"`` or ``"ggn"``.
        filter: ``"inverse"`` (default: ``(H + λI)⁻¹``), ``"horizon"`` or a
            :class:`~influencekit.curvature.SpectralFilter` (e.g. ``HorizonFilter(lr, steps)``:
            the effect of ``steps`` of gradient descent instead of the converged response).
        max_params: refuse models larger than this (the matrix costs ``8·P²`` bytes; ``16·P²``
            at the peak while it is factored).
        micro_batch_size, block: examples per curvature-product evaluation and columns per
            product while the dense matrix is built (memory only: ``O(block × (P +
            micro_batch_size × activations per example))`` on top of the matrix).
    """

    name = "exact"
    #: an estimated ``min |λ + δ| / max |λ + δ|`` below this sends the inverse filter to the
    #: eigendecomposition, which refuses ratios below 1e-10 (100× margin for the estimate).
    near_singular = 1e-8

    def __init__(self, task: Task, *, damping: float = 0.0, curvature: str = "hessian",
                 filter: str | SpectralFilter = "inverse", max_params: int = 20_000,
                 micro_batch_size: int = 512, block: int = 128, **kw: Any):
        super().__init__(task, damping=damping, **kw)
        self.curvature = choice("curvature", curvature, CURVATURES)
        self.filter = as_filter(filter)
        max_params = positive_int("max_params", max_params)
        self.micro_batch_size = positive_int("micro_batch_size", micro_batch_size)
        self.block = positive_int("block", block)
        if task.num_params > max_params:
            raise InputError(
                f"ExactInfluence builds a {task.num_params}² matrix; that is above max_params="
                f"{max_params}. Use ArnoldiInfluence or CGInfluence, restrict params=, or raise "
                "max_params."
            )
        self._eigen: Eigenpairs | None = None
        self._weights: tuple[torch.Tensor, float] | None = None
        self._factor: tuple[str, torch.Tensor, torch.Tensor | None] | None = None

    def _dense(self, train: Data) -> torch.Tensor:
        return CurvatureOperator(self.task, train, self.curvature,
                                 micro_batch_size=self.micro_batch_size
                                 ).dense(block=self.block, progress=self.progress)

    def _fit(self, train: Data) -> None:
        self._eigen, self._weights, self._factor = None, None, None
        h = self._dense(train)
        if type(self.filter) is InverseFilter:  # on the full spectrum: (H + λI)⁻¹
            self._factor = self._factorise(h)
        if self._factor is None:
            self._decompose(h)

    def _decompose(self, h: torch.Tensor) -> None:
        values, vectors = torch.linalg.eigh(h)
        self._eigen = Eigenpairs(values, vectors.T.contiguous())
        self._weights = self.filter.weights(values, self.damping)

    def _factorise(self, h: torch.Tensor) -> tuple[str, torch.Tensor, torch.Tensor | None] | None:
        """A Cholesky (else LU) factor of ``H + λI``; ``None`` when it is singular or estimated
        near-singular (``h`` is left as it was, up to rounding of its diagonal)."""
        diagonal = h.diagonal()
        diagonal += self.damping
        try:
            factor, info = torch.linalg.cholesky_ex(h)
            if int(info) == 0:
                out: tuple[str, torch.Tensor, torch.Tensor | None] = ("cholesky", factor, None)
            else:
                del factor
                lu, pivots, info = torch.linalg.lu_factor_ex(h)
                if int(info) != 0:
                    return None
                out = ("lu", lu, pivots)
            # Power iteration on A and on A⁻¹: max |λ| from below, min |λ| from above.
            gen = torch.Generator().manual_seed(0)
            v = torch.randn(h.shape[0], 4, generator=gen, dtype=h.dtype)
            w = v.clone()
            for _ in range(10):
                v = h @ (v / v.norm(dim=0))
                w = self._solve(out, w / w.norm(dim=0))
            largest, inv_smallest = float(v.norm(dim=0).max()), float(w.norm(dim=0).max())
            if not inv_smallest < float("inf") or inv_smallest * largest * self.near_singular >= 1:
                return None
            return out
        finally:
            diagonal -= self.damping

    @staticmethod
    def _solve(factor: tuple[str, torch.Tensor, torch.Tensor | None], b: torch.Tensor
               ) -> torch.Tensor:
        """``(H + λI)⁻¹ b`` for the columns of ``b`` from the factor."""
        kind, f, pivots = factor
        if kind == "cholesky":
            return torch.cholesky_solve(b, f)
        return torch.linalg.lu_solve(f, pivots, b)

    @property
    def solver(self) -> str:
        """How :meth:`precondition` applies the filter: ``"cholesky"``, ``"lu"`` or ``"eigh"``."""
        return "eigh" if self._factor is None else self._factor[0]

    @property
    def eigen(self) -> Eigenpairs | None:
        """The eigenpairs of the curvature (computed on first use after a factored fit)."""
        if self._eigen is None and self._factor is not None and self.train is not None:
            self._decompose(self._dense(self.train))
        return self._eigen

    @property
    def eigenvalues(self) -> torch.Tensor:
        return self.eigen.values

    def precondition(self, g: torch.Tensor) -> torch.Tensor:
        if self._factor is not None:
            kind, f, pivots = self._factor
            if f.device != g.device:
                self._factor = (kind, f.to(g.device),
                                None if pivots is None else pivots.to(g.device))
            return self._solve(self._factor, g.to(torch.float64).T).T
        f, c = self._weights
        return self._eigen.apply(g, f, c)


class CGInfluence(Estimator):
    """``(H + λI)⁻¹ g`` by breakdown-free block conjugate gradients (Ji & Li 2017) over each
    chunk of queries: one Krylov space shared by the chunk, so every iteration (one curvature
    product per search direction) serves all its queries.

    The search block (one direction per nonzero query, from its residual) is orthonormalised
    each iteration and directions that are (numerically) dependent — repeated or proportional
    queries — are dropped, so the block shrinks instead of breaking down. The solve stops when
    every query's residual is below ``tol · ‖g‖``; ``iterations_used`` counts block iterations
    (each one curvature pass with at most as many vectors as queries).
    Each iteration applies the curvature of the *mean* loss over the whole training set.
    Raises :class:`~influencekit.errors.CurvatureError` when ``H + λI`` is not positive definite
    on the search space (the small matrix ``PᵀAP`` has an eigenvalue ≤ 0).

    Args:
        curvature: ``"hessian"`` or ``"ggn"`` (the GGN is positive semi-definite).
        max_iter: block-iteration limit; tol: the solve stops when every query's residual is
            below ``tol · ‖g‖``.
        micro_batch_size: examples per curvature-product evaluation (memory only).
    """

    name = "cg"
    #: singular values below this fraction of the largest mark a dependent search direction.
    drop_tol = 1e-10

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
        return self.operator(v).to(v.device) + self.damping * v

    def _orthonormal(self, z: torch.Tensor) -> torch.Tensor:
        """Orthonormal rows spanning the rows of ``z [k, P]``, dependent directions dropped
        (each row is scaled to unit norm first, so a small residual is not mistaken for a
        dependent one)."""
        z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-300)
        _, s, vh = torch.linalg.svd(z, full_matrices=False)
        return vh[s > self.drop_tol * s[0]]

    def _small_solve(self, pap: torch.Tensor) -> torch.Tensor:
        """The Cholesky factor of the symmetrised ``PᵀAP``, or :class:`CurvatureError`."""
        pap = (pap + pap.T) / 2
        factor, info = torch.linalg.cholesky_ex(pap)
        if int(info) != 0:
            lowest = float(torch.linalg.eigvalsh(pap)[0])
            raise CurvatureError(
                "H + λI is not positive definite (CG met a direction of non-positive "
                f"curvature, smallest eigenvalue of PᵀAP = {lowest:.3g}). Add damping (e.g. a "
                "small fraction of the largest eigenvalue), use curvature='ggn', or use "
                "ExactInfluence / ArnoldiInfluence, which accept indefinite curvature."
            )
        return factor

    def precondition(self, g: torch.Tensor) -> torch.Tensor:
        b = g.to(torch.float64)
        x = torch.zeros_like(b)
        r = b.clone()
        norms = b.norm(dim=1)
        target = self.tol * norms
        live = norms > 0  # a zero right-hand side has the solution 0
        active = norms > target
        bar = progress_bar(range(self.max_iter), desc="CG", progress=self.progress)
        self.iterations_used = 0
        # Converged columns stay in the block: their residuals keep enlarging the shared Krylov
        # space (16 instead of 41 iterations for 100 queries on the L-BFGS digits MLP at
        # λ = 1e-3, where dropping them left a slow tail of small blocks).
        p = self._orthonormal(r[live]) if active.any() else r[:0]
        for _ in bar:
            if not active.any():
                break
            self.iterations_used += 1
            q = self._apply(p)                                     # A P, [s, P]
            factor = self._small_solve(p @ q.T)                    # PᵀAP = L Lᵀ
            alpha = torch.cholesky_solve(p @ r[live].T, factor)    # [s, k]
            x[live] += alpha.T @ p
            r[live] -= alpha.T @ q
            active = r.norm(dim=1) > target
            if active.any():  # the next block, A-conjugate to this one
                beta = torch.cholesky_solve(q @ r[live].T, factor)
                p = self._orthonormal(r[live] - beta.T @ p)
        bar.close()
        if active.any():
            warnings.warn(
                f"CG did not converge in {self.iterations_used} iterations for "
                f"{int(active.sum())} queries; raise max_iter or damping.", stacklevel=2)
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
