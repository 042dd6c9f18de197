"""The face every estimator shares: ``fit``, ``scores``, ``self_influence``, ``top_k``.

An estimator is defined by one transform (dattri-style): :meth:`Estimator.precondition`, which
maps query gradients ``g_q [k, P]`` to ``(H + λI)⁻¹ g_q`` (or its approximation). Scores are then

    score(q, x) = ⟨precondition(∇m(q)), ∇ℓ(x)⟩

streamed over training gradients in batches, so ``N × P`` is never held in memory: peak memory is
``O(query_chunk × P + batch_size × P)`` plus the estimator's curvature state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..autodiff import iter_grads
from ..batching import Data, check_compatible, num_examples
from ..errors import InputError
from ..task import Task

_QUERY_CHUNK_BYTES = 256 * 2**20


@dataclass
class TopK:
    """Most influential training examples per query (indices into the training data)."""

    proponents: torch.Tensor  # [n_queries, k] indices, most positive score first
    proponent_scores: torch.Tensor
    opponents: torch.Tensor  # [n_queries, k] indices, most negative score first
    opponent_scores: torch.Tensor


class Estimator:
    """Base class. Subclasses override :meth:`_fit` and :meth:`precondition` (and, rarely,
    :meth:`train_features` / :meth:`query_features`).

    Args:
        task: the :class:`~influencekit.Task` (model, loss, measurement, parameters).
        damping: λ in ``(H + λI)⁻¹`` (where the method uses a curvature).
        batch_size: examples per gradient batch (does not change results).
        query_chunk: queries preconditioned at once (default: as many as fit in 256 MiB).
        progress: show progress bars (default: when the output is a terminal).
    """

    needs_fit = True

    def __init__(self, task: Task, *, damping: float = 0.0, batch_size: int = 64,
                 query_chunk: int | None = None, progress: bool | None = None):
        if not isinstance(task, Task):
            raise InputError(
                f"expected an influencekit Task, got {type(task).__name__}; wrap the model: "
                "ik.ClassificationTask(model) or ik.Task(model, loss=...)."
            )
        if damping < 0:
            raise InputError(f"damping must be ≥ 0, got {damping}.")
        if batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size}.")
        self.task = task
        self.damping = float(damping)
        self.batch_size = batch_size
        self.query_chunk = query_chunk
        self.progress = progress
        self.train: Data | None = None
        self.n_train: int | None = None

    # ----------------------------------------------------------------- override points
    def _fit(self, train: Data) -> None:
        """Compute what the method needs from the training data (curvature)."""

    def precondition(self, g: torch.Tensor) -> torch.Tensor:
        """``(H + λI)⁻¹ g`` for each row of ``g [k, P]`` (identity by default)."""
        return g

    def query_features(self, g: torch.Tensor) -> torch.Tensor:
        return g

    def train_features(self, g: torch.Tensor) -> torch.Tensor:
        return g

    # ----------------------------------------------------------------- public face
    def fit(self, train: Data) -> Estimator:
        """Fit on the training data; later calls to :meth:`scores` default to it."""
        n = num_examples(train)
        if n == 0:
            raise InputError("the training data is empty; give at least one example.")
        self.train, self.n_train = train, n
        self._fit(train)
        return self

    def scores(self, queries: Data, train: Data | None = None) -> torch.Tensor:
        """Influence of each training example on each query, ``[n_queries, n_train]``.

        ``score > 0``: the training example is a proponent (training more on it lowers the
        query's measurement).
        """
        train = self._resolve_train(train)
        check_compatible(queries, train)
        chunks = []
        for q in self._query_chunks(queries):
            chunks.append(self._score_block(q, train))
        return torch.cat(chunks, 0).to(self._out_dtype())

    def self_influence(self, train: Data | None = None) -> torch.Tensor:
        """``⟨∇ℓ(x), (H + λI)⁻¹ ∇ℓ(x)⟩`` for each training example, ``[n_train]``."""
        train = self._resolve_train(train)
        out = []
        for _, g in iter_grads(self.task, train, self.batch_size, "loss",
                               desc="self-influence", progress=self.progress):
            pre = self.precondition(self.query_features(g)).to(torch.float64)
            out.append((pre * self.train_features(g).to(torch.float64)).sum(1))
        return torch.cat(out).to(self._out_dtype())

    def top_k(self, queries: Data, train: Data | None = None, k: int = 10) -> TopK:
        """The ``k`` strongest proponents and opponents of each query."""
        s = self.scores(queries, train)
        k = min(k, s.shape[1])
        ps, pi = s.topk(k, dim=1)
        os_, oi = (-s).topk(k, dim=1)
        return TopK(pi, ps, oi, -os_)

    # ----------------------------------------------------------------- helpers
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

    def _query_chunks(self, queries: Data) -> Any:
        """Yield preconditioned query vectors ``[k, P]`` (float64), a chunk at a time."""
        chunk = self._query_chunk_size(8 * self.task.num_params)
        pending: list[torch.Tensor] = []
        size = 0
        for _, g in iter_grads(self.task, queries, self.batch_size, "measurement",
                               desc="query gradients", progress=self.progress):
            pending.append(g)
            size += g.shape[0]
            while size >= chunk:
                block = torch.cat(pending)
                yield self._prepare_queries(block[:chunk])
                pending, size = [block[chunk:]], block.shape[0] - chunk
        if size:
            yield self._prepare_queries(torch.cat(pending))

    def _query_chunk_size(self, bytes_per_query: int) -> int:
        """``query_chunk``, or as many queries as fit in 256 MiB."""
        return self.query_chunk or max(1, _QUERY_CHUNK_BYTES // bytes_per_query)

    def _prepare_queries(self, g: torch.Tensor) -> torch.Tensor:
        return self.precondition(self.query_features(g)).to(torch.float64)

    def _score_block(self, q: torch.Tensor, train: Data) -> torch.Tensor:
        cols = []
        for _, g in iter_grads(self.task, train, self.batch_size, "loss",
                               desc="train gradients", progress=self.progress):
            if g.shape[1] != q.shape[1]:
                raise InputError("query and training gradients differ in size.")
            cols.append(q @ self.train_features(g).to(torch.float64).T)
        return torch.cat(cols, 1)

    def __repr__(self) -> str:
        curvature = getattr(self, "curvature", None)
        extra = f", curvature={curvature!r}" if curvature else ""
        return f"{type(self).__name__}(damping={self.damping}{extra}, P={self.task.num_params})"
