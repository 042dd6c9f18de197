"""Training dynamics: unrolled influence against finite differences and a closed form, twin runs
against the trainer (bit for bit, runs counted, resume), and the analyses on known curves."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import influencekit as ik
from influencekit.dynamics import (
    TwinRuns,
    fading_curve,
    growth_rate,
    influence_horizon,
    log_slope,
    trajectory_influence,
    twin_runs,
    unrolled_influence,
)
from influencekit.dynamics import twins as twins_module
from influencekit.errors import InputError
from influencekit.groundtruth.retrain import measure
from influencekit.training import TrainConfig, Trainer, train

N = 12
# SGD with momentum, weight decay, cosine schedule, mini-batches with a smaller last batch
CONFIG = TrainConfig(epochs=3, batch_size=5, lr=0.3, momentum=0.9, weight_decay=0.01,
                     schedule="cosine")


def builder() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 3, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    q = (torch.randn(4, 3, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 1]))
    return (x, y), q


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# --------------------------------------------------------------------------- unrolled influence
@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_unrolled_matches_finite_differences_through_the_trainer(problem, mode):
    """score = −N·dm/dw_x against central differences of the real trainer in the weight of x
    (h = 2⁻¹⁰, exact in the trainer's float32 weights). Measured rel. error ≈ 2e-8; bound 1e-4."""
    data, q = problem
    examples = [0, 5]
    scores = unrolled_influence(builder, data, CONFIG, q, examples=examples, mode=mode)
    assert scores.shape == (4, 2)
    h = 2.0 ** -10
    for k, i in enumerate(examples):
        ms = []
        for sign in (1, -1):
            w = torch.ones(N)
            w[i] += sign * h
            ms.append(measure(ik.ClassificationTask(train(builder, data, CONFIG,
                                                          weights=w).model), q))
        fd = -N * (ms[0] - ms[1]) / (2 * h)
        assert float((scores[:, k] - fd).norm() / fd.norm()) <= 1e-4


def test_forward_and_reverse_modes_agree_and_removal_sign(problem):
    data, q = problem
    fwd = trajectory_influence(builder, data, CONFIG, q, mode="forward")
    rev = trajectory_influence(builder, data, CONFIG, q, mode="reverse")
    assert fwd.unrolled is not None and rev.unrolled is not None
    assert fwd.unrolled.shape == (4, N)
    torch.testing.assert_close(fwd.unrolled, rev.unrolled, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(fwd.same_time, rev.same_time)
    # removing x changes m(q) by about +score/N (first order)
    cfg = TrainConfig(**{**CONFIG.__dict__, "lr": 0.05})  # small steps: nearly linear
    s = unrolled_influence(builder, data, cfg, q, examples=[2])[:, 0]
    base = measure(ik.ClassificationTask(train(builder, data, cfg).model), q)
    removed = measure(ik.ClassificationTask(train(builder, data, cfg, remove=[2]).model), q)
    assert float(((removed - base) - s / N).norm() / (s / N).norm()) < 0.05


def test_unrolled_closed_form_on_a_quadratic():
    """Linear regression, ℓ = ½(xᵀθ − y)², full-batch GD from θ* for T steps:
    dθ_T/dw_x = −(1/N)(I − (I − ηH)^T) H⁻¹ ∇ℓ(x) with H = XᵀX/N, so
    score = −N·∇m(q)ᵀ dθ_T/dw_x = ∇m(q)ᵀ (I − (I − ηH)^T) H⁻¹ ∇ℓ(x) (rel. error ≤ 1e-8).
    The same-time sum is then T·η·∇m(q)ᵀ∇ℓ(x) (the finite-horizon small-λ limit)."""
    g = torch.Generator().manual_seed(3)
    n, d, steps, lr = 10, 3, 7, 0.2
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x @ torch.randn(d, generator=g, dtype=torch.float64) + 0.3 * torch.randn(
        n, generator=g, dtype=torch.float64)
    q = (torch.randn(2, d, generator=g, dtype=torch.float64),
         torch.randn(2, generator=g, dtype=torch.float64))
    theta = torch.linalg.lstsq(x, y[:, None]).solution[:, 0]
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(theta[None])

    def sq(out, batch):
        return 0.5 * (out[:, 0] - batch[1]) ** 2

    task = ik.Task(model, loss=sq)
    cfg = TrainConfig(epochs=steps, batch_size=n, lr=lr, momentum=0.0)
    out = trajectory_influence(model, (x, y), cfg, q, task=task, mode="reverse")
    h = x.T @ x / n
    grad_train = (x @ theta - y)[:, None] * x  # [n, d]
    grad_q = (q[0] @ theta - q[1])[:, None] * q[0]
    filt = torch.eye(d, dtype=torch.float64) - torch.linalg.matrix_power(
        torch.eye(d, dtype=torch.float64) - lr * h, steps)
    expected = grad_q @ filt @ torch.linalg.solve(h, grad_train.T)
    assert float((out.unrolled - expected).norm() / expected.norm()) < 1e-8
    same = steps * lr * grad_q @ grad_train.T
    assert float((out.same_time - same).norm() / same.norm()) < 1e-8


def test_unrolled_refuses_adam_and_dropout(problem):
    data, q = problem
    with pytest.raises(InputError, match="Adam"):
        unrolled_influence(builder, data, TrainConfig(epochs=1, optimizer="adam"), q)
    with pytest.raises(InputError, match="dropout"):
        unrolled_influence(lambda: nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5)).double(),
                           data, TrainConfig(epochs=1), q)


# --------------------------------------------------------------------------- twin runs
TWIN_CONFIG = TrainConfig(epochs=2, batch_size=5, lr=0.3, momentum=0.9, weight_decay=0.01)


class SpyTrainer(Trainer):
    """Counts runs and steps, keeps each run's final parameters; can fail on the k-th run."""

    runs: list[tuple[torch.Tensor, int, torch.Tensor]] = []
    steps = 0
    fail_at: int | None = None

    def __init__(self, *args, **kwargs):
        if SpyTrainer.fail_at is not None and len(SpyTrainer.runs) == SpyTrainer.fail_at:
            raise KeyboardInterrupt("simulated kill")
        super().__init__(*args, **kwargs)

    def run(self, steps=None, callback=None):
        before = self.step
        super().run(steps, callback)
        SpyTrainer.steps += self.step - before
        SpyTrainer.runs.append((self.weights.clone(), self.config.seed, flat(self.model)))
        return self


@pytest.fixture
def spy(monkeypatch):
    SpyTrainer.runs, SpyTrainer.steps, SpyTrainer.fail_at = [], 0, None
    monkeypatch.setattr(twins_module, "Trainer", SpyTrainer)
    return SpyTrainer


def test_twin_runs_match_the_trainer_and_share_the_reference(problem, spy):
    data, q = problem
    runs = twin_runs(builder, data, TWIN_CONFIG, q, remove=[0, 3], upweight=[5], epsilon=0.5,
                     record_every=2, control_seeds=(1,))
    total = 2 * math.ceil(N / 5)
    # one reference, three twins, one control — the reference is not rerun per twin
    assert len(spy.runs) == 5 and spy.steps == 5 * total
    assert sum(bool((w == 1).all()) and seed == 0 for w, seed, _ in spy.runs) == 1
    assert runs.steps.tolist() == [2, 4, total]
    assert runs.divergence.shape == (3, 3) and runs.measure_twin.shape == (3, 3, 4)
    assert runs.layer_divergence.shape == (3, 3, 2) and runs.layers == ["0", "2"]
    assert runs.delta_w.tolist() == [-1.0, -1.0, 0.5]
    # the twin's final parameters are those of train(..., remove=[i]), bit for bit
    ref = train(builder, data, TWIN_CONFIG).model
    removed = train(builder, data, TWIN_CONFIG, remove=[3]).model
    twin_final = next(p for w, _, p in spy.runs if w[3] == 0)
    assert torch.equal(twin_final, flat(removed))
    assert torch.equal(spy.runs[0][2], flat(ref))
    torch.testing.assert_close(runs.divergence[-1, 1], (flat(removed) - flat(ref)).norm(),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(runs.layer_divergence[-1].norm(dim=1), runs.divergence[-1])
    torch.testing.assert_close(runs.measure_ref[-1], measure(ik.ClassificationTask(ref), q))
    torch.testing.assert_close(runs.effect[-1, 1],
                               measure(ik.ClassificationTask(removed), q)
                               - measure(ik.ClassificationTask(ref), q))
    start = flat(train(builder, data, TrainConfig(epochs=0)).model)
    torch.testing.assert_close(runs.start_distance[-1], (flat(ref) - start).norm())
    assert runs.control_divergence.shape == (3, 1) and (runs.control_divergence > 0).all()


def test_twin_runs_resume_after_a_kill(problem, spy, tmp_path):
    data, q = problem
    kw = dict(remove=[0, 3, 7], record_every=3, control_seeds=(2,), store=tmp_path)
    spy.fail_at = 2  # killed after the reference and the first twin
    with pytest.raises(KeyboardInterrupt):
        twin_runs(builder, data, TWIN_CONFIG, q, **kw)
    assert len(spy.runs) == 2
    spy.runs, spy.fail_at = [], None
    resumed = twin_runs(builder, data, TWIN_CONFIG, q, **kw)
    assert len(spy.runs) == 3  # twins 3 and 7 and the control; nothing else rerun
    assert all(w[0] == 1 and (w == 0).sum() + (seed != 0) == 1 for w, seed, _ in spy.runs)
    spy.runs = []
    again = twin_runs(builder, data, TWIN_CONFIG, q, **kw)
    assert spy.runs == []  # everything from the store
    fresh = twin_runs(builder, data, TWIN_CONFIG, q, **{**kw, "store": None})
    for a, b in ((resumed, fresh), (again, fresh)):
        assert torch.equal(a.divergence, b.divergence)
        assert torch.equal(a.measure_twin, b.measure_twin)
        assert torch.equal(a.control_divergence, b.control_divergence)


def test_twin_runs_save_and_load(problem, tmp_path):
    data, q = problem
    runs = twin_runs(builder, data, TrainConfig(epochs=1, batch_size=6), q, remove=[1],
                     control_seeds=())
    back = TwinRuns.load(runs.save(tmp_path / "twins.json"))
    torch.testing.assert_close(back.divergence, runs.divergence)
    assert back.control_divergence.shape == runs.control_divergence.shape == (2, 0)
    assert back.layers == runs.layers and back.n_train == N


def test_twin_runs_bad_input(problem):
    data, q = problem
    with pytest.raises(InputError, match="indices"):
        twin_runs(builder, data, TWIN_CONFIG, q, remove=[N])
    with pytest.raises(InputError, match="reference's own seed"):
        twin_runs(builder, data, TWIN_CONFIG, q, remove=[0], control_seeds=(0,))
    with pytest.raises(InputError, match="record steps"):
        twin_runs(builder, data, TWIN_CONFIG, q, remove=[0], record_every=[99])


# --------------------------------------------------------------------------- analyses
def synthetic_runs(divergence: np.ndarray, effect: np.ndarray, control: np.ndarray | None = None,
                   steps: np.ndarray | None = None) -> TwinRuns:
    r, p = divergence.shape
    q = effect.shape[2]
    steps = np.arange(1, r + 1) if steps is None else steps
    ctrl = np.zeros((r, 0)) if control is None else control
    t = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    return TwinRuns(
        steps=torch.as_tensor(steps), examples=torch.arange(p), delta_w=-torch.ones(p),
        n_train=p, layers=["all"], start_distance=torch.ones(r), divergence=t(divergence),
        layer_divergence=t(divergence[..., None]), measure_ref=torch.zeros(r, q),
        measure_twin=t(effect), control_seeds=list(range(ctrl.shape[1])),
        control_divergence=t(ctrl), control_layer_divergence=t(ctrl[..., None]),
        control_measure=torch.zeros(r, ctrl.shape[1], q))


def test_growth_rate_recovers_known_exponents():
    """Curves c_p·exp(a t): the rate is a exactly (1e-10), for twins (a = 0.05) and control
    (a = 0.01); with multiplicative noise (σ = 0.2) the 95% bootstrap interval covers a."""
    steps = np.arange(1, 61)
    rng = np.random.default_rng(0)
    scales = rng.uniform(0.5, 2.0, 8)
    div = scales * np.exp(0.05 * steps)[:, None]
    ctrl = np.exp(0.01 * steps)[:, None] * np.array([3.0, 4.0])
    g = growth_rate(synthetic_runs(div, np.zeros((60, 8, 1)), ctrl))
    assert abs(g.twins.rate - 0.05) < 1e-10 and abs(g.control.rate - 0.01) < 1e-10
    assert g.twins.low <= 0.05 <= g.twins.high and g.twins.high - g.twins.low < 1e-9
    assert abs(g.twins.doubling_steps - math.log(2) / 0.05) < 1e-6
    noisy = div * np.exp(0.2 * rng.standard_normal(div.shape))
    s = log_slope(steps, noisy)
    assert s.low < 0.05 < s.high and s.high - s.low < 0.01
    one = log_slope(steps, noisy[:, :1])  # single curve: t-interval of the regression
    assert one.low < 0.05 < one.high and one.n_curves == 1
    late = log_slope(steps, np.where(steps < 30, 1.0, np.exp(0.1 * (steps - 30)))[:, None],
                     start=30)
    assert abs(late.rate - 0.1) < 1e-10


def test_fading_curve_and_horizon_on_known_curves():
    """actual(t) = d(t)·predicted + noise(t) with a known signal-to-noise ratio: correlation
    1 at t = 1, falling; the magnitude of the pure signal part gives the ratio d(t)."""
    rng = np.random.default_rng(1)
    p, q, r = 30, 5, 10
    scores = rng.standard_normal((q, p))
    predicted = scores.T / p  # removal: +score/N
    noise = rng.standard_normal((p, q)) * predicted.std()
    effect = np.stack([predicted + (t / 3) * noise for t in range(r)])
    runs = synthetic_runs(np.ones((r, p)), effect)
    curve = fading_curve(runs, torch.as_tensor(scores))
    assert curve.pearson[0] == pytest.approx(1.0) and curve.spearman[0] == pytest.approx(1.0)
    assert curve.per_query_spearman[0] == pytest.approx(1.0)
    assert np.all(np.diff(curve.pearson) < 0.05) and curve.pearson[-1] < 0.5
    scaled = synthetic_runs(np.ones((r, p)), np.stack([0.5 ** t * predicted for t in range(r)]))
    c2 = fading_curve(scaled, scores)
    np.testing.assert_allclose(c2.magnitude_ratio, 0.5 ** np.arange(r))
    np.testing.assert_allclose(c2.spearman, 1.0)
    assert c2.horizon(0.5) == math.inf
    assert curve.horizon(0.9, "pearson") == curve.steps[np.argmax(curve.pearson < 0.9)]
    with pytest.raises(InputError, match="scores must be"):
        fading_curve(runs, scores[:, :3])


def test_influence_horizon_definition():
    steps = np.arange(0, 101, 10)
    tau = 40.0
    corr = np.exp(-steps / tau)  # falls below 0.5 after τ·ln 2 ≈ 27.7
    assert influence_horizon(steps, corr, 0.5) == 30
    rise_fall = np.array([0.1, 0.4, 0.7, 0.8, 0.6, 0.45, 0.3, 0.2, 0.1, 0.1, 0.0])
    assert influence_horizon(steps, rise_fall, 0.5) == 50  # low early values do not count
    assert influence_horizon(steps, np.full(11, 0.9), 0.5) == math.inf
    assert influence_horizon(steps, np.full(11, 0.1), 0.5) == 0.0
    assert influence_horizon(steps, np.r_[0.9, np.nan, np.full(9, 0.9)], 0.5) == 10
