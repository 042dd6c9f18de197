"""TRAK (Park et al. 2023): influence in the after-kernel of randomly projected gradients,
averaged over an ensemble of models, mapped onto the library's sign and scale.

For each model ``θ_m`` (independently trained models, or checkpoints of one run) and a seeded
random projection ``R [P, k]``:

- kernel features ``φ_m(x) = Rᵀ∇f(x; θ_m)`` of the training examples, with ``f`` the *output
  function*: ``output="loss"`` (default) the training loss ``ℓ``; ``output="margin"`` (the
  published TRAK; cross-entropy tasks only) the margin ``f = z_y − logsumexp_{c≠y} z_c``,
  for which ``p(y|x) = σ(f)`` and ``∇ℓ(x) = −(1 − p) ∇f(x)`` exactly;
- the after-kernel ``K_m = (1/N) Σ_x φ_m(x) φ_m(x)ᵀ + λI`` ``[k, k]`` (TRAK's ``ΦᵀΦ`` over
  ``N``, damped: by default ``λ = tr(K_m)/k``, the kernel's average eigenvalue);
- ``score(q, x) = (1/M) Σ_m (Rᵀ∇m(q; θ_m))ᵀ K_m⁻¹ Rᵀ∇ℓ(x; θ_m)``.

The training side is always the loss gradient: with the margin that is TRAK's
``Q = diag(1 − p)`` re-weighting of ``φ(x)``. The query side is the task's measurement
(``ClassificationTask(measurement="margin")`` gives TRAK's ``−∇f(q)``; the default loss scales
each query's row by ``1 − p(q)``, which leaves per-query rankings unchanged). So a score is the
library's ``∇m(q)ᵀ (H + λI)⁻¹ ∇ℓ(x)`` with ``H`` replaced by the after-kernel in ``k``
projected dimensions: positive = proponent, and with the margin at ``λ = 0`` it is ``N``
times TRAK's (un-sparsified) single-model score. Ensembles average whole per-model scores
(TRAK averages the ``1 − p`` factors separately).

Why the loss kernel is the default: ``output="loss"`` is the margin kernel with TRAK's own
``Q`` applied on both sides (``Φ_ℓ = QΦ``). The unweighted margin kernel gives confidently
fitted examples (``p ≈ 1``) full weight although they add nothing to the loss curvature, so a
small ``λ`` inverts directions the loss does not care about. On the digits MLP (LDS, one
model, ``k = 2048``, ``λ = 10⁻³``): margin 0.38, loss 0.68 (exact GGN influence 0.70); the
margin kernel needs ``λ = 0.1`` or large ensembles to catch up (``benchmarks/RESULTS.md``).

Why the kernel is damped by default: its spectrum decays steeply (on the MNIST CNN of
``benchmarks/``, eigenvalues from 2.9 down to 2·10⁻⁸ at ``k = 2048``, ``N = 4000``), and TRAK's
undamped inverse (``λ = 0``) amplifies the smallest, noisiest directions: LDS 0.05 there with one
model, against 0.41 at ``λ = tr(K)/k`` — the ≈ 0.0–0.1 other libraries' TRAK gets on that
workload. ``damping=0`` keeps the published estimator.

Stored features: ``φ_m`` and the factor ``c_m = ∂ℓ/∂f`` per training example and model
(``k + 1`` numbers each), computed once at ``fit`` (``store=``: fingerprinted, resumable), so
a query costs ``M`` gradient projections and a ``k × k`` product.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from ..batching import Batch, Data
from ..errors import CurvatureError, InputError
from ..task import Task, cross_entropy, margin_loss
from ..validate import choice
from .features import Features
from .tracin import CheckpointEstimator

OUTPUTS = ("margin", "loss")


def _margin(outputs: Any, batch: Batch) -> torch.Tensor:
    """The classification margin ``f = z_y − logsumexp_{c≠y} z_c`` (higher is better)."""
    return -margin_loss(outputs, batch)


class TRAKInfluence(CheckpointEstimator):
    """TRAK: projected-gradient after-kernel influence, ensembled (see the module docstring
    for exactly what is computed).

    Args:
        projection_dim: ``k`` (default 2048; it may exceed ``P``).
        checkpoints / models: the ensemble: a list of modules, state dicts, trainer states or
            trainer checkpoint folders, or a :class:`~influencekit.estimators.tracin.
            Checkpoints` (give one of the two; ``None``: the task's model alone). Every member
            has the task's architecture.
        projection: ``"rademacher"`` (default), ``"gaussian"`` or ``"none"`` (exact gradients,
            ``k = P``: small models only). seed: seeds the projection (one matrix, shared by
            every member).
        output: ``"loss"`` (default: the kernel of loss gradients) or ``"margin"`` (TRAK's
            kernel of margin gradients; cross-entropy tasks only).
        damping: λ in ``K_m + λI``: ``"auto"`` (default) takes each member's average kernel
            eigenvalue ``tr(K_m)/k`` (scale-free; see the module docstring for why the kernel
            needs it), or give a number (absolute; ``0`` is TRAK's own, undamped).
        batch_size, query_chunk, chunk_size, store, overwrite, progress: as for every
            estimator.
    """

    name = "trak"

    def __init__(self, task: Task, projection_dim: int | None = 2048, *,
                 checkpoints: Any = None, models: Any = None, projection: str = "rademacher",
                 output: str = "loss", seed: int = 0, damping: float | str = "auto", **kw: Any):
        if checkpoints is not None and models is not None:
            raise InputError("give the ensemble as checkpoints= or as models=, not both.")
        self.auto_damping = isinstance(damping, str)
        if self.auto_damping and damping != "auto":
            raise InputError(f"damping must be a number ≥ 0 or 'auto', got {damping!r}.")
        super().__init__(task, checkpoints=models if checkpoints is None else checkpoints,
                         projection_dim=projection_dim, projection=projection, seed=seed,
                         damping=0.0 if self.auto_damping else damping, **kw)
        if self.projection != "none" and self.projection_dim is None:
            raise InputError("projection_dim must be a positive integer (or use "
                             "projection='none' for exact gradients).")
        self.output = choice("output", output, OUTPUTS)
        if self.output == "margin" and task.loss_fn is not cross_entropy:
            raise InputError("output='margin' needs a cross-entropy classification task "
                             "(ik.ClassificationTask); use output='loss' for other losses.")
        self._kernels: list[torch.Tensor] | None = None
        self.kernel_dampings: list[float] = []  # λ used for each member (after fit)

    @property
    def dim(self) -> int:
        """Feature dimension ``k`` (``P`` without a projection)."""
        return self.task.num_params if self.projector() is None else self.projection_dim

    def settings(self) -> dict[str, Any]:
        return {"method": "trak", "output": self.output,
                "damping": "auto" if self.auto_damping else self.damping,
                **self._base_settings()}

    def feature_settings(self) -> dict[str, Any]:
        return {"method": "trak", "output": self.output, **self._base_settings()}

    # ----------------------------------------------------------------- fit
    def stores_features(self) -> bool:
        return True

    def fit(self, train: Data) -> TRAKInfluence:
        super().fit(train)
        self._kernels = self._inverse_kernels()
        return self

    def _inverse_kernels(self) -> list[torch.Tensor]:
        k, n = self.dim, self.n_train
        grams = [torch.zeros(k, k, dtype=torch.float64) for _ in range(self.num_states)]
        for chunk in self.train_features():
            for m, gram in enumerate(grams):
                phi = chunk[f"phi{m}"].to(torch.float64)
                gram += phi.T @ phi
        out, self.kernel_dampings = [], []
        for m, gram in enumerate(grams):
            kern = gram / n
            lam = float(kern.diagonal().mean()) if self.auto_damping else self.damping
            kern.diagonal().add_(lam)
            chol, info = torch.linalg.cholesky_ex(kern)
            if info != 0:
                raise CurvatureError(
                    f"the TRAK kernel of model {m} is singular (k = {k} projected dimensions, "
                    f"N = {n} examples, damping {lam:g}): use damping='auto' (or a number "
                    "> 0, e.g. 1e-3) or projection_dim < N.")
            out.append(torch.cholesky_inverse(chol))
            self.kernel_dampings.append(lam)
        return out

    def inverse_kernels(self) -> list[torch.Tensor]:
        """``K_m⁻¹`` ``[k, k]`` (float64) of each model."""
        if self._kernels is None:
            raise InputError("TRAKInfluence has not been fitted: call .fit(train) first.")
        return self._kernels

    # ----------------------------------------------------------------- features
    def features(self, batch: Batch, kind: str) -> Features:
        """Queries: ``phi{m}`` = projected ``∇m(q)``. Training: ``phi{m}`` = projected
        ``∇f(x)`` and ``c{m}`` = ``∂ℓ/∂f`` (``−(1 − p)`` for the margin, 1 for the loss)."""
        out: Features = {}
        for m in range(self.num_states):
            task = self.task_at(m)
            if kind == "measurement":
                out[f"phi{m}"] = self._project(self._grads(batch, "measurement", task=task))
            elif self.output == "margin":
                margin = copy.copy(task)
                margin.measurement_fn = _margin
                out[f"phi{m}"] = self._project(self._grads(batch, "measurement", task=margin))
                with torch.no_grad(), task.evaluating():
                    loss = task.losses(task.theta(), batch)
                out[f"c{m}"] = torch.expm1(-loss.to(torch.float64))  # −(1 − p)
            else:
                g = self._project(self._grads(batch, "loss", task=task))
                out[f"phi{m}"] = g
                out[f"c{m}"] = torch.ones(g.shape[0], dtype=torch.float64, device=g.device)
        return out

    def score_features(self, q: Features, t: Features) -> torch.Tensor:
        s = None
        for m, inv in enumerate(self.inverse_kernels()):
            left = q[f"phi{m}"].to(torch.float64).cpu() @ inv
            right = t[f"phi{m}"].to(torch.float64) * t[f"c{m}"].to(torch.float64)[:, None]
            part = left @ right.T
            s = part if s is None else s + part
        return s / self.num_states

    def self_score_features(self, t: Features) -> torch.Tensor:
        """``(1/M) Σ_m c_m² φ_mᵀ K_m⁻¹ φ_m``: the diagonal of the pairwise scores when the
        measurement is the loss."""
        s = None
        for m, inv in enumerate(self.inverse_kernels()):
            phi = t[f"phi{m}"].to(torch.float64)
            part = ((phi @ inv) * phi).sum(1) * t[f"c{m}"].to(torch.float64) ** 2
            s = part if s is None else s + part
        return s / self.num_states

    def _feature_bytes(self) -> int:
        return 8 * (self.dim + 1) * self.num_states

    def __repr__(self) -> str:
        return (f"TRAKInfluence(projection_dim={self.dim}, models={self.num_states}, "
                f"output={self.output!r}, "
                f"damping={'auto' if self.auto_damping else self.damping!r}, "
                f"P={self.task.num_params})")
