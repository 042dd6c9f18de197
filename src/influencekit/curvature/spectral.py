"""Eigenpairs of the curvature and the spectral filters applied to them.

Every curvature-based preconditioner in influencekit is one formula over eigenpairs
``(λ_j, e_j)`` (the full spectrum from ``eigh`` or the top of it from Arnoldi)::

    P g = Σ_j f(λ_j) ⟨e_j, g⟩ e_j  +  c⊥ (g − Σ_j ⟨e_j, g⟩ e_j)

The **filter** ``f`` and the complement weight ``c⊥`` are the method:

- :class:`InverseFilter` ``f(λ) = 1/(λ + δ)``: the damped inverse (exact influence at full rank;
  the paper's ABIF on the top eigenpairs with ``complement=0``; "low rank + damped identity"
  with ``complement="auto"``, which weights the rest by ``1/(min_j |λ_j| + δ)``).
- :class:`HorizonFilter` ``f(λ) = (1 − (1 − η(λ + δ))^T) / (λ + δ)``: the response after ``T``
  steps of gradient descent with learning rate ``η`` (paper digest, "finite-horizon view"); it
  tends to ``1/λ`` for ``λ ≫ 1/(ηT)`` and to ``ηT`` for small ``λ``; the complement gets
  ``f(δ)``. ``lr=None`` means ``η = 1/λ_max``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import CurvatureError, InputError
from ..validate import number, positive, positive_int

WHICH = ("magnitude", "positive")


@dataclass
class Eigenpairs:
    """Eigenvalues (float64, ordered as selected) and unit eigenvectors as rows ``[r, P]``."""

    values: torch.Tensor
    vectors: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def select(self, rank: int, which: str = "magnitude") -> Eigenpairs:
        """The top ``rank`` pairs by ``|λ|`` (``"magnitude"``) or the largest positive ones."""
        if which not in WHICH:
            raise InputError(f"which must be one of {WHICH}, got {which!r}.")
        v = self.values
        if which == "positive":
            order = torch.argsort(v, descending=True)
            order = order[v[order] > 0]
        else:
            order = torch.argsort(v.abs(), descending=True)
        order = order[:rank]
        return Eigenpairs(v[order].clone(), self.vectors[order.to(self.vectors.device)],
                          dict(self.info))

    def apply(self, g: torch.Tensor, f: torch.Tensor, complement: float = 0.0) -> torch.Tensor:
        """``Σ_j f_j ⟨e_j, g⟩ e_j + complement · (g − Σ_j ⟨e_j, g⟩ e_j)`` for the rows of
        ``g [k, P]``, in float64."""
        e = self.vectors.to(g.device, torch.float64)
        g = g.to(torch.float64)
        coords = g @ e.T
        out = (coords * f.to(g.device)) @ e
        if complement:
            out = out + complement * (g - coords @ e)
        return out


class SpectralFilter:
    """``weights(values, damping) -> (f [r] float64, c⊥)``; ``which`` is the eigenvalue
    selection the filter needs (``"positive"`` where it explodes on negative eigenvalues)."""

    which = "magnitude"
    name = "filter"

    def weights(self, values: torch.Tensor, damping: float) -> tuple[torch.Tensor, float]:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        return {"filter": self.name}


class InverseFilter(SpectralFilter):
    """``1/(λ + δ)``; ``complement``: ``0`` (drop the rest), ``"auto"`` (``1/(min|λ| + δ)``)
    or a number."""

    name = "inverse"

    def __init__(self, complement: float | str = 0.0):
        if complement != "auto":
            complement = number("complement", complement, minimum=0.0,
                                fix="Use 0 (drop it), 'auto' or a weight ≥ 0.")
        self.complement = complement

    def weights(self, values: torch.Tensor, damping: float) -> tuple[torch.Tensor, float]:
        lam = values.to(torch.float64) + damping
        scale = max(float(lam.abs().max()), damping, 1e-30)
        smallest = float(lam.abs().min())
        if smallest <= 1e-10 * scale:
            raise CurvatureError(
                f"H + λI is singular on the kept eigenspace (smallest |eigenvalue + damping| "
                f"{smallest:.3g}, largest {scale:.3g}): add damping (e.g. damping="
                f"{1e-3 * scale:.2g}), use curvature='ggn', or use the horizon filter.")
        if self.complement == "auto":
            c = 1.0 / (float(values.abs().min()) + damping)
        else:
            c = float(self.complement)
        return 1.0 / lam, c

    def settings(self) -> dict[str, Any]:
        return {"filter": self.name, "complement": self.complement}

    def __repr__(self) -> str:
        return f"InverseFilter(complement={self.complement!r})"


class HorizonFilter(SpectralFilter):
    """``(1 − (1 − η(λ + δ))^T)/(λ + δ)``: ``T = steps`` of gradient descent at ``η = lr``
    (``None``: ``1/λ_max``); the complement is weighted ``f(δ)`` (``complement=True``) or not."""

    name = "horizon"
    which = "positive"

    def __init__(self, lr: float | None = None, steps: int = 100, complement: bool = True):
        self.lr = None if lr is None else positive("horizon lr", lr)
        self.steps = positive_int("horizon steps", steps)
        self.complement = bool(complement)

    def learning_rate(self, values: torch.Tensor, damping: float) -> float:
        if self.lr is not None:
            return self.lr
        return 1.0 / max(float(values.abs().max()) + damping, 1e-30)

    def weights(self, values: torch.Tensor, damping: float) -> tuple[torch.Tensor, float]:
        lr = self.learning_rate(values, damping)
        f = horizon_filter(values.to(torch.float64) + damping, lr, self.steps)
        c = 0.0
        if self.complement:
            c = float(horizon_filter(torch.tensor([float(damping)], dtype=torch.float64),
                                     lr, self.steps)[0])
        return f, c

    def settings(self) -> dict[str, Any]:
        return {"filter": self.name, "lr": self.lr, "steps": self.steps,
                "complement": self.complement}

    def __repr__(self) -> str:
        return f"HorizonFilter(lr={self.lr}, steps={self.steps}, complement={self.complement})"


def horizon_filter(lam: torch.Tensor, lr: float, steps: int) -> torch.Tensor:
    """``(1 − (1 − lr·λ)^T) / λ`` (``lr·T`` at ``λ = 0``), computed stably in float64."""
    x = lr * lam
    base = 1.0 - x
    safe = torch.where(base > 0, x, torch.zeros_like(x))
    one_minus = torch.where(base > 0, -torch.expm1(steps * torch.log1p(-safe)),
                            1.0 - base.pow(steps))
    tiny = x.abs() < 1e-12
    return torch.where(tiny, torch.full_like(lam, lr * steps),
                       one_minus / torch.where(tiny, torch.ones_like(lam), lam))


FILTERS = {
    "horizon": HorizonFilter,
    "inverse": lambda: InverseFilter(0.0),
    "topk": lambda: InverseFilter(0.0),
    "complement": lambda: InverseFilter("auto"),
}


def as_filter(spec: str | SpectralFilter) -> SpectralFilter:
    """A filter from its name (``"horizon"``, ``"topk"``/``"inverse"``, ``"complement"``) or
    itself."""
    if isinstance(spec, SpectralFilter):
        return spec
    if not isinstance(spec, str) or spec not in FILTERS:
        raise InputError(
            f"filter must be one of {sorted(FILTERS)} or a SpectralFilter (HorizonFilter(lr, "
            f"steps), InverseFilter(complement)); got {spec!r}.")
    return FILTERS[spec]()
