"""The face every estimator shares: ``fit``, ``scores``, ``self_influence``, ``top_k``.

Two ways of scoring, one base:

- **Gradient space** (default). An estimator is one transform (dattri-style),
  :meth:`Estimator.precondition`: query gradients ``g_q [k, P]`` ↦ ``(H + λI)⁻¹ g_q`` (or its
  approximation); scores ``⟨precondition(∇m(q)), ∇ℓ(x)⟩`` are streamed over the training
  gradients, so ``N × P`` is never held: peak memory ``O(query_chunk × P + batch_size × P)``
  plus the estimator's state.
- **Stored features**. An estimator that maps each example to a small feature vector (Arnoldi's
  eigen-projections, TRAK's random projections) overrides :meth:`Estimator.features`,
  :meth:`Estimator.score_features` and :meth:`Estimator.self_score_features`: the training
  features are computed once at ``fit`` (chunked; stored, fingerprinted and resumable with
  ``store=``), and a query costs one feature map plus a product with the stored chunks.

Queries are processed in chunks by one rule: as many as fit in 256 MiB (``query_chunk``
overrides it).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..autodiff import check_grads, grad_buffer, iter_grads, per_example_grads
from ..batching import (
    Batch,
    Data,
    batch_size_of,
    check_compatible,
    iter_batches,
    num_examples,
    to_device,
)
from ..errors import InputError
from ..store import ArtifactStore, fingerprint
from ..task import Task
from ..validate import boolean, non_negative, optional_positive_int, positive_int
from .features import Features, TrainFeatures

_QUERY_CHUNK_BYTES = 256 * 2**20


@dataclass
class TopK:
    """Most influential training examples per query (indices into the training data)."""

    proponents: torch.Tensor  # [n_queries, k] indices, most positive score first
    proponent_scores: torch.Tensor
    opponents: torch.Tensor  # [n_queries, k] indices, most negative score first
    opponent_scores: torch.Tensor


class Estimator:
    """Base class (see the module docstring for the two override sets).

    Args:
        task: the :class:`~influencekit.Task` (model, loss, measurement, parameters).
        damping: λ in ``(H + λI)⁻¹`` (where the method uses a curvature).
        batch_size: examples per gradient batch (does not change results).
        query_chunk: queries processed at once (default: as many as fit in 256 MiB).
        chunk_size: training examples per stored feature chunk (does not change results).
        store: a folder or :class:`~influencekit.store.ArtifactStore` where the estimator's
            fitted state (curvature, training features) is saved, reused when task, data and
            settings match, resumed after an interruption and refused when stale.
        overwrite: recompute and replace stale artifacts instead of refusing them.
        progress: show progress bars (default: when the output is a terminal).
    """

    needs_fit = True
    name = "estimator"  # the artifact prefix

    def __init__(self, task: Task, *, damping: float = 0.0, batch_size: int = 64,
                 query_chunk: int | None = None, chunk_size: int = 4096,
                 store: str | ArtifactStore | None = None, overwrite: bool = False,
                 progress: bool | None = None, **unknown: Any):
        if unknown:
            raise InputError(
                f"{type(self).__name__} got unknown option(s) {', '.join(sorted(unknown))}; "
                f"it takes: {', '.join(_options(type(self)))}.")
        if not isinstance(task, Task):
            raise InputError(
                f"expected an influencekit Task, got {type(task).__name__}; wrap the model: "
                "ik.ClassificationTask(model) or ik.Task(model, loss=...)."
            )
        self.task = task
        self.damping = non_negative("damping", damping)
        self.batch_size = positive_int("batch_size", batch_size)
        self.query_chunk = optional_positive_int("query_chunk", query_chunk)
        self.chunk_size = positive_int("chunk_size", chunk_size)
        self.store = store if store is None or isinstance(store, ArtifactStore) \
            else ArtifactStore(store)
        self.overwrite = boolean("overwrite", overwrite)
        self.progress = progress
        self.train: Data | None = None
        self.n_train: int | None = None
        self._features: TrainFeatures | None = None
        self._scratch: torch.Tensor | None = None

    # ----------------------------------------------------------------- override points
    def _fit(self, train: Data) -> None:
        """Compute what the method needs from the training data (curvature)."""

    def precondition(self, g: torch.Tensor) -> torch.Tensor:
        """``(H + λI)⁻¹ g`` for each row of ``g [k, P]`` (identity by default)."""
        return g

    def train_transform(self, g: torch.Tensor) -> torch.Tensor:
        """Map applied to training gradients in the gradient-space path (identity)."""
        return g

    def stores_features(self) -> bool:
        """Whether :meth:`fit` computes and keeps per-example training features."""
        return False

    def scores_from_features(self) -> bool:
        """Whether :meth:`scores` reads the stored features (else it streams gradients)."""
        return self.stores_features()

    def features(self, batch: Batch, kind: str) -> Features:
        """Per-example features of ``batch`` (``kind``: ``"loss"`` for training examples,
        ``"measurement"`` for queries)."""
        raise NotImplementedError

    def score_features(self, q: Features, t: Features) -> torch.Tensor:
        """Scores ``[n_q, n_t]`` (float64) from query and training features."""
        raise NotImplementedError

    def self_score_features(self, t: Features) -> torch.Tensor:
        """Self-influence ``[n_t]`` (float64) from training features."""
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """What the fitted state depends on besides task and data (for fingerprints)."""
        return {"method": type(self).__name__, "damping": self.damping,
                "params": self.task.param_names, "dtype": str(self.task.dtype)}

    def feature_settings(self) -> dict[str, Any]:
        """What the stored training features depend on besides task, data and
        :meth:`_feature_upstream` (default: :meth:`settings`)."""
        return self.settings()

    # ----------------------------------------------------------------- public face
    def fit(self, train: Data) -> Estimator:
        """Fit on the training data; later calls to :meth:`scores` default to it."""
        n = num_examples(train)
        if n == 0:
            raise InputError("the training data is empty; give at least one example.")
        self.task.check_batch(to_device(next(iter_batches(train, self.batch_size)),
                                        self.task.device))
        self.train, self.n_train = train, n
        try:
            self._fit(train)
            if self.stores_features():
                self._features = self._train_features(train, stored=True)
        finally:
            self._drop_scratch()
        return self

    def scores(self, queries: Data, train: Data | None = None) -> torch.Tensor:
        """Influence of each training example on each query, ``[n_queries, n_train]``.

        ``score > 0``: the training example is a proponent (training more on it lowers the
        query's measurement).
        """
        try:
            return self._scores(queries, self._resolve_train(train))
        finally:
            self._drop_scratch()

    def _scores(self, queries: Data, train: Data) -> torch.Tensor:
        check_compatible(queries, train)
        out = []
        if self.scores_from_features():
            feats = self._features_for(train)
            for q in self._query_chunks(queries, lambda b: self.features(b, "measurement"),
                                        self._feature_bytes()):
                out.append(torch.cat([self.score_features(q, t) for t in feats], 1))
        else:
            for g in self._query_chunks(
                    queries, lambda b: per_example_grads(self.task, b, "measurement"),
                    8 * self.task.num_params):
                out.append(self._score_gradients(self.precondition(g).to(torch.float64),
                                                 train))
        return torch.cat(out, 0).to(self._out_dtype())

    def self_influence(self, train: Data | None = None) -> torch.Tensor:
        """``⟨∇ℓ(x), (H + λI)⁻¹ ∇ℓ(x)⟩`` for each training example, ``[n_train]``."""
        train = self._resolve_train(train)
        if self.stores_features():
            out = [self.self_score_features(t) for t in self._features_for(train)]
        else:
            out = []
            for g in iter_grads(self.task, train, self.batch_size, "loss",
                                desc="self-influence", progress=self.progress, reuse=True):
                pre = self.precondition(g).to(torch.float64)
                out.append((pre * self.train_transform(g).to(torch.float64)).sum(1).cpu())
        return torch.cat(out).to(self._out_dtype())

    def top_k(self, queries: Data, train: Data | None = None, k: int = 10) -> TopK:
        """The ``k`` strongest proponents and opponents of each query."""
        k = positive_int("k", k)
        s = self.scores(queries, train)
        k = min(k, s.shape[1])
        ps, pi = s.topk(k, dim=1)
        os_, oi = (-s).topk(k, dim=1)
        return TopK(pi, ps, oi, -os_)

    # ----------------------------------------------------------------- stored features
    def train_features(self) -> TrainFeatures:
        """The stored features of the fitted training set."""
        if self._features is None:
            raise InputError(f"{type(self).__name__} has no stored training features: call "
                             ".fit(train) first.")
        return self._features

    def _train_features(self, train: Data, stored: bool) -> TrainFeatures:
        art = None
        if stored and self.store is not None:
            settings = {**self.feature_settings(), "chunk_size": self.chunk_size}
            fp = fingerprint(task=self.task, data=train, settings=settings,
                             **self._feature_upstream())
            art = self.store.open(f"{self.name}-features", fp, settings,
                                  overwrite=self.overwrite)
            if art.complete:
                return TrainFeatures(art=art)
        return TrainFeatures.compute(
            train, lambda b: self.features(b, "loss"), batch_size=self.batch_size,
            chunk_size=self.chunk_size, device=self.task.device, art=art,
            progress=self.progress, desc=f"{self.name} train features")

    def _feature_upstream(self) -> dict[str, str]:
        """Fingerprints of fitted state the features depend on (e.g. the eigenbasis)."""
        return {}

    def _features_for(self, train: Data) -> TrainFeatures:
        if train is self.train and self._features is not None:
            return self._features
        return self._train_features(train, stored=False)

    def _feature_bytes(self) -> int:
        """Bytes per query of its features (for the query-chunk rule)."""
        return 8 * self.task.num_params

    # ----------------------------------------------------------------- gradient space
    def _grads(self, batch: Batch, kind: str, check: bool = True,
               task: Task | None = None) -> torch.Tensor:
        """Per-example gradients (of ``task``, default the estimator's) in the estimator's
        scratch buffer, overwritten by the next call (for features consumed at once); the
        buffer is dropped after fit and scores."""
        task = task or self.task
        b = batch_size_of(batch)
        if self._scratch is None or self._scratch.shape[0] < b:
            self._scratch = grad_buffer(task, b)  # the first batch is the largest
        return per_example_grads(task, batch, kind, out=self._scratch, check=check)

    def _drop_scratch(self) -> None:
        """Free the buffers kept between batches (after fit and after scores)."""
        self._scratch = None

    def _score_gradients(self, q: torch.Tensor, train: Data) -> torch.Tensor:
        """``q [k, P]`` against every (transformed) training gradient, streamed through one
        reused buffer, the products in the model's precision (float32: 2× faster than
        float64 and no ``[B, P]`` float64 copy per batch; the sums are over ``P`` terms of
        float32 gradients either way)."""
        cols = []
        q = q.to(self.task.dtype)
        for g in iter_grads(self.task, train, self.batch_size, "loss",
                            desc="train gradients", progress=self.progress, reuse=True,
                            check=False):
            col = q @ self.train_transform(g).T
            check_grads(g, "loss", reduced=col)  # NaN/inf in g reaches its products
            cols.append(col.to(torch.float64).cpu())
        return torch.cat(cols, 1)

    # ----------------------------------------------------------------- helpers
    def _query_chunks(self, queries: Data, fn: Callable[[Batch], Any],
                      bytes_per_query: int) -> Iterator[Any]:
        """``fn`` over the query batches, concatenated into chunks of ``query_chunk`` queries
        (default: as many as fit in 256 MiB at ``bytes_per_query``). ``fn`` returns a tensor or
        a dict of tensors with one row per query."""
        chunk = self.query_chunk or max(1, _QUERY_CHUNK_BYTES // max(bytes_per_query, 1))
        pending: list[Any] = []
        size = 0
        for batch in iter_batches(queries, self.batch_size):
            pending.append(fn(to_device(batch, self.task.device)))  # fn's autodiff checks it
            size += _rows(pending[-1])
            while size >= chunk:
                block = _cat(pending)
                yield _rows_slice(block, slice(0, chunk))
                pending, size = [_rows_slice(block, slice(chunk, None))], size - chunk
        if size:
            yield _cat(pending)

    def _out_dtype(self) -> torch.dtype:
        return self.task.dtype

    def _resolve_train(self, train: Data | None) -> Data:
        if train is None:
            if self.train is None:
                raise InputError(
                    f"{type(self).__name__} has not been fitted: call .fit(train) first "
                    "or pass train= explicitly."
                )
            return self.train
        if self.needs_fit and self.train is None:
            raise InputError(f"{type(self).__name__} needs .fit(train) before scoring.")
        return train

    def __repr__(self) -> str:
        curvature = getattr(self, "curvature", None)
        extra = f", curvature={curvature!r}" if curvature else ""
        return f"{type(self).__name__}(damping={self.damping}{extra}, P={self.task.num_params})"


def _options(cls: type) -> list[str]:
    """Keyword options of an estimator class's constructors (its own and its bases')."""
    names: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.kind is p.KEYWORD_ONLY or (p.kind is p.POSITIONAL_OR_KEYWORD
                                            and p.name not in ("self", "task")):
                if p.name not in names:
                    names.append(p.name)
    return names


def _rows(x: Any) -> int:
    return int((next(iter(x.values())) if isinstance(x, dict) else x).shape[0])


def _rows_slice(x: Any, rows: slice) -> Any:
    return {k: v[rows] for k, v in x.items()} if isinstance(x, dict) else x[rows]


def _cat(parts: list[Any]) -> Any:
    if isinstance(parts[0], dict):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts)


