"""Ground truth for influence estimators: leave-one-out, LDS, PBRF and mislabel detection, with
the metrics that compare scores against them. Retraining runs on :mod:`influencekit.training`
and is cached on the artifact store.

    from influencekit.groundtruth import Cache, Retrainer, leave_one_out
    from influencekit.training import TrainConfig
    rt = Retrainer(builder, (x, y), TrainConfig(epochs=30, weight_decay=1e-3), cache=Cache("gt"))
    loo = leave_one_out(rt, removed=[3, 17], queries=(xq, yq))
"""

from .cache import Cache
from .metrics import auc, fraction_found, lds, loo_correlation, mean_spearman, rowwise_spearman
from .mislabel import flip_labels
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

__all__ = [
    "Cache", "LDSResult", "LOOResult", "PBRFResult", "Retrainer", "auc", "flip_labels",
    "fraction_found", "lds", "lds_retrain", "leave_one_out", "loo_correlation", "mean_spearman",
    "measure", "pbrf", "random_subsets", "rowwise_spearman", "with_epochs",
]
