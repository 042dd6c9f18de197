"""Arnoldi iteration and ArnoldiInfluence against dense oracles and invariances.

Tolerances (float64 throughout):
- known spectra: top eigenvalues within 1e-8 relative to the largest, eigenvectors |cos| > 1 − 1e-8;
- tiny model: eigenpairs of the dense Hessian / GGN (``torch.linalg.eigh``) within 1e-8 relative;
- rank = P: ExactInfluence's scores within 1e-8 relative (Frobenius);
- batch / chunk sizes, resume: scores equal within 1e-12 relative (only summation order changes).
"""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import influencekit as ik
from conftest import rel_error
from influencekit.curvature import (
    CurvatureOperator,
    Eigensolver,
    arnoldi,
    curvature_eigenpairs,
    dense_curvature,
    distill,
    horizon_filter,
    top_eigenpairs,
)
from influencekit.estimators import METHODS
from influencekit.store import Artifact

ARN = partial(Eigensolver, method="arnoldi")  # the paper's Arnoldi (default: randomized GGN)
FULL = ARN(sampling="full")


def _sym(values: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(values), len(values), generator=g,
                                       dtype=torch.float64))
    return q @ torch.diag(values) @ q.T, q


def _spectrum(p: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    top = torch.tensor([50.0, -40.0, 30.0, 20.0, -15.0, 10.0, 8.0, 6.0, 5.0, 4.0],
                       dtype=torch.float64)
    return torch.cat([top, torch.rand(p - 10, generator=g, dtype=torch.float64) - 0.5])


# ----------------------------------------------------------------------------- known spectra
@pytest.mark.parametrize("block", [1, 3])
def test_top_eigenpairs_of_known_spectrum(block):
    lam = _spectrum(200)
    a, q = _sym(lam)
    pairs = top_eigenpairs(lambda v: v @ a, 200, 10, 80, block=block, seed=3)
    order = lam.abs().argsort(descending=True)[:10]
    assert torch.allclose(pairs.values, lam[order], atol=1e-8 * 50, rtol=0)
    cos = (pairs.vectors * q[:, order].T).sum(1).abs()
    assert (cos > 1 - 1e-8).all(), cos
    assert torch.allclose(pairs.vectors.norm(dim=1), torch.ones(10, dtype=torch.float64))


def test_positive_only_and_eigh_agree():
    lam = _spectrum(120, seed=1)
    a, _ = _sym(lam, seed=1)
    ref = torch.linalg.eigh(a).eigenvalues.flip(0)
    pairs = top_eigenpairs(lambda v: v @ a, 120, 5, 60, which="positive")
    assert (pairs.values > 0).all()
    assert torch.allclose(pairs.values, ref[:5], atol=1e-8 * 50, rtol=0)


def test_invariant_subspace_stops_early():
    lam = torch.zeros(60, dtype=torch.float64)
    lam[:4] = torch.tensor([3.0, 2.0, -1.0, 0.5], dtype=torch.float64)
    a, _ = _sym(lam, seed=2)
    calls = []

    def matvec(v):
        calls.append(v.shape[0])
        return v @ a

    kr = arnoldi(matvec, 60, 50)
    assert kr.stopped_early and sum(calls) <= 6
    pairs = distill(kr, 4)
    assert torch.allclose(pairs.values, torch.tensor([3.0, 2.0, -1.0, 0.5],
                                                     dtype=torch.float64), atol=1e-10)


def test_seeded_start_is_reproducible():
    a, _ = _sym(_spectrum(100))
    one = arnoldi(lambda v: v @ a, 100, 20, seed=7)
    two = arnoldi(lambda v: v @ a, 100, 20, seed=7)
    other = arnoldi(lambda v: v @ a, 100, 20, seed=8)
    assert torch.equal(one.basis, two.basis) and torch.equal(one.projected, two.projected)
    assert not torch.allclose(one.basis, other.basis)


def test_basis_stays_orthonormal():
    a, _ = _sym(_spectrum(300, seed=4), seed=4)
    kr = arnoldi(lambda v: v @ a, 300, 150)
    gram = kr.basis @ kr.basis.T
    assert (gram - torch.eye(gram.shape[0], dtype=torch.float64)).abs().max() < 1e-12


# ----------------------------------------------------------------------------- tiny model
@pytest.fixture(scope="module")
def tiny():
    """A tanh MLP (3 → 8 → 3, 59 parameters) fitted on 48 points (float64), L2-regularised."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(48, 3, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    opt = torch.optim.LBFGS(model.parameters(), max_iter=30, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss = loss + 0.005 * sum((p ** 2).sum() for p in model.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    return ik.ClassificationTask(model), x, y


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_eigenpairs_match_dense_curvature(tiny, curvature):
    task, x, y = tiny
    h = dense_curvature(task, (x, y), curvature)
    lam, vec = torch.linalg.eigh(h)
    order = lam.abs().argsort(descending=True)[:8]
    pairs = curvature_eigenpairs(task, (x, y), 8, 40, curvature=curvature,
                                 solver=ARN(sampling="full", micro_batch_size=16))
    scale = float(lam.abs().max())
    assert torch.allclose(pairs.values, lam[order], atol=1e-8 * scale, rtol=0)
    cos = (pairs.vectors.double() * vec[:, order].T).sum(1).abs()
    assert (cos > 1 - 1e-6).all(), cos


def test_stream_covers_the_set_and_approximates_full(tiny):
    task, x, y = tiny
    lam = torch.linalg.eigh(dense_curvature(task, (x, y))).eigenvalues
    top = float(lam.abs().max())
    op = CurvatureOperator(task, (x, y), sampling="stream", batch=16, seed=0)
    kr = arnoldi(op, task.num_params, 30)
    assert op.examples_seen == 30 * 16 >= len(y)
    est = distill(kr, 1).values[0]
    assert abs(float(est) - top) < 0.5 * top  # a noisy but faithful estimate
    # a stream batch as large as the set is the full curvature
    full = curvature_eigenpairs(task, (x, y), 3, 20, solver=FULL)
    stream = curvature_eigenpairs(task, (x, y), 3, 20, solver=ARN(batch=len(y)))
    assert torch.allclose(full.values, stream.values, rtol=1e-8)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("variant", ["topk", "complement"])
def test_full_rank_equals_exact(tiny, curvature, variant):
    task, x, y = tiny
    p = task.num_params
    exact = ik.ExactInfluence(task, damping=0.01, curvature=curvature).fit((x, y))
    est = ik.ArnoldiInfluence(task, rank=p, iterations=p, damping=0.01, curvature=curvature,
                              filter=variant, solver=ARN(which="magnitude",
                                                                 sampling="full"))
    est.fit((x, y))
    q = (x[:6], y[:6])
    assert rel_error(est.scores(q), exact.scores(q)) < 1e-8
    assert rel_error(est.self_influence(), exact.self_influence()) < 1e-8


def test_low_rank_complement_matches_dense_formula(tiny):
    task, x, y = tiny
    h = dense_curvature(task, (x, y))
    lam, vec = torch.linalg.eigh(h)
    order = lam.abs().argsort(descending=True)[:10]
    e, lk = vec[:, order], lam[order]
    c = 1.0 / (float(lk.abs().min()) + 0.01)
    pre = e @ torch.diag(1 / (lk + 0.01)) @ e.T + c * (torch.eye(len(lam), dtype=torch.float64)
                                                       - e @ e.T)
    gq = ik.autodiff.all_grads(task, (x[:5], y[:5]), kind="measurement")
    gx = ik.autodiff.all_grads(task, (x, y))
    est = METHODS["arnoldi-complement"](task, rank=10, iterations=59, damping=0.01,
                                        curvature="hessian", solver=FULL).fit((x, y))
    assert rel_error(est.scores((x[:5], y[:5])), gq @ pre @ gx.T) < 1e-7


def test_horizon_filter_limits_and_one_step_is_graddot(tiny):
    lam = torch.tensor([2.0, 1e-3, 0.0, 1e-15], dtype=torch.float64)
    f = horizon_filter(lam, 0.1, 10)
    ref = (1 - (1 - 0.1 * lam[:2]) ** 10) / lam[:2]
    assert torch.allclose(f[:2], ref, rtol=1e-10)
    assert torch.allclose(f[2:], torch.full((2,), 1.0, dtype=torch.float64))
    assert torch.allclose(horizon_filter(torch.tensor([3.0], dtype=torch.float64), 0.1, 10**6),
                          torch.tensor([1 / 3.0], dtype=torch.float64))
    # one step of lr η: (1 − (1 − ηλ))/λ = η on every direction, so scores are η · GradDot
    task, x, y = tiny
    est = ik.ArnoldiInfluence(task, rank=5, iterations=20, filter=ik.HorizonFilter(0.3, 1),
                              solver=FULL).fit((x, y))
    dot = ik.GradDot(task).scores((x[:4], y[:4]), (x, y))
    assert rel_error(est.scores((x[:4], y[:4])), 0.3 * dot) < 1e-10


def test_default_horizon_is_inverse_top_eigenvalue(tiny):
    task, x, y = tiny
    kw = dict(rank=5, iterations=20, solver=FULL)
    a = ik.ArnoldiInfluence(task, filter=ik.HorizonFilter(steps=7), **kw).fit((x, y))
    lr = 1.0 / float(a.eigen.values.abs().max())
    b = ik.ArnoldiInfluence(task, filter=ik.HorizonFilter(lr, 7), **kw).fit((x, y))
    c = ik.ArnoldiInfluence(task, **kw).fit((x, y))  # default: (1/λ_max, 100)
    d = ik.ArnoldiInfluence(task, filter=ik.HorizonFilter(None, 100), **kw).fit((x, y))
    assert torch.equal(a.spectral_filter()[0], b.spectral_filter()[0])
    assert torch.equal(c.spectral_filter()[0], d.spectral_filter()[0])
    assert (c.eigen.values > 0).all()  # the horizon variant keeps positive eigenvalues


@pytest.mark.parametrize("variant", ["topk", "complement", "horizon"])
def test_self_influence_is_diagonal_of_scores(tiny, variant):
    task, x, y = tiny
    est = ik.ArnoldiInfluence(task, rank=6, iterations=30, damping=0.05, filter=variant,
                              solver=ARN(batch=16)).fit((x, y))
    assert rel_error(est.self_influence(), torch.diag(est.scores((x, y)))) < 1e-10


def test_independent_of_batch_chunk_and_query_sizes(tiny):
    task, x, y = tiny
    ref = None
    for bs, chunk, qc, micro in [(64, 4096, None, 256), (7, 11, 4, 5)]:
        est = ik.ArnoldiInfluence(task, rank=6, iterations=30, damping=0.05, batch_size=bs,
                                  chunk_size=chunk, query_chunk=qc, filter="topk",
                                  solver=ARN(sampling="fixed", batch=40,
                                                     micro_batch_size=micro))
        s = est.fit((x, y)).scores((x[:9], y[:9]))
        ref = s if ref is None else ref
        assert rel_error(s, ref) < 1e-12


def test_jvp_and_gradient_projections_agree(tiny):
    task, x, y = tiny
    kw = dict(rank=6, iterations=30, solver=FULL, filter="topk")
    a = ik.ArnoldiInfluence(task, projection="jvp", **kw).fit((x, y))
    b = ik.ArnoldiInfluence(task, projection="grad", **kw).fit((x, y))
    assert rel_error(a.train_projections(), b.train_projections()) < 1e-12
    assert rel_error(a.scores((x[:3], y[:3])), b.scores((x[:3], y[:3]))) < 1e-12
    c = ik.ArnoldiInfluence(task, projection="auto", **kw).fit((x, y))
    assert c.projection_method == "grad" and not c.projection_timings  # by rule, not timed


def test_other_train_set_and_top_k(tiny):
    task, x, y = tiny
    est = ik.ArnoldiInfluence(task, rank=6, iterations=30, solver=FULL).fit((x, y))
    sub = (x[10:30], y[10:30])
    full = est.scores((x[:4], y[:4]))
    assert rel_error(est.scores((x[:4], y[:4]), sub), full[:, 10:30]) < 1e-12
    top = est.top_k((x[:4], y[:4]), k=3)
    assert torch.equal(top.proponents, full.topk(3, dim=1).indices)


# ----------------------------------------------------------------------------- store
def test_killed_and_resumed_projection_gives_identical_scores(tiny, tmp_path, monkeypatch):
    task, x, y = tiny
    kw = dict(rank=6, iterations=30, damping=0.05, chunk_size=5, batch_size=4,
              solver=ARN(sampling="fixed", batch=32), store=tmp_path, projection="grad")
    reference = ik.ArnoldiInfluence(task, **{**kw, "store": None}).fit((x, y))
    expected = reference.scores((x[:5], y[:5]))

    real = Artifact.write_chunk
    written: list[int] = []

    def dying(self, i, tensors):
        if self.path.name != "arnoldi-features":  # the eigensolver's checkpoints
            return real(self, i, tensors)
        if len(written) == 4:
            raise KeyboardInterrupt("simulated kill after 4 chunks")
        written.append(i)
        real(self, i, tensors)

    monkeypatch.setattr(Artifact, "write_chunk", dying)
    with pytest.raises(KeyboardInterrupt):
        ik.ArnoldiInfluence(task, **kw).fit((x, y))
    monkeypatch.setattr(Artifact, "write_chunk", real)

    resumed_chunks: list[int] = []

    def counting(self, i, tensors):
        if self.path.name == "arnoldi-features":
            resumed_chunks.append(i)
        real(self, i, tensors)

    monkeypatch.setattr(Artifact, "write_chunk", counting)
    est = ik.ArnoldiInfluence(task, **kw).fit((x, y))
    assert written == [0, 1, 2, 3] and resumed_chunks == list(range(4, 10))
    assert torch.equal(est.scores((x[:5], y[:5])), expected)
    # a third run reuses everything
    resumed_chunks.clear()
    again = ik.ArnoldiInfluence(task, **kw).fit((x, y))
    assert resumed_chunks == [] and torch.equal(again.scores((x[:5], y[:5])), expected)


def test_killed_arnoldi_resumes_from_its_checkpoints(tiny, tmp_path, monkeypatch):
    """The paper's Hessian Arnoldi on a stream: a kill after 40 curvature products keeps the
    checkpoint at 25 (basis rows, coefficients, the stream's state); the rerun does only the
    rest and gives bit-identical eigenpairs and scores."""
    task, x, y = tiny
    kw = dict(rank=5, iterations=60, damping=0.05, curvature="hessian", store=tmp_path,
              solver=ARN(batch=16))
    real = CurvatureOperator.__call__
    calls: list[int] = []
    monkeypatch.setattr(CurvatureOperator, "__call__",
                        lambda self, v: calls.append(1) or real(self, v))
    ref = ik.ArnoldiInfluence(task, **{**kw, "store": None}).fit((x, y))
    total = len(calls)  # 59 = P at most; fewer if the Krylov space closes
    assert total > 40
    calls.clear()

    def dying(self, v):
        if len(calls) == 40:
            raise KeyboardInterrupt("simulated kill during Arnoldi")
        calls.append(1)
        return real(self, v)

    monkeypatch.setattr(CurvatureOperator, "__call__", dying)
    with pytest.raises(KeyboardInterrupt):
        ik.ArnoldiInfluence(task, **kw).fit((x, y))
    calls.clear()
    monkeypatch.setattr(CurvatureOperator, "__call__",
                        lambda self, v: calls.append(1) or real(self, v))
    est = ik.ArnoldiInfluence(task, **kw).fit((x, y))
    assert len(calls) == total - 25
    assert torch.equal(est.eigen.values, ref.eigen.values)
    assert torch.equal(est.scores((x[:4], y[:4])), ref.scores((x[:4], y[:4])))


def test_stale_artifact_is_refused(tiny, tmp_path):
    model, x, y = copy.deepcopy(tiny[0].model), tiny[1], tiny[2]
    task = ik.ClassificationTask(model)
    kw = dict(rank=4, iterations=20, solver=FULL, store=tmp_path)
    ik.ArnoldiInfluence(task, **kw).fit((x, y))
    with torch.no_grad():
        task.model[0].bias.add_(0.01)
    with pytest.raises(ik.ArtifactError, match="stale.*model"):
        ik.ArnoldiInfluence(task, **kw).fit((x, y))
    with pytest.raises(ik.ArtifactError, match="stale"):
        ik.ArnoldiInfluence(task, **{**kw, "rank": 5}).fit((x, y))  # other settings
    est = ik.ArnoldiInfluence(task, overwrite=True, **kw).fit((x, y))
    with pytest.raises(ik.ArtifactError, match="stale.*settings"):  # chunks would not line up
        ik.ArnoldiInfluence(task, **{**kw, "chunk_size": 7}).fit((x, y))
    fresh = ik.ArnoldiInfluence(task, rank=4, iterations=20, solver=FULL).fit((x, y))
    assert rel_error(est.scores((x[:3], y[:3])), fresh.scores((x[:3], y[:3]))) < 1e-12
    with pytest.raises(ik.ArtifactError, match="stale.*data"):
        ik.ArnoldiInfluence(task, **kw).fit((x[:-1], y[:-1]))


def test_corrupted_projection_chunk_is_refused(tiny, tmp_path):
    task, x, y = tiny
    for filt in ("horizon", "topk"):  # with and without the streamed complement
        store = tmp_path / filt
        kw = dict(rank=4, iterations=20, solver=FULL, store=store, chunk_size=10, filter=filt)
        ik.ArnoldiInfluence(task, **kw).fit((x, y))
        f = store / "arnoldi-features" / "chunk-000002.safetensors"
        blob = bytearray(f.read_bytes())
        blob[-3] ^= 0xFF
        f.write_bytes(bytes(blob))
        with pytest.raises(ik.ArtifactError, match="corrupted"):  # refused when opened
            ik.ArnoldiInfluence(task, **kw).fit((x, y))


# ----------------------------------------------------------------------------- errors, registry
def test_clear_errors(tiny):
    task, x, y = tiny
    with pytest.raises(ik.InputError, match="iterations"):
        ik.ArnoldiInfluence(task, rank=50, iterations=10, curvature="hessian")
    with pytest.raises(ik.InputError, match="method"):
        Eigensolver(method="lanczos")
    with pytest.raises(ik.InputError, match="passes"):
        Eigensolver(passes=0)
    with pytest.raises(ik.InputError, match="filter"):
        ik.ArnoldiInfluence(task, filter="nope")
    with pytest.raises(ik.InputError, match="block"):
        Eigensolver(block=0)
    with pytest.raises(ik.InputError, match="unknown option.*variant"):
        ik.ArnoldiInfluence(task, variant="topk")
    with pytest.raises(ik.InputError, match="fitted"):
        ik.ArnoldiInfluence(task, rank=2, iterations=4).scores((x[:2], y[:2]))
    with pytest.raises(ik.InputError, match="horizon steps"):
        ik.HorizonFilter(0.1, 0)


def test_registered_with_defaults(tiny):
    task, x, y = tiny
    for name, kind, complement in [("arnoldi", ik.HorizonFilter, True),
                                   ("arnoldi-topk", ik.InverseFilter, 0.0),
                                   ("arnoldi-complement", ik.InverseFilter, "auto")]:
        est = METHODS[name](task, damping=0.01)
        assert isinstance(est, ik.ArnoldiInfluence) and isinstance(est.filter, kind)
        assert est.filter.complement == complement
        assert est.rank == 50 and est.iterations == 200
    est = METHODS["arnoldi-topk"](task, rank=3, iterations=10, solver=FULL)
    assert est.fit((x, y)).scores((x[:2], y[:2])).shape == (2, len(y))


# ----------------------------------------------------------------------------- sketched complement
def test_sketched_complement_converges_to_exact_and_stays_consistent(tiny, tmp_path):
    """A CountSketch of P⊥∇ℓ(x): no collisions (sketch ≫ P) reproduces the exact complement;
    smaller sketches approximate it; self-influence stays the diagonal of the scores; a stored
    sketch is reused bit for bit."""
    task, x, y = tiny
    kw = dict(rank=6, iterations=30, damping=0.05, solver=ARN(batch=16))
    exact = ik.ArnoldiInfluence(task, **kw).fit((x, y)).scores((x[:7], y[:7]))
    wide = ik.ArnoldiInfluence(task, sketch=1 << 16, **kw).fit((x, y))  # P = 59: no collision
    assert rel_error(wide.scores((x[:7], y[:7])), exact) < 1e-10
    narrow = ik.ArnoldiInfluence(task, sketch=256, **kw).fit((x, y))
    err = rel_error(narrow.scores((x[:7], y[:7])), exact)
    assert 1e-6 < err < 0.5  # an approximation, not a copy
    assert rel_error(narrow.self_influence(), torch.diag(narrow.scores((x, y)))) < 1e-10
    stored = ik.ArnoldiInfluence(task, sketch=256, store=tmp_path, **kw).fit((x, y))
    again = ik.ArnoldiInfluence(task, sketch=256, store=tmp_path, **kw).fit((x, y))
    assert torch.equal(stored.scores((x[:7], y[:7])), again.scores((x[:7], y[:7])))
    assert torch.equal(again.scores((x[:7], y[:7])), narrow.scores((x[:7], y[:7])))
    with pytest.raises(ik.InputError, match="sketch"):
        ik.ArnoldiInfluence(task, sketch=0)


class _Mixed(nn.Module):
    """conv (a block in the rest) → Linear once per example (factored) → Linear over two
    positions (a block) → head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3, padding=1)
        self.once = nn.Linear(12, 6)
        self.twice = nn.Linear(3, 3)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.once(torch.tanh(self.conv(x)).flatten(1)))
        return self.head(torch.tanh(self.twice(h.view(-1, 2, 3))).flatten(1))


@pytest.mark.parametrize("layer_path", [True, False])
def test_default_complement_is_exact_from_the_store(tmp_path, layer_path):
    """sketch="auto" (default) stores the gradients in factored form: the scores equal the
    streamed exact complement (sketch=None) to 1e-10, queries read the store only, the
    self-influence is the diagonal of the scores, and a stored run is reused bit for bit. Over
    the per-example budget it falls back to a CountSketch of that size."""
    torch.manual_seed(0)
    task = ik.ClassificationTask(_Mixed().double())
    task._layerwise_off = not layer_path
    x = torch.randn(40, 2, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    kw = dict(rank=5, damping=0.01)
    exact = ik.ArnoldiInfluence(task, sketch=None, **kw).fit((x, y))
    assert exact.complement == "stream" and not exact.scores_from_features()
    est = ik.ArnoldiInfluence(task, store=tmp_path, **kw).fit((x, y))
    assert est.complement == "exact" and est.scores_from_features()
    keys = set(next(iter(est.train_features())))
    parts = {k for k in keys if k.startswith("dot.")}
    assert (parts == {"dot.rest"}) == (not layer_path)
    if layer_path:  # `once` factored (12 + 6 numbers, not 72), `twice` a block
        assert {"dot.in1", "dot.out1", "dot.block2"} <= parts
        assert est._exact_width < task.num_params
    q = (x[:6], y[:6])
    assert rel_error(est.scores(q), exact.scores(q)) < 1e-10
    assert rel_error(est.self_influence(), torch.diag(est.scores((x, y)))) < 1e-10
    again = ik.ArnoldiInfluence(task, store=tmp_path, **kw).fit((x, y))
    assert torch.equal(again.scores(q), est.scores(q))
    import influencekit.estimators.arnoldi as arn

    small = arn._EXACT_VALUES
    try:
        arn._EXACT_VALUES = 8  # below one example's width: a sketch of that size
        over = ik.ArnoldiInfluence(task, **kw).fit((x, y))
    finally:
        arn._EXACT_VALUES = small
    assert over.complement == "sketch" and over.sketch_dim == 8
    err = rel_error(over.scores(q), exact.scores(q))
    assert 1e-6 < err < 2


def test_store_refuses_a_changed_loss_or_architecture(tmp_path):
    """The reliability issue's worst case: a stored eigenbasis reused after the loss (label
    smoothing) or the architecture (Tanh → ReLU, same state_dict) changed gave scores off by
    orders of magnitude. Now it is refused, naming what changed."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 3, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(0)
    tanh = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    relu = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    relu.load_state_dict(tanh.state_dict())
    kw = dict(rank=3, iterations=10, damping=0.1, solver=FULL, store=tmp_path)
    ik.ArnoldiInfluence(ik.ClassificationTask(tanh), **kw).fit((x, y))

    def smoothed(outputs, batch):
        return F.cross_entropy(outputs, batch[1], reduction="none", label_smoothing=0.1)

    with pytest.raises(ik.ArtifactError, match="stale.*task"):
        ik.ArnoldiInfluence(ik.Task(tanh, loss=smoothed), **kw).fit((x, y))
    with pytest.raises(ik.ArtifactError, match="stale.*architecture"):
        ik.ArnoldiInfluence(ik.ClassificationTask(relu), **kw).fit((x, y))
