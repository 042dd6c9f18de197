"""Influence estimators, all with the same face: fit / scores / self_influence / top_k."""

from .base import Estimator, TopK
from .classic import CGInfluence, ExactInfluence, GradCos, GradDot, LiSSAInfluence

# name -> class, for the CLI and the evaluation harness (later estimators register here).
METHODS: dict[str, type[Estimator]] = {
    "exact": ExactInfluence,
    "cg": CGInfluence,
    "lissa": LiSSAInfluence,
    "graddot": GradDot,
    "gradcos": GradCos,
}

__all__ = [
    "METHODS", "CGInfluence", "Estimator", "ExactInfluence", "GradCos", "GradDot",
    "LiSSAInfluence", "TopK",
]
