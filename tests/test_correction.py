"""ik.correct / ik.correct_all: a planted mis-prediction is fixed by its influential examples."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import influencekit as ik
from influencekit import correction as C
from influencekit.batching import slice_batch
from influencekit.errors import InputError
from influencekit.store import model_fingerprint

N_A = N_B = 150
N_PLANTED = 12
Z = torch.tensor([-2.0, 2.5])  # the target: in class 0's region, where class-1 labels are planted


def _builder() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2))


@pytest.fixture(scope="module")
def planted():
    """Two blobs (class 0 at (−2, 0), class 1 at (2, 0)) and 12 training examples labelled 1
    clustered at the target Z, which the trained MLP therefore predicts as 1."""
    g = torch.Generator().manual_seed(0)
    xa = torch.randn(N_A, 2, generator=g) * 0.8 + torch.tensor([-2.0, 0.0])
    xb = torch.randn(N_B, 2, generator=g) * 0.8 + torch.tensor([2.0, 0.0])
    xp = torch.randn(N_PLANTED, 2, generator=g) * 0.25 + Z
    x = torch.cat([xa, xb, xp])
    y = torch.cat([torch.zeros(N_A), torch.ones(N_B + N_PLANTED)]).long()
    cfg = ik.training.TrainConfig(epochs=200, batch_size=64, lr=0.1, weight_decay=1e-3)
    model = ik.training.train(_builder, (x, y), cfg, progress=False).model
    hx = torch.cat([torch.randn(100, 2, generator=g) * 0.8 + torch.tensor([-2.0, 0.0]),
                    torch.randn(100, 2, generator=g) * 0.8 + torch.tensor([2.0, 0.0])])
    holdout = (hx, torch.cat([torch.zeros(100), torch.ones(100)]).long())
    assert int(ik.ClassificationTask(model).predict(Z[None])) == 1  # mis-predicted
    return model, (x, y), holdout, set(range(N_A + N_B, N_A + N_B + N_PLANTED))


def _ggn(model: nn.Module) -> ik.ExactInfluence:
    return ik.ExactInfluence(ik.ClassificationTask(model), damping=1e-3, curvature="ggn")


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_planted_opponents_are_selected_and_fix_the_target(planted):
    model, train, holdout, planted_idx = planted
    kw = dict(examples=N_PLANTED, steps=10, lr=0.5, holdout=holdout)
    fix = C.correct(model, (Z, 0), train, estimator=_ggn(model), strategy="opponents", **kw)
    assert set(fix.examples) == planted_idx  # the planted cluster, ranked at the top
    assert all(s < 0 for s in fix.scores) and fix.weights == [-1.0] * N_PLANTED
    assert fix.fixed and fix.steps_to_fix <= 3
    assert fix.predictions[0] == 1 and fix.predictions[-1] == 0
    assert fix.losses[-1] < fix.losses[0]
    assert fix.collateral is not None and fix.collateral.flips <= 2
    assert int(ik.ClassificationTask(fix.model).predict(Z[None])) == 0
    rand = C.correct(model, (Z, 0), train, selection="random", **kw)
    assert not rand.fixed and rand.steps_taken == 10 and rand.scores == [None] * N_PLANTED


def test_strategies_and_baselines(planted):
    model, train, _, planted_idx = planted
    est = _ggn(model).fit(train)
    both = C.correct(model, (Z, 0), train, estimator=est, strategy="both", examples=4, lr=0.5)
    assert len(both.examples) == 8 and both.weights == [1.0] * 4 + [-1.0] * 4
    assert set(both.examples[4:]) <= planted_idx and both.fixed
    cls = C.correct(model, (Z, 0), train, selection="class-random", examples=8, lr=0.5)
    assert all(int(train[1][i]) == 0 for i in cls.examples)
    own = C.correct(model, (Z, 0), train, selection="target", lr=0.5)
    assert own.examples == [] and own.fixed and own.steps_to_fix == 1


def test_original_model_untouched_and_deterministic():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Dropout(0.2), nn.Linear(8, 3))
    x, y = torch.randn(60, 3), torch.randint(0, 3, (60,))
    model.train()
    before = _state(model)
    runs = [C.correct(model, (x[0], y[0]), (x, y), selection="random", examples=8, steps=5,
                       lr=0.1, seed=3, stop_when_fixed=False) for _ in range(2)]
    after = _state(model)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], after[k]) for k in before)
    a, b = runs
    assert a.examples == b.examples and a.losses == b.losses and a.steps_taken == 5
    assert all(torch.equal(p, q) for p, q in zip(a.model.state_dict().values(),
                                                 b.model.state_dict().values()))
    c = C.correct(model, (x[0], y[0]), (x, y), selection="random", examples=8, steps=5, seed=4)
    assert c.examples != a.examples


def test_save_and_reload_reproduce_the_corrected_predictions(planted, tmp_path):
    model, train, holdout, _ = planted
    fix = C.correct(model, (Z, 0), train, estimator="graddot", strategy="opponents",
                     examples=N_PLANTED, lr=0.5, holdout=holdout)
    fix.save(tmp_path / "fix")
    again = C.load(tmp_path / "fix", model)
    assert again.to_dict() == fix.to_dict()
    assert again.start_fingerprint == model_fingerprint(model)
    pred = ik.ClassificationTask(again.model).predict
    assert torch.equal(pred(holdout[0]), ik.ClassificationTask(fix.model).predict(holdout[0]))
    assert int(pred(Z[None])) == 0 and int(ik.ClassificationTask(model).predict(Z[None])) == 1


def test_correct_all_fits_once_and_resumes(planted, tmp_path):
    model, train, _, _ = planted
    targets = (torch.cat([Z[None], Z[None] + 0.1, torch.tensor([[2.0, 0.0]])]),
               torch.tensor([0, 0, 1]))
    est = ik.GradDot(ik.ClassificationTask(model))
    calls = []
    score = est.scores
    est.scores = lambda *a, **k: calls.append(1) or score(*a, **k)  # type: ignore[method-assign]
    kw = dict(estimator=est, strategy="opponents", examples=N_PLANTED, steps=5, lr=0.5,
              store=tmp_path, progress=False)
    first = C.correct_all(model, targets, train, **kw)
    assert len(calls) == 1  # one scoring call for every target
    assert first.n_targets == 2 and [r.target_index for r in first.results] == [0, 1]
    assert first.n_fixed == 2 and first.summary()["fix_rate_ci"][1] == 1.0
    again = C.correct_all(model, targets, train, **kw)
    assert len(calls) == 1  # all stored: nothing refitted or rescored
    assert [r.to_dict() for r in again.results] == [r.to_dict() for r in first.results]
    rand = C.correct_all(model, targets, train, selection="random", examples=N_PLANTED,
                          steps=5, lr=0.5, progress=False)
    assert rand.label == "random" and rand.n_fixed == 0
    # other targets in the same store (e.g. another --n-queries): records of their own
    fewer = C.correct_all(model, slice_batch(targets, slice(0, 2)), train, **kw)
    assert len(calls) == 2 and fewer.n_targets == 2
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("correct-")]) == 2


@pytest.mark.parametrize("kw, name", [
    ({"examples": 0}, "examples"), ({"steps": 0}, "steps"), ({"lr": -1.0}, "lr"),
    ({"strategy": "up"}, "strategy"), ({"selection": "best"}, "selection"),
    ({"estimator": "nope"}, "estimator"), ({"selection": "random", "strategy": "both"},
                                           "strategy"),
    ({"holdout": [1, 2]}, "holdout"), ({"seed": -1}, "seed"),
])
def test_bad_arguments_name_the_argument(planted, kw, name):
    model, train, _, _ = planted
    with pytest.raises(InputError, match=name):
        C.correct(model, (Z, 0), train, **kw)


def test_bad_target_and_train(planted):
    model, train, _, _ = planted
    with pytest.raises(InputError, match="target"):
        C.correct(model, Z, train, selection="random")
    with pytest.raises(InputError, match="target"):
        C.correct(model, (Z[None].repeat(2, 1), torch.tensor([0, 1])), train)
    with pytest.raises(InputError, match="train"):
        C.correct(model, (Z, 0), train[0])


def test_cli_correct_writes_tables_and_plot(tmp_path, capsys):
    from influencekit.cli import main

    out = tmp_path / "out"
    rc = main(["correct", "--dataset", "digits", "--n-train", "200", "--n-queries", "40",
               "--epochs", "1", "--methods", "graddot,random,target", "--examples", "2",
               "--steps", "2", "--no-progress", "--cache-dir", str(tmp_path / "cache"),
               "--out", str(out)])
    assert rc == 0
    import json

    report = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in report["results"]] == ["graddot", "random", "target"]
    assert report["results"][0]["targets"] > 0 and len(report["results"][0]["fixed_within"]) == 3
    assert "| graddot | 2 |" in (out / "results.md").read_text()
    assert (out / "fix_rate.png").read_bytes()[:4] == b"\x89PNG"
    # the gallery: fixed targets of the first influence method with the examples used
    assert report["gallery"] and len(report["gallery"]) <= 4
    for g in report["gallery"]:
        assert g["method"] == "graddot" and 0 < g["steps_to_fix"] <= 2
        assert len(g["examples"]) == 2 and g["predicted_before"] != g["label"]
    assert (out / "gallery.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["correct", "--methods", "nope"]) == 2
    assert main(["correct", "--examples", "0"]) == 2
    assert "nope" in capsys.readouterr().err
