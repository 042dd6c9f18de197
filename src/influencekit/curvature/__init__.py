"""Curvature of the mean training loss as matrices and linear operators."""

from .arnoldi import DataCurvature, Eigenpairs, arnoldi, curvature_eigenpairs, distill
from .dense import dense_curvature

__all__ = ["DataCurvature", "Eigenpairs", "arnoldi", "curvature_eigenpairs", "dense_curvature",
           "distill"]
