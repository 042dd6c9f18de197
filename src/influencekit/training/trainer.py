"""The deterministic, steppable trainer behind the ground truth, training dynamics and corrections.

Determinism: the initialisation is seeded (``config.init_seed``), the data order of epoch ``e``
is a permutation drawn from ``config.seed`` and ``e`` alone, dropout draws from the trainer's own
RNG state (seeded from ``config.seed``, swapped in for each step and saved after it, so the global
RNG is never touched and a resumed run continues the same stream), and
``torch.use_deterministic_algorithms(True)`` is on while training. Two runs with the same
arguments produce bit-identical parameters (on the same machine and thread count), however they
are split into :meth:`Trainer.run` calls, checkpoints or ``state_dict`` round trips.

Example weights and removal: a batch's loss is ``Σ_i w_i ℓ_i / |slots|``, where ``|slots|`` counts
every example the schedule placed in the batch. Removing an example sets its weight to 0: its
slot is skipped (it is not even forwarded, which matters for batch norm), and every other example
stays in the same batch at the same step with the same factor. So removing ``x`` is exactly the
objective perturbation ``ε = −1`` on ``x``'s per-slot term, as influence functions model it.

Weight decay is an L2 term ``(wd/2)‖θ‖²`` (added to the gradient), so the curvature of the
trained objective is ``H + wd·I``: pass ``damping=wd`` to the estimators.

Steps are numbered from 0: step ``t`` takes the trainer from ``t`` to ``t + 1`` steps done;
:meth:`Trainer.plan` gives its slots, the examples it uses and its learning rate ``η_t`` (for
TracIn and trajectory-aware influence), without running anything.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import validate
from ..batching import Batch, batch_size_of, slice_batch, to_device
from ..errors import ArtifactError, InputError, NumericalError
from ..progress import progress_bar
from ..store import ArtifactStore, StaleArtifactError, fingerprint, hash_value, tensor_fingerprint
from ..task import cross_entropy, default_forward
from .config import TrainConfig, batch_schedule

LossFn = Callable[[Any, Batch], torch.Tensor]
ForwardFn = Callable[[Callable[..., Any], Batch], Any]
ModelSpec = nn.Module | Callable[[], nn.Module]
DROPOUT_SEED_OFFSET = 7919  # the dropout RNG is seeded with config.seed + this


@dataclass(frozen=True)
class PlannedStep:
    """What step ``index`` (0-based) does, known before it runs."""

    index: int
    epoch: int
    slots: torch.Tensor  # example indices scheduled in this batch (removed ones included)
    used: torch.Tensor  # the indices actually forwarded (weight ≠ 0)
    lr: float  # the learning rate η_t of this step


@dataclass
class StepInfo:
    """What a callback sees after each optimizer step."""

    step: int  # steps done, this one included (so the step's index is step - 1)
    epoch: int
    slots: torch.Tensor
    used: torch.Tensor
    loss: float  # the batch objective Σ w_i ℓ_i / |slots| before the step
    model: nn.Module  # the live model (in train mode)
    lr: float = 0.0


@dataclass
class TrainResult:
    model: nn.Module
    epoch_losses: list[float] = field(default_factory=list)
    steps: int = 0


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """Deterministic kernels for the duration (the previous setting is restored)."""
    was = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


def example_weights(n: int, weights: torch.Tensor | None = None,
                    remove: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
    """Per-example weights: ``weights`` (default 1) with the ``remove``d examples set to 0."""
    w = torch.ones(n) if weights is None else torch.as_tensor(weights, dtype=torch.float32).clone()
    if w.shape != (n,):
        raise InputError(f"weights must have shape [{n}] (one per training example), got "
                         f"{tuple(w.shape)}.")
    if not torch.isfinite(w).all():
        raise InputError("weights hold NaN/inf; give finite per-example weights.")
    if remove is not None:
        idx = torch.as_tensor(remove)
        if idx.dtype == torch.bool or idx.is_floating_point() or idx.is_complex():
            raise InputError(f"remove takes example indices (integers), got {idx.dtype}; for a "
                             "boolean mask pass mask.nonzero().squeeze(1).")
        idx = idx.long().reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            raise InputError(f"remove holds indices outside [0, {n}).")
        w[idx] = 0.0
    return w


def init_model(model: ModelSpec, init_seed: int) -> nn.Module:
    """A fresh copy: a module is deep-copied; a builder is called under a seeded private RNG."""
    if isinstance(model, nn.Module):
        return copy.deepcopy(model)
    if not callable(model):
        raise InputError(f"model must be an nn.Module or a builder () -> nn.Module, got "
                         f"{type(model).__name__}.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        built = model()
    if not isinstance(built, nn.Module):
        raise InputError(f"the model builder returned {type(built).__name__}, not an nn.Module.")
    return built


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InputError("the model has no trainable parameters (requires_grad=True).")
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)


def _seeded_rng(seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The RNG states that ``torch.manual_seed(seed)`` would give (CPU, and CUDA on a GPU)."""
    state = {"cpu": torch.Generator().manual_seed(seed).get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.Generator(device=device).manual_seed(seed).get_state()
    return state


class Trainer:
    """Deterministic training that can be stepped, inspected, saved and resumed.

    Args:
        model: a module (deep-copied: the original is never modified; a warm start) or a builder
            called under ``config.init_seed``.
        data: the training data ``(inputs, labels, ...)`` as tensors in memory.
        config: the hyper-parameters (default ``TrainConfig()``).
        weights: per-example weights ``[N]``; remove: examples whose slots are skipped.
        task: an influencekit ``Task`` whose ``loss_fn`` and ``forward_fn`` are used (its model
            is not trained: pass it as ``model``); or give them as ``loss``
            (``(outputs, batch) -> [B]``, default cross-entropy) and ``forward``
            (``(model, batch) -> outputs``, default ``model(batch[0])``).
        checkpoint_dir: keep checkpoints there (on the artifact store, atomically) every
            ``checkpoint_every`` epochs and at the end, and resume from the latest one when
            constructed again with the same arguments; checkpoints of another run are refused.
        progress: show a progress bar (``None``: on a terminal only).

    Typical use::

        trainer = Trainer(builder, (x, y), TrainConfig(epochs=10))
        trainer.run(steps=5)              # five optimizer steps
        theta = trainer.parameters()      # read (or set_parameters) between steps
        trainer.run()                     # to the end of config.epochs
    """

    def __init__(self, model: ModelSpec, data: Batch, config: TrainConfig | None = None, *,
                 weights: torch.Tensor | None = None,
                 remove: Sequence[int] | torch.Tensor | None = None, task: Any = None,
                 loss: LossFn | None = None, forward: ForwardFn | None = None,
                 checkpoint_dir: str | os.PathLike[str] | None = None, checkpoint_every: int = 1,
                 progress: bool | None = None):
        config = TrainConfig() if config is None else config
        if not isinstance(config, TrainConfig):
            raise InputError(f"config must be a TrainConfig, got {type(config).__name__}.")
        if task is not None and (loss is not None or forward is not None):
            raise InputError("give the loss and forward either as task= or as loss=/forward=, "
                             "not both.")
        if not isinstance(data, (tuple, list)):
            raise InputError("the trainer takes the training data as (inputs, labels, ...) "
                             f"tensors in memory, got {type(data).__name__}.")
        self.config = config
        self.loss_fn: LossFn = task.loss_fn if task is not None else loss or cross_entropy
        self.forward_fn: ForwardFn = (task.forward_fn if task is not None
                                      else forward or default_forward)
        self.data: Batch = tuple(data)
        self.n = batch_size_of(self.data)
        if self.n == 0:
            raise InputError("the training data is empty; give at least one example.")
        self.weights = example_weights(self.n, weights, remove)
        self.checkpoint_every = validate.positive_int("checkpoint_every", checkpoint_every)
        self.progress = progress
        self.model = init_model(model, config.init_seed)
        self.optimizer = _optimizer(self.model, config)
        self.device = next(p for p in self.model.parameters() if p.requires_grad).device
        self.steps_per_epoch = math.ceil(self.n / config.batch_size)
        self.total_steps = config.epochs * self.steps_per_epoch
        self._step = 0
        self._losses: list[float] = []
        self._epoch_sum = 0.0  # Σ (batch objective · |slots|) over the current epoch so far
        self._rng = _seeded_rng(config.seed + DROPOUT_SEED_OFFSET, self.device)
        self._order: tuple[int, list[torch.Tensor]] | None = None
        self._zero_grads()
        self.model.eval()
        self._store: ArtifactStore | None = None
        if checkpoint_dir is not None:
            self._store = ArtifactStore(checkpoint_dir)
            self._fingerprint = fingerprint(
                model=self.model, data=self.data, settings=asdict(config),
                weights=tensor_fingerprint(self.weights),
                loss=hash_value(self.loss_fn, self.forward_fn))
            self._resume()

    # ------------------------------------------------------------------ progress
    @property
    def step(self) -> int:
        """Optimizer steps done."""
        return self._step

    @property
    def epoch(self) -> int:
        """The epoch the next step belongs to (``config.epochs`` when done)."""
        return self._step // self.steps_per_epoch

    @property
    def done(self) -> bool:
        return self._step >= self.total_steps

    @property
    def epoch_losses(self) -> list[float]:
        """The mean training objective of each finished epoch."""
        return list(self._losses)

    def result(self) -> TrainResult:
        return TrainResult(self.model, list(self._losses), self._step)

    # ------------------------------------------------------------------ schedule
    def plan(self, index: int) -> PlannedStep:
        """Step ``index`` (0-based) of the schedule: its slots, used examples and η_t."""
        index = validate.integer("index", index, minimum=0)
        if index >= self.total_steps:
            raise InputError(f"step index {index} is past the schedule ({self.total_steps} "
                             "steps).")
        return self._plan(index)

    def _plan(self, index: int) -> PlannedStep:
        epoch, b = divmod(index, self.steps_per_epoch)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, batch_schedule(self.n, self.config.batch_size,
                                                 self.config.seed, epoch))
        slots = self._order[1][b]
        return PlannedStep(index, epoch, slots, slots[self.weights[slots] != 0],
                           self.config.lr_at(epoch))

    def schedule(self, start: int = 0, stop: int | None = None) -> Iterator[PlannedStep]:
        """The planned steps ``start ≤ t < stop`` (default: all), replaying the exact schedule."""
        stop = self.total_steps if stop is None else min(stop, self.total_steps)
        for t in range(start, stop):
            yield self.plan(t)

    def slots(self, index: int) -> torch.Tensor:
        """The example indices scheduled in step ``index`` (removed ones included)."""
        return self.plan(index).slots

    def lr_at_step(self, index: int) -> float:
        """The learning rate η_t of step ``index``."""
        return self.config.lr_at(validate.integer("index", index, minimum=0)
                                 // self.steps_per_epoch)

    # ------------------------------------------------------------------ running
    def run(self, steps: int | None = None,
            callback: Callable[[StepInfo], None] | None = None) -> Trainer:
        """Run ``steps`` more optimizer steps (``None``: to the end of ``config.epochs``),
        calling ``callback`` with a :class:`StepInfo` after each. Returns the trainer."""
        stop = self.total_steps if steps is None else min(
            self._step + validate.integer("steps", steps, minimum=0), self.total_steps)
        if self._step >= stop:
            return self
        bar = progress_bar(total=self.config.epochs, initial=self.epoch, desc="train",
                           unit="epoch", progress=self.progress)
        with deterministic(), bar:
            self.model.train()
            try:
                while self._step < stop:
                    with self._own_rng():
                        info = self._take_step()
                    if callback is not None:
                        callback(info)
                    if self._step % self.steps_per_epoch == 0:
                        self._losses.append(self._epoch_sum / self.n)
                        self._epoch_sum = 0.0
                        bar.update(1)
                        self._maybe_checkpoint()
            finally:
                self.model.eval()
        return self

    def _take_step(self) -> StepInfo:
        plan = self._plan(self._step)
        for group in self.optimizer.param_groups:
            group["lr"] = plan.lr
        self.optimizer.zero_grad(set_to_none=False)
        value = 0.0
        if len(plan.used):
            batch = to_device(slice_batch(self.data, plan.used), self.device)
            per_example = self.loss_fn(self.forward_fn(self.model, batch), batch)
            if not isinstance(per_example, torch.Tensor) or per_example.shape != plan.used.shape:
                shape = getattr(per_example, "shape", type(per_example).__name__)
                raise InputError(
                    f"the loss must return one value per example (shape [{len(plan.used)}]), "
                    f"got {shape}. Return unreduced values, e.g. reduction='none'.")
            objective = (self.weights[plan.used].to(per_example) * per_example).sum() / len(
                plan.slots)
            objective.backward()
            value = objective.item()
            if not math.isfinite(value):
                raise NumericalError(
                    f"training loss became {value} at epoch {plan.epoch}, step {plan.index}: "
                    "lower the learning rate or check the data for NaN/inf.")
        self.optimizer.step()
        self._step += 1
        self._epoch_sum += value * len(plan.slots)
        return StepInfo(self._step, plan.epoch, plan.slots, plan.used, value, self.model,
                        plan.lr)

    @contextlib.contextmanager
    def _own_rng(self) -> Iterator[None]:
        """The trainer's RNG state in place of the global one for the duration."""
        cuda = "cuda" in self._rng
        with torch.random.fork_rng(devices=[self.device] if cuda else []):
            torch.set_rng_state(self._rng["cpu"])
            if cuda:
                torch.cuda.set_rng_state(self._rng["cuda"], self.device)
            try:
                yield
            finally:
                self._rng = {"cpu": torch.get_rng_state()}
                if cuda:
                    self._rng["cuda"] = torch.cuda.get_rng_state(self.device)

    def _zero_grads(self) -> None:
        # zero (not missing) grads: a step with every slot removed still applies momentum and
        # weight decay to every parameter
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)

    # ------------------------------------------------------------------ state
    def parameters(self) -> dict[str, torch.Tensor]:
        """A copy of the model's parameters by name."""
        return {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def set_parameters(self, values: Mapping[str, torch.Tensor]) -> None:
        """Overwrite parameters by name (others stay). The trainer then no longer follows its
        arguments, so it stops writing checkpoints."""
        named = dict(self.model.named_parameters())
        unknown = sorted(set(values) - set(named))
        if unknown:
            raise InputError(f"set_parameters: no parameters named {unknown[:5]}; known: "
                             f"{list(named)[:8]}...")
        with torch.no_grad():
            for name, v in values.items():
                if tuple(v.shape) != tuple(named[name].shape):
                    raise InputError(f"set_parameters: {name} has shape "
                                     f"{tuple(named[name].shape)}, got {tuple(v.shape)}.")
                named[name].copy_(v)
        self._store = None

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-identically: parameters and buffers, optimizer
        state, steps done, epoch losses and the dropout RNG state (copies)."""
        return {
            "step": self._step,
            "epoch_losses": list(self._losses),
            "epoch_sum": self._epoch_sum,
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "rng": {k: v.clone() for k, v in self._rng.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`state_dict`, possibly of another trainer with the
        same arguments). The trainer then stops writing checkpoints (see :meth:`set_parameters`)."""
        self._load(state)
        self._store = None

    def _load(self, state: Mapping[str, Any]) -> None:
        missing = {"step", "epoch_losses", "epoch_sum", "model", "optimizer", "rng"} - set(state)
        if missing:
            raise InputError(f"not a trainer state: it lacks {sorted(missing)}.")
        step = validate.integer("state['step']", state["step"], minimum=0)
        if step > self.total_steps or len(state["epoch_losses"]) != step // self.steps_per_epoch:
            raise InputError(f"the state is at step {step} with {len(state['epoch_losses'])} "
                             f"epoch losses, which does not fit this trainer's schedule "
                             f"({self.total_steps} steps, {self.steps_per_epoch} per epoch).")
        rng = {k: torch.as_tensor(v, dtype=torch.uint8).clone() for k, v in state["rng"].items()}
        if "cpu" not in rng or (self.device.type == "cuda") != ("cuda" in rng):
            raise InputError(f"the state's RNG ({sorted(rng)}) does not fit a model on "
                             f"{self.device}.")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))  # own, not shared
        self._step = step
        self._losses = [float(x) for x in state["epoch_losses"]]
        self._epoch_sum = float(state["epoch_sum"])
        self._rng = rng
        self._zero_grads()

    # ------------------------------------------------------------------ checkpoints
    def _maybe_checkpoint(self) -> None:
        epoch = self._step // self.steps_per_epoch
        if self._store is not None and (epoch % self.checkpoint_every == 0
                                        or epoch == self.config.epochs):
            art = self._store.open(f"epoch-{epoch:04d}", self._fingerprint,
                                   {"epoch": epoch, "step": self._step,
                                    "config": asdict(self.config)})
            art.save(self.state_dict(), epoch=epoch, step=self._step)

    def _resume(self) -> None:
        assert self._store is not None
        for name in reversed(self._store.names("epoch-")):
            try:
                art = self._store.open(name, self._fingerprint)
            except StaleArtifactError as e:
                raise ArtifactError(
                    f"the checkpoints in {self._store.root} belong to another run: their "
                    f"{' and '.join(e.changed)} fingerprint differs (other model, data, weights, "
                    "loss or config). Use another checkpoint_dir or delete that folder.") from e
            if art.complete:  # else killed while saving: an earlier one will do
                self._load(art.load())
                return


def train(
    model: ModelSpec,
    data: Batch,
    config: TrainConfig | None = None,
    *,
    weights: torch.Tensor | None = None,
    remove: Sequence[int] | torch.Tensor | None = None,
    task: Any = None,
    loss: LossFn | None = None,
    forward: ForwardFn | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 1,
    callback: Callable[[StepInfo], None] | None = None,
    progress: bool | None = None,
) -> TrainResult:
    """Train deterministically on ``data = (inputs, labels, ...)`` (tensors in memory): a
    :class:`Trainer` run to the end. The arguments are those of :class:`Trainer`;
    ``callback`` is called with a :class:`StepInfo` after every step."""
    trainer = Trainer(model, data, config, weights=weights, remove=remove, task=task, loss=loss,
                      forward=forward, checkpoint_dir=checkpoint_dir,
                      checkpoint_every=checkpoint_every, progress=progress)
    return trainer.run(callback=callback).result()
