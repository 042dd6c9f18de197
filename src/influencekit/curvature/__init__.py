"""Curvature of the mean training loss: one operator, its eigenpairs, and spectral filters.

- :mod:`.operator` — :class:`CurvatureOperator` (Hessian | GGN over full / fixed / streamed /
  sampled data; block products, power iteration, the dense matrix).
- :mod:`.arnoldi` — Arnoldi iteration and the Rayleigh–Ritz step (top eigenpairs), and
  :class:`Eigensolver` / :func:`curvature_eigenpairs`, which pick the eigensolver.
- :mod:`.randomized` — randomized subspace iteration (Nyström / Rayleigh–Ritz) and the
  sampled-label Fisher as a one-pass block operator over per-example gradients.
- :mod:`.spectral` — :class:`Eigenpairs` and the filters (damped inverse, finite horizon) that
  turn eigenpairs into a preconditioner.
"""

from .arnoldi import Eigensolver, arnoldi, curvature_eigenpairs, distill, top_eigenpairs
from .kfac import FISHERS, KroneckerCurvature, KroneckerLayer, find_layers
from .operator import SAMPLINGS, CurvatureOperator, dense_curvature
from .randomized import FisherGradients, randomized_eigh
from .spectral import (
    Eigenpairs,
    HorizonFilter,
    InverseFilter,
    SpectralFilter,
    as_filter,
    horizon_filter,
)

__all__ = [
    "FISHERS", "SAMPLINGS", "CurvatureOperator", "Eigenpairs", "Eigensolver", "FisherGradients",
    "HorizonFilter",
    "InverseFilter", "KroneckerCurvature", "KroneckerLayer", "SpectralFilter", "arnoldi",
    "as_filter", "curvature_eigenpairs", "dense_curvature", "distill", "find_layers",
    "horizon_filter", "randomized_eigh", "top_eigenpairs",
]
