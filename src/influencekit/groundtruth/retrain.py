"""Retraining ground truth: leave-one-out (warm-started and from scratch) and LDS subsets.

Each retrained run is cached on the artifact store under a hash of everything that determines
it (the model's architecture, code and initialisation, the data, the task that measures, the
configuration, removed examples, queries), one artifact per run written atomically, so an
interrupted computation resumes where it stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from ..batching import Batch, batch_size_of, iter_batches, slice_batch, to_device
from ..errors import InputError
from ..progress import progress_bar
from ..store import architecture_fingerprint, data_fingerprint, hash_value, model_fingerprint
from ..task import ClassificationTask, Task
from ..training import ModelSpec, TrainConfig, init_model, train
from .cache import Cache


def measure(task: Task, queries: Batch, batch_size: int = 512) -> torch.Tensor:
    """Per-query measurement ``m(q)`` of the task's model at its current parameters, ``[Q]``."""
    out = []
    with torch.no_grad(), task.evaluating():
        theta = task.theta()
        for batch in iter_batches(queries, batch_size):
            out.append(task.measurements(theta, to_device(batch, task.device)).double().cpu())
    return torch.cat(out)


class Retrainer:
    """Retrains one reference setup under perturbations, with results cached on disk.

    Args:
        model: a builder (from-scratch runs use ``config.init_seed``) or a module.
        train: the training data ``(inputs, labels)``; config: the reference training.
        make_task: model -> :class:`~influencekit.Task` giving the measurement
            (default :class:`~influencekit.ClassificationTask`: the query's loss).
        cache: where runs are cached (``Cache(None)``: nowhere).
    """

    def __init__(self, model: ModelSpec, train: Batch, config: TrainConfig, *,
                 make_task: Callable[[nn.Module], Task] = ClassificationTask,
                 cache: Cache | None = None, progress: bool | None = None):
        self.model = model
        self.train = train
        self.n = batch_size_of(train)
        self.config = config
        self.make_task = make_task
        self.cache = cache or Cache(None)
        self.progress = progress
        init = init_model(model, config.init_seed)
        self._base_key = hash_value(_model_key(init), data_fingerprint(train), make_task)

    def key(self, *parts: object) -> str:
        """A cache key for results derived from this setup and ``parts``."""
        return hash_value(self._base_key, *parts)

    def fit(self, *, remove: Sequence[int] | None = None, init: nn.Module | None = None,
            config: TrainConfig | None = None) -> nn.Module:
        """The model trained with ``remove``d examples (slots kept), from ``init`` (a warm
        start) or from scratch. Cached."""
        cfg = config or self.config
        start = self.model if init is None else init
        key = self.key("fit", asdict(cfg), sorted(remove or []), _model_key(init))
        net = init_model(start, cfg.init_seed)
        state = self.cache.get_or_compute(
            "models", key,
            lambda: train(start, self.train, cfg, remove=remove, progress=False
                          ).model.state_dict())
        net.load_state_dict(state)
        return net.eval()

    def measured(self, queries: Batch, *, remove: Sequence[int] | None = None,
                 init: nn.Module | None = None, config: TrainConfig | None = None,
                 subset: torch.Tensor | None = None) -> torch.Tensor:
        """``m(q)`` after retraining (on ``subset`` of the data when given). Cached."""
        cfg = config or self.config
        key = self.key("measure", asdict(cfg), sorted(remove or []), _model_key(init),
                        queries, [] if subset is None else subset)

        def run() -> torch.Tensor:
            start = self.model if init is None else init
            data = self.train if subset is None else slice_batch(self.train, subset)
            net = train(start, data, cfg, remove=remove, progress=False).model
            return measure(self.make_task(net), queries)

        return self.cache.get_or_compute("measurements", key, run)


def _model_key(model: nn.Module | None) -> str:
    """The architecture (and code) and the values of a model: what a run starts from."""
    if model is None:
        return ""
    return architecture_fingerprint(model) + model_fingerprint(model)


@dataclass
class LOOResult:
    """Leave-one-out retraining: ``values[k, q]`` is ``m(q)`` with ``removed[k]`` left out."""

    removed: torch.Tensor  # [K]
    base: torch.Tensor  # [Q]   the same training without removal
    values: torch.Tensor  # [K, Q]
    mode: str

    @property
    def delta(self) -> torch.Tensor:
        """``m_{−k}(q) − m(q)``, ``[K, Q]``: positive when removing ``k`` hurts ``q``."""
        return self.values - self.base


def leave_one_out(rt: Retrainer, removed: Sequence[int], queries: Batch, *,
                  warm_start: nn.Module | None = None, warm_config: TrainConfig | None = None
                  ) -> LOOResult:
    """Retrain without each example of ``removed``.

    From scratch (default): the reference training with the example's slots skipped; the base
    is the reference run itself. Warm-started (``warm_start=θ*``): continue from ``θ*`` with
    ``warm_config`` with and without the example; the base is the continued full run, so the
    difference isolates the example (the extra training cancels).
    """
    if warm_start is not None and warm_config is None:
        raise InputError("a warm-started leave-one-out needs warm_config (its training).")
    removed = [int(i) for i in removed]
    if any(not 0 <= i < rt.n for i in removed):
        raise InputError(f"removed indices must lie in [0, {rt.n}).")
    kw = {"init": warm_start, "config": warm_config}
    mode = "scratch" if warm_start is None else "warm"
    base = rt.measured(queries, **kw)
    values = [rt.measured(queries, remove=[i], **kw)
              for i in progress_bar(removed, desc=f"leave-one-out ({mode})", leave=False,
                            progress=rt.progress)]
    return LOOResult(torch.tensor(removed), base, torch.stack(values), mode)


@dataclass
class LDSResult:
    """``values[m, q]``: ``m(q)`` after training on subset ``m`` (``subsets[m]`` membership)."""

    subsets: torch.Tensor  # [M, N] bool
    values: torch.Tensor  # [M, Q]


def random_subsets(n: int, count: int, alpha: float, seed: int = 0) -> torch.Tensor:
    """``count`` random subsets of ``round(alpha · n)`` examples, as a ``[count, n]`` mask."""
    if not 0 < alpha < 1:
        raise InputError(f"alpha must lie in (0, 1), got {alpha}.")
    gen = torch.Generator().manual_seed(seed)
    k = max(1, int(round(alpha * n)))
    masks = torch.zeros(count, n, dtype=torch.bool)
    for m in range(count):
        masks[m, torch.randperm(n, generator=gen)[:k]] = True
    return masks


def lds_retrain(rt: Retrainer, queries: Batch, *, n_subsets: int = 50, alpha: float = 0.5,
                seed: int = 0, config: TrainConfig | None = None) -> LDSResult:
    """Train on ``n_subsets`` random ``alpha``-subsets (each as its own data set, with the
    reference initialisation, order seed and epochs) and measure the queries."""
    subsets = random_subsets(rt.n, n_subsets, alpha, seed)
    values = [rt.measured(queries, subset=mask.nonzero().squeeze(1), config=config)
              for mask in progress_bar(subsets, desc="LDS retraining", leave=False,
                               progress=rt.progress)]
    return LDSResult(subsets, torch.stack(values))


def with_epochs(config: TrainConfig, epochs: int, lr: float | None = None) -> TrainConfig:
    """A copy of ``config`` with other epochs (and learning rate)."""
    return replace(config, epochs=epochs, lr=config.lr if lr is None else lr)
