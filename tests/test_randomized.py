"""The randomized eigensolver and the Fisher block operator (ArnoldiInfluence's default).

Tolerances (float64 throughout):
- known spectra (geometric decay): top eigenvalues within 1e-10 relative to the largest,
  eigenvectors |cos| > 1 − 1e-10 (Nyström and Rayleigh–Ritz);
- tiny MLP: the exact-GGN Fisher operator equals the dense GGN to 1e-12; its top 5 eigenpairs
  within 1e-8 (values, relative) and |cos| > 1 − 1e-6; the drawn Fishers (labels, Gaussian
  output vectors) with 400 draws per example within 10% of the GGN (Frobenius), one draw exactly
  the Gram matrix of its gradients;
- rank = P: ExactInfluence's GGN scores within 1e-8 relative;
- batch / chunk sizes, resume: scores equal within 1e-12 relative.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import influencekit as ik
from conftest import rel_error
from influencekit import layerwise
from influencekit.autodiff import all_grads
from influencekit.curvature import (
    Eigensolver,
    FisherGradients,
    curvature_eigenpairs,
    dense_curvature,
    randomized_eigh,
)
from influencekit.store import Artifact


def _sym(values: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(values), len(values), generator=g,
                                       dtype=torch.float64))
    return q @ torch.diag(values) @ q.T, q


@pytest.fixture
def mlp():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 4, generator=g, dtype=torch.float64)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    return ik.ClassificationTask(model), x, y


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


@pytest.fixture
def cnn():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 1, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (24,), generator=g)
    torch.manual_seed(1)
    return ik.ClassificationTask(SmallCNN().double()), x, y


# ----------------------------------------------------------------------------- known spectra
@pytest.mark.parametrize("psd", [True, False])
def test_known_spectrum(psd):
    p = 150
    lam = 0.5 ** torch.arange(p, dtype=torch.float64) * 10
    if not psd:
        lam[1::3] *= -1  # indefinite: Rayleigh–Ritz, selected by magnitude
    a, q = _sym(lam)
    pairs = randomized_eigh(lambda v: v @ a, p, 8, passes=4, oversample=20, seed=2, psd=psd)
    order = lam.abs().argsort(descending=True)[:8]
    assert torch.allclose(pairs.values, lam[order], atol=1e-10 * 10, rtol=0)
    cos = (pairs.vectors * q[:, order].T).sum(1).abs()
    assert (cos > 1 - 1e-10).all(), cos


def test_full_block_is_exact_and_low_rank_operator_is_recovered_in_one_pass():
    lam = torch.linspace(3, 0.1, 30, dtype=torch.float64)
    a, _ = _sym(lam, seed=4)
    pairs = randomized_eigh(lambda v: v @ a, 30, 30, passes=1, oversample=0)
    assert torch.allclose(pairs.values, lam, atol=1e-12, rtol=0)
    low = lam.clone()
    low[5:] = 0  # rank 5: Nyström with a block of 8 reproduces it from one pass
    b, q = _sym(low, seed=5)
    pairs = randomized_eigh(lambda v: v @ b, 30, 5, passes=1, oversample=3)
    assert torch.allclose(pairs.values, low[:5], atol=1e-10, rtol=0)


def test_seed_determinism_and_pass_resume():
    lam = 0.7 ** torch.arange(60, dtype=torch.float64)
    a, _ = _sym(lam, seed=6)
    calls = []

    def op(v):
        calls.append(1)
        return v @ a

    ref = randomized_eigh(op, 60, 5, passes=3, seed=9)
    same = randomized_eigh(op, 60, 5, passes=3, seed=9)
    assert torch.equal(ref.values, same.values) and torch.equal(ref.vectors, same.vectors)
    other = randomized_eigh(op, 60, 5, passes=3, seed=10)
    assert not torch.equal(ref.vectors, other.vectors)
    assert torch.allclose(ref.values, other.values, rtol=1e-4)
    stored: dict[int, torch.Tensor] = {}

    def dying(i, y):
        if i == 2:
            raise KeyboardInterrupt("simulated kill in the last pass")
        stored[i] = y

    with pytest.raises(KeyboardInterrupt):
        randomized_eigh(op, 60, 5, passes=3, seed=9, on_pass=dying)
    calls.clear()
    resumed = randomized_eigh(op, 60, 5, passes=3, seed=9, done=stored)
    assert len(calls) == 1  # only the unfinished pass is redone
    assert torch.equal(resumed.values, ref.values) and torch.equal(resumed.vectors, ref.vectors)


def test_errors():
    with pytest.raises(ik.InputError, match="passes"):
        randomized_eigh(lambda v: v, 5, 2, passes=0)
    with pytest.raises(ik.InputError, match="rank"):
        randomized_eigh(lambda v: v, 5, 0)
    with pytest.raises(ik.InputError, match="shape"):
        randomized_eigh(lambda v: v, 5, 2, done={0: torch.zeros(3, 5)})
    with pytest.raises(ik.InputError, match="fisher"):
        Eigensolver(fisher="true")


# ----------------------------------------------------------------------------- Fisher operator
def test_ggn_fisher_operator_equals_dense_ggn_and_its_eigenpairs(mlp):
    task, x, y = mlp
    p = task.num_params
    ggn = dense_curvature(task, (x, y), "ggn")
    op = FisherGradients(task, (x, y), fisher="ggn", batch_size=7)
    assert rel_error(op(torch.eye(p, dtype=torch.float64)), ggn) < 1e-12
    lam, vec = torch.linalg.eigh(ggn)
    lam, vec = lam.flip(0)[:5], vec.flip(1)[:, :5]
    pairs = curvature_eigenpairs(task, (x, y), 5, curvature="ggn",
                                 solver=Eigensolver(fisher="ggn", passes=5, oversample=15))
    assert torch.allclose(pairs.values, lam, atol=1e-8 * float(lam[0]), rtol=0)
    cos = (pairs.vectors.double() * vec.T).sum(1).abs()
    assert (cos > 1 - 1e-6).all(), cos


@pytest.mark.parametrize("fisher", ["sampled", "gaussian"])
def test_drawn_fishers_are_the_ggn_in_expectation(mlp, fisher):
    task, x, y = mlp
    p = task.num_params
    ggn = dense_curvature(task, (x, y), "ggn")
    op = FisherGradients(task, (x, y), fisher=fisher, samples=400, seed=3)
    assert rel_error(op(torch.eye(p, dtype=torch.float64)), ggn) < 0.1


def test_sampled_fisher_gram_matrix(mlp):
    task, x, y = mlp
    p = task.num_params
    one = FisherGradients(task, (x, y), seed=3)  # one draw: exactly its gradients' Gram matrix
    g = torch.cat([gb for gb, _, _ in one.grad_batches()])
    assert rel_error(one(torch.eye(p, dtype=torch.float64)), g.T @ g / len(y)) < 1e-12


def test_layer_and_vmap_fisher_gradients_agree(cnn):
    """Fisher gradients from the layer path (conv + linear) equal torch.func's."""
    task, x, y = cnn
    op = FisherGradients(task, (x, y), samples=2, batch_size=5)
    got = torch.zeros(2, len(y), task.num_params, dtype=torch.float64)
    for g, start, b in op.grad_batches():
        got[:, start:start + b] = g.reshape(2, b, -1)
    assert layerwise.plan(task).ok == {"vector": True}
    got = got.reshape(2 * len(y), -1)
    task._layerwise_off = True  # vmap from here on
    try:
        ref = op.grads((x, y), 0).clone()
    finally:
        del task._layerwise_off
    assert rel_error(got, ref) < 1e-12


# ----------------------------------------------------------------------------- the estimator
def test_default_is_randomized_ggn_and_full_rank_equals_exact(mlp):
    task, x, y = mlp
    p = task.num_params
    est = ik.ArnoldiInfluence(task)
    assert est.curvature == "ggn" and est.method == "randomized"
    assert ik.ArnoldiInfluence(task, curvature="hessian").method == "arnoldi"
    exact = ik.ExactInfluence(task, damping=0.01, curvature="ggn").fit((x, y))
    full = ik.ArnoldiInfluence(task, rank=p, damping=0.01, filter="topk",
                               solver=Eigensolver(fisher="ggn", which="magnitude")).fit((x, y))
    q = (x[:6], y[:6])
    assert rel_error(full.scores(q), exact.scores(q)) < 1e-8
    assert rel_error(full.self_influence(), exact.self_influence()) < 1e-8


def test_low_rank_scores_match_the_dense_formula(mlp):
    task, x, y = mlp
    est = ik.ArnoldiInfluence(task, rank=6, damping=0.05, filter="complement").fit((x, y))
    e, lam = est.eigen.vectors.double(), est.eigen.values
    c = 1.0 / (float(lam.min()) + 0.05)
    pre = e.T @ torch.diag(1 / (lam + 0.05)) @ e + c * (torch.eye(e.shape[1],
                                                                 dtype=torch.float64) - e.T @ e)
    gq = all_grads(task, (x[:5], y[:5]), kind="measurement")
    gx = all_grads(task, (x, y))
    assert rel_error(est.scores((x[:5], y[:5])), gq @ pre @ gx.T) < 1e-10
    assert rel_error(est.self_influence(), torch.diag(est.scores((x, y)))) < 1e-10


def test_deterministic_for_a_seed_and_independent_of_batch_and_chunk_sizes(cnn):
    task, x, y = cnn
    q = (x[:5], y[:5])
    ref = None
    for bs, chunk, qc, micro in [(64, 4096, None, 256), (5, 7, 2, 3)]:
        est = ik.ArnoldiInfluence(task, rank=4, damping=0.05, batch_size=bs, chunk_size=chunk,
                                  query_chunk=qc, solver=Eigensolver(micro_batch_size=micro))
        s = est.fit((x, y)).scores(q)
        ref = s if ref is None else ref
        assert rel_error(s, ref) < 1e-12
    other = ik.ArnoldiInfluence(task, rank=4, damping=0.05,
                                solver=Eigensolver(seed=1)).fit((x, y)).scores(q)
    assert rel_error(other, ref) > 1e-6  # another draw of labels and start block


@pytest.mark.parametrize("fisher", ["gaussian", "sampled"])
def test_last_pass_draws_afresh(mlp, fisher, monkeypatch):
    """With drawn output vectors the last pass applies the same Fisher under independent draws
    (stream 1), the earlier ones under the first draws; the eigenpairs still approach the GGN's
    with many draws, and the exact GGN has no such pass."""
    task, x, y = mlp
    streams: list[int] = []
    real = FisherGradients.grads

    def spy(self, batch, start):
        streams.append(self.stream)
        return real(self, batch, start)

    monkeypatch.setattr(FisherGradients, "grads", spy)
    solver = Eigensolver(fisher=fisher, samples=400, passes=3, oversample=20)
    pairs = curvature_eigenpairs(task, (x, y), 4, curvature="ggn", solver=solver)
    first, last = streams[0], streams[-1]
    streams.clear()
    curvature_eigenpairs(task, (x, y), 4, curvature="ggn",
                         solver=Eigensolver(fisher="ggn", passes=3))
    assert first == 0 and last == 1 and set(streams) == {0}
    ref = torch.linalg.eigvalsh(dense_curvature(task, (x, y), "ggn")).flip(0)[:4]
    assert rel_error(pairs.values, ref) < 0.1
    assert Eigensolver(fisher=fisher).settings("ggn")["final_pass"] == "fresh draws"
    assert "final_pass" not in Eigensolver(fisher="ggn").settings("ggn")


def test_killed_eigensolver_resumes_from_its_stored_passes(cnn, tmp_path, monkeypatch):
    """A kill during the eigensolver's second pass keeps the first (stored as a chunk of the
    ``arnoldi-passes`` artifact); the rerun computes only the rest and gives identical
    scores; a kill during the projections resumes after the stored chunks."""
    task, x, y = cnn
    kw = dict(rank=4, damping=0.05, chunk_size=5, batch_size=4, store=tmp_path,
              solver=Eigensolver(passes=3))
    expected = ik.ArnoldiInfluence(task, **{**kw, "store": None}).fit((x, y)).scores(
        (x[:5], y[:5]))
    real_call = FisherGradients.__call__
    applied: list[int] = []

    def dying(self, v):
        if applied:
            raise KeyboardInterrupt("simulated kill in the eigensolver's third pass")
        applied.append(1)
        return real_call(self, v)

    monkeypatch.setattr(FisherGradients, "__call__", dying)
    with pytest.raises(KeyboardInterrupt):
        ik.ArnoldiInfluence(task, **kw).fit((x, y))
    monkeypatch.setattr(FisherGradients, "__call__", real_call)
    sketches: list[int] = []
    real_sketch = FisherGradients.sketch
    monkeypatch.setattr(FisherGradients, "sketch",
                        lambda self, *a, **k: sketches.append(1) or real_sketch(self, *a, **k))
    counted: list[int] = []
    monkeypatch.setattr(FisherGradients, "__call__",
                        lambda self, v: counted.append(1) or real_call(self, v))
    real_chunk = Artifact.write_chunk
    written: list[int] = []

    def dying_chunk(self, i, tensors):
        if self.path.name == "arnoldi-features" and len(written) == 2:
            raise KeyboardInterrupt("simulated kill in the projections")
        if self.path.name == "arnoldi-features":
            written.append(i)
        real_chunk(self, i, tensors)

    monkeypatch.setattr(Artifact, "write_chunk", dying_chunk)
    with pytest.raises(KeyboardInterrupt):
        ik.ArnoldiInfluence(task, **kw).fit((x, y))
    assert sketches == [] and counted == [1]  # passes 0 and 1 read back, pass 2 computed
    monkeypatch.setattr(Artifact, "write_chunk", real_chunk)
    est = ik.ArnoldiInfluence(task, **kw).fit((x, y))
    assert counted == [1]  # the eigenbasis is stored: no pass at all
    assert torch.equal(est.scores((x[:5], y[:5])), expected)


def test_plan_gives_small_models_more_work():
    solver = Eigensolver()
    assert solver.plan(1438, 2410) == (16, 3, 30)  # digits MLP: 48·N·P ≤ 1e9
    assert solver.plan(4000, 105866) == (1, 2, 10)  # MNIST CNN
    assert Eigensolver(samples=2, passes=5, oversample=0).plan(10, 10) == (2, 5, 0)
