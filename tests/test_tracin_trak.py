"""TracIn and TRAK: oracles (lr × GradDot, the dense closed form of the after-kernel),
trainer integration, seeded projections, invariances, the artifact store and bad input.

Tolerances: float64 throughout; identities that only reorder sums are checked to 1e-10
(absolute on O(1) scores, or relative), closed forms that go through a matrix inverse to 1e-8
(relative).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import influencekit as ik
from conftest import rel_error
from influencekit.autodiff import all_grads
from influencekit.errors import ArtifactError, CurvatureError, InputError
from influencekit.estimators.tracin import Checkpoints, RandomProjection, TracIn
from influencekit.estimators.trak import TRAKInfluence, _margin
from influencekit.training import TrainConfig, Trainer, train


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _perturbed(model: nn.Module, seed: int, scale: float = 0.3) -> nn.Module:
    m = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return m


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def small():
    """The module-scoped tiny MLP (59 parameters, 40 points) and two other parameter states."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 3, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    return model, (x, y), (x[:6], y[:6])


# --------------------------------------------------------------------------- TracIn
def test_tracin_one_checkpoint_is_lr_times_graddot(small):
    model, train, queries = small
    task = ik.ClassificationTask(model)
    gd = ik.GradDot(task).scores(queries, train)
    for ckpt in (model, _state(model)):
        s = TracIn(task, [ckpt], [0.3]).scores(queries, train)
        assert (s - 0.3 * gd).abs().max() < 1e-10
    # no checkpoints: the task's model with η = 1, i.e. GradDot (what `evaluate` runs)
    assert (TracIn(task).scores(queries, train) - gd).abs().max() < 1e-10
    assert (TracIn(task).self_influence(train) - ik.GradDot(task).self_influence(train)
            ).abs().max() < 1e-10


def test_tracin_sums_graddot_over_checkpoints(small):
    model, train, queries = small
    models = [_perturbed(model, s) for s in (1, 2, 3)]
    lrs = [0.5, 0.2, 0.05]
    expected = sum(lr * ik.GradDot(ik.ClassificationTask(m)).scores(queries, train)
                   for lr, m in zip(lrs, models))
    task = ik.ClassificationTask(model)
    est = TracIn(task, [_state(m) for m in models], lrs)
    assert (est.scores(queries, train) - expected).abs().max() < 1e-10
    self_expected = sum(lr * ik.GradDot(ik.ClassificationTask(m)).self_influence(train)
                        for lr, m in zip(lrs, models))
    assert (est.self_influence(train) - self_expected).abs().max() < 1e-10
    # self-influence = diagonal of the pairwise scores
    assert (est.scores(train, train).diag() - est.self_influence(train)).abs().max() < 1e-10


def test_tracin_never_modifies_the_users_model(small):
    model, train, queries = small
    before = _state(model)
    others = [_perturbed(model, s) for s in (4, 5)]
    others_before = [_state(m) for m in others]
    task = ik.ClassificationTask(model)
    TracIn(task, others, [1.0, 1.0]).scores(queries, train)
    TracIn(task, others, [1.0, 1.0], projection_dim=8).fit(train).scores(queries)
    TRAKInfluence(task, 8, models=others, damping=1e-3).fit(train).scores(queries)
    assert _same_state(_state(model), before)
    assert all(_same_state(_state(m), b) for m, b in zip(others, others_before))


def test_tracin_projection_and_chunking(small):
    model, train, queries = small
    task = ik.ClassificationTask(model)
    ckpts = [_perturbed(model, 6), model]
    ref = TracIn(task, ckpts, [0.2, 0.1], projection_dim=16, seed=3).fit(train)
    s = ref.scores(queries)
    other = TracIn(task, ckpts, [0.2, 0.1], projection_dim=16, seed=3, batch_size=7,
                   chunk_size=11, query_chunk=2).fit(train)
    assert (other.scores(queries) - s).abs().max() < 1e-10
    assert (ref.scores(train).diag() - ref.self_influence()).abs().max() < 1e-10
    # the projected score is the exact one in the projected space (dense oracle)
    r = ref.projector().matrix()
    dense = sum(lr * (all_grads(ik.ClassificationTask(m), queries, kind="measurement") @ r)
                @ (all_grads(ik.ClassificationTask(m), train) @ r).T
                for lr, m in zip([0.2, 0.1], ckpts))
    assert rel_error(s, dense) < 1e-10


def test_tracin_from_a_trainer_run_equals_building_it_by_hand(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long()

    def builder() -> nn.Module:
        return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()

    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.2, schedule="cosine")
    # by hand: step the trainer epoch by epoch
    by_hand = Trainer(builder, (x, y), cfg)
    spe = by_hand.steps_per_epoch
    states, lrs = [], []
    for e in range(cfg.epochs):
        by_hand.run(steps=spe)
        states.append(by_hand.parameters())
        lrs.append(sum(by_hand.lr_at_step(t) for t in range(e * spe, (e + 1) * spe)))
    # one training run with a collector, and one with checkpoints on disk
    ckpts = TracIn.collector(every=1, unit="epoch")
    result = train(builder, (x, y), cfg, callback=ckpts, checkpoint_dir=tmp_path / "run")
    assert ckpts.steps == [spe, 2 * spe, 3 * spe]
    assert ckpts.learning_rates == pytest.approx(lrs, rel=1e-12)
    task = ik.ClassificationTask(result.model)
    queries = (x[:5], y[:5])
    expected = TracIn(task, states, lrs).scores(queries, (x, y))
    from_run = TracIn.from_trainer(task, ckpts).scores(queries, (x, y))
    from_dir = TracIn.from_trainer(task, tmp_path / "run").scores(queries, (x, y))
    assert (from_run - expected).abs().max() < 1e-10
    assert (from_dir - expected).abs().max() < 1e-10
    # a single trainer checkpoint folder or trainer state works as a checkpoint too
    one = TracIn(task, [tmp_path / "run" / "epoch-0003"], [lrs[-1]]).scores(queries, (x, y))
    assert (one - TracIn(task, [states[-1]], [lrs[-1]]).scores(queries, (x, y))
            ).abs().max() < 1e-10

    # every 2 steps; the end of the run is kept too, with the learning rates of its steps
    steps = Checkpoints(every=2, unit="step")
    trainer = Trainer(builder, (x, y), cfg)
    trainer.run(callback=steps)
    total = trainer.total_steps
    assert steps.steps == list(range(2, total + 1, 2)) + ([total] if total % 2 else [])
    assert sum(steps.learning_rates) == pytest.approx(
        sum(trainer.lr_at_step(t) for t in range(total)), rel=1e-12)
    assert _same_state(steps.states[-1], {k: v for k, v in trainer.model.state_dict().items()})


# --------------------------------------------------------------------------- TRAK
@pytest.fixture(scope="module")
def logistic():
    """Softmax regression (15 parameters, 150 points): N > P, so the kernel is invertible."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(150, 4, generator=g, dtype=torch.float64)
    y = (x @ torch.randn(4, 3, generator=g, dtype=torch.float64)).argmax(1)
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    return model, (x, y), (x[:7], y[:7])


def _closed_form(task, train, queries, damping, r=None, output="loss"):
    """Dense ``g_qᵀ R (RᵀΦᵀΦR/N + λI)⁻¹ Rᵀ g_x`` with ``g_x`` the loss gradients."""
    g_q = all_grads(task, queries, kind="measurement")
    g_x = all_grads(task, train)
    if output == "margin":
        margin = copy.copy(task)
        margin.measurement_fn = _margin
        phi = all_grads(margin, train, kind="measurement")
    else:
        phi = g_x
    if r is not None:
        g_q, g_x, phi = g_q @ r, g_x @ r, phi @ r
    kern = phi.T @ phi / len(train[1]) + damping * torch.eye(phi.shape[1], dtype=phi.dtype)
    return g_q @ torch.linalg.solve(kern, g_x.T)


def test_trak_exact_gradients_match_the_closed_form(logistic):
    model, train, queries = logistic
    task = ik.ClassificationTask(model)
    for output in ("margin", "loss"):
        est = TRAKInfluence(task, projection="none", output=output, damping=1e-3).fit(train)
        assert rel_error(est.scores(queries), _closed_form(task, train, queries, 1e-3,
                                                           output=output)) < 1e-8
    # the margin identity behind TRAK's (1 − p): ∇ℓ(x) = −(1 − p) ∇f(x) exactly
    est = TRAKInfluence(task, projection="none", output="margin")
    feats = est.features(train, "loss")
    assert rel_error(feats["c0"][:, None] * feats["phi0"], all_grads(task, train)) < 1e-10


def test_trak_projection_dim_at_least_p(logistic):
    model, train, queries = logistic
    task = ik.ClassificationTask(model)
    p = task.num_params
    # k = P, λ = 0: a square invertible projection cancels, leaving the unprojected form
    # (least squares: a softmax's shift invariance would make the undamped kernel singular)
    x = train[0]
    reg = ik.Task(nn.Linear(4, 1).double(), loss=lambda o, b: 0.5 * (o[:, 0] - b[1]) ** 2)
    data = (x, x @ torch.tensor([1.0, -2.0, 0.5, 0.3], dtype=torch.float64) + 0.1 * x[:, 0] ** 2)
    est = TRAKInfluence(reg, 5, projection="gaussian", damping=0.0).fit(data)
    q = (x[:7], data[1][:7])
    assert rel_error(est.scores(q), _closed_form(reg, data, q, 0.0, output="loss")) < 1e-8
    # k ≥ P with damping: the dense closed form in the projected space
    for output in ("loss", "margin"):
        est = TRAKInfluence(task, 2 * p, damping=1e-3, seed=5, output=output).fit(train)
        r = est.projector().matrix()
        assert rel_error(est.scores(queries), _closed_form(task, train, queries, 1e-3, r,
                                                           output)) < 1e-8
    # more dimensions than examples without damping: a clear error
    with pytest.raises(CurvatureError, match="damping"):
        TRAKInfluence(task, 200, damping=0.0).fit((train[0][:20], train[1][:20]))


def test_trak_auto_damping_is_the_mean_kernel_eigenvalue(logistic, small):
    """The default λ = tr(K_m)/k of each member's own kernel; it also makes a kernel with more
    dimensions than examples invertible."""
    model, train, queries = logistic
    task = ik.ClassificationTask(model)
    for output in ("loss", "margin"):
        est = TRAKInfluence(task, projection="none", output=output).fit(train)
        phi = all_grads(task, train)
        if output == "margin":
            margin = copy.copy(task)
            margin.measurement_fn = _margin
            phi = all_grads(margin, train, kind="measurement")
        lam = float((phi ** 2).sum() / len(train[1]) / phi.shape[1])
        assert est.kernel_dampings == [pytest.approx(lam, rel=1e-12)]
        assert rel_error(est.scores(queries), _closed_form(task, train, queries, lam,
                                                           output=output)) < 1e-8
    assert "damping='auto'" in repr(est) and est.settings()["damping"] == "auto"
    est = TRAKInfluence(task, 200).fit((train[0][:20], train[1][:20]))  # k > N: fine
    assert torch.isfinite(est.scores(queries)).all()
    mlp, data, _ = small
    other = copy.deepcopy(mlp)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    ens = TRAKInfluence(ik.ClassificationTask(mlp), 16, models=[mlp, other]).fit(data)
    alone = [TRAKInfluence(ik.ClassificationTask(m), 16).fit(data).kernel_dampings[0]
             for m in (mlp, other)]
    assert ens.kernel_dampings == pytest.approx(alone, rel=1e-12)  # each member its own λ
    assert alone[0] != pytest.approx(alone[1])
    with pytest.raises(InputError, match="'auto'"):
        TRAKInfluence(task, 8, damping="big")


def test_trak_ensemble_is_the_mean_of_single_models(small):
    model, train, queries = small
    task = ik.ClassificationTask(model)
    members = [model, _perturbed(model, 7)]
    ens = TRAKInfluence(task, 24, models=members, damping=1e-2, seed=1, output="margin"
                        ).fit(train)
    singles = [TRAKInfluence(ik.ClassificationTask(m), 24, damping=1e-2, seed=1,
                             output="margin").fit(train)
               for m in members]
    mean = sum(s.scores(queries) for s in singles) / 2
    assert rel_error(ens.scores(queries), mean) < 1e-10
    assert rel_error(ens.self_influence(), sum(s.self_influence() for s in singles) / 2) < 1e-10
    # self-influence = diagonal of pairwise scores (measurement = loss)
    assert (ens.scores(train).diag() - ens.self_influence()).abs().max() < 1e-10
    assert (ens.self_influence() >= 0).all()


def test_trak_seeded_and_invariant_to_batching(small):
    model, train, queries = small
    task = ik.ClassificationTask(model)
    a = TRAKInfluence(task, 16, damping=1e-2, seed=3).fit(train).scores(queries)
    b = TRAKInfluence(task, 16, damping=1e-2, seed=3, batch_size=7, chunk_size=9,
                      query_chunk=4).fit(train).scores(queries)
    c = TRAKInfluence(task, 16, damping=1e-2, seed=4).fit(train).scores(queries)
    assert (a - b).abs().max() < 1e-10 * a.abs().max()
    assert rel_error(c, a) > 1e-3


def test_random_projection_blocks():
    for kind in ("rademacher", "gaussian"):
        proj = RandomProjection(9000, 5, kind, seed=2, dtype=torch.float64)
        full = proj.matrix()
        assert full.shape == (9000, 5)
        assert torch.equal(full, RandomProjection(9000, 5, kind, seed=2,
                                                  dtype=torch.float64).matrix())
        if kind == "rademacher":
            assert torch.allclose(full.abs(), torch.full_like(full, 5 ** -0.5))
        g = torch.randn(3, 9000, dtype=torch.float64)
        proj.cached = False  # the block-by-block path gives the same product
        assert rel_error(proj(g), g @ full) < 1e-12


# --------------------------------------------------------------------------- store
class _Interrupted(Exception):
    pass


def test_trak_store_reuse_resume_and_stale(small, tmp_path, monkeypatch):
    model, train, queries = small
    task = ik.ClassificationTask(model)
    members = [model, _perturbed(model, 8)]
    kw = dict(models=members, damping=1e-2, batch_size=10, chunk_size=10, output="margin")
    ref = TRAKInfluence(task, 12, **kw).fit(train).scores(queries)

    calls = {"n": 0}
    original = TRAKInfluence.features

    def failing(self, batch, kind):
        if kind == "loss":
            calls["n"] += 1
            if calls["n"] == 3:
                raise _Interrupted
        return original(self, batch, kind)

    monkeypatch.setattr(TRAKInfluence, "features", failing)
    with pytest.raises(_Interrupted):
        TRAKInfluence(task, 12, store=tmp_path, **kw).fit(train)
    calls["n"] = 0
    s = TRAKInfluence(task, 12, store=tmp_path, **kw).fit(train).scores(queries)
    assert calls["n"] == 2  # 4 chunks: the 2 written before the interruption are reused
    assert (s - ref).abs().max() < 1e-12
    calls["n"] = 0
    reused = TRAKInfluence(task, 12, store=tmp_path, **{**kw, "damping": 0.1}).fit(train)
    assert calls["n"] == 0  # other damping: same features, new kernel
    assert rel_error(reused.scores(queries), ref) > 1e-3
    with pytest.raises(ArtifactError, match="stale"):
        TRAKInfluence(task, 12, store=tmp_path,
                      **{**kw, "models": [model, _perturbed(model, 9)]}).fit(train)
    monkeypatch.undo()
    TRAKInfluence(task, 12, store=tmp_path, overwrite=True,
                  **{**kw, "models": [model, _perturbed(model, 9)]}).fit(train)


def test_tracin_store_reuse(small, tmp_path, monkeypatch):
    model, train, queries = small
    task = ik.ClassificationTask(model)
    ref = TracIn(task, [model], [0.5], projection_dim=8, store=tmp_path).fit(train
                                                                          ).scores(queries)
    calls = {"n": 0}
    original = TracIn.features

    def counting(self, batch, kind):
        calls["n"] += kind == "loss"
        return original(self, batch, kind)

    monkeypatch.setattr(TracIn, "features", counting)
    again = TracIn(task, [model], [0.5], projection_dim=8, store=tmp_path).fit(train)
    assert calls["n"] == 0  # the stored projections are read back
    assert (again.scores(queries) - ref).abs().max() < 1e-12
    with pytest.raises(ArtifactError, match="stale"):
        TracIn(task, [_perturbed(model, 1)], [0.5], projection_dim=8, store=tmp_path
               ).fit(train)


# --------------------------------------------------------------------------- bad input
def test_bad_arguments_name_themselves(small):
    model, train, _ = small
    task = ik.ClassificationTask(model)
    wrong = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    seen = Checkpoints()
    seen(SimpleNamespace(step=1, epoch=0, lr=0.1, model=model))
    cases = [
        (lambda: TracIn(task, [model, model], [0.1]), "learning_rates"),
        (lambda: TracIn(task, [model], [float("nan")]), r"learning_rates\[0\]"),
        (lambda: TracIn(task, [wrong]), r"checkpoints\[0\]"),
        (lambda: TracIn(task, [{"nope": torch.zeros(1)}]), r"checkpoints\[0\]"),
        (lambda: TracIn(task, [3]), r"checkpoints\[0\]"),
        (lambda: TracIn(task, []), "checkpoints"),
        (lambda: TracIn(task, projection_dim=0), "projection_dim"),
        (lambda: TracIn(task, projection="sparse"), "projection"),
        (lambda: TracIn(task, seen, [1.0]), "learning_rates"),
        (lambda: TracIn(task, Checkpoints()), "no training step"),
        (lambda: TracIn(task, rank=3), "unknown option"),
        (lambda: TRAKInfluence(task, -1), "projection_dim"),
        (lambda: TRAKInfluence(task, 8, seed=-1), "seed"),
        (lambda: TRAKInfluence(task, 8, output="logit"), "output"),
        (lambda: TRAKInfluence(task, 8, models=[model], checkpoints=[model]), "models="),
        (lambda: TRAKInfluence(ik.Task(model, loss=lambda o, b: (o ** 2).sum(1)), 8,
                               output="margin"), "output"),
        (lambda: TRAKInfluence(task, 8, damping=-1.0), "damping"),
        (lambda: Checkpoints(unit="week"), "unit"),
        (lambda: Checkpoints(every=0), "every"),
        (lambda: TracIn.from_trainer(task, 5), "source"),
    ]
    for make, name in cases:
        with pytest.raises(InputError, match=name):
            make()
    with pytest.raises(InputError, match="fit"):
        TRAKInfluence(task, 8).scores(train)
