"""Arnoldi-based influence (ABIF, Schioppa et al. 2022) and variants that keep the whole spectrum.

Pipeline (each stage stored and resumable when ``store=`` is given):

1. **eigenbasis** — top ``rank`` eigenpairs ``(λ_j, e_j)`` of the mean-loss curvature by Arnoldi
   (:func:`~influencekit.curvature.curvature_eigenpairs`); by default each iteration takes the next
   batch of a seeded shuffle of the training set, so the iterations together cover it once.
2. **train projections** — ``G(x)_j = ⟨∇ℓ(x), e_j⟩`` for every training example, computed once
   (by per-example gradients × basis or by ``rank`` forward-mode JVPs, whichever measures faster),
   in chunks, and reused by every query.
3. **queries** — ``score(q, x) = Σ_j G(q)_j f(λ_j) G(x)_j [+ c⊥ ⟨P⊥∇m(q), P⊥∇ℓ(x)⟩]``:
   the first term costs ``O(rank)`` per training example, from the stored projections.

The spectral filter ``f`` and the complement weight ``c⊥`` make the variants:

- ``"topk"`` — the paper's ABIF: ``f(λ) = 1/(λ + δ)``, the rest of the spectrum dropped.
- ``"horizon"`` (default) — the finite-horizon filter of ``T`` steps of gradient descent with
  learning rate ``η``: ``f(λ) = (1 − (1 − η(λ + δ))^T) / (λ + δ)``, which tends to ``1/λ`` for
  ``λ ≫ 1/(ηT)`` and to ``ηT`` for small ``λ`` (short fine-tuning acts as damping ``≈ 1/(ηT)``);
  the complement gets ``c⊥ = f(δ)`` (``ηT`` without damping). ``horizon=(η, T)``; the default is
  ``η = 1/λ_max``, ``T = 100``; only positive eigenvalues are kept (the filter explodes on
  negative ones).
- ``"complement"`` — low rank plus damped identity: ``f(λ) = 1/(λ + δ)`` on the top eigenspace
  and ``c⊥ = 1/(min_j |λ_j| + δ)`` on its orthogonal complement.

The complement term needs full gradients, so with it (the default for ``"horizon"`` and
``"complement"``; ``complement=False`` turns it off) scoring streams the training gradients once
per chunk of queries (like :class:`~influencekit.GradDot`; up to ``query_chunk`` queries share one
pass) besides reading the projections. ``"topk"`` and ``complement=False`` read projections only,
and so does ``sketch=d``: a ``d``-dimensional CountSketch of ``P⊥∇ℓ(x)`` is stored with the
projections and the complement term is estimated from it (unbiased; measured on the MNIST CNN:
queries 9× faster at ``d = 4096`` with Spearman 0.89 to the exact complement).
Measured on the digits MLP (``influencekit evaluate``), keeping the complement is what lifts LDS
above plain top-k (see benchmarks/RESULTS.md).

Memory (peak, never ``N × P``): ``(iterations + 1) × P`` basis values while fitting, ``rank × P``
eigenvectors, ``batch_size × P`` per-example gradients, ``N × rank`` projections (on disk with
``store=``, read back a chunk at a time), plus the ``n_queries × N`` score matrix returned.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import torch

from ..autodiff import _check_curvature, iter_grads, per_example_grads, value_jvps
from ..batching import (
    Batch,
    Data,
    batch_size_of,
    check_compatible,
    iter_batches,
    num_examples,
    take,
    to_device,
)
from ..curvature.arnoldi import HESSIAN_SETS, WHICH, Eigenpairs, curvature_eigenpairs
from ..errors import CurvatureError, InputError
from ..progress import progress_bar
from ..store import (
    ArtifactStore,
    data_fingerprint,
    fingerprint,
    model_fingerprint,
    settings_fingerprint,
    tensor_fingerprint,
)
from ..task import Task
from .base import Estimator

VARIANTS = ("horizon", "complement", "topk")
PROJECTIONS = ("auto", "grad", "jvp")
DEFAULT_HORIZON_STEPS = 100


class ArnoldiInfluence(Estimator):
    """Influence through the top eigenspace of the curvature, found by Arnoldi iteration.

    Args:
        rank: eigenpairs kept. iterations: Arnoldi steps (curvature-vector products).
        damping: δ, added to every eigenvalue. curvature: ``"hessian"`` or ``"ggn"``.
        variant: ``"horizon"`` (default), ``"complement"`` or ``"topk"`` (see the module doc).
        horizon: ``(lr, steps)`` for the finite-horizon filter; ``lr=None`` means ``1/λ_max``;
            an int ``T`` means ``(None, T)``; default ``(None, 100)``.
        complement: weight of the orthogonal complement: ``None`` (the variant's default: on
            for ``"horizon"`` and ``"complement"``, off for ``"topk"``), ``True``
            (``1/(min|λ|+δ)``, or ``f(δ)`` for ``"horizon"``), ``False``, or a number.
        which: ``"magnitude"`` (largest ``|λ|``) or ``"positive"``; ``None``: positive for
            ``"horizon"`` (its filter explodes on negative eigenvalues), magnitude otherwise.
        hessian_set: ``"stream"`` (default; each iteration takes the next batch of a seeded
            shuffle), ``"fixed"`` (one random subset) or ``"full"`` (all examples every step).
        hessian_batch_size: examples per iteration (default: ``hessian_epochs × N /
            iterations``, at least ``max(32, hessian_budget / (iterations × P))``: small
            models get the whole set every iteration). block: vectors per Arnoldi pass.
        projection: ``"auto"`` (time both on the first batch), ``"grad"`` or ``"jvp"``.
        chunk_size: training examples per stored projection chunk (does not change results).
        sketch: with the complement on, store a ``sketch``-dimensional CountSketch of each
            training gradient's complement ``P⊥∇ℓ(x)`` beside its projections, so queries read
            the store only (``O(rank + sketch)`` per training example) instead of streaming the
            training gradients; the complement term becomes an unbiased estimate (relative
            error ≈ ``1/√sketch`` of ``‖P⊥∇m(q)‖‖P⊥∇ℓ(x)‖``). ``None`` (default): exact.
        store: a folder or :class:`~influencekit.store.ArtifactStore`: eigenbasis and
            projections are saved there, reused when model, data and settings match, resumed
            after an interruption, and refused (``ArtifactError``) when stale.
        overwrite: recompute and replace stale artifacts instead of refusing them.
        seed: Arnoldi start vector and data stream.
        batch_size, query_chunk, progress: as for every estimator.
    """

    def __init__(
        self, task: Task, rank: int = 50, iterations: int = 200, *, damping: float = 0.0,
        curvature: str = "hessian", variant: str = "horizon",
        horizon: tuple[float | None, int] | int | None = None,
        complement: bool | float | None = None, which: str | None = None,
        hessian_set: str = "stream",
        hessian_batch_size: int | None = None, hessian_epochs: float = 1.0,
        hessian_budget: float = 1e9, block: int = 1, micro_batch_size: int = 256,
        projection: str = "auto", chunk_size: int = 4096, sketch: int | None = None,
        store: str | ArtifactStore | None = None, overwrite: bool = False, seed: int = 0,
        **kw: Any,
    ):
        super().__init__(task, damping=damping, **kw)
        _check_curvature(curvature)
        _check_choice("variant", variant, VARIANTS)
        _check_choice("hessian_set", hessian_set, HESSIAN_SETS)
        _check_choice("projection", projection, PROJECTIONS)
        if which is not None:
            _check_choice("which", which, WHICH)
        if rank < 1 or iterations < 1 or chunk_size < 1:
            raise InputError(
                f"rank, iterations and chunk_size must be positive (got {rank}, {iterations}, "
                f"{chunk_size}).")
        if iterations < rank:
            raise InputError(
                f"iterations={iterations} < rank={rank}: Arnoldi finds at most `iterations` "
                "eigenpairs; use iterations ≥ 2 × rank (e.g. 200 for rank 50).")
        if isinstance(horizon, int):
            horizon = (None, horizon)
        if horizon is not None:
            if (len(horizon) != 2 or (horizon[0] is not None and horizon[0] <= 0)
                    or int(horizon[1]) < 1):
                raise InputError(
                    f"horizon must be (lr > 0 or None for 1/λ_max, steps ≥ 1), got {horizon!r}.")
            if variant != "horizon":
                raise InputError(f"horizon= is used by variant='horizon', not {variant!r}.")
        self.rank, self.iterations, self.curvature = rank, iterations, curvature
        self.variant, self.horizon = variant, horizon
        self.complement = complement
        self.which = which or ("positive" if variant == "horizon" else "magnitude")
        self.hessian_set, self.hessian_batch_size = hessian_set, hessian_batch_size
        self.hessian_epochs, self.hessian_budget = hessian_epochs, hessian_budget
        self.block, self.micro_batch_size = block, micro_batch_size
        self.projection, self.chunk_size = projection, chunk_size
        if sketch is not None and sketch < 1:
            raise InputError(f"sketch must be a positive dimension or None, got {sketch}.")
        self.sketch = sketch
        self._sketch_map: tuple[torch.Tensor, torch.Tensor] | None = None
        self.store = store if store is None or isinstance(store, ArtifactStore) \
            else ArtifactStore(store)
        self.overwrite, self.seed = overwrite, seed
        self.eigen: Eigenpairs | None = None
        self.projection_method: str | None = None
        self.projection_timings: dict[str, float] = {}
        self.timings: dict[str, float] = {}
        self._projections: _Projections | None = None

    # ----------------------------------------------------------------- settings
    def settings(self) -> dict[str, Any]:
        """What the eigenbasis depends on (besides model and data)."""
        settings = {
            "method": "arnoldi", "rank": self.rank, "iterations": self.iterations,
            "curvature": self.curvature, "which": self.which, "hessian_set": self.hessian_set,
            "hessian_batch_size": self.hessian_batch_size, "hessian_epochs": self.hessian_epochs,
            "block": self.block, "seed": self.seed, "params": self.task.param_names,
            "dtype": str(self.task.dtype),
        }
        if self.hessian_set != "full" and self.hessian_batch_size is None:
            settings["hessian_budget"] = self.hessian_budget  # only then does it matter
        return settings

    # ----------------------------------------------------------------- fit
    def _fit(self, train: Data) -> None:
        t0 = time.perf_counter()
        self.eigen = self._eigenbasis(train)
        t1 = time.perf_counter()
        self._projections = self._train_projections(train)
        self.timings = {"eigenbasis": t1 - t0, "projection": time.perf_counter() - t1}

    def _eigenbasis(self, train: Data) -> Eigenpairs:
        art = None
        if self.store is not None:
            fp = fingerprint(model=self.task.model, data=train, settings=self.settings())
            art = self.store.open("arnoldi-eigenbasis", fp, self.settings(),
                                  overwrite=self.overwrite)
            if art.complete:
                t = art.load()
                return Eigenpairs(t["values"], t["vectors"].to(self.task.device), art.info)
        pairs = curvature_eigenpairs(
            self.task, train, self.rank, self.iterations, curvature=self.curvature,
            which=self.which, hessian_set=self.hessian_set,
            hessian_batch_size=self.hessian_batch_size, hessian_epochs=self.hessian_epochs,
            hessian_budget=self.hessian_budget, block=self.block,
            micro_batch_size=self.micro_batch_size, seed=self.seed, progress=self.progress)
        if len(pairs) == 0:
            raise CurvatureError(
                "Arnoldi found no eigenpairs to keep (which='positive' and no positive "
                "eigenvalue): use which='magnitude', curvature='ggn', or check the model.")
        if art is not None:
            art.save({"values": pairs.values, "vectors": pairs.vectors}, **pairs.info)
        return pairs

    # ----------------------------------------------------------------- spectral filter
    def _horizon(self) -> tuple[float, int]:
        lr, steps = self.horizon if self.horizon is not None else (None, DEFAULT_HORIZON_STEPS)
        if lr is None:
            lr = 1.0 / max(float(self.eigen.values.abs().max()) + self.damping, 1e-30)
        return float(lr), int(steps)

    def spectral_filter(self) -> tuple[torch.Tensor, float]:
        """``(f(λ_j) [rank] float64, c⊥)``: weights of the kept eigenpairs and of the rest."""
        self._require_fit()
        lam = self.eigen.values.to(torch.float64) + self.damping
        if self.variant == "horizon":
            lr, steps = self._horizon()
            f = _horizon_filter(lam, lr, steps)
            comp_default = float(_horizon_filter(torch.tensor([float(self.damping)],
                                                              dtype=torch.float64),
                                                 lr, steps)[0])
        else:
            scale = max(float(lam.abs().max()), 1e-30)
            if float(lam.abs().min()) <= 1e-12 * scale:
                raise CurvatureError(
                    f"a kept eigenvalue plus damping is ~0 ({float(lam.abs().min()):.3g}): add "
                    f"damping (e.g. {1e-3 * scale:.2g}), lower rank, or use variant='horizon'.")
            f = 1.0 / lam
            comp_default = 1.0 / (float(self.eigen.values.abs().min()) + self.damping)
        comp = self.complement
        if comp is None:
            comp = self.variant != "topk"
        if comp is True:
            c = comp_default
        elif comp is False:
            c = 0.0
        else:
            c = float(comp)
        return f, c

    def precondition(self, g: torch.Tensor) -> torch.Tensor:
        """``Eᵀ f(Λ) E g + c⊥ (g − EᵀE g)``: the estimator's ``(H + δI)⁻¹`` as a ``P × P`` map."""
        f, c = self.spectral_filter()
        e = self.eigen.vectors.to(g.device, torch.float64)
        g = g.to(torch.float64)
        coords = g @ e.T
        out = (coords * f.to(g.device)) @ e
        if c:
            out = out + c * (g - coords @ e)
        return out

    # ----------------------------------------------------------------- projections
    def _project(self, batch: Batch, kind: str, method: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``([B, rank] projections in the task's dtype, [B] float64 squared gradient norms, or
        NaN where they are not computed)``."""
        e = self.eigen.vectors
        if method == "jvp":
            proj = value_jvps(self.task, batch, e, kind).T
            return proj, torch.full((proj.shape[0],), float("nan"), dtype=torch.float64)
        g = per_example_grads(self.task, batch, kind)
        return g @ e.T.to(g.dtype), (g * g).sum(1, dtype=torch.float64)

    def _sketching(self) -> bool:
        return self.sketch is not None and bool(self._complement_weight())

    def _complement_sketch(self, batch: Batch, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``([B, rank] projections, [B, sketch] CountSketch of P⊥g)`` from per-example grads."""
        e = self.eigen.vectors
        g = per_example_grads(self.task, batch, kind)
        coords = g @ e.T.to(g.dtype)
        resid = (g - coords @ e.to(g.dtype)).to(torch.float64)
        if self._sketch_map is None:
            gen = torch.Generator().manual_seed(self.seed + 1)
            p = self.task.num_params
            self._sketch_map = (torch.randint(self.sketch, (p,), generator=gen),
                                torch.randint(0, 2, (p,), generator=gen).to(torch.float64) * 2 - 1)
        bucket, sign = (t.to(g.device) for t in self._sketch_map)
        sk = torch.zeros(g.shape[0], self.sketch, dtype=torch.float64, device=g.device)
        return coords, sk.index_add_(1, bucket, resid * sign)

    def _choose_projection(self, batch: Batch) -> str:
        if self.projection != "auto":
            return self.projection
        if self._complement_weight():  # the complement needs gradient norms: use gradients
            return "grad"
        for method in ("grad", "jvp"):  # warm up (tracing, allocation), then time
            self._project(batch, "loss", method)
            t0 = time.perf_counter()
            self._project(batch, "loss", method)
            self.projection_timings[method] = time.perf_counter() - t0
        return min(self.projection_timings, key=self.projection_timings.get)

    def _complement_weight(self) -> float:
        return self.spectral_filter()[1]

    def _train_projections(self, train: Data) -> _Projections:
        n = num_examples(train)
        art = None
        if self.store is not None:
            settings = {"params": self.task.param_names, "chunk_size": self.chunk_size,
                        "sketch": self._sketching() and self.sketch, "seed": self.seed}
            fp = {"model": model_fingerprint(self.task.model), "data": data_fingerprint(train),
                  "eigenbasis": tensor_fingerprint(self.eigen.values, self.eigen.vectors),
                  "settings": settings_fingerprint(settings)}
            art = self.store.open("arnoldi-projections", fp,
                                  {"rank": len(self.eigen), "n": n, **settings},
                                  overwrite=self.overwrite)
            if art.complete:
                self.projection_method = art.info.get("method", "grad")
                return _Projections(art=art)
        first = to_device(next(iter_batches(train, self.batch_size)), self.task.device)
        self.task.check_batch(first)
        self.projection_method = self._choose_projection(first)
        chunks = self._projection_chunks(train, art)
        if art is not None:
            art.finish(chunks=math.ceil(n / self.chunk_size), n=n,
                       method=self.projection_method)
            return _Projections(art=art)
        return _Projections(chunks=chunks)

    def _projection_chunks(self, data: Data, art: Any = None) -> list[dict[str, torch.Tensor]]:
        """Project ``data`` chunk by chunk; with ``art``, skip stored chunks and store new ones
        (so an interrupted run resumes where it stopped)."""
        n = num_examples(data)
        chunks: list[dict[str, torch.Tensor]] = []
        bar = progress_bar(total=n, desc="train projections", unit="ex", leave=False,
                   progress=self.progress)
        with bar:
            for i, start in enumerate(range(0, n, self.chunk_size)):
                stop = min(start + self.chunk_size, n)
                if art is not None and art.has_chunk(i):
                    bar.update(stop - start)
                    continue
                part = take(data, torch.arange(start, stop)) if (start, stop) != (0, n) else data
                g_list, s_list = [], []
                for batch in iter_batches(part, self.batch_size):
                    batch = to_device(batch, self.task.device)
                    if self._sketching():
                        g, s = self._complement_sketch(batch, "loss")
                    else:
                        g, s = self._project(batch, "loss", self.projection_method or "grad")
                    g_list.append(g.cpu())
                    s_list.append(s.cpu())
                    bar.update(g.shape[0])
                key = "sketch" if self._sketching() else "sqnorm"
                chunk = {"G": torch.cat(g_list), key: torch.cat(s_list)}
                if art is not None:
                    art.write_chunk(i, chunk)
                else:
                    chunks.append(chunk)
        return chunks

    def train_projections(self) -> torch.Tensor:
        """The stored ``[N, rank]`` projections of the fitted training set."""
        self._require_fit()
        return torch.cat([c["G"] for c in self._projections])

    # ----------------------------------------------------------------- queries
    def _query_blocks(self, queries: Data, need_grads: bool) -> Iterator[
            tuple[torch.Tensor, torch.Tensor | None]]:
        """``(filtered query projections [k, rank] float64, query grads [k, P] or None)``."""
        f, _ = self.spectral_filter()
        chunk = self._query_chunk_size(8 * self.task.num_params)
        method = "grad" if need_grads else (self.projection_method or "grad")
        pending_p: list[torch.Tensor] = []
        pending_g: list[torch.Tensor] = []
        bar = progress_bar(total=num_examples(queries), desc="query projections", unit="ex",
                   leave=False, progress=self.progress)
        for batch in iter_batches(queries, self.batch_size):
            batch = to_device(batch, self.task.device)
            bar.update(batch_size_of(batch))
            if need_grads:
                g = per_example_grads(self.task, batch, "measurement")
                pending_g.append(g)
                pending_p.append(g @ self.eigen.vectors.T.to(g.dtype))
            else:
                pending_p.append(self._project(batch, "measurement", method)[0])
            if sum(p.shape[0] for p in pending_p) >= chunk:
                yield self._flush(pending_p, pending_g, f)
                pending_p, pending_g = [], []
        if pending_p:
            yield self._flush(pending_p, pending_g, f)
        bar.close()

    def _query_sketches(self, queries: Data) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(query projections [k, rank], complement sketches [k, sketch])`` in chunks of
        ``query_chunk`` queries (default: 256 MiB of sketches), so stored training chunks are
        read once per query chunk."""
        chunk = self._query_chunk_size(8 * (self.sketch + len(self.eigen)))
        pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        size = 0
        for batch in iter_batches(queries, self.batch_size):
            coords, sk = self._complement_sketch(to_device(batch, self.task.device),
                                                 "measurement")
            pending.append((coords.cpu(), sk.cpu()))
            size += coords.shape[0]
            if size >= chunk:
                yield torch.cat([a for a, _ in pending]), torch.cat([b for _, b in pending])
                pending, size = [], 0
        if pending:
            yield torch.cat([a for a, _ in pending]), torch.cat([b for _, b in pending])

    @staticmethod
    def _flush(p: list[torch.Tensor], g: list[torch.Tensor], f: torch.Tensor) -> tuple[
            torch.Tensor, torch.Tensor | None]:
        proj = torch.cat(p).cpu().to(torch.float64) * f
        return proj, (torch.cat(g) if g else None)

    def scores(self, queries: Data, train: Data | None = None) -> torch.Tensor:
        """Influence of each training example on each query, ``[n_queries, n_train]``."""
        train = self._resolve_train(train)
        self._require_fit()
        check_compatible(queries, train)
        c = self._complement_weight()
        out = []
        if self._sketching():
            f = self.spectral_filter()[0]
            for coords, q_sk in self._query_sketches(queries):
                qf = coords.to(torch.float64) * f
                out.append(torch.cat([
                    qf @ part["G"].to(torch.float64).T + c * (q_sk @ part["sketch"].T)
                    for part in self._projections_for(train)], 1))
            return torch.cat(out, 0).to(self._out_dtype())
        for qf, qg in self._query_blocks(queries, need_grads=bool(c)):
            if c:
                out.append(self._score_with_complement(qf, qg, train, c))
            else:
                cols = [qf @ part["G"].to(torch.float64).T
                        for part in self._projections_for(train)]
                out.append(torch.cat(cols, 1))
        return torch.cat(out, 0).to(self._out_dtype())

    def _score_with_complement(self, qf: torch.Tensor, qg: torch.Tensor, train: Data,
                               c: float) -> torch.Tensor:
        e = self.eigen.vectors
        q_coords = (qg @ e.T.to(qg.dtype)).to(torch.float64).cpu()
        qg64 = qg.to(torch.float64)
        cols = []
        for _, g in iter_grads(self.task, train, self.batch_size, "loss",
                               desc="train gradients", progress=self.progress):
            t_coords = (g @ e.T.to(g.dtype)).to(torch.float64).cpu()
            dots = (qg64 @ g.to(torch.float64).T).cpu()
            cols.append(qf @ t_coords.T + c * (dots - q_coords @ t_coords.T))
        return torch.cat(cols, 1)

    def self_influence(self, train: Data | None = None) -> torch.Tensor:
        """``Σ_j f(λ_j) G(x)_j² + c⊥ (‖∇ℓ(x)‖² − ‖G(x)‖²)`` for each training example."""
        train = self._resolve_train(train)
        self._require_fit()
        f, c = self.spectral_filter()
        out = []
        for part in self._projections_for(train):
            g = part["G"].to(torch.float64)
            s = (g * g * f).sum(1)
            if c and "sketch" in part:
                s = s + c * (part["sketch"] * part["sketch"]).sum(1)
            elif c:
                sq = part["sqnorm"].to(torch.float64)
                if torch.isnan(sq).any():
                    return Estimator.self_influence(self, train)
                s = s + c * (sq - (g * g).sum(1))
            out.append(s)
        return torch.cat(out).to(self._out_dtype())

    def _projections_for(self, train: Data) -> _Projections:
        if train is self.train:
            return self._projections
        return _Projections(chunks=self._projection_chunks(train))

    def _require_fit(self) -> None:
        if self.eigen is None:
            raise InputError("ArnoldiInfluence has not been fitted: call .fit(train) first.")

    def __repr__(self) -> str:
        return (f"ArnoldiInfluence(rank={self.rank}, iterations={self.iterations}, "
                f"variant={self.variant!r}, damping={self.damping}, curvature="
                f"{self.curvature!r}, P={self.task.num_params})")


class _Projections:
    """Train projections, in memory or in a chunked artifact (read a chunk at a time)."""

    def __init__(self, chunks: list[dict[str, torch.Tensor]] | None = None, art: Any = None):
        self.chunks, self.art = chunks, art

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.art is not None:
            yield from self.art.iter_chunks()
        else:
            yield from self.chunks or []


def _horizon_filter(lam: torch.Tensor, lr: float, steps: int) -> torch.Tensor:
    """``(1 − (1 − lr·λ)^T) / λ`` (``lr·T`` at ``λ = 0``), computed stably in float64."""
    x = lr * lam
    base = 1.0 - x
    safe = torch.where(base > 0, x, torch.zeros_like(x))
    one_minus = torch.where(base > 0, -torch.expm1(steps * torch.log1p(-safe)),
                            1.0 - base.pow(steps))
    tiny = x.abs() < 1e-12
    return torch.where(tiny, torch.full_like(lam, lr * steps),
                       one_minus / torch.where(tiny, torch.ones_like(lam), lam))


def _check_choice(name: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise InputError(f"{name} must be one of {options}, got {value!r}.")


class ArnoldiTopK(ArnoldiInfluence):
    """The paper's ABIF: ``1/(λ + δ)`` on the top eigenpairs by ``|λ|``, the rest dropped."""

    def __init__(self, task: Task, rank: int = 50, iterations: int = 200, **kw: Any):
        kw.setdefault("variant", "topk")
        super().__init__(task, rank, iterations, **kw)


class ArnoldiComplement(ArnoldiInfluence):
    """Low rank plus damped identity: the complement weighted by ``1/(min|λ| + δ)``."""

    def __init__(self, task: Task, rank: int = 50, iterations: int = 200, **kw: Any):
        kw.setdefault("variant", "complement")
        super().__init__(task, rank, iterations, **kw)
