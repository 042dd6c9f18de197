"""Estimators against closed forms and against actual retraining.

Tolerances:
- closed form vs ExactInfluence: 1e-9 relative (float64 linear algebra only);
- leave-one-out: removing x (ε = −1/N) changes m(q) by score/N to first order; on these
  regularised convex problems the second-order remainder keeps the relative error below 5% and the
  Pearson correlation above 0.995.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import influencekit as ik
from conftest import ce, fit_full_batch, rel_error


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


# ----------------------------------------------------------------------------- linear regression
def _squared(outputs, batch):
    return 0.5 * (outputs.squeeze(-1) - batch[1]) ** 2


@pytest.fixture
def ridge():
    g = torch.Generator().manual_seed(0)
    n, d, alpha = 200, 5, 0.1
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x @ torch.randn(d, generator=g, dtype=torch.float64) + 0.3 * torch.randn(
        n, generator=g, dtype=torch.float64)
    xa = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)

    def solve(keep: torch.Tensor) -> torch.Tensor:
        a = xa[keep].T @ xa[keep] / n + alpha * torch.eye(d + 1, dtype=torch.float64)
        return torch.linalg.solve(a, xa[keep].T @ y[keep] / n)

    theta = solve(torch.ones(n, dtype=torch.bool))
    model = nn.Linear(d, 1).double()
    with torch.no_grad():
        model.weight.copy_(theta[:d][None])
        model.bias.copy_(theta[d:])
    return model, x, y, xa, alpha, solve, theta


def test_ridge_scores_equal_closed_form(ridge):
    model, x, y, xa, alpha, _, theta = ridge
    task = ik.Task(model, loss=_squared)
    n = len(y)
    grads = (xa @ theta - y)[:, None] * xa
    h = xa.T @ xa / n + alpha * torch.eye(xa.shape[1], dtype=torch.float64)
    expected = grads[:7] @ torch.linalg.solve(h, grads.T)
    est = ik.ExactInfluence(task, damping=alpha).fit((x, y))
    got = est.scores((x[:7], y[:7]))
    assert rel_error(got, expected) < 1e-9
    # CG solves the same system.
    cg = ik.CGInfluence(task, damping=alpha, tol=1e-12).fit((x, y)).scores((x[:7], y[:7]))
    assert rel_error(cg, expected) < 1e-8


def test_ridge_predicts_leave_one_out(ridge):
    model, x, y, xa, alpha, solve, theta = ridge
    n = len(y)
    queries = slice(0, 6)
    scores = ik.ExactInfluence(ik.Task(model, loss=_squared), damping=alpha).fit((x, y)).scores(
        (x[queries], y[queries]))

    def query_losses(th):
        return 0.5 * (xa[queries] @ th - y[queries]) ** 2

    base = query_losses(theta)
    actual = torch.stack([
        query_losses(solve(torch.arange(n) != i)) - base for i in range(n)], 1)
    predicted = scores / n  # removing x is ε = −1/N: Δm ≈ +score/N
    assert _pearson(predicted, actual) > 0.995
    assert rel_error(predicted, actual) < 0.05


# ----------------------------------------------------------------------------- logistic regression
def _softmax_regression_closed_form(model, x, y, l2):
    """Per-example gradients and mean Hessian of softmax regression, written out by hand."""
    n, d = x.shape
    c = model.out_features
    with torch.no_grad():
        p = torch.softmax(model(x), 1)
    resid = p - torch.nn.functional.one_hot(y, c).double()
    grads = torch.cat([(resid[:, :, None] * x[:, None, :]).reshape(n, c * d), resid], 1)
    h = torch.zeros(c * d + c, c * d + c, dtype=torch.float64)
    eye = torch.eye(c, dtype=torch.float64)
    for i in range(n):
        jac = torch.cat([torch.kron(eye, x[i][None]), eye], 1)  # d logits / d θ, [c, P]
        curv = torch.diag(p[i]) - torch.outer(p[i], p[i])
        h += jac.T @ curv @ jac
    return grads, h / n + l2 * torch.eye(c * d + c, dtype=torch.float64)


def test_logistic_scores_equal_closed_form(logistic_problem):
    model, x, y, l2 = logistic_problem
    grads, h = _softmax_regression_closed_form(model, x, y, l2)
    expected = grads[:5] @ torch.linalg.solve(h, grads.T)
    task = ik.ClassificationTask(model)
    for curvature in ("hessian", "ggn"):  # for a linear model the GGN is the Hessian
        est = ik.ExactInfluence(task, damping=l2, curvature=curvature).fit((x, y))
        assert rel_error(est.scores((x[:5], y[:5])), expected) < 1e-9
    # self-influence is the diagonal of the closed form too
    self_inf = ik.ExactInfluence(task, damping=l2).fit((x, y)).self_influence()
    expected_self = (grads * torch.linalg.solve(h, grads.T).T).sum(1)
    assert rel_error(self_inf, expected_self) < 1e-9


def test_logistic_predicts_leave_one_out_and_upweighting(logistic_problem):
    model, x, y, l2 = logistic_problem
    n = len(y)
    g = torch.Generator().manual_seed(5)
    xq = torch.randn(5, x.shape[1], generator=g, dtype=torch.float64)
    yq = torch.randint(0, 3, (5,), generator=g)
    scores = ik.ExactInfluence(ik.ClassificationTask(model), damping=l2).fit((x, y)).scores(
        (xq, yq))

    def query_losses(m):
        with torch.no_grad():
            return ce(m(xq), yq)

    base = query_losses(model)
    removed = list(range(0, n, 6))
    actual = []
    for i in removed:
        w = torch.ones(n, dtype=torch.float64)
        w[i] = 0.0
        retrained = fit_full_batch(copy.deepcopy(model), x, y, ce, l2, weights=w)
        actual.append(query_losses(retrained) - base)
    actual = torch.stack(actual, 1)
    predicted = scores[:, removed] / n
    assert _pearson(predicted, actual) > 0.995
    assert rel_error(predicted, actual) < 0.05

    # Up-weighting x by ε (weight 1 + Nε in the mean) changes m(q) by ≈ −ε·score.
    eps = 0.1 / n
    j = int(scores[0].abs().argmax())
    w = torch.ones(n, dtype=torch.float64)
    w[j] += eps * n
    up = query_losses(fit_full_batch(copy.deepcopy(model), x, y, ce, l2, weights=w)) - base
    assert rel_error(up, -eps * scores[:, j]) < 0.05
    assert torch.equal(torch.sign(up), torch.sign(-scores[:, j]))
