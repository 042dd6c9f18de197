"""Ground truth for influence estimators: deterministic training, leave-one-out, LDS, PBRF and
mislabel detection, with the metrics that compare scores against them.

    from influencekit.groundtruth import TrainConfig, train, Retrainer, leave_one_out
    result = train(builder, (x, y), TrainConfig(epochs=30, weight_decay=1e-3))
"""

from .cache import Cache, atomic_save, atomic_write_text, fingerprint
from .metrics import auc, fraction_found, lds, loo_correlation, mean_spearman, rowwise_spearman
from .mislabel import DetectionResult, detection, flip_labels
from .pbrf import PBRFResult, pbrf
from .retrain import (
    LDSResult,
    LOOResult,
    Retrainer,
    lds_retrain,
    leave_one_out,
    measure,
    random_subsets,
    with_epochs,
)
from .trainer import (
    StepInfo,
    TrainConfig,
    TrainResult,
    batch_schedule,
    deterministic,
    epoch_order,
    example_weights,
    init_model,
    train,
)

__all__ = [
    "Cache", "DetectionResult", "LDSResult", "LOOResult", "PBRFResult", "Retrainer", "StepInfo",
    "TrainConfig", "TrainResult", "atomic_save", "atomic_write_text", "auc", "batch_schedule",
    "detection", "deterministic", "epoch_order", "example_weights", "fingerprint", "flip_labels",
    "fraction_found", "init_model", "lds", "lds_retrain", "leave_one_out", "loo_correlation",
    "mean_spearman", "measure", "pbrf", "random_subsets", "rowwise_spearman", "train",
    "with_epochs",
]
