"""The deterministic, steppable trainer: ground truth, training dynamics and corrections run on it.

    from influencekit.training import TrainConfig, Trainer, train
    result = train(builder, (x, y), TrainConfig(epochs=30, weight_decay=1e-3))
    trainer = Trainer(builder, (x, y), TrainConfig(epochs=30)).run(steps=100)
"""

from .config import TrainConfig, batch_schedule, epoch_order
from .trainer import (
    ModelSpec,
    PlannedStep,
    StepInfo,
    Trainer,
    TrainResult,
    deterministic,
    example_weights,
    init_model,
    train,
)

__all__ = [
    "ModelSpec", "PlannedStep", "StepInfo", "TrainConfig", "TrainResult", "Trainer",
    "batch_schedule", "deterministic", "epoch_order", "example_weights", "init_model", "train",
]
