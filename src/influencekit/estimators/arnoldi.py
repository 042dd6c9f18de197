"""Arnoldi-based influence (ABIF, Schioppa et al. 2022) under a spectral filter.

Pipeline (each stage stored and resumable with ``store=``):

1. **eigenbasis** — top ``rank`` eigenpairs ``(λ_j, e_j)`` of the mean-loss curvature
   (:func:`~influencekit.curvature.curvature_eigenpairs`, configured by an
   :class:`~influencekit.curvature.Eigensolver`). **Default**: the GGN (``curvature="ggn"``),
   by randomized subspace iteration on per-example sampled-label Fisher gradients of *every*
   training example — two passes over the data, a Nyström step at the end; each finished pass
   is stored, so an interrupted eigensolve resumes after it. ``curvature="hessian"`` gives the
   paper's Arnoldi iteration on Hessian-vector products (each iteration on the next batch of a
   seeded shuffle, so the iterations together cover the set once); ``Eigensolver(method=
   "arnoldi")`` runs Arnoldi on GGN products too.
2. **train features** — ``G(x)_j = ⟨∇ℓ(x), e_j⟩`` for every training example (by per-example
   gradients × basis or by ``rank`` forward-mode JVPs), computed once, stored in chunks by the
   estimator base, reused by every query.
3. **queries** — ``score(q, x) = Σ_j G(q)_j f(λ_j) G(x)_j [+ c⊥ ⟨P⊥∇m(q), P⊥∇ℓ(x)⟩]``.

The spectral filter ``f`` and complement weight ``c⊥`` (:mod:`influencekit.curvature.spectral`)
make the variants: ``filter="horizon"`` (default; the finite-horizon filter of ``T = 100`` steps
of gradient descent at ``η = 1/λ_max``, complement weighted ``ηT``, positive eigenvalues only),
``"topk"`` (the paper's ABIF: ``1/(λ + δ)``, the rest dropped), ``"complement"`` (``1/(λ + δ)``
plus a damped identity on the complement), or any ``HorizonFilter(lr, steps)`` /
``InverseFilter(complement)``.

The complement term needs ``⟨∇m(q), ∇ℓ(x)⟩`` (then ``⟨P⊥a, P⊥b⟩ = ⟨a, b⟩ − ⟨Ea, Eb⟩``). By
default (``sketch="auto"``) the training features hold each gradient **exactly, in factored
form**: an ``nn.Linear`` weight applied once per example as its input and output gradient
(``d_in + d_out`` numbers instead of ``d_in·d_out``), every other parameter's gradient as is
(:func:`influencekit.layerwise.gradient_dots`), so queries read the store only and the
complement is exact — when that takes at most 16,384 numbers per example (the MNIST CNN: 6,580
of its 105,866 parameters) and the features at most 1 GiB; otherwise a CountSketch of ``P⊥∇ℓ(x)``
of that budget's size is stored instead (an unbiased estimate; LDS 0.400 / 0.406 / 0.410 at
4,096 / 8,192 / 16,384 against 0.416 exact on the MNIST CNN, same eigenbasis). ``sketch=d`` forces a
``d``-dimensional sketch; ``sketch=None`` streams the training gradients once per query chunk
(the base's gradient-space path, with the filter as the preconditioner).

Memory (peak, never ``N × P``): while fitting, three ``(rank + oversample) × P`` blocks
(randomized solver) or ``(iterations + 1) × P`` basis values (Arnoldi); ``rank × P``
eigenvectors, ``batch_size × P`` per-example gradients, ``N × rank`` features (on disk with
``store=``, read back a chunk at a time), plus the ``n_queries × N`` score matrix returned.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..autodiff import CURVATURES, project_grads, value_jvps
from ..batching import Batch, Data, batch_size_of, take, to_device
from ..curvature import Eigenpairs, Eigensolver, SpectralFilter, as_filter, curvature_eigenpairs
from ..curvature.randomized import release_memory
from ..errors import CurvatureError, InputError
from ..layerwise import gradient_dots
from ..store import fingerprint, tensor_fingerprint
from ..task import Task
from ..validate import choice, optional_positive_int, positive_int
from .base import Estimator
from .features import Features

PROJECTIONS = ("auto", "grad", "jvp")
_SKETCH_BYTES = 2**30  # one batch of sketches
_EXACT_VALUES = 16_384  # per example: exact gradients in factored form, or a sketch this size
_FEATURE_BYTES = 2**30  # all training examples' complement features (sketch="auto")
_GRAD_BYTES = 2**30  # one batch of per-example gradients, above which JVPs project


class ArnoldiInfluence(Estimator):
    """Influence through the top eigenspace of the curvature, found by Arnoldi iteration.

    Args:
        rank: eigenpairs kept. iterations: Arnoldi steps (curvature-vector products; not
            used by the randomized solver).
        damping: δ, added to every eigenvalue. curvature: ``"ggn"`` (default; randomized
            solver) or ``"hessian"`` (the paper's Arnoldi).
        filter: ``"horizon"`` (default), ``"topk"``, ``"complement"`` or a
            :class:`~influencekit.curvature.SpectralFilter` (see the module docstring).
        solver: an :class:`~influencekit.curvature.Eigensolver`: the method (randomized or
            Arnoldi), which eigenvalues, passes, the data each Arnoldi step sees, seed.
        projection: ``"auto"`` (gradients when the complement needs their norms, else the
            faster of the two on the first batch), ``"grad"`` or ``"jvp"``.
        sketch: how queries get the complement term: ``"auto"`` (default: exact gradients in
            factored form in the store, or a CountSketch when they would not fit; module
            docstring), ``d`` (a ``d``-dimensional CountSketch) or ``None`` (stream the
            training gradients per query chunk). Queries read the store only unless ``None``.
        batch_size, query_chunk, chunk_size, store, overwrite, progress: as for every
            estimator (:class:`~influencekit.estimators.base.Estimator`).
    """

    name = "arnoldi"

    def __init__(
        self, task: Task, rank: int = 50, iterations: int = 200, *, damping: float = 0.0,
        curvature: str = "ggn", filter: str | SpectralFilter = "horizon",
        solver: Eigensolver | None = None, projection: str = "auto",
        sketch: int | str | None = "auto", **kw: Any,
    ):
        super().__init__(task, damping=damping, **kw)
        self.rank = positive_int("rank", rank)
        self.iterations = positive_int("iterations", iterations)
        self.curvature = choice("curvature", curvature, CURVATURES)
        self.filter = as_filter(filter)
        if solver is not None and not isinstance(solver, Eigensolver):
            raise InputError(f"solver must be an Eigensolver(...), got {type(solver).__name__}.")
        self.solver = solver or Eigensolver()
        self.method = self.solver.resolved(self.curvature)
        if self.method == "arnoldi" and self.iterations < self.rank:
            raise InputError(
                f"iterations={iterations} < rank={rank}: Arnoldi finds at most `iterations` "
                "eigenpairs; use iterations ≥ 2 × rank (e.g. 200 for rank 50).")
        self.which = self.solver.which or self.filter.which
        self.projection = choice("projection", projection, PROJECTIONS)
        self.sketch = sketch if sketch == "auto" else optional_positive_int(
            "sketch", sketch, fix='Use sketch="auto" (default), a positive int or None.')
        if isinstance(self.sketch, int) and self.sketch * self.batch_size * 8 > _SKETCH_BYTES:
            raise InputError(
                f"sketch={self.sketch} would take {self.sketch * self.batch_size * 8 / 2**30:.1f}"
                f" GiB per batch of {self.batch_size} examples; a sketch only saves work while "
                f"it is smaller than the {task.num_params} parameters: use sketch ≤ "
                f"{min(task.num_params, _SKETCH_BYTES // (8 * self.batch_size))}, or None for "
                "the exact complement.")
        self.eigen: Eigenpairs | None = None
        self.projection_method: str | None = None
        self.projection_timings: dict[str, float] = {}
        self.timings: dict[str, float] = {}
        self._weights: tuple[torch.Tensor, float] | None = None
        self._sketch_map: tuple[torch.Tensor, torch.Tensor] | None = None
        self.complement: str | None = None  # "exact" | "sketch" | "stream" | None, at fit
        self.sketch_dim: int | None = None
        self._exact_width = 0

    # ----------------------------------------------------------------- settings
    def settings(self) -> dict[str, Any]:
        """What the eigenbasis depends on (besides task and data)."""
        s = {"rank": self.rank, "iterations": self.iterations, "curvature": self.curvature,
             **self.solver.settings(self.curvature), "which": self.which,
             "params": self.task.param_names, "dtype": str(self.task.dtype)}
        if self.method == "randomized":
            s.pop("iterations")
        return {"estimator": "arnoldi", **s}

    def feature_settings(self) -> dict[str, Any]:
        return {"params": self.task.param_names, "complement": self.complement,
                "sketch": self.sketch_dim, "seed": self.solver.seed}

    def _feature_upstream(self) -> dict[str, str]:
        return {"eigenbasis": tensor_fingerprint(self.eigen.values, self.eigen.vectors)}

    # ----------------------------------------------------------------- fit
    def _fit(self, train: Data) -> None:
        t0 = time.perf_counter()
        self.eigen = self._eigenbasis(train)
        self._weights = self.filter.weights(self.eigen.values, self.damping)
        self.projection_method = None
        self._resolve_complement(train)
        self.timings = {"eigenbasis": time.perf_counter() - t0}

    def _resolve_complement(self, train: Data) -> None:
        """Decide how queries get the complement term (``sketch``; module docstring): the
        width of one example's factored gradient against the per-example budget."""
        self.complement, self.sketch_dim, self._sketch_map = None, None, None
        if not self.spectral_filter()[1]:
            return
        if self.sketch is None:
            self.complement = "stream"
            return
        if self.sketch != "auto":
            self.complement, self.sketch_dim = "sketch", self.sketch
            return
        itemsize = self.task.dtype.itemsize
        budget = min(_EXACT_VALUES, max(1024, _FEATURE_BYTES // (self.n_train * itemsize)))
        parts: dict[str, torch.Tensor] = {}
        probe = to_device(take(train, torch.arange(1)), self.task.device)
        project_grads(self.task, probe, "loss", self._basis(self.task.dtype),
                      {}, parts=parts)
        width = sum(v[0].numel() for v in parts.values())
        if width <= budget:
            self.complement, self._exact_width = "exact", width
        else:
            self.complement, self.sketch_dim = "sketch", min(budget, self.task.num_params)

    def fit(self, train: Data) -> ArnoldiInfluence:
        t0 = time.perf_counter()
        super().fit(train)
        self.timings["projection"] = time.perf_counter() - t0 - self.timings["eigenbasis"]
        return self

    def _eigenbasis(self, train: Data) -> Eigenpairs:
        art = None
        if self.store is not None:
            fp = fingerprint(task=self.task, data=train, settings=self.settings())
            art = self.store.open("arnoldi-eigenbasis", fp, self.settings(),
                                  overwrite=self.overwrite)
            if art.complete:
                t = art.load()
                return Eigenpairs(t["values"], t["vectors"].to(self.task.device), art.info)
        done, on_pass = self._pass_log(train)
        pairs = curvature_eigenpairs(
            self.task, train, self.rank, self.iterations, curvature=self.curvature,
            solver=self.solver, which=self.which, progress=self.progress, done=done,
            on_pass=on_pass)
        if len(pairs) == 0:
            raise CurvatureError(
                "Arnoldi found no eigenpairs to keep (which='positive' and no positive "
                "eigenvalue): use Eigensolver(which='magnitude'), curvature='ggn', or check "
                "the model.")
        if art is not None:
            art.save({"values": pairs.values, "vectors": pairs.vectors}, **pairs.info)
        return pairs

    def _pass_log(self, train: Data) -> tuple[dict[int, Any], Any]:
        """The eigensolver's finished passes (randomized) or checkpoints (Arnoldi) from the
        store, and how to record more: each is one chunk of the ``arnoldi-passes`` artifact,
        written atomically, so a killed eigensolve resumes after the last one."""
        if self.store is None:
            return {}, None
        fp = fingerprint(task=self.task, data=train, settings=self.settings())
        art = self.store.open("arnoldi-passes", fp, self.settings(), overwrite=self.overwrite)
        done = {i: art.read_chunk(i) for i in art.done_chunks()}
        return done, art.write_chunk

    # ----------------------------------------------------------------- the filter
    def spectral_filter(self) -> tuple[torch.Tensor, float]:
        """``(f(λ_j) [rank] float64, c⊥)``: weights of the kept eigenpairs and of the rest."""
        self._require_fit()
        return self._weights

    def precondition(self, g: torch.Tensor) -> torch.Tensor:
        """``Eᵀ f(Λ) E g + c⊥ (g − EᵀE g)``: the estimator's ``(H + δI)⁻¹`` as a ``P × P`` map."""
        f, c = self.spectral_filter()
        return self.eigen.apply(g, f, c)

    # ----------------------------------------------------------------- features
    def stores_features(self) -> bool:
        return True

    def scores_from_features(self) -> bool:
        return self.complement != "stream"

    def features(self, batch: Batch, kind: str) -> Features:
        """``G`` ([B, rank] projections) and ``sqnorm`` (squared gradient norms, NaN when
        projected by JVPs), with the gradients in factored form (``dot.*``, exact complement)
        or ``sketch`` (CountSketch of the complement)."""
        e = self.eigen.vectors
        if self.complement == "sketch":
            g = self._grads(batch, kind)
            ec = self._basis(g.dtype)
            coords = (ec @ g.T).T
            resid = (g - coords @ ec).to(torch.float64)
            bucket, sign = (t.to(g.device) for t in self._sketch_hash())
            sk = torch.zeros(g.shape[0], self.sketch_dim, dtype=torch.float64,
                             device=g.device)
            sk.index_add_(1, bucket, resid * sign)  # summed in float64, kept in the model's
            out = {"G": coords, "sketch": sk.to(g.dtype)}  # dtype (the memory budget's)
            del resid
            release_memory()
            return out
        if self.complement == "exact":
            parts: dict[str, torch.Tensor] = {}
            coords, sq = project_grads(
                self.task, batch, kind, self._basis(self.task.dtype),
                self.__dict__.setdefault("_projection", {}),
                grads=lambda: self._grads(batch, kind, check=False), parts=parts)
            return {"G": coords, "sqnorm": sq.to(torch.float64),
                    **{f"dot.{k}": v for k, v in parts.items()}}
        if self._method(batch) == "jvp":
            proj = value_jvps(self.task, batch, e, kind).T
            return {"G": proj, "sqnorm": torch.full((proj.shape[0],), float("nan"),
                                                    dtype=torch.float64)}
        coords, sq = project_grads(
            self.task, batch, kind, self._basis(self.task.dtype),
            self.__dict__.setdefault("_projection", {}),
            grads=lambda: self._grads(batch, kind, check=False))  # one reused buffer
        return {"G": coords, "sqnorm": sq.to(torch.float64)}

    def _drop_scratch(self) -> None:
        super()._drop_scratch()
        self.__dict__.pop("_basis_cast", None)
        self.__dict__.pop("_projection", None)

    def _basis(self, dtype: torch.dtype) -> torch.Tensor:
        """The eigenvectors ``[rank, P]`` in ``dtype``, cast once (not once per batch: 5% of
        a projection pass on the MNIST CNN)."""
        e = self.eigen.vectors
        cached = self.__dict__.get("_basis_cast")
        if cached is None or cached[0] is not e or cached[1].dtype != dtype:
            cached = (e, e.to(dtype).contiguous())
            self._basis_cast = cached
        return cached[1]

    def score_features(self, q: Features, t: Features) -> torch.Tensor:
        f, c = self.spectral_filter()
        qg, tg = q["G"].to(torch.float64).cpu(), t["G"].to(torch.float64)
        s = (qg * f) @ tg.T
        if c and "sketch" in q:
            s = s + c * (q["sketch"].cpu() @ t["sketch"].T).to(torch.float64)
        elif c and "dot.rest" in q:
            parts = [{k[4:]: v.cpu() for k, v in x.items() if k.startswith("dot.")}
                     for x in (q, t)]
            try:
                dots = gradient_dots(*parts)
            except ValueError as e:
                raise InputError(
                    f"the query and training gradients have different layer structure ({e}): "
                    "a layer applied at one position per example in one and at several in "
                    "the other. Use ArnoldiInfluence(..., sketch=None).") from None
            s = s + c * (dots - qg @ tg.T)
        return s

    def self_score_features(self, t: Features) -> torch.Tensor:
        """``Σ_j f(λ_j) G(x)_j² + c⊥ ‖P⊥∇ℓ(x)‖²``."""
        f, c = self.spectral_filter()
        g = t["G"].to(torch.float64)
        s = (g * g * f).sum(1)
        if c and "sketch" in t:
            sk = t["sketch"].to(torch.float64)
            s = s + c * (sk * sk).sum(1)
        elif c:
            s = s + c * (t["sqnorm"].to(torch.float64) - (g * g).sum(1))
        return s

    def train_projections(self) -> torch.Tensor:
        """The stored ``[N, rank]`` projections of the fitted training set."""
        return self.train_features().cat("G")

    def _sketch_hash(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._sketch_map is None:
            gen = torch.Generator().manual_seed(self.solver.seed + 1)
            p = self.task.num_params
            self._sketch_map = (torch.randint(self.sketch_dim, (p,), generator=gen),
                                torch.randint(0, 2, (p,), generator=gen).to(torch.float64) * 2
                                - 1)
        return self._sketch_map

    def _method(self, batch: Batch) -> str:
        """The projection method, chosen on the first batch that needs it."""
        if self.projection_method is None:
            self.projection_method = self._choose_projection(batch)
        return self.projection_method

    def _choose_projection(self, batch: Batch) -> str:
        """By rule, not by timing: per-example gradients cost about one backward pass per
        example whatever the rank, ``rank`` JVPs about ``rank`` forward-mode passes, so
        gradients unless a batch of them would not fit in ``_GRAD_BYTES`` (and rank ≤ 64); the
        complement needs gradient norms anyway."""
        if self.projection != "auto":
            return self.projection
        if self.spectral_filter()[1]:
            return "grad"
        size = batch_size_of(batch) * self.task.num_params * self.task.dtype.itemsize
        return "grad" if size <= _GRAD_BYTES or len(self.eigen) > 64 else "jvp"

    def _feature_bytes(self) -> int:
        extra = self._exact_width if self.complement == "exact" else (self.sketch_dim or 0)
        return 8 * (len(self.eigen) + 1) + self.task.dtype.itemsize * extra

    def _require_fit(self) -> None:
        if self.eigen is None:
            raise InputError("ArnoldiInfluence has not been fitted: call .fit(train) first.")

    def __repr__(self) -> str:
        return (f"ArnoldiInfluence(rank={self.rank}, iterations={self.iterations}, "
                f"filter={self.filter!r}, damping={self.damping}, curvature="
                f"{self.curvature!r}, P={self.task.num_params})")
