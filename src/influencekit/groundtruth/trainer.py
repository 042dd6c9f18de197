"""A deterministic trainer shared by the ground truth, the twin runs and the corrections.

Determinism: the initialisation is seeded (``config.init_seed``), the data order of epoch ``e``
is a permutation drawn from ``config.seed`` and ``e`` alone, dropout draws from a seeded private
RNG, and ``torch.use_deterministic_algorithms(True)`` is on while training. Two runs with the
same arguments produce bit-identical parameters (on the same machine and thread count).

Example weights and removal: a batch's loss is ``Σ_i w_i ℓ_i / |slots|``, where ``|slots|`` counts
every example the schedule placed in the batch. Removing an example sets its weight to 0: its
slot is skipped (it is not even forwarded, which matters for batch norm), and every other example
stays in the same batch at the same step with the same factor. So removing ``x`` is exactly the
objective perturbation ``ε = −1`` on ``x``'s per-slot term, as influence functions model it.

Weight decay is an L2 term ``(wd/2)‖θ‖²`` (added to the gradient), so the curvature of the
trained objective is ``H + wd·I``: pass ``damping=wd`` to the estimators.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..batching import Batch, batch_size_of, slice_batch, to_device
from ..errors import ArtifactError, InputError, NumericalError
from ..progress import progress_bar
from ..task import cross_entropy, default_forward
from .cache import atomic_save, fingerprint, load

LossFn = Callable[[Any, Batch], torch.Tensor]
ModelSpec = nn.Module | Callable[[], nn.Module]


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters.

    Args:
        epochs: passes over the data. batch_size: slots per batch (the last may be smaller).
        lr: learning rate; schedule: ``"constant"`` or ``"cosine"`` (per epoch, to 0).
        optimizer: ``"sgd"`` (with ``momentum``) or ``"adam"``.
        weight_decay: L2 coefficient (use it as the estimators' damping).
        seed: data order and dropout. init_seed: initialisation when a builder is given.
    """

    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "constant"
    seed: int = 0
    init_seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or self.lr < 0:
            raise InputError("TrainConfig needs epochs ≥ 0, batch_size ≥ 1 and lr ≥ 0.")
        if self.optimizer not in ("sgd", "adam"):
            raise InputError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}.")
        if self.schedule not in ("constant", "cosine"):
            raise InputError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}.")

    def lr_at(self, epoch: int) -> float:
        if self.schedule == "cosine" and self.epochs > 0:
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / self.epochs))
        return self.lr


@dataclass
class StepInfo:
    """What a callback sees after each optimizer step."""

    step: int
    epoch: int
    slots: torch.Tensor  # example indices scheduled in this batch (removed ones included)
    used: torch.Tensor  # the indices actually forwarded (weight ≠ 0)
    loss: float
    model: nn.Module


@dataclass
class TrainResult:
    model: nn.Module
    epoch_losses: list[float] = field(default_factory=list)
    steps: int = 0


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of ``epoch``: depends on ``(seed, epoch, n)`` only."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen)


def batch_schedule(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """The slots (example indices) of each batch of ``epoch``."""
    return list(epoch_order(n, seed, epoch).split(batch_size))


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
    if remove is not None:
        idx = torch.as_tensor(remove, dtype=torch.long).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            raise InputError(f"remove holds indices outside [0, {n}).")
        w[idx] = 0.0
    return w


def init_model(model: ModelSpec, init_seed: int) -> nn.Module:
    """A fresh copy: a module is deep-copied; a builder is called under a seeded private RNG."""
    if isinstance(model, nn.Module):
        return copy.deepcopy(model)
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


def train(
    model: ModelSpec,
    data: Batch,
    config: TrainConfig = TrainConfig(),
    *,
    weights: torch.Tensor | None = None,
    remove: Sequence[int] | torch.Tensor | None = None,
    loss: LossFn = cross_entropy,
    forward: Callable[[Callable[..., Any], Batch], Any] = default_forward,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 1,
    callback: Callable[[StepInfo], None] | None = None,
    progress: bool | None = None,
) -> TrainResult:
    """Train deterministically on ``data = (inputs, labels, ...)`` (tensors in memory).

    Args:
        model: a module (deep-copied, the original is left alone: warm starts) or a builder
            called with ``config.init_seed``.
        weights: per-example weights ``[N]``; remove: examples whose slots are skipped.
        loss: per-example loss ``(outputs, batch) -> [B]``; forward: ``(model, batch) -> outputs``.
        checkpoint_dir: save ``epoch-XXXX.pt`` every ``checkpoint_every`` epochs (atomically)
            and resume from the latest one there when rerun with the same arguments.
        callback: called with a :class:`StepInfo` after every step.
    """
    n = batch_size_of(data)
    if n == 0:
        raise InputError("the training data is empty; give at least one example.")
    w = example_weights(n, weights, remove)
    net = init_model(model, config.init_seed)
    device = next(net.parameters()).device
    opt = _optimizer(net, config)
    for group in opt.param_groups:  # zero (not missing) grads: a step with every slot removed
        for p in group["params"]:  # still applies momentum and weight decay
            p.grad = torch.zeros_like(p)
    start_epoch, step, result, key = 0, 0, TrainResult(net), ""
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None:
        key = fingerprint(asdict(config), w, data, list(net.state_dict().values()))
        start_epoch, step = _resume(ckpt, key, net, opt, result)
    bar = progress_bar(total=config.epochs, initial=start_epoch, desc="train", unit="epoch",
               leave=False, progress=progress)
    with deterministic(), torch.random.fork_rng(devices=[]), bar:
        torch.manual_seed(config.seed + 7919)  # dropout and other in-model randomness
        net.train()
        for epoch in range(start_epoch, config.epochs):
            for group in opt.param_groups:
                group["lr"] = config.lr_at(epoch)
            total = 0.0
            for slots in batch_schedule(n, config.batch_size, config.seed, epoch):
                used = slots[w[slots] != 0]
                opt.zero_grad(set_to_none=False)
                value = 0.0
                if len(used):
                    batch = to_device(slice_batch(data, used), device)
                    per_example = loss(forward(net, batch), batch)
                    objective = (w[used].to(per_example) * per_example).sum() / len(slots)
                    objective.backward()
                    value = objective.item()
                    if not math.isfinite(value):
                        raise NumericalError(
                            f"training loss became {value} at epoch {epoch}, step {step}: lower "
                            "the learning rate or check the data for NaN/inf.")
                opt.step()
                step += 1
                total += value * len(slots)
                if callback is not None:
                    callback(StepInfo(step, epoch, slots, used, value, net))
            result.epoch_losses.append(total / n)
            bar.update(1)
            if ckpt is not None and ((epoch + 1) % checkpoint_every == 0
                                     or epoch + 1 == config.epochs):
                atomic_save({"key": key, "epoch": epoch + 1, "step": step,
                             "model": net.state_dict(), "optimizer": opt.state_dict(),
                             "epoch_losses": result.epoch_losses},
                            ckpt / f"epoch-{epoch + 1:04d}.pt")
    net.eval()
    result.steps = step
    return result


def _resume(ckpt: Path, key: str, net: nn.Module, opt: torch.optim.Optimizer,
            result: TrainResult) -> tuple[int, int]:
    files = sorted(ckpt.glob("epoch-*.pt"))
    if not files:
        return 0, 0
    state = load(files[-1])
    if state.get("key") != key:
        raise ArtifactError(
            f"the checkpoints in {ckpt} belong to another run (different data, weights or "
            "config); use another checkpoint_dir or delete that folder.")
    net.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    result.epoch_losses = list(state["epoch_losses"])
    return int(state["epoch"]), int(state["step"])
