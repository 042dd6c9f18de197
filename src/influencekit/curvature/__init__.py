"""Curvature of the mean training loss as matrices and linear operators."""

from .dense import dense_curvature

__all__ = ["dense_curvature"]
