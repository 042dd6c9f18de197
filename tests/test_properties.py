"""Properties every public entry point keeps, whatever it is given.

- A user's model is never modified (parameters, buffers, train/eval mode, requires_grad).
- Generated invalid arguments to every estimator's constructor, ``fit`` and ``scores`` either
  work or raise an :class:`~influencekit.InfluenceError` — never a raw Python/torch exception,
  never non-finite scores, never a hang (each example runs under an alarm).
"""

from __future__ import annotations

import contextlib
import signal

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import influencekit as ik

# --------------------------------------------------------------------------- model untouched


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.2),
                          nn.Linear(6, 2)).double()
    model[4].bias.requires_grad_(False)  # a frozen parameter must stay frozen
    model.train()  # the user left it in training mode: it must stay there
    with torch.no_grad():
        model(torch.randn(8, 3, dtype=torch.float64))  # non-trivial running statistics
    return model


def _snapshot(model: nn.Module) -> tuple:
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [m.training for m in model.modules()],
            [p.requires_grad for p in model.parameters()])


def _assert_same(model: nn.Module, snap: tuple) -> None:
    state, modes, grads = snap
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == grads
    assert all(p.grad is None for p in model.parameters())


def _data(n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return x, (x[:, 0] > 0).long()


ESTIMATOR_OPTIONS = {
    "exact": {"damping": 0.1},
    "cg": {"damping": 0.1, "curvature": "ggn"},
    "lissa": {"damping": 0.5, "depth": 20, "check_definite": False},
    "graddot": {},
    "gradcos": {},
    "arnoldi": {"rank": 3, "iterations": 8},
    "arnoldi-topk": {"rank": 3, "iterations": 8, "damping": 0.1},
    "arnoldi-complement": {"rank": 3, "iterations": 8, "damping": 0.1},
}


@pytest.mark.parametrize("name", sorted(ESTIMATOR_OPTIONS))
def test_estimators_never_modify_the_model(name, tmp_path):
    model = _model()
    snap = _snapshot(model)
    x, y = _data()
    for measurement in ("loss", "margin"):
        task = ik.ClassificationTask(model, measurement=measurement)
        est = ik.METHODS[name](task, store=tmp_path / measurement,
                               **ESTIMATOR_OPTIONS[name]).fit((x, y))
        est.scores((x[:4], y[:4]))
        est.self_influence()
        est.top_k((x[:4], y[:4]), k=2)
        _assert_same(model, snap)


# --------------------------------------------------------------------------- fuzzing
class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _alarm(seconds: int):
    def handler(signum, frame):
        raise _Timeout(f"no answer within {seconds} s (a hang)")

    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


BAD_VALUES = st.one_of(
    st.integers(-3, 0), st.integers(10**7, 10**9),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), -1.5, 0.0, 1e-300, 2.5]),
    st.sampled_from(["", "auto", "nope", "8", None, [], [1], {}, (None, 3), True, object()]),
)
OPTIONS = {
    "exact": ["damping", "curvature", "batch_size", "query_chunk", "max_params", "filter",
              "chunk_size", "overwrite"],
    "cg": ["damping", "curvature", "max_iter", "tol", "micro_batch_size", "batch_size"],
    "lissa": ["damping", "scale", "depth", "repeats", "curvature_batch", "seed",
              "check_definite"],
    "graddot": ["batch_size", "query_chunk", "progress"],
    "gradcos": ["batch_size", "query_chunk"],
    "arnoldi": ["rank", "iterations", "damping", "curvature", "filter", "solver", "projection",
                "sketch", "chunk_size", "query_chunk"],
}
WORK = ("depth", "repeats")  # LiSSA runs exactly this many steps: huge values are just slow
SMALL = {"exact": {"damping": 0.1}, "cg": {"damping": 0.1, "max_iter": 20},
         "lissa": {"damping": 0.5, "depth": 10, "check_definite": False},
         "graddot": {}, "gradcos": {}, "arnoldi": {"rank": 2, "iterations": 6}}


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(OPTIONS)), data=st.data())
def test_invalid_arguments_raise_influence_errors(name, data):
    option = data.draw(st.sampled_from(OPTIONS[name]))
    value = data.draw(BAD_VALUES)
    if option in WORK and isinstance(value, int) and value > 10**6:
        return  # a huge amount of requested work is valid, merely slow
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = _data(16)
    kw = {"progress": False, **SMALL[name], option: value}
    try:
        with _alarm(20):
            est = ik.METHODS[name](ik.ClassificationTask(model), **kw)
            s = est.fit((x, y)).scores((x[:3], y[:3]))
            assert torch.isfinite(s).all(), f"{name}({option}={value!r}) gave non-finite scores"
    except ik.InfluenceError:
        pass


@settings(max_examples=30, deadline=None, derandomize=True)
@given(k=st.one_of(st.integers(-5, 0), st.sampled_from([2.5, "3", None, float("nan")])),
       rows=st.integers(0, 3))
def test_invalid_scoring_calls_raise_influence_errors(k, rows):
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    x, y = _data(12)
    est = ik.GradDot(ik.ClassificationTask(model))
    try:
        with _alarm(20):
            est.top_k((x[:rows], y[:rows]), (x, y), k=k)
    except ik.InfluenceError:
        pass


def _model_no_dropout() -> nn.Module:
    """A model the trajectory code accepts (no dropout, no batch norm), left in train mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    model[2].bias.requires_grad_(False)
    model.train()
    return model


def _ground_truth_calls(model: nn.Module, tmp_path) -> None:
    from influencekit.groundtruth import Cache, Retrainer, lds_retrain, leave_one_out, measure, pbrf
    from influencekit.training import TrainConfig

    x, y = _data(20)
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.05)
    q = (x[:3], y[:3])
    rt = Retrainer(model, (x, y), cfg, cache=Cache(tmp_path / "cache"), progress=False)
    rt.fit(remove=[1])
    leave_one_out(rt, [0, 2], q)
    leave_one_out(rt, [0], q, warm_start=model, warm_config=cfg)
    lds_retrain(rt, q, n_subsets=2)
    task = ik.ClassificationTask(model)
    measure(task, q)
    pbrf(task, (x, y), [0], q, damping=0.1, progress=False)


def _trainer_calls(model: nn.Module, tmp_path) -> None:
    from influencekit.training import TrainConfig, Trainer, train

    x, y = _data(20)
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.05)
    train(model, (x, y), cfg, remove=[3], checkpoint_dir=tmp_path / "ckpt", progress=False)
    Trainer(model, (x, y), cfg, task=ik.ClassificationTask(model)).run(steps=2)


def _dynamics_calls(model: nn.Module, tmp_path) -> None:
    from influencekit.training import TrainConfig

    x, y = _data(20)
    cfg = TrainConfig(epochs=1, batch_size=8, lr=0.05)
    ik.dynamics.twin_runs(model, (x, y), cfg, (x[:3], y[:3]), remove=[0], record_every=1,
                          store=tmp_path / "twins", progress=False)
    ik.dynamics.unrolled_influence(model, (x, y), cfg, (x[:3], y[:3]), examples=[0, 1],
                                   progress=False)


@pytest.mark.parametrize("calls, make", [
    (_ground_truth_calls, _model), (_trainer_calls, _model), (_dynamics_calls, _model_no_dropout),
])
def test_training_ground_truth_and_dynamics_never_modify_the_model(calls, make, tmp_path):
    model = make()
    snap = _snapshot(model)
    calls(model, tmp_path)
    _assert_same(model, snap)
