"""Training hyper-parameters and the data schedule they define."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import validate


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
        checked = {
            "epochs": validate.integer("TrainConfig.epochs", self.epochs, minimum=0),
            "batch_size": validate.positive_int("TrainConfig.batch_size", self.batch_size),
            "lr": validate.non_negative("TrainConfig.lr", self.lr),
            "optimizer": validate.choice("TrainConfig.optimizer", self.optimizer, ("sgd", "adam")),
            "momentum": validate.non_negative("TrainConfig.momentum", self.momentum),
            "weight_decay": validate.non_negative("TrainConfig.weight_decay", self.weight_decay),
            "schedule": validate.choice("TrainConfig.schedule", self.schedule,
                                        ("constant", "cosine")),
            "seed": validate.integer("TrainConfig.seed", self.seed, minimum=0),
            "init_seed": validate.integer("TrainConfig.init_seed", self.init_seed, minimum=0),
        }
        for name, value in checked.items():  # normalised, e.g. epochs=3.0 -> 3
            object.__setattr__(self, name, value)

    def lr_at(self, epoch: int) -> float:
        """The learning rate during ``epoch`` (0-based)."""
        if self.schedule == "cosine" and self.epochs > 0:
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / self.epochs))
        return self.lr


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of ``epoch``: depends on ``(seed, epoch, n)`` only."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen)


def batch_schedule(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """The slots (example indices) of each batch of ``epoch``."""
    return list(epoch_order(n, seed, epoch).split(batch_size))
