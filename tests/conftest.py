"""Shared fixtures: small float64 problems with known answers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Every test uses tiny tensors: one torch thread avoids synchronisation overhead, which on
    a shared 2-core machine made some tests 10× slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_report(tmp_path_factory):
    """``influencekit reproduce --preset tiny`` once per test session: its output folder."""
    from influencekit.cli import main

    out = tmp_path_factory.mktemp("reproduce")
    assert main(["reproduce", "--preset", "tiny", "--out", str(out), "--no-progress"]) == 0
    return out


def fit_full_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn,
                   l2: float, weights: torch.Tensor | None = None, iters: int = 200) -> nn.Module:
    """Minimise mean(w_i·loss_i) + l2/2·‖θ‖² with L-BFGS to high precision (in place)."""
    w = torch.ones(len(y), dtype=x.dtype) if weights is None else weights
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=iters, tolerance_grad=1e-13,
                            tolerance_change=1e-15, history_size=50,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (w * loss_fn(model(x), y)).sum() / len(y)
        loss = loss + 0.5 * l2 * sum((p**2).sum() for p in model.parameters())
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    return model


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ (Frobenius)."""
    return float((a - b).norm() / b.norm())


def ce(outputs, y):
    return F.cross_entropy(outputs, y, reduction="none")


@pytest.fixture
def logistic_problem():
    """3-class softmax regression on 150 points in 4-D, trained with L2 = 0.05 (float64)."""
    g = torch.Generator().manual_seed(0)
    n, d, c = 150, 4, 3
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w_true = torch.randn(d, c, generator=g, dtype=torch.float64)
    y = (x @ w_true + 0.8 * torch.randn(n, c, generator=g, dtype=torch.float64)).argmax(1)
    l2 = 0.05
    torch.manual_seed(0)
    model = nn.Linear(d, c).double()
    fit_full_batch(model, x, y, ce, l2)
    return model, x, y, l2


@pytest.fixture(scope="module")
def mlp_problem():
    """A tiny tanh MLP (3 classes, 59 parameters) trained on 40 points (float64).

    Module-scoped: tests must not change the model's parameters."""
    g = torch.Generator().manual_seed(1)
    n = 40
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = ((x[:, 0] > 0).long() + (x[:, 1] > 0.5).long())
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    l2 = 0.01
    fit_full_batch(model, x, y, ce, l2, iters=100)
    return model, x, y, l2
