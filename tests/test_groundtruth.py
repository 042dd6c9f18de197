"""Ground truth: metrics on hand-made cases, PBRF against closed forms, cached retraining."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

import influencekit as ik
from influencekit.errors import InputError
from influencekit.groundtruth import (
    Cache,
    PBRFResult,
    Retrainer,
    auc,
    flip_labels,
    fraction_found,
    lds,
    lds_retrain,
    leave_one_out,
    loo_correlation,
    mean_spearman,
    measure,
    pbrf,
    random_subsets,
    rowwise_spearman,
)
from influencekit.groundtruth import retrain as retrain_module
from influencekit.models import MLP
from influencekit.training import TrainConfig, init_model, train


# --------------------------------------------------------------------------- metrics
def test_spearman_hand_cases():
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]])
    b = torch.tensor([[10.0, 20.0, 30.0, 40.0], [4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    r = rowwise_spearman(a, b)
    assert r[0] == pytest.approx(1.0) and r[1] == pytest.approx(-1.0) and np.isnan(r[2])
    assert mean_spearman(a, b) == pytest.approx(0.0)  # the constant row is skipped
    # ranks (1, 2, 3, 4) vs (1, 3, 2, 4): rho = 1 − 6·2 / (4·15) = 0.8
    assert rowwise_spearman([[1, 2, 3, 4]], [[0.1, 0.5, 0.3, 0.9]])[0] == pytest.approx(0.8)


def test_loo_correlation_hand_case():
    # 2 queries, 3 removed examples; delta is removed × queries
    scores = np.array([[3.0, 1.0, 2.0], [1.0, 2.0, 3.0]])
    delta = np.array([[0.3, 0.1], [0.1, 0.3], [0.2, 0.2]])  # q0 agrees (1), q1: (1,3,2) -> 0.5
    assert loo_correlation(scores, delta) == pytest.approx((1.0 + 0.5) / 2)
    assert loo_correlation(scores, -delta) == pytest.approx(-(1.0 + 0.5) / 2)
    with pytest.raises(InputError, match="removed × queries"):
        loo_correlation(scores, delta.T)


def test_lds_hand_case():
    scores = np.array([[1.0, 2.0, 4.0]])  # one query, three training examples
    subsets = np.array([[1, 1, 0], [0, 1, 1], [1, 0, 1], [1, 0, 0]])  # sums 3, 6, 5, 1
    # a higher sum of scores predicts a LOWER measurement: perfectly linear data -> 1
    assert lds(scores, subsets, -(subsets @ scores.T)) == pytest.approx(1.0)
    assert lds(scores, subsets, subsets @ scores.T) == pytest.approx(-1.0)
    # measured ranks (of −values): 2, 4, 1, 3 vs predicted 2, 4, 3, 1 -> rho = 1 − 6·8/60 = 0.2
    values = -np.array([[2.0], [4.0], [1.0], [3.0]])
    assert lds(scores, subsets, values) == pytest.approx(0.2)


def test_auc_and_fraction_found_hand_cases():
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auc([1.0, 1.0], [0, 1]) == pytest.approx(0.5)  # a tie counts half
    assert fraction_found([5, 1, 4, 2, 3], [1, 0, 0, 0, 1], inspect=0.4) == pytest.approx(0.5)
    assert fraction_found([5, 1, 4, 2, 3], [1, 0, 1, 0, 0], inspect=0.4) == pytest.approx(1.0)


def test_flip_labels():
    y = torch.arange(100) % 5
    noisy, flipped = flip_labels(y, 0.1, 5, seed=0)
    assert flipped.sum() == 10 and (noisy[flipped] != y[flipped]).all()
    assert torch.equal(noisy[~flipped], y[~flipped])
    assert noisy.max() < 5


# --------------------------------------------------------------------------- PBRF
def _squared(outputs, batch):
    return 0.5 * (outputs.squeeze(1) - batch[1]) ** 2


def test_pbrf_of_a_convex_quadratic_is_the_closed_form():
    g = torch.Generator().manual_seed(0)
    n, d, lam, eps = 30, 4, 0.1, 0.2
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=g, dtype=torch.float64))
    theta = model.weight.detach().reshape(-1)
    task = ik.Task(model, loss=_squared)
    removed = [3, 17]
    res = pbrf(task, (x, y), removed, (x[:5], y[:5]), damping=lam, epsilon=eps)
    gram = x.T @ x / n
    for k, i in enumerate(removed):
        grad_i = x[i] * (x[i] @ theta - y[i])
        # stationarity of (1/2N)Σ(x_jᵀΔ)² − ε½(x_iᵀ(θ+Δ) − y_i)² + λ/2‖Δ‖²
        a = gram + lam * torch.eye(d, dtype=torch.float64) - eps * torch.outer(x[i], x[i])
        expected = eps * torch.linalg.solve(a, grad_i)
        assert torch.allclose(res.delta_theta[k], expected, atol=1e-8, rtol=1e-6)
        new = theta + expected
        m_new = 0.5 * (x[:5] @ new - y[:5]) ** 2
        m_old = 0.5 * (x[:5] @ theta - y[:5]) ** 2
        assert torch.allclose(res.delta_measure[k], m_new - m_old, atol=1e-9)
    assert res.grad_norm.max() < 1e-4


def test_pbrf_small_epsilon_matches_ggn_influence(logistic_problem):
    model, x, y, l2 = logistic_problem
    task = ik.ClassificationTask(model)
    q = (x[:6], y[:6])
    scores = ik.ExactInfluence(task, damping=l2, curvature="ggn").fit((x, y)).scores(q)
    removed = [0, 5, 9, 40]
    res = pbrf(task, (x, y), removed, q, damping=l2, epsilon=1e-4)
    predicted = res.epsilon * scores[:, removed].T  # Δm ≈ ε · score_GGN
    assert torch.allclose(res.delta_measure, predicted, rtol=1e-2, atol=1e-9)
    assert loo_correlation(scores[:, removed], res.delta_measure) == pytest.approx(1.0)


def test_pbrf_needs_damping(logistic_problem):
    model, x, y, _ = logistic_problem
    with pytest.raises(InputError, match="damping > 0"):
        pbrf(ik.ClassificationTask(model), (x, y), [0], (x[:2], y[:2]), damping=0.0)


# --------------------------------------------------------------------------- retraining
def _problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=g)
    return x, (x[:, 0] > 0).long()


def _builder():
    return MLP(3, 2, hidden=(4,))


CFG = TrainConfig(epochs=3, batch_size=8, lr=0.1, weight_decay=1e-3)


def test_leave_one_out_matches_direct_retraining(tmp_path):
    data = _problem()
    q = (data[0][:5], data[1][:5])
    rt = Retrainer(_builder, data, CFG, cache=Cache(tmp_path))
    loo = leave_one_out(rt, [2, 7], q)
    direct = measure(ik.ClassificationTask(train(_builder, data, CFG, remove=[7],
                                                 progress=False).model), q)
    base = measure(ik.ClassificationTask(train(_builder, data, CFG, progress=False).model), q)
    assert torch.equal(loo.values[1], direct) and torch.equal(loo.base, base)
    assert torch.equal(loo.delta[1], direct - base) and loo.delta.shape == (2, 5)
    theta_star = rt.fit()
    warm = leave_one_out(rt, [2, 7], q, warm_start=theta_star, warm_config=CFG)
    cont = train(theta_star, data, CFG, remove=[2], progress=False).model
    assert torch.equal(warm.values[0], measure(ik.ClassificationTask(cont), q))
    assert warm.mode == "warm" and not torch.equal(warm.delta, loo.delta)


def test_retraining_is_cached_and_resumes(tmp_path, monkeypatch):
    data = _problem()
    q = (data[0][:5], data[1][:5])
    rt = Retrainer(_builder, data, CFG, cache=Cache(tmp_path))
    first = leave_one_out(rt, [1, 2], q)
    entries = _entries(tmp_path)
    assert len(entries) == 3 and not list(tmp_path.rglob("*.tmp"))

    def no_training(*args, **kwargs):
        raise AssertionError("should have been read from the cache")

    monkeypatch.setattr(retrain_module, "train", no_training)
    again = leave_one_out(Retrainer(_builder, data, CFG, cache=Cache(tmp_path)), [1, 2], q)
    assert torch.equal(first.values, again.values)
    # an interrupted run: one result missing is recomputed, the others are read
    monkeypatch.undo()
    shutil.rmtree(entries[0])
    resumed = leave_one_out(Retrainer(_builder, data, CFG, cache=Cache(tmp_path)), [1, 2], q)
    assert torch.equal(first.values, resumed.values)
    # other data -> other keys
    other = (data[0] + 1, data[1])
    leave_one_out(Retrainer(_builder, other, CFG, cache=Cache(tmp_path)), [1], q)
    assert len(_entries(tmp_path)) == 5


def _entries(root):
    """The complete cache entries under ``root``."""
    return sorted(f.parent for f in root.rglob("manifest.json")
                  if json.loads(f.read_text())["complete"])


def _relu_builder():
    return MLP(3, 2, hidden=(4,), activation="relu")


def test_cache_keys_cover_architecture_and_measurement(tmp_path):
    """Same initial weights, another activation or measurement: never the cached result."""
    data = _problem()
    q = (data[0][:5], data[1][:5])
    same_init = [init_model(b, CFG.init_seed).state_dict() for b in (_builder, _relu_builder)]
    assert all(torch.equal(a, b) for a, b in zip(*(s.values() for s in same_init)))
    tanh = leave_one_out(Retrainer(_builder, data, CFG, cache=Cache(tmp_path)), [1], q)
    relu = leave_one_out(Retrainer(_relu_builder, data, CFG, cache=Cache(tmp_path)), [1], q)
    direct = measure(ik.ClassificationTask(
        train(_relu_builder, data, CFG, remove=[1], progress=False).model), q)
    assert torch.equal(relu.values[0], direct) and not torch.equal(relu.values, tanh.values)
    margin = leave_one_out(Retrainer(_builder, data, CFG, cache=Cache(tmp_path),
                                     make_task=lambda m: ik.ClassificationTask(
                                         m, measurement="margin")), [1], q)
    assert not torch.equal(margin.values, tanh.values)
    assert len(_entries(tmp_path)) == 6


def test_cache_holds_results_without_pickle(tmp_path, monkeypatch):
    def no_pickle(*args, **kwargs):
        raise AssertionError("the cache must not pickle")

    monkeypatch.setattr(torch, "save", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    cache = Cache(tmp_path)
    value = PBRFResult(torch.tensor([1, 2]), torch.ones(2, 3, dtype=torch.float64),
                       torch.zeros(2, 1, dtype=torch.float64), 0.025, torch.tensor([1e-9, 2e-9]))
    assert cache.get_or_compute("pbrf", "k", lambda: value) is value

    def never():
        raise AssertionError("should have been read from the cache")

    again = cache.get_or_compute("pbrf", "k", never)
    assert isinstance(again, PBRFResult) and again.epsilon == 0.025
    assert all(torch.equal(getattr(again, f), getattr(value, f))
               for f in ("removed", "delta_theta", "delta_measure", "grad_norm"))
    state = MLP(3, 2).state_dict()
    loaded = Cache(tmp_path).get_or_compute("models", "m", lambda: state)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_lds_retrain_shapes_and_subsets():
    data = _problem()
    q = (data[0][:4], data[1][:4])
    res = lds_retrain(Retrainer(_builder, data, CFG), q, n_subsets=3, alpha=0.25, seed=1)
    assert res.subsets.shape == (3, 40) and (res.subsets.sum(1) == 10).all()
    assert res.values.shape == (3, 4)
    assert torch.equal(res.subsets, random_subsets(40, 3, 0.25, seed=1))
    with pytest.raises(InputError, match="alpha"):
        random_subsets(10, 2, 1.5)


def test_corrupted_cache_file_names_the_fix(tmp_path):
    from influencekit.errors import ArtifactError

    cache = Cache(tmp_path)
    assert cache.get_or_compute("g", "k", lambda: torch.ones(2)).sum() == 2
    (cache.path("g", "k") / "tensors.safetensors").write_bytes(b"half-written")
    with pytest.raises(ArtifactError, match=f"{cache.path('g', 'k')}.*corrupted.*Delete"):
        cache.get_or_compute("g", "k", lambda: torch.ones(2))
    assert Cache(None).get_or_compute("g", "k", lambda: 3) == 3  # caches nothing
    assert not list(tmp_path.rglob("*.tmp"))
