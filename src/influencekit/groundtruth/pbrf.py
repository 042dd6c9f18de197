"""The proximal Bregman response function (PBRF; Bae et al. 2022).

For a training example ``x``, starting at the fitted ``θ*``, minimise

    J(θ) = (1/N) Σ_i D(f(θ, x_i), f(θ*, x_i)) − ε ℓ(x, θ) + (λ/2) ‖θ − θ*‖²

where ``D(z, z*) = ℓ(z) − ℓ(z*) − ⟨∇ℓ(z*), z − z*⟩`` is the Bregman divergence of the loss on
the model outputs (for softmax cross-entropy: the KL divergence between the predictions).
To first order the response is ``Δθ ≈ ε (G + λI)⁻¹ ∇ℓ(x)`` with ``G`` the Gauss–Newton matrix
of the mean loss, so the measurement changes by ``≈ ε · score_GGN(q, x)``: this is what damped
influence functions estimate, whether or not the net is convex.

The minimisation runs in float64 with L-BFGS over ``u = (θ − θ*)/ε`` (so its scale does not
depend on ε), over the task's selected parameters, in eval mode.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..batching import Batch, batch_size_of, iter_batches, slice_batch, to_device, tree_map
from ..errors import InputError
from ..progress import progress_bar
from ..task import Task
from .retrain import measure


def _minimise(f: Callable[[torch.Tensor], torch.Tensor], like: torch.Tensor, max_iter: int
              ) -> tuple[torch.Tensor, float]:
    """Minimise ``f(u)`` from ``u = 0`` by L-BFGS; returns ``u`` and the final gradient norm."""
    u = torch.zeros_like(like, requires_grad=True)
    opt = torch.optim.LBFGS([u], lr=1.0, max_iter=max_iter, history_size=100,
                            tolerance_grad=1e-9, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = f(u)
        value.backward()
        return value

    opt.step(closure)
    opt.zero_grad()
    f(u).backward()
    return u.detach(), u.grad.norm().item()


@dataclass
class PBRFResult:
    removed: torch.Tensor  # [K] training examples perturbed
    delta_theta: torch.Tensor  # [K, P] float64: θ_PBRF − θ*
    delta_measure: torch.Tensor  # [K, Q] float64: m(q) at θ_PBRF minus at θ*
    epsilon: float
    grad_norm: torch.Tensor  # [K] final gradient norm of the scaled objective (convergence)


def _tensor_output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None:
        raise InputError("the PBRF needs the forward to return a tensor (or .logits).")
    return logits


def _to_dtype(task: Task, dtype: torch.dtype) -> Task:
    """A shallow copy of the task around a deep copy of its model in ``dtype``."""
    t = copy.copy(task)
    t.__dict__ = dict(task.__dict__)
    t.__dict__.pop("_vmap_ok", None)
    t.model = copy.deepcopy(task.model).to(dtype)
    return t


def _cast(batch: Batch, dtype: torch.dtype) -> Batch:
    return tree_map(lambda x: x.to(dtype) if x.is_floating_point() else x, batch)


def pbrf(task: Task, train: Batch, removed: Sequence[int], queries: Batch, *, damping: float,
         epsilon: float | None = None, max_iter: int = 500, batch_size: int = 1024,
         dtype: torch.dtype = torch.float64, progress: bool | None = None) -> PBRFResult:
    """PBRF responses for each example of ``removed`` (``ε = 1/N`` by default).

    ``damping`` must be positive (it is the proximal term that makes the problem well posed).
    """
    if damping <= 0:
        raise InputError(f"the PBRF needs damping > 0 (the proximal weight λ), got {damping}.")
    n = batch_size_of(train)
    eps = 1.0 / n if epsilon is None else float(epsilon)
    t = _to_dtype(task, dtype)
    device = t.device
    train = _cast(train, dtype)
    queries = _cast(queries, dtype)
    theta0 = t.flat_theta()
    layout = t.layout
    batches = [to_device(b, device) for b in iter_batches(train, batch_size)]
    with torch.no_grad(), t.evaluating():
        ref = []
        for b in batches:
            z = _tensor_output(t.outputs(t.theta(), b)).detach().requires_grad_(True)
            with torch.enable_grad():
                ell = t.loss_fn(z, b)
                (g,) = torch.autograd.grad(ell.sum(), z)
            ref.append((z.detach(), ell.detach(), g.detach()))
        m0 = measure(t, queries)

    def objective(u: torch.Tensor, x_batch: Batch) -> torch.Tensor:
        theta = layout.unflatten(theta0 + eps * u)
        total = torch.zeros((), dtype=dtype, device=device)
        for b, (z0, l0, g0) in zip(batches, ref, strict=True):
            z = _tensor_output(t.outputs(theta, b))
            d = t.loss_fn(z, b) - l0 - ((z - z0) * g0).reshape(len(z), -1).sum(1)
            total = total + d.sum() / n
        total = total - eps * t.loss_fn(_tensor_output(t.outputs(theta, x_batch)), x_batch).sum()
        total = total + 0.5 * damping * eps**2 * (u * u).sum()
        return total / eps**2

    d_theta, d_measure, gnorms = [], [], []
    removed_t = torch.as_tensor(list(removed), dtype=torch.long)
    with t.evaluating():
        for i in progress_bar(removed_t.tolist(), desc="PBRF", leave=False,
                      progress=progress):
            x_batch = to_device(slice_batch(train, slice(i, i + 1)), device)
            u, gnorm = _minimise(lambda v, xb=x_batch: objective(v, xb), theta0, max_iter)
            gnorms.append(gnorm)
            delta = eps * u
            d_theta.append(delta)
            moved = _to_dtype(t, dtype)
            with torch.no_grad():
                named = dict(moved.model.named_parameters())
                for name, v in layout.unflatten(theta0 + delta).items():
                    named[name].copy_(v)
            d_measure.append(measure(moved, queries) - m0)
    grad_norm = torch.tensor(gnorms, dtype=torch.float64)
    if len(grad_norm) and grad_norm.max() > 1e-4:
        warnings.warn(f"PBRF: L-BFGS stopped with gradient norm up to {grad_norm.max():.2g} "
                      "(scaled objective); raise max_iter.", stacklevel=2)
    return PBRFResult(removed_t, torch.stack(d_theta), torch.stack(d_measure), eps, grad_norm)
