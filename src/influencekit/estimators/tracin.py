"""TracIn over saved checkpoints (TracInCP, Pruthi et al. 2020), and what it shares with TRAK:
checkpoints of a training run and seeded random projections.

    ckpts = TracIn.collector(every=1, unit="epoch")          # a trainer callback
    result = ik.training.train(builder, (x, y), config, callback=ckpts)
    est = ik.TracIn(ik.ClassificationTask(result.model), checkpoints=ckpts)
    S = est.scores(queries, (x, y))

``score(q, x) = Σ_t η_t ⟨∇m(q, θ_t), ∇ℓ(x, θ_t)⟩``: a first-order account of the training
trajectory that drops the propagation terms ``(I − ηH)`` (paper digest, assumption 3).
Checkpoints are never loaded into the user's model: a private copy is used.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..autodiff import iter_grads, per_example_grads
from ..batching import Batch, Data, check_compatible
from ..errors import ArtifactError, InputError
from ..store import ArtifactStore, tensor_fingerprint
from ..task import Task
from ..training.config import TrainConfig
from ..validate import choice, integer, number, optional_positive_int, positive_int
from .base import Estimator
from .features import Features

State = dict[str, torch.Tensor]
CheckpointLike = nn.Module | Mapping[str, Any] | str | os.PathLike
PROJECTIONS = ("rademacher", "gaussian", "none")
UNITS = ("epoch", "step")
_BLOCK_ROWS = 4096  # parameters per generated projection block (fixed: part of the matrix)
_CACHE_BYTES = 2**30  # keep the whole projection in memory up to this size (one, shared)
_PROJECTION_VERSION = 2  # how the matrix is generated (part of stored features' settings)


# --------------------------------------------------------------------------- checkpoints
class Checkpoints:
    """Parameters saved along one training run, each with its learning-rate weight ``η_t``.

    Use it as the trainer's callback (``Trainer.run(callback=ckpts)`` or
    ``train(..., callback=ckpts)``), or read a trainer's ``checkpoint_dir`` with
    :meth:`load`; pass it as ``checkpoints=`` to :class:`TracIn` or
    :class:`~influencekit.estimators.trak.TRAKInfluence`.

    A checkpoint taken after step ``s_i`` stands for the steps since the previous one,
    ``s_{i−1} < t ≤ s_i``, and its weight is the sum of their learning rates: with these
    weights a TracIn score is on the library's scale (removing ``x`` changes ``m(q)`` by about
    ``+score/N``, to first order and without the propagation terms; SGD momentum ``μ``
    would multiply the effective steps by ``1/(1 − μ)``, which is not included).

    Args:
        every: keep a checkpoint every ``every`` units; the end of the run (the state when the
            checkpoints are first read) is always kept.
        unit: ``"epoch"`` or ``"step"``.
    """

    def __init__(self, every: int = 1, unit: str = "epoch"):
        self.every = positive_int("every", every)
        self.unit = choice("unit", unit, UNITS)
        self._states: list[State] = []
        self._weights: list[float] = []
        self._steps: list[int] = []
        self._buffer: State | None = None  # the latest state seen
        self._buffer_step = 0
        self._lr_sum = 0.0  # learning rates of the steps since the last checkpoint
        self._pending = 0  # steps since the last checkpoint
        self._epoch: int | None = None

    # ----------------------------------------------------------------- as a callback
    def __call__(self, info: Any) -> None:
        """Record one optimizer step (a :class:`~influencekit.training.StepInfo`)."""
        if self.unit == "epoch" and self._epoch is not None and info.epoch != self._epoch \
                and (self._epoch + 1) % self.every == 0 and self._pending:
            self._commit()  # the previous step ended an epoch
        self._lr_sum += float(info.lr)
        self._pending += 1
        self._epoch = info.epoch
        self._snapshot(info.model, info.step)
        if self.unit == "step" and info.step % self.every == 0:
            self._commit()

    def _snapshot(self, model: nn.Module, step: int) -> None:
        sd = model.state_dict()
        if self._buffer is None or self._buffer.keys() != sd.keys():
            self._buffer = {k: v.detach().clone() for k, v in sd.items()}
        else:
            for k, v in sd.items():
                self._buffer[k].copy_(v)
        self._buffer_step = step

    def _commit(self) -> None:
        assert self._buffer is not None
        self._states.append({k: v.clone() for k, v in self._buffer.items()})
        self._weights.append(self._lr_sum)
        self._steps.append(self._buffer_step)
        self._lr_sum, self._pending = 0.0, 0

    def finish(self) -> Checkpoints:
        """Keep the latest state seen as the final checkpoint (done when first read)."""
        if self._pending:
            self._commit()
        return self

    # ----------------------------------------------------------------- reading
    @property
    def states(self) -> list[State]:
        """The saved states (parameters and buffers by name)."""
        return self.finish()._states

    @property
    def learning_rates(self) -> list[float]:
        """``η_t`` of each checkpoint: the summed learning rates of the steps it stands for."""
        return self.finish()._weights

    @property
    def steps(self) -> list[int]:
        """Optimizer steps done at each checkpoint."""
        return self.finish()._steps

    def __len__(self) -> int:
        return len(self.states)

    @classmethod
    def load(cls, checkpoint_dir: str | os.PathLike) -> Checkpoints:
        """The checkpoints a :class:`~influencekit.training.Trainer` kept in
        ``checkpoint_dir``, with weights from the run's schedule (see the class docstring)."""
        store = ArtifactStore(checkpoint_dir)
        names = store.names("epoch-")
        if not names:
            raise InputError(f"checkpoint_dir: no trainer checkpoints (epoch-*) in "
                             f"{checkpoint_dir}; train with checkpoint_dir= set.")
        out = cls()
        run_fp = None
        prev_step = 0
        for name in names:
            fp, args = _manifest(store.root / name)
            if run_fp is not None and fp != run_fp:
                raise InputError(f"checkpoint_dir: {checkpoint_dir} mixes checkpoints of "
                                 "different runs; keep one run per folder.")
            run_fp = fp
            art = store.open(name, fp)
            if not art.complete:
                continue  # killed while saving
            state = art.load()
            step, epoch = int(args["step"]), int(args["epoch"])
            cfg = TrainConfig(**args["config"])
            per_epoch = step // max(epoch, 1)
            out._states.append(_trainer_state(state))
            out._weights.append(sum(cfg.lr_at(t // per_epoch) for t in range(prev_step, step)))
            out._steps.append(step)
            prev_step = step
        return out

    def __repr__(self) -> str:
        return f"Checkpoints({len(self._states)} saved, every={self.every} {self.unit})"


def _manifest(folder: Path) -> tuple[dict[str, str], dict[str, Any]]:
    try:
        m = json.loads((folder / "manifest.json").read_text())
        return dict(m["fingerprint"]), dict(m["arguments"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{folder} is not a readable trainer checkpoint ({e}).") from e


def _trainer_state(state: Any) -> State:
    """The model state inside a trainer checkpoint (``Trainer.state_dict()``)."""
    return dict(state["model"])


def _as_state(obj: Any, where: str) -> State:
    """A checkpoint (module, state dict, trainer state or trainer artifact folder) as a state
    dict of tensors (copied: later changes to ``obj`` do not leak in)."""
    if isinstance(obj, nn.Module):
        return {k: v.detach().clone() for k, v in obj.state_dict().items()}
    if isinstance(obj, (str, os.PathLike)):
        folder = Path(obj)
        if not (folder / "manifest.json").is_file():
            raise InputError(f"{where}: {folder} is not a trainer checkpoint folder (no "
                             "manifest.json); for a whole checkpoint_dir use "
                             "Checkpoints.load(dir) or TracIn.from_trainer(task, dir).")
        fp, _ = _manifest(folder)
        art = ArtifactStore(folder.parent).open(folder.name, fp)
        if not art.complete:
            raise InputError(f"{where}: the checkpoint at {folder} is incomplete.")
        return _trainer_state(art.load())
    if isinstance(obj, Mapping):
        if {"model", "step", "optimizer"} <= set(obj):
            obj = obj["model"]
        bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise InputError(f"{where}: a state dict maps names to tensors; {bad[:3]} are not "
                             "tensors.")
        return {k: v.detach().clone() for k, v in obj.items()}
    raise InputError(f"{where} must be an nn.Module, a state dict, a trainer state or a trainer "
                     f"checkpoint folder, got {type(obj).__name__}.")


def _check_state(state: State, task: Task, where: str) -> State:
    """Refuse unknown names, wrong shapes and missing selected parameters."""
    own = task.model.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise InputError(f"{where} has entries the task's model lacks: {unknown[:4]} (known: "
                         f"{list(own)[:4]}...). Save the same architecture's state_dict().")
    missing = [n for n in task.param_names if n not in state]
    if missing:
        raise InputError(f"{where} lacks the selected parameters {missing[:4]}.")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise InputError(f"{where}: {k} has shape {tuple(v.shape)}, the model's has "
                             f"{tuple(own[k].shape)}.")
    return state


def resolve_checkpoints(task: Task, checkpoints: Any, arg: str = "checkpoints"
                        ) -> tuple[list[State] | None, list[float] | None]:
    """``(states, weights)``: ``(None, None)`` for the task's model itself; weights only when
    ``checkpoints`` is a :class:`Checkpoints`."""
    if checkpoints is None:
        return None, None
    if isinstance(checkpoints, Checkpoints):
        states, weights = checkpoints.states, list(checkpoints.learning_rates)
        if not states:
            raise InputError(f"{arg}: the Checkpoints saw no training step; pass it to the "
                             "trainer as callback= (or load a checkpoint_dir) first.")
    elif isinstance(checkpoints, (nn.Module, Mapping, str, os.PathLike)):
        states, weights = [_as_state(checkpoints, arg)], None
    elif isinstance(checkpoints, Sequence):
        states, weights = [_as_state(c, f"{arg}[{i}]") for i, c in enumerate(checkpoints)], None
    else:
        raise InputError(f"{arg} must be a list of checkpoints (modules, state dicts, trainer "
                         f"states or folders) or a Checkpoints, got {type(checkpoints).__name__}.")
    if not states:
        raise InputError(f"{arg} is empty; give at least one checkpoint (or None for the "
                         "task's model).")
    return [_check_state(s, task, f"{arg}[{i}]") for i, s in enumerate(states)], weights


# --------------------------------------------------------------------------- projections
@functools.lru_cache(maxsize=1)
def _held_matrix(num_params: int, dim: int, kind: str, seed: int, dtype: torch.dtype
                 ) -> torch.Tensor:
    """The whole matrix of one projection, kept while it is the latest asked for (so that
    every member of an ensemble, every checkpoint and every estimator with the same seed
    shares one copy)."""
    proj = RandomProjection(num_params, dim, kind, seed, dtype)
    return torch.cat([blk for _, blk in proj.blocks()])


class RandomProjection:
    """A seeded ``P × k`` random matrix (Rademacher ``±1/√k`` or Gaussian ``N(0, 1/k)``), so
    that ``⟨Rᵀa, Rᵀb⟩ ≈ ⟨a, b⟩``. It is generated in blocks of 4,096 rows, each from its own
    seeded generator, and held whole (one copy per process, shared) when it takes at most
    1 GiB; otherwise each product regenerates it block by block (memory ``O(4096 · k)``)."""

    def __init__(self, num_params: int, dim: int, kind: str, seed: int,
                 dtype: torch.dtype = torch.float32):
        self.num_params, self.dim, self.kind, self.seed = num_params, dim, kind, seed
        self.dtype = dtype
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.cached = num_params * dim * itemsize <= _CACHE_BYTES

    def block(self, b: int) -> torch.Tensor:
        """Rows ``4096·b ≤ i < 4096·(b+1)`` of the matrix."""
        rows = min(_BLOCK_ROWS, self.num_params - b * _BLOCK_ROWS)
        key = hashlib.sha256(f"influencekit-projection:{self.seed}:{b}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)
        scale = 1.0 / math.sqrt(self.dim)
        if self.kind == "gaussian":
            return torch.randn(rows, self.dim, generator=gen, dtype=self.dtype).mul_(scale)
        m = torch.empty(rows, self.dim, dtype=self.dtype).bernoulli_(0.5, generator=gen)
        return m.mul_(2 * scale).sub_(scale)

    def blocks(self) -> Iterator[tuple[slice, torch.Tensor]]:
        for b in range(math.ceil(self.num_params / _BLOCK_ROWS)):
            start = b * _BLOCK_ROWS
            yield slice(start, min(start + _BLOCK_ROWS, self.num_params)), self.block(b)

    def matrix(self) -> torch.Tensor:
        """The whole ``[P, k]`` matrix (for small models and tests)."""
        if self.cached:
            return _held_matrix(self.num_params, self.dim, self.kind, self.seed, self.dtype)
        return torch.cat([blk for _, blk in self.blocks()])

    def __call__(self, g: torch.Tensor) -> torch.Tensor:
        """``g [B, P] ↦ g R [B, k]``."""
        if self.cached:
            return g @ self.matrix().to(g)
        out = torch.zeros(g.shape[0], self.dim, dtype=g.dtype, device=g.device)
        for rows, blk in self.blocks():
            out += g[:, rows] @ blk.to(g)
        return out


# --------------------------------------------------------------------------- shared base
class CheckpointEstimator(Estimator):
    """An estimator evaluated at several parameter states (checkpoints or models), each
    loaded into a private copy of the task's model, with optional random projections."""

    def __init__(self, task: Task, *, checkpoints: Any = None, projection_dim: int | None,
                 projection: str = "rademacher", seed: int = 0, **kw: Any):
        super().__init__(task, **kw)
        self.projection = choice("projection", projection, PROJECTIONS)
        self.projection_dim = optional_positive_int("projection_dim", projection_dim)
        self.seed = integer("seed", seed, minimum=0)
        self._states, self._ckpt_weights = resolve_checkpoints(task, checkpoints)
        self._projector: RandomProjection | None = None
        self._work: Task | None = None
        self._loaded: int | None = None
        self._fp_cache: str | None = None

    @property
    def num_states(self) -> int:
        return 1 if self._states is None else len(self._states)

    def projector(self) -> RandomProjection | None:
        """The random projection (``None`` without one)."""
        if self.projection_dim is None or self.projection == "none":
            return None
        if self._projector is None:
            self._projector = RandomProjection(self.task.num_params, self.projection_dim,
                                               self.projection, self.seed, self.task.dtype)
        return self._projector

    def _project(self, g: torch.Tensor) -> torch.Tensor:
        """``g R`` (a new tensor: ``g`` may be the reused gradient buffer)."""
        proj = self.projector()
        return g.clone() if proj is None else proj(g)

    def task_at(self, i: int) -> Task:
        """The task evaluated at state ``i`` (a private model copy; the user's is untouched)."""
        if self._states is None:
            return self.task
        if self._work is None:
            self._work = copy.copy(self.task)
            self._work.model = copy.deepcopy(self.task.model)
        if self._loaded != i:
            own = self._work.model.state_dict()
            with torch.no_grad():
                for k, v in self._states[i].items():
                    own[k].copy_(v)
            self._loaded = i
        return self._work

    def _states_fingerprint(self) -> str:
        if self._fp_cache is None:
            if self._states is None:
                self._fp_cache = "task-model"
            else:
                self._fp_cache = tensor_fingerprint(*[v for s in self._states
                                                      for _, v in sorted(s.items())])
        return self._fp_cache

    def _feature_upstream(self) -> dict[str, str]:
        return {"checkpoints": self._states_fingerprint()}

    def _base_settings(self) -> dict[str, Any]:
        return {"projection": self.projection, "projection_dim": self.projection_dim,
                "seed": self.seed, "projection_version": _PROJECTION_VERSION,
                "states": self.num_states, "params": self.task.param_names,
                "dtype": str(self.task.dtype)}


# --------------------------------------------------------------------------- TracIn
class TracIn(CheckpointEstimator):
    """TracInCP: ``score(q, x) = Σ_t η_t ⟨∇m(q, θ_t), ∇ℓ(x, θ_t)⟩`` over saved checkpoints.

    Same sign as every estimator (positive = proponent). Without a projection, training
    gradients are streamed per checkpoint (nothing stored; memory
    ``O(query_chunk × P + batch_size × P)``). With ``projection_dim=k``, each example's
    gradients at every checkpoint are projected by one seeded random matrix ``R`` and the
    training projections are stored at ``fit`` (``store=`` makes them resumable), so
    ``score ≈ Σ_t η_t ⟨Rᵀ∇m(q, θ_t), Rᵀ∇ℓ(x, θ_t)⟩`` (unbiased).

    Args:
        checkpoints: a list of checkpoints (``nn.Module``, ``state_dict`` — partial ones take
            the rest from the task's model —, a trainer state or a trainer checkpoint folder),
            or a :class:`Checkpoints` (from a training run; brings its learning rates).
            ``None``: the task's model alone with ``η = 1`` (then TracIn equals GradDot; this
            is what ``influencekit evaluate`` runs).
        learning_rates: ``η_t`` per checkpoint (default 1 each; not with a
            :class:`Checkpoints`, which brings its own).
        projection_dim: ``k`` for random projections (``None``: exact gradients).
        projection: ``"rademacher"`` (default) or ``"gaussian"``; seed: seeds it.
        damping: accepted for a uniform interface, unused (TracIn has no curvature).
        batch_size, query_chunk, chunk_size, store, overwrite, progress: as for every
            estimator.

    One line from a training run: ``TracIn.from_trainer(task, ckpts)`` with ``ckpts`` a
    :meth:`collector` passed to the trainer as its callback, or a trainer's
    ``checkpoint_dir``.
    """

    name = "tracin"

    def __init__(self, task: Task, checkpoints: Any = None,
                 learning_rates: Sequence[float] | None = None, *,
                 projection_dim: int | None = None, projection: str = "rademacher",
                 seed: int = 0, **kw: Any):
        super().__init__(task, checkpoints=checkpoints, projection_dim=projection_dim,
                         projection=projection, seed=seed, **kw)
        if self.projection == "none" and projection_dim is not None:
            raise InputError("projection_dim is given but projection='none'; drop one.")
        n = self.num_states
        if learning_rates is not None and self._ckpt_weights is not None:
            raise InputError("learning_rates: the Checkpoints bring their own learning rates; "
                             "drop learning_rates= (or pass checkpoints.states).")
        if learning_rates is None:
            rates = self._ckpt_weights or [1.0] * n
        else:
            if isinstance(learning_rates, (int, float)) and n == 1:
                learning_rates = [learning_rates]
            if not isinstance(learning_rates, Sequence) or len(learning_rates) != n:
                raise InputError(f"learning_rates must give one number per checkpoint ({n}), "
                                 f"got {learning_rates!r}.")
            rates = [number(f"learning_rates[{i}]", r) for i, r in enumerate(learning_rates)]
        self.learning_rates = [float(r) for r in rates]
        self.needs_fit = self.stores_features()

    @staticmethod
    def collector(every: int = 1, unit: str = "epoch") -> Checkpoints:
        """A trainer callback that keeps checkpoints and their learning rates."""
        return Checkpoints(every, unit)

    @classmethod
    def from_trainer(cls, task: Task, source: Checkpoints | str | os.PathLike,
                     **options: Any) -> TracIn:
        """TracIn over the checkpoints of one training run: a :meth:`collector` used as the
        run's callback, or the folder a :class:`~influencekit.training.Trainer` wrote with
        ``checkpoint_dir=``."""
        if not isinstance(source, Checkpoints):
            if not isinstance(source, (str, os.PathLike)):
                raise InputError(f"source must be a TracIn.collector() or a checkpoint_dir, "
                                 f"got {type(source).__name__}.")
            source = Checkpoints.load(source)
        return cls(task, checkpoints=source, **options)

    def settings(self) -> dict[str, Any]:
        return {"method": "tracin", **self._base_settings()}

    # ----------------------------------------------------------------- stored projections
    def stores_features(self) -> bool:
        return self.projector() is not None

    def features(self, batch: Batch, kind: str) -> Features:
        """``g{t}``: projected gradients at checkpoint ``t`` ([B, k] each)."""
        return {f"g{t}": self._project(self._grads(batch, kind, task=self.task_at(t)))
                for t in range(self.num_states)}

    def score_features(self, q: Features, t: Features) -> torch.Tensor:
        s = None
        for i, lr in enumerate(self.learning_rates):
            part = lr * (q[f"g{i}"].to(torch.float64).cpu() @ t[f"g{i}"].to(torch.float64).T)
            s = part if s is None else s + part
        return s

    def self_score_features(self, t: Features) -> torch.Tensor:
        return sum(lr * (t[f"g{i}"].to(torch.float64) ** 2).sum(1)
                   for i, lr in enumerate(self.learning_rates))

    def _feature_bytes(self) -> int:
        return 8 * (self.projection_dim or self.task.num_params) * self.num_states

    # ----------------------------------------------------------------- gradient space
    def scores(self, queries: Data, train: Data | None = None) -> torch.Tensor:
        if self.stores_features():
            return super().scores(queries, train)
        train = self._resolve_train(train)
        check_compatible(queries, train)
        total: torch.Tensor | None = None
        for i, lr in enumerate(self.learning_rates):
            task = self.task_at(i)
            rows = []
            for g in self._query_chunks(
                    queries, lambda b, task=task: per_example_grads(task, b, "measurement"),
                    8 * task.num_params):
                rows.append(self._stream(task, g.to(torch.float64), train))
            part = lr * torch.cat(rows, 0)
            total = part if total is None else total + part
        return total.to(self._out_dtype())

    def _stream(self, task: Task, q: torch.Tensor, train: Data) -> torch.Tensor:
        return torch.cat([(q @ g.to(torch.float64).T).cpu()
                          for g in iter_grads(task, train, self.batch_size, "loss",
                                              desc="train gradients", progress=self.progress,
                                              reuse=True)],
                         1)

    def self_influence(self, train: Data | None = None) -> torch.Tensor:
        """``Σ_t η_t ‖∇ℓ(x, θ_t)‖²`` (projected when ``projection_dim`` is set)."""
        if self.stores_features():
            return super().self_influence(train)
        train = self._resolve_train(train)
        total: torch.Tensor | None = None
        for i, lr in enumerate(self.learning_rates):
            part = lr * torch.cat([(g.to(torch.float64) ** 2).sum(1).cpu() for g in iter_grads(
                self.task_at(i), train, self.batch_size, "loss", desc="self-influence",
                progress=self.progress, reuse=True)])
            total = part if total is None else total + part
        return total.to(self._out_dtype())

    def __repr__(self) -> str:
        proj = f", projection_dim={self.projection_dim}" if self.stores_features() else ""
        return f"TracIn(checkpoints={self.num_states}{proj}, P={self.task.num_params})"
