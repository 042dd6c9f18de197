"""Block CG and the exact solve against dense oracles on tiny float64 models.

Tolerances (float64, 59 parameters):
- block CG (``tol=1e-10``) vs ExactInfluence: relative error < 1e-6;
- query-chunk invariance of block CG: < 1e-8 (different Krylov spaces, same solution);
- ExactInfluence vs ``torch.linalg.solve`` of the dense matrix, and its Cholesky path vs its
  eigendecomposition path: < 1e-10.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import influencekit as ik
from conftest import rel_error
from influencekit.autodiff import all_grads
from influencekit.curvature import dense_curvature


@pytest.fixture(scope="module")
def trained(mlp_problem):
    """The trained tiny MLP with a damping that makes the Hessian positive definite."""
    model, x, y, l2 = mlp_problem
    task = ik.ClassificationTask(model)
    h = dense_curvature(task, (x, y))
    damping = l2 + max(0.0, -float(torch.linalg.eigvalsh(h)[0])) + 1e-3
    return task, x, y, damping


@pytest.fixture(scope="module")
def untrained():
    """A tanh MLP at initialisation: its cross-entropy Hessian is indefinite."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(30, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=g)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    task = ik.ClassificationTask(model)
    values = torch.linalg.eigvalsh(dense_curvature(task, (x, y)))
    assert values[0] < -1e-4 * values[-1]  # the premise: clearly indefinite
    return task, x, y, values


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_block_cg_matches_exact(trained, curvature):
    task, x, y, damping = trained
    q = (x[:8], y[:8])
    exact = ik.ExactInfluence(task, damping=damping, curvature=curvature).fit((x, y))
    cg = ik.CGInfluence(task, damping=damping, curvature=curvature, tol=1e-10,
                        max_iter=200).fit((x, y))
    assert rel_error(cg.scores(q), exact.scores(q)) < 1e-6
    assert 0 < cg.iterations_used <= task.num_params


def test_block_cg_shares_one_krylov_space(trained):
    """A block of 8 queries needs fewer iterations than a single query alone would."""
    task, x, y, damping = trained
    block = ik.CGInfluence(task, damping=damping, tol=1e-10, max_iter=200).fit((x, y))
    block.scores((x[:8], y[:8]))
    single = ik.CGInfluence(task, damping=damping, tol=1e-10, max_iter=200).fit((x, y))
    single.scores((x[:1], y[:1]))
    assert block.iterations_used < single.iterations_used


def test_block_cg_does_not_depend_on_query_chunk(trained):
    task, x, y, damping = trained
    q = (x[:9], y[:9])
    ref = ik.CGInfluence(task, damping=damping, tol=1e-10).fit((x, y)).scores(q)
    for chunk in (1, 4):
        got = ik.CGInfluence(task, damping=damping, tol=1e-10, query_chunk=chunk
                             ).fit((x, y)).scores(q)
        assert rel_error(got, ref) < 1e-8


def test_block_cg_with_dependent_and_zero_columns(trained):
    """Repeated, proportional and zero right-hand sides: dependent directions are dropped, the
    zero column stays zero, every other column is solved."""
    task, x, y, damping = trained
    g = all_grads(task, (x[:3], y[:3]), kind="measurement")
    b = torch.stack([g[0], g[0], 2 * g[1], torch.zeros_like(g[0]), g[1], g[2], -g[2]])
    h = dense_curvature(task, (x, y)) + damping * torch.eye(task.num_params,
                                                            dtype=torch.float64)
    cg = ik.CGInfluence(task, damping=damping, tol=1e-10, max_iter=200).fit((x, y))
    got = cg.precondition(b)
    assert torch.isfinite(got).all()
    assert got[3].abs().max() == 0
    assert rel_error(got, torch.linalg.solve(h, b.T).T) < 1e-6


def test_block_cg_refuses_indefinite_hessian(untrained):
    task, x, y, _ = untrained
    est = ik.CGInfluence(task, max_iter=200).fit((x, y))
    with pytest.raises(ik.CurvatureError, match="not positive definite.*damping"):
        est.scores((x[:4], y[:4]))


def test_block_cg_warns_when_not_converged(trained):
    task, x, y, damping = trained
    est = ik.CGInfluence(task, damping=damping, tol=1e-12, max_iter=1).fit((x, y))
    with pytest.warns(UserWarning, match="did not converge in 1 iterations"):
        est.scores((x[:3], y[:3]))
    assert est.iterations_used == 1


class _EighInverse(ik.InverseFilter):
    """The inverse filter, forced through the eigendecomposition (a subclass is not factored)."""


def _dense_solve(task, train, damping, queries):
    h = dense_curvature(task, train) + damping * torch.eye(task.num_params, dtype=torch.float64)
    gq = all_grads(task, queries, kind="measurement")
    gx = all_grads(task, train)
    return gq @ torch.linalg.solve(h, gx.T)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_exact_cholesky_equals_eigh(trained, curvature):
    task, x, y, damping = trained
    q = (x[:5], y[:5])
    fast = ik.ExactInfluence(task, damping=damping, curvature=curvature).fit((x, y))
    slow = ik.ExactInfluence(task, damping=damping, curvature=curvature,
                             filter=_EighInverse()).fit((x, y))
    assert fast.solver == "cholesky" and slow.solver == "eigh"
    assert fast._eigen is None  # eigenpairs only on demand
    assert rel_error(fast.scores(q), slow.scores(q)) < 1e-10
    if curvature == "hessian":
        assert rel_error(fast.scores(q), _dense_solve(task, (x, y), damping, q)) < 1e-10
    assert rel_error(fast.eigenvalues, slow.eigenvalues) < 1e-12
    assert fast.solver == "cholesky"


def test_exact_on_indefinite_hessian(untrained):
    """``H + λI`` indefinite but invertible: an LU solve, equal to the eigendecomposition."""
    task, x, y, values = untrained
    damping = float(-values[0]) / 2  # still indefinite
    q = (x[:4], y[:4])
    fast = ik.ExactInfluence(task, damping=damping).fit((x, y))
    slow = ik.ExactInfluence(task, damping=damping, filter=_EighInverse()).fit((x, y))
    assert fast.solver == "lu" and slow.solver == "eigh"
    assert rel_error(fast.scores(q), slow.scores(q)) < 1e-10
    assert rel_error(fast.scores(q), _dense_solve(task, (x, y), damping, q)) < 1e-10


def test_exact_refuses_near_singular_through_the_eigendecomposition(untrained):
    """A damping that cancels an eigenvalue: the estimate sends it to eigh, which refuses."""
    task, x, y, values = untrained
    est = ik.ExactInfluence(task, damping=float(-values[0]))
    with pytest.raises(ik.CurvatureError, match="singular"):
        est.fit((x, y))
    assert est.solver == "eigh"


def test_exact_build_does_not_depend_on_block_or_micro_batch(trained):
    task, x, y, damping = trained
    q = (x[:5], y[:5])
    ref = ik.ExactInfluence(task, damping=damping).fit((x, y)).scores(q)
    other = ik.ExactInfluence(task, damping=damping, block=7, micro_batch_size=9).fit((x, y))
    assert rel_error(other.scores(q), ref) < 1e-10
