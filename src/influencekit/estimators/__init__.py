"""Influence estimators, all with the same face: fit / scores / self_influence / top_k."""

from .arnoldi import ArnoldiComplement, ArnoldiInfluence, ArnoldiTopK
from .base import Estimator, TopK
from .classic import CGInfluence, ExactInfluence, GradCos, GradDot, LiSSAInfluence

# name -> class, for the CLI and the evaluation harness (later estimators register here).
METHODS: dict[str, type[Estimator]] = {
    "exact": ExactInfluence,
    "cg": CGInfluence,
    "lissa": LiSSAInfluence,
    "graddot": GradDot,
    "gradcos": GradCos,
    "arnoldi": ArnoldiInfluence,
    "arnoldi-topk": ArnoldiTopK,
    "arnoldi-complement": ArnoldiComplement,
}

__all__ = [
    "METHODS", "ArnoldiComplement", "ArnoldiInfluence", "ArnoldiTopK", "CGInfluence",
    "Estimator", "ExactInfluence", "GradCos", "GradDot",
    "LiSSAInfluence", "TopK",
]
