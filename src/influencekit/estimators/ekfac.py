"""K-FAC and EK-FAC influence: a block-diagonal, Kronecker-factored GGN / Fisher.

Pipeline (each stage stored and resumable with ``store=``):

1. **factors** (``kfac-factors``, shared by both estimators) — per supported layer the
   activation covariance ``A`` and the output-gradient covariance ``S`` (float64 accumulation),
   plus a diagonal Fisher for selected parameters outside supported layers; one pass over the
   training data (:class:`~influencekit.curvature.kfac.KroneckerCurvature`).
2. **eigenvalue correction** (``ekfac-correction``, EK-FAC only) — the eigendecompositions
   ``Q_A, Q_S`` and the second moments ``E[(Q_Sᵀ ∇W Q_A)²]`` of the per-example gradients in that
   basis; a second pass, with output draws independent of the first pass's. K-FAC uses
   ``Λ_S ⊗ Λ_A`` instead.
3. **queries** — ``score(q, x) = ⟨(C + λI)⁻¹ ∇m(q), ∇ℓ(x)⟩``, the preconditioner applied per
   layer block in the Kronecker eigenbasis (never ``P × P``), the training gradients streamed
   (never ``N × P``).

``C`` approximates the GGN of the *mean* training loss (the library's sign and scale): where the
Kronecker factorisation is exact (one linear layer under squared loss with ``fisher="ggn"``, or
any case where every example has the same output Hessian), the scores equal
``ExactInfluence(task, curvature="ggn", damping=λ)``.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..batching import Data
from ..curvature.kfac import FISHERS, UNSUPPORTED, KroneckerCurvature
from ..errors import InputError
from ..store import fingerprint, tensor_fingerprint
from ..task import Task
from ..validate import choice, integer, positive_int
from .base import Estimator


class KFACInfluence(Estimator):
    """Influence with the K-FAC approximation of the GGN (``S ⊗ A`` per layer).

    Args:
        damping: λ in ``(C + λI)⁻¹``. With ``0``, eigenvalues below ``1e-10 ×`` a block's
            largest are left out (a pseudo-inverse).
        fisher: ``"sampled"`` (default; the true Fisher, labels drawn from the model for
            classification), ``"ggn"`` (the exact expectation, one backward pass per output)
            or ``"empirical"`` (the true labels). See :mod:`influencekit.curvature.kfac`.
        samples: draws per example for ``fisher="sampled"``. seed: their seed.
        unsupported: parameters outside ``Linear`` / ``Conv2d`` / ``Embedding`` layers get a
            diagonal Fisher (``"diagonal"``, default) or raise an ``InputError`` (``"error"``).
        batch_size, query_chunk, store, overwrite, progress: as for every estimator
            (:class:`~influencekit.estimators.base.Estimator`).
    """

    name = "kfac"
    corrected = False

    def __init__(self, task: Task, *, damping: float = 0.0, fisher: str = "sampled",
                 samples: int = 1, seed: int = 0, unsupported: str = "diagonal", **kw: Any):
        super().__init__(task, damping=damping, **kw)
        self.fisher = choice("fisher", fisher, FISHERS)
        self.samples = positive_int("samples", samples)
        self.seed = integer("seed", seed, minimum=0)
        self.unsupported = choice("unsupported", unsupported, UNSUPPORTED)
        self.curvature = KroneckerCurvature(
            task, fisher=self.fisher, samples=self.samples, seed=self.seed,
            batch_size=self.batch_size, unsupported=self.unsupported, progress=self.progress)
        self.factors: dict[str, Any] | None = None
        self.eigen: dict[str, Any] | None = None
        self.values: list[torch.Tensor] | None = None
        self.timings: dict[str, float] = {}

    @property
    def layers(self) -> list:
        """The Kronecker-factored blocks (:class:`~influencekit.curvature.kfac.KroneckerLayer`)."""
        return self.curvature.layers

    @property
    def fallback(self) -> dict[str, str]:
        """Selected parameters with a diagonal Fisher, and why each is not factored."""
        return dict(self.curvature.reasons)

    def settings(self) -> dict[str, Any]:
        return {"method": type(self).__name__, "damping": self.damping,
                **self.curvature.settings()}

    # ----------------------------------------------------------------- fit
    def _fit(self, train: Data) -> None:
        self.timings = {}
        t0 = time.perf_counter()
        self.factors = self._stored("kfac-factors", train, self.curvature.settings(), {},
                                    lambda: self.curvature.fit_factors(train))
        self.timings["factors"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self._fit_values(train)
        self.timings["eigen"] = time.perf_counter() - t0

    def _fit_values(self, train: Data) -> None:
        self.eigen = KroneckerCurvature.eigendecompose(self.factors)
        self.values = KroneckerCurvature.kfac_values(self.eigen)

    def _factor_hash(self) -> str:
        f = self.factors
        return tensor_fingerprint(*f["A"], *f["S"], f["diag"])

    def _stored(self, name: str, train: Data, settings: dict[str, Any],
                upstream: dict[str, str], compute: Any) -> Any:
        """``compute()``, or its stored result when task, data and settings match."""
        if self.store is None:
            return compute()
        fp = fingerprint(task=self.task, data=train, settings=settings, **upstream)
        art = self.store.open(name, fp, settings, overwrite=self.overwrite)
        if art.complete:
            return art.load()
        result = compute()
        art.save(result, layers=len(self.layers), fallback=len(self.curvature.fallback))
        return result

    # ----------------------------------------------------------------- queries
    def precondition(self, g: torch.Tensor) -> torch.Tensor:
        """``(C + λI)⁻¹ g`` per block for the rows of ``g [k, P]`` (float64)."""
        if self.values is None:
            raise InputError(f"{type(self).__name__} has not been fitted: call .fit(train) "
                             "first.")
        return self.curvature.precondition(g, self.eigen, self.values, self.factors["diag"],
                                           self.damping)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(damping={self.damping}, fisher={self.fisher!r}, "
                f"layers={len(self.layers)}, fallback={len(self.curvature.fallback)}, "
                f"P={self.task.num_params})")


class EKFACInfluence(KFACInfluence):
    """Influence with EK-FAC: K-FAC's Kronecker eigenbasis with eigenvalues corrected to the
    gradients' second moments in it, ``E[(Q_Sᵀ ∇W Q_A)²]`` (a second pass over the data).
    Arguments as for :class:`KFACInfluence`."""

    name = "ekfac"
    corrected = True

    def _fit_values(self, train: Data) -> None:
        def compute() -> dict[str, Any]:
            eigen = KroneckerCurvature.eigendecompose(self.factors)
            return {**eigen, "values": self.curvature.fit_correction(train, eigen)}

        settings = {**self.curvature.settings(), "correction_draws": "independent"}
        out = self._stored("ekfac-correction", train, settings,
                           {"factors": self._factor_hash()}, compute)
        self.values = out.pop("values")
        self.eigen = out
