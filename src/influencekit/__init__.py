"""influencekit: influence functions for deep networks.

    import influencekit as ik
    task = ik.ClassificationTask(model)
    est = ik.ExactInfluence(task, damping=1e-3).fit(train)
    S = est.scores(queries)          # [n_queries, n_train]; > 0 = proponent

Sign convention: ``score(q, x) = ∇m(q)ᵀ (H + λI)⁻¹ ∇ℓ(x)``; up-weighting ``x`` by ε changes
``m(q)`` by about ``−ε·score``.
"""

from . import data as data  # built-in datasets: ik.data.load("digits")
from . import diagnostics as diagnostics  # the five assumptions: ik.diagnose(...)
from . import dynamics as dynamics  # twin runs, fading, unrolled influence
from . import models as models  # built-in models: ik.models.build("mlp", ...)
from . import training as training  # the deterministic trainer: ik.training.train(...)
from .correction import correct, correct_all
from .curvature import CurvatureOperator, Eigensolver, HorizonFilter, InverseFilter
from .diagnostics import diagnose
from .errors import ArtifactError, CurvatureError, InfluenceError, InputError, NumericalError
from .estimators import (
    METHODS,
    ArnoldiInfluence,
    CGInfluence,
    EKFACInfluence,
    Estimator,
    ExactInfluence,
    GradCos,
    GradDot,
    KFACInfluence,
    LiSSAInfluence,
    TopK,
    TracIn,
    TRAKInfluence,
)
from .task import ClassificationTask, Task

__version__ = "0.1.0"

__all__ = [
    "METHODS", "ArnoldiInfluence", "ArtifactError", "CGInfluence", "ClassificationTask",
    "CurvatureError", "CurvatureOperator", "EKFACInfluence", "Eigensolver", "Estimator",
    "ExactInfluence", "GradCos", "GradDot", "HorizonFilter", "InfluenceError", "InputError",
    "InverseFilter", "KFACInfluence", "LiSSAInfluence", "NumericalError", "Task", "TopK",
    "TracIn", "TRAKInfluence", "correct", "correct_all", "diagnose",
]
