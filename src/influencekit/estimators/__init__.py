"""Influence estimators, all with the same face: fit / scores / self_influence / top_k."""

from collections.abc import Callable
from functools import partial

from .arnoldi import ArnoldiInfluence
from .base import Estimator, TopK
from .classic import CGInfluence, ExactInfluence, GradCos, GradDot, LiSSAInfluence
from .ekfac import EKFACInfluence, KFACInfluence
from .features import TrainFeatures
from .tracin import TracIn
from .trak import TRAKInfluence

# name -> estimator factory ``(task, **options) -> Estimator``, for the CLI and the evaluation
# harness (later estimators register here).
METHODS: dict[str, Callable[..., Estimator]] = {
    "exact": ExactInfluence,
    "cg": CGInfluence,
    "lissa": LiSSAInfluence,
    "graddot": GradDot,
    "gradcos": GradCos,
    "arnoldi": ArnoldiInfluence,
    "arnoldi-topk": partial(ArnoldiInfluence, filter="topk"),
    "arnoldi-complement": partial(ArnoldiInfluence, filter="complement"),
    "ekfac": EKFACInfluence,
    "kfac": KFACInfluence,
    "tracin": TracIn,
    "trak": TRAKInfluence,
}

__all__ = [
    "METHODS", "ArnoldiInfluence", "CGInfluence", "EKFACInfluence", "Estimator",
    "ExactInfluence", "GradCos", "GradDot", "KFACInfluence", "LiSSAInfluence", "TRAKInfluence",
    "TopK", "TracIn", "TrainFeatures",
]
