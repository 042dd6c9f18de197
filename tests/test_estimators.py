"""Estimators on a tiny MLP: agreement with the dense solve, invariances, data formats.

Tolerances:
- CG vs ExactInfluence (PD curvature): relative error < 1e-6 (CG is exact in ≤ P steps);
- LiSSA vs ExactInfluence (mini-batches of 20, 150 steps, 4 repeats): relative error
  < 0.15 and Spearman > 0.9 (full-batch curvature: < 1e-4);
- invariances (batch size, query chunk, data format): 1e-10 relative (float64).
"""

from __future__ import annotations

import pytest
import torch
from scipy.stats import spearmanr
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import influencekit as ik
from conftest import rel_error
from influencekit.autodiff import all_grads, curvature_vp, per_example_grads, value_jvps
from influencekit.curvature import dense_curvature


@pytest.fixture(scope="module")
def mlp(mlp_problem):
    model, x, y, l2 = mlp_problem
    task = ik.ClassificationTask(model)
    h = dense_curvature(task, (x, y))
    damping = l2 + max(0.0, -float(torch.linalg.eigvalsh(h)[0])) + 1e-3  # make H + λI ≻ 0
    return task, x, y, damping


def test_dense_hessian_matches_torch_hessian(mlp):
    task, x, y, _ = mlp
    theta = task.flat_theta()

    def mean_loss(flat):
        return task.losses(task.layout.unflatten(flat), (x, y)).mean()

    expected = torch.autograd.functional.hessian(mean_loss, theta)
    assert rel_error(dense_curvature(task, (x, y), batch_size=7), expected) < 1e-10


def test_per_example_grads_and_jvps_match_autograd(mlp):
    task, x, y, _ = mlp
    g = per_example_grads(task, (x[:5], y[:5]))
    for i in range(5):
        params = list(task.model.parameters())
        loss = torch.nn.functional.cross_entropy(task.model(x[i:i + 1]), y[i:i + 1])
        expected = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params)])
        assert torch.allclose(g[i], expected, atol=1e-12)
    v = torch.randn(3, task.num_params, dtype=torch.float64)
    assert torch.allclose(value_jvps(task, (x[:5], y[:5]), v), v @ g.T, atol=1e-12)


def test_cg_matches_exact(mlp):
    task, x, y, damping = mlp
    exact = ik.ExactInfluence(task, damping=damping).fit((x, y)).scores((x[:6], y[:6]))
    cg = ik.CGInfluence(task, damping=damping, tol=1e-10, max_iter=200).fit((x, y))
    assert rel_error(cg.scores((x[:6], y[:6])), exact) < 1e-6


def test_lissa_matches_exact(mlp):
    task, x, y, damping = mlp
    # A well-conditioned system (λ ≥ 0.3·λ_max) keeps the recursion short for a unit test.
    lam_max = float(torch.linalg.eigvalsh(dense_curvature(task, (x, y)))[-1])
    damping = max(damping, 0.3 * lam_max)
    exact = ik.ExactInfluence(task, damping=damping).fit((x, y)).scores((x[:4], y[:4]))
    # Full-batch curvature: the recursion is deterministic and converges to the exact solve.
    full = ik.LiSSAInfluence(task, damping=damping, depth=150, curvature_batch=None)
    assert rel_error(full.fit((x, y)).scores((x[:4], y[:4])), exact) < 1e-4
    # Mini-batch curvature: unbiased but noisy.
    lissa = ik.LiSSAInfluence(task, damping=damping, depth=150, repeats=4,
                              curvature_batch=20).fit((x, y))
    got = lissa.scores((x[:4], y[:4]))
    assert rel_error(got, exact) < 0.15
    assert spearmanr(got.flatten(), exact.flatten()).statistic > 0.9


@pytest.mark.parametrize("name", ["exact", "cg", "graddot", "gradcos"])
def test_self_influence_is_diagonal_of_pairwise(mlp, name):
    task, x, y, damping = mlp
    kwargs = {"damping": damping} if name in ("exact", "cg") else {}
    est = ik.METHODS[name](task, **kwargs).fit((x, y))
    diag = torch.diagonal(est.scores((x, y)))
    assert rel_error(est.self_influence(), diag) < 1e-8


def test_results_do_not_depend_on_batch_or_chunk_size(mlp):
    task, x, y, damping = mlp
    ref = ik.ExactInfluence(task, damping=damping).fit((x, y)).scores((x[:9], y[:9]))
    other = ik.ExactInfluence(task, damping=damping, batch_size=3, query_chunk=2).fit((x, y))
    assert rel_error(other.scores((x[:9], y[:9])), ref) < 1e-10
    cg_a = ik.CGInfluence(task, damping=damping, tol=1e-10, micro_batch_size=16).fit((x, y))
    cg_b = ik.CGInfluence(task, damping=damping, tol=1e-10, query_chunk=1).fit((x, y))
    assert rel_error(cg_a.scores((x[:2], y[:2])), cg_b.scores((x[:2], y[:2]))) < 1e-8


def test_data_formats_agree(mlp):
    task, x, y, damping = mlp
    est = ik.ExactInfluence(task, damping=damping).fit((x, y))
    ref = est.scores((x[:4], y[:4]))
    ds = TensorDataset(x, y)
    assert rel_error(est.scores(TensorDataset(x[:4], y[:4]), ds), ref) < 1e-12
    loader = DataLoader(ds, batch_size=11, shuffle=False)
    assert rel_error(est.scores((x[:4], y[:4]), loader), ref) < 1e-12
    refit = ik.ExactInfluence(task, damping=damping).fit(loader)
    assert rel_error(refit.scores((x[:4], y[:4])), ref) < 1e-10


def test_graddot_and_gradcos_are_gradient_products(mlp):
    task, x, y, _ = mlp
    g = all_grads(task, (x, y))
    assert rel_error(ik.GradDot(task).scores((x[:3], y[:3]), (x, y)), g[:3] @ g.T) < 1e-12
    gn = g / g.norm(dim=1, keepdim=True)
    assert rel_error(ik.GradCos(task).scores((x[:3], y[:3]), (x, y)), gn[:3] @ gn.T) < 1e-12
    assert torch.allclose(ik.GradCos(task).self_influence((x, y)),
                          torch.ones(len(y), dtype=torch.float64))


def test_ggn_is_psd_and_differs_from_hessian_on_mlp(mlp):
    task, x, y, _ = mlp
    ggn = dense_curvature(task, (x, y), "ggn")
    hess = dense_curvature(task, (x, y), "hessian")
    assert torch.linalg.eigvalsh(ggn)[0] > -1e-10
    assert rel_error(ggn, hess) > 1e-3  # the MLP is non-linear in its parameters
    v = torch.randn(2, task.num_params, dtype=torch.float64)
    assert rel_error(curvature_vp(task, (x, y), v, "ggn") / len(y), v @ ggn) < 1e-10


def test_params_restrict_to_a_subset(mlp):
    task, x, y, damping = mlp
    model = task.model
    last = ik.ClassificationTask(model, params=[model[2]])
    assert last.num_params == 8 * 3 + 3
    assert ik.ClassificationTask(model, params="2.bias").num_params == 3
    pred = ik.ClassificationTask(model, params=lambda name, p: name.endswith("weight"))
    assert pred.num_params == 3 * 8 + 8 * 3
    full = per_example_grads(task, (x[:4], y[:4]))
    assert torch.allclose(per_example_grads(last, (x[:4], y[:4])), full[:, -27:])


def test_loop_fallback_matches_vmap(mlp):
    """A model that vmap cannot trace (data-dependent Python control flow) still works."""
    task, x, y, _ = mlp

    class Branchy(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, inp):
            out = self.inner(inp)
            if float(out.detach().abs().max()) > 1e6:  # data-dependent: vmap refuses it
                out = out / 2
            return out

    branchy = ik.ClassificationTask(Branchy(task.model))
    layers = per_example_grads(branchy, (x[:5], y[:5]))  # the layer path does not trace
    assert torch.allclose(layers, per_example_grads(task, (x[:5], y[:5])), atol=1e-12)
    branchy._layerwise_off = True  # as for a model outside the layer path
    with pytest.warns(UserWarning, match="falling back"):
        g = per_example_grads(branchy, (x[:5], y[:5]))
    assert torch.allclose(g, per_example_grads(task, (x[:5], y[:5])), atol=1e-12)
    v = torch.randn(2, task.num_params, dtype=torch.float64)
    hv = curvature_vp(branchy, (x, y), v)  # only tangents are batched here: vmap copes
    assert rel_error(hv, curvature_vp(task, (x, y), v)) < 1e-10


def test_margin_measurement_sign(mlp):
    """With measurement='margin' (the negative margin), Δm ≈ −ε·score still holds."""
    task, x, y, damping = mlp
    margin_task = ik.ClassificationTask(task.model, measurement="margin")
    est = ik.ExactInfluence(margin_task, damping=damping).fit((x, y))
    s = est.scores((x[:3], y[:3]))
    g = per_example_grads(margin_task, (x[:3], y[:3]), kind="measurement")
    gl = per_example_grads(task, (x, y))
    h = dense_curvature(task, (x, y)) + damping * torch.eye(task.num_params,
                                                             dtype=torch.float64)
    assert rel_error(s, g @ torch.linalg.solve(h, gl.T)) < 1e-9
    logits = task.model(x[:3]).detach()
    correct = logits.gather(1, y[:3, None]).squeeze(1)
    others = logits.scatter(1, y[:3, None], float("-inf")).logsumexp(1)
    with torch.no_grad():
        m = margin_task.measurements(margin_task.theta(), (x[:3], y[:3]))
    assert torch.allclose(m, others - correct)


def test_top_k_orders_scores(mlp):
    task, x, y, damping = mlp
    est = ik.ExactInfluence(task, damping=damping).fit((x, y))
    s = est.scores((x[:2], y[:2]))
    top = est.top_k((x[:2], y[:2]), k=5)
    assert torch.equal(top.proponents[0], s[0].argsort(descending=True)[:5])
    assert torch.equal(top.opponents[1], s[1].argsort()[:5])
    assert (top.proponent_scores[:, :-1] >= top.proponent_scores[:, 1:]).all()
    assert torch.allclose(top.opponent_scores, s.gather(1, top.opponents))


def _custom_measurement(outputs, batch):
    """A non-loss measurement: the negative log-probability of class 0 (not the label)."""
    return -torch.log_softmax(outputs, -1)[:, 0]


@pytest.mark.parametrize("measurement", ["margin", "custom"])
@pytest.mark.parametrize("name", sorted(ik.METHODS))
def test_non_loss_measurements_with_every_estimator(mlp, measurement, name):
    """Every estimator scores a non-loss measurement as ⟨P ∇m(q), ∇ℓ(x)⟩ with its own P.

    The PD reference ``(H + λI)⁻¹`` gets 1e-6 (exact, CG, full-rank Arnoldi), full-batch LiSSA
    1e-4; GradDot/GradCos/TracIn (one checkpoint, η = 1) their closed forms (1e-10); unprojected
    TRAK the damped empirical Fisher (1e-8); the rank-5 Arnoldi variants and EK-FAC/K-FAC their
    own preconditioner (1e-10)."""
    task0, x, y, damping = mlp
    m = "margin" if measurement == "margin" else _custom_measurement
    task = ik.ClassificationTask(task0.model, measurement=m)
    q, train = (x[:5], y[:5]), (x, y)
    gq = all_grads(task, q, kind="measurement")
    gx = all_grads(task, train)
    p = task.num_params
    h = dense_curvature(task, train) + damping * torch.eye(p, dtype=torch.float64)
    exact = gq @ torch.linalg.solve(h, gx.T)
    if name in ("graddot", "gradcos", "tracin"):
        est = ik.METHODS[name](task)
        a, b = (gq, gx) if name != "gradcos" else (gq / gq.norm(dim=1, keepdim=True),
                                                   gx / gx.norm(dim=1, keepdim=True))
        assert rel_error(est.fit(train).scores(q, train), a @ b.T) < 1e-10
        return
    if name == "trak":  # unprojected, loss kernel: the damped empirical Fisher
        est = ik.METHODS[name](task, projection="none", damping=damping).fit(train)
        fisher = gx.T @ gx / len(y) + damping * torch.eye(p, dtype=torch.float64)
        assert rel_error(est.scores(q), gq @ torch.linalg.solve(fisher, gx.T)) < 1e-8
        return
    if name in ("ekfac", "kfac"):  # their own Kronecker preconditioner
        est = ik.METHODS[name](task, damping=damping).fit(train)
        assert rel_error(est.scores(q), est.precondition(gq) @ gx.T) < 1e-10
        return
    if name.startswith("arnoldi"):
        solver = ik.Eigensolver(which="magnitude", sampling="full")
        est = ik.METHODS[name](task, rank=5, iterations=30, damping=damping,
                               curvature="hessian", solver=solver).fit(train)
        assert rel_error(est.scores(q), est.precondition(gq) @ gx.T) < 1e-10
        if name == "arnoldi-topk":  # at full rank it is the exact inverse
            full = ik.METHODS[name](task, rank=p, iterations=p, damping=damping,
                                    curvature="hessian", solver=solver).fit(train)
            assert rel_error(full.scores(q), exact) < 1e-6
        return
    if name == "lissa":  # well conditioned (λ ≥ 0.3·λ_max) to keep the recursion short
        damping = max(damping, 0.3 * float(torch.linalg.eigvalsh(h)[-1]))
        h = dense_curvature(task, train) + damping * torch.eye(p, dtype=torch.float64)
        exact = gq @ torch.linalg.solve(h, gx.T)
    kw = {"lissa": {"curvature_batch": None, "depth": 150}}.get(name, {})
    est = ik.METHODS[name](task, damping=damping, **kw).fit(train)
    assert rel_error(est.scores(q), exact) < (1e-4 if name == "lissa" else 1e-6)


def test_exact_takes_any_spectral_filter(mlp):
    """The horizon filter on the full spectrum: one step of rate η is η·GradDot; many steps at a
    stable rate converge to the damped inverse."""
    task, x, y, damping = mlp
    q, train = (x[:4], y[:4]), (x, y)
    one_step = ik.ExactInfluence(task, filter=ik.HorizonFilter(0.3, 1)).fit(train)
    assert rel_error(one_step.scores(q), 0.3 * ik.GradDot(task).scores(q, train)) < 1e-10
    inverse = ik.ExactInfluence(task, damping=damping).fit(train)
    lam_max = float(inverse.eigenvalues.max()) + damping
    long_run = ik.ExactInfluence(task, damping=damping,
                                 filter=ik.HorizonFilter(1 / lam_max, 10**6)).fit(train)
    assert rel_error(long_run.scores(q), inverse.scores(q)) < 1e-8
