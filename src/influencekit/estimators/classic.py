"""Classic estimators: exact (dense curvature), conjugate gradients, LiSSA, gradient dot/cosine."""

from __future__ import annotations

import math
import warnings

import torch

from ..autodiff import _check_curvature, curvature_vp, mean_curvature_vp
from ..batching import Data, take, to_device
from ..curvature import dense_curvature
from ..errors import CurvatureError, InputError, NumericalError
from ..progress import progress_bar
from ..task import Task
from .base import Estimator


class ExactInfluence(Estimator):
    """``(H + λI)⁻¹`` from the dense curvature (``P × P``): the oracle for small models.

    Args:
        curvature: ``"hessian"`` or ``"ggn"``.
        max_params: refuse models larger than this (the matrix costs ``8·P²`` bytes).
    """

    def __init__(self, task: Task, *, damping: float = 0.0, curvature: str = "hessian",
                 max_params: int = 20_000, **kw):
        super().__init__(task, damping=damping, **kw)
        _check_curvature(curvature)
        if task.num_params > max_params:
            raise InputError(
                f"ExactInfluence builds a {task.num_params}² matrix; that is above max_params="
                f"{max_params}. Use ArnoldiInfluence or CGInfluence, restrict params=, or raise "
                "max_params."
            )
        self.curvature = curvature
        self.eigenvalues: torch.Tensor | None = None
        self.eigenvectors: torch.Tensor | None = None

    def _fit(self, train: Data) -> None:
        h = dense_curvature(self.task, train, self.curvature, batch_size=self.batch_size,
                            progress=self.progress)
        self.eigenvalues, self.eigenvectors = torch.linalg.eigh(h)
        shifted = self.eigenvalues + self.damping
        scale = max(self.eigenvalues.abs().max().item(), self.damping, 1e-30)
        if shifted.abs().min().item() <= 1e-10 * scale:
            raise CurvatureError(
                f"H + λI is singular (smallest |eigenvalue| {shifted.abs().min().item():.3g}, "
                f"largest {scale:.3g}): add damping (e.g. damping={1e-3 * scale:.2g}) or use "
                "curvature='ggn'."
            )

    def precondition(self, g: torch.Tensor) -> torch.Tensor:
        v = self.eigenvectors
        return ((g.to(torch.float64) @ v) / (self.eigenvalues + self.damping)) @ v.T


class CGInfluence(Estimator):
    """``(H + λI)⁻¹ g`` by conjugate gradients, one block of queries at a time.

    Each iteration applies the curvature of the *mean* loss over the whole training set.
    Raises :class:`~influencekit.errors.CurvatureError` when ``H + λI`` is not positive definite
    along a search direction.

    Args:
        curvature: ``"hessian"`` or ``"ggn"`` (the GGN is positive semi-definite).
        max_iter: iteration limit; tol: relative residual at which a column stops.
        hessian_batch_size: examples per curvature-product batch.
    """

    def __init__(self, task: Task, *, damping: float = 0.0, curvature: str = "hessian",
                 max_iter: int = 100, tol: float = 1e-6, hessian_batch_size: int = 256, **kw):
        super().__init__(task, damping=damping, **kw)
        _check_curvature(curvature)
        self.curvature = curvature
        self.max_iter = max_iter
        self.tol = tol
        self.hessian_batch_size = hessian_batch_size
        self.iterations_used = 0

    def _apply(self, v: torch.Tensor) -> torch.Tensor:
        hv = mean_curvature_vp(self.task, self.train, v, self.curvature,
                               batch_size=self.hessian_batch_size)
        return hv + self.damping * v

    def precondition(self, g: torch.Tensor) -> torch.Tensor:
        b = g.to(torch.float64)
        x = torch.zeros_like(b)
        r = b.clone()
        p = r.clone()
        rs = (r * r).sum(1)
        target = self.tol * b.norm(dim=1)
        active = rs.sqrt() > target
        bar = progress_bar(range(self.max_iter), desc="CG", leave=False,
                   progress=self.progress)
        self.iterations_used = 0
        for _ in bar:
            if not active.any():
                break
            self.iterations_used += 1
            idx = active.nonzero().squeeze(1)
            ap = self._apply(p[idx])
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
    the curvature on a random mini-batch; averaged over ``repeats`` runs. Converges only when
    ``scale`` exceeds the largest eigenvalue of ``H + λI`` (about half of it suffices in exact
    arithmetic) and ``H + λI ≻ 0``; divergence is detected and raised, never returned.

    Args:
        scale: ``None`` estimates ``1.5 × λ_max(H + λI)`` by power iteration at fit time.
        depth: recursion steps; repeats: independent recursions averaged.
        hessian_batch_size: examples per mini-batch curvature product, sampled with
            replacement; ``None`` uses the whole training set every step (deterministic).
        seed: seeds the mini-batch sampling.
    """

    def __init__(self, task: Task, *, damping: float = 0.0, scale: float | None = None,
                 depth: int = 1000, repeats: int = 1, hessian_batch_size: int | None = 64,
                 curvature: str = "hessian", seed: int = 0, **kw):
        super().__init__(task, damping=damping, **kw)
        _check_curvature(curvature)
        if scale is not None and scale <= 0:
            raise InputError(f"scale must be positive, got {scale}.")
        self.scale = scale
        self.depth = depth
        self.repeats = repeats
        self.hessian_batch_size = hessian_batch_size
        self.curvature = curvature
        self.seed = seed
        self.last_relative_change: float | None = None

    def _fit(self, train: Data) -> None:
        if self.scale is None:
            lam = power_iteration(self.task, train, self.curvature, batch_size=256)
            self.scale = 1.5 * (abs(lam) + self.damping)

    def _curvature(self, h: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if self.hessian_batch_size is None:
            return mean_curvature_vp(self.task, self.train, h, self.curvature)
        idx = torch.randint(self.n_train, (self.hessian_batch_size,), generator=gen)
        batch = to_device(take(self.train, idx), self.task.device)
        hv = curvature_vp(self.task, batch, h, self.curvature).to(torch.float64)
        return hv / self.hessian_batch_size

    def precondition(self, g: torch.Tensor) -> torch.Tensor:
        b = g.to(torch.float64)
        gen = torch.Generator().manual_seed(self.seed)
        b_norm = b.norm(dim=1).clamp_min(1e-300)
        total = torch.zeros_like(b)
        bar = progress_bar(total=self.repeats * self.depth, desc="LiSSA", leave=False,
                   progress=self.progress)
        for _ in range(self.repeats):
            h = b.clone()
            prev = h
            for t in range(self.depth):
                hv = self._curvature(h, gen) + self.damping * h
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
        noisy = self.hessian_batch_size is not None
        if self.last_relative_change is not None and self.last_relative_change > (
                0.1 if noisy else 1e-3):
            warnings.warn(
                f"LiSSA has not converged after depth={self.depth} (last relative change "
                f"{self.last_relative_change:.2g}); increase depth or damping.", stacklevel=2)
        return total / (self.repeats * self.scale)


def power_iteration(task: Task, train: Data, curvature: str = "hessian", *,
                    iterations: int = 30, batch_size: int = 256, seed: int = 0) -> float:
    """Largest-magnitude eigenvalue of the mean-loss curvature, by power iteration."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(task.num_params, generator=gen, dtype=torch.float64)
    v /= v.norm()
    lam = 0.0
    for _ in range(iterations):
        w = mean_curvature_vp(task, train, v[None], curvature, batch_size=batch_size)[0]
        lam = float(v @ w)
        norm = w.norm()
        if norm == 0:
            return 0.0
        v = w / norm
    return lam


class GradDot(Estimator):
    """``⟨∇m(q), ∇ℓ(x)⟩``: no curvature (the limit of short fine-tuning)."""

    needs_fit = False


class GradCos(Estimator):
    """Cosine of ``∇m(q)`` and ``∇ℓ(x)``; self-influence is 1 for every nonzero gradient."""

    needs_fit = False

    @staticmethod
    def _normalise(g: torch.Tensor) -> torch.Tensor:
        return g / g.norm(dim=1, keepdim=True).clamp_min(1e-30)

    def query_features(self, g: torch.Tensor) -> torch.Tensor:
        return self._normalise(g)

    def train_features(self, g: torch.Tensor) -> torch.Tensor:
        return self._normalise(g)
