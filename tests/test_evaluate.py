"""`influencekit evaluate`: a smoke run on tiny settings, reports, errors and the cache."""

from __future__ import annotations

import argparse
import json
import math

import pytest

import influencekit.experiments.evaluate as evaluate
from influencekit.cli import main
from influencekit.data import INPUTS, LOADERS
from influencekit.errors import InputError
from influencekit.estimators import METHODS, GradDot
from influencekit.experiments.evaluate import markdown_table, parse_methods

TINY = ["evaluate", "--dataset", "synthetic", "--n-train", "60", "--n-queries", "8",
        "--hidden", "4", "--epochs", "3", "--batch-size", "16", "--n-removed", "5",
        "--lds-subsets", "5", "--n-pbrf", "3", "--warm-epochs", "2", "--no-progress",
        "--threads", "1"]


def test_evaluate_smoke(tmp_path, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = TINY + ["--methods", "graddot,exact,gradcos,cg:curvature=ggn:mislabel=False",
                   "--out", str(out), "--cache-dir", str(cache), "--damping", "0.01"]
    assert main(argv) == 0
    printed = capsys.readouterr()
    report = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in report["results"]}
    cg = "cg:curvature=ggn:mislabel=False"
    assert list(rows) == ["exact", "graddot", "gradcos", cg]  # exact first
    assert report["damping"] == 0.01 and report["model"]["params"] == 8 * 4 + 4 + 4 * 3 + 3
    for name, r in rows.items():
        assert r["error"] is None, (name, r["error"])
        for key in ("loo_warm", "loo_scratch", "lds", "pbrf", "mislabel_auc"):
            if name == cg and key == "mislabel_auc":
                assert key not in r  # skipped on request
                continue
            assert -1.0 <= r[key] <= 1.0 or math.isnan(r[key]), (name, key, r[key])
        assert r["time_s"] > 0
    assert "spearman_vs_exact" not in rows["exact"]
    assert rows["graddot"]["spearman_vs_exact"] <= 1.0
    md = (out / "results.md").read_text()
    assert "| method | Spearman vs exact |" in md and f"| {cg} |" in md
    assert report["reference"] == "exact"
    assert "| method |" in printed.out
    # the rerun reads every retraining from the cache and gives the same ground-truth metrics
    assert main(argv + ["--ground-truth", "loo-scratch,lds"]) == 0
    again = {r["method"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert again["graddot"]["lds"] == pytest.approx(rows["graddot"]["lds"])
    assert "pbrf" not in again["graddot"]


def test_evaluate_bad_arguments(capsys):
    assert main(TINY + ["--methods", "exact,nonsense"]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'nonsense'" in err and "graddot" in err
    assert main(TINY + ["--ground-truth", "loo,lds"]) == 2
    assert "unknown ground truth" in capsys.readouterr().err
    assert main(TINY + ["--methods", "cg:max_iters=5"]) == 2  # an option cg does not take
    err = capsys.readouterr().err
    assert "'cg:max_iters=5'" in err and "unknown option(s) max_iters" in err
    assert main(TINY + ["--methods", "cg:max_iter=-1"]) == 2  # a value cg refuses
    assert "max_iter must be ≥ 1" in capsys.readouterr().err


def test_parse_methods_options():
    specs = parse_methods("exact, cg:curvature=ggn:max_iter=7 ,lissa")
    assert specs[0] == ("exact", "exact", {})
    assert specs[1] == ("cg:curvature=ggn:max_iter=7", "cg", {"curvature": "ggn", "max_iter": 7})
    assert specs[2][2]["depth"] > 0  # a default that keeps the run short
    with pytest.raises(InputError, match="key=value"):
        parse_methods("cg:ggn")


def test_markdown_table_marks_failures():
    md = markdown_table([{"method": "a", "lds": 0.5, "time_s": 1.0},
                         {"method": "b", "error": "CurvatureError: not PD"}])
    assert "| a | 0.500 | 1.0 |" in md and "failed: CurvatureError" in md


def test_help_lists_defaults(capsys):
    assert main(["evaluate", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--methods" in out and "damping" in out and "leave-one-out" in out


def test_menus_come_from_the_registries(monkeypatch):
    assert evaluate.DATASETS == [n for n in LOADERS if INPUTS[n] != "text"]
    assert "bert" not in evaluate.MODELS and {"mlp", "logreg", "cnn", "resnet"} <= set(
        evaluate.MODELS)
    monkeypatch.setitem(METHODS, "newly-registered", GradDot)
    assert parse_methods("newly-registered")[0][1] == "newly-registered"


@pytest.mark.parametrize("model", ["mlp", "logreg", "cnn", "resnet"])
def test_each_model_is_built_for_the_data(model):
    args = argparse.Namespace(model=model, dataset="digits", hidden=(5,), seed=0, n_train=6,
                              n_queries=3)
    d = evaluate._load(args)  # 8×8 digits: flat for the MLPs, [N, 1, 8, 8] for the CNNs
    assert d.train[0].dim() == (2 if model in ("mlp", "logreg") else 4)
    assert evaluate._model_builder(args, d)()(d.train[0]).shape == (6, 10)
    assert d.test[0].shape[0] == 3


def test_tracin_reads_the_checkpoints_of_the_evaluated_run(tmp_path):
    """`tracin` sums over θ*'s own training run (checked to end at θ*, also for the model with
    flipped labels); `tracin:every=0` is θ* alone, i.e. GradDot."""
    out = tmp_path / "out"
    argv = TINY + ["--methods", "graddot,tracin,tracin:every=0,tracin:every=2", "--out", str(out),
                   "--cache-dir", str(tmp_path / "cache"), "--ground-truth", "lds,mislabel"]
    assert main(argv) == 0
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    for r in rows.values():
        assert r["error"] is None, r["error"]
    assert rows["tracin:every=0"]["lds"] == pytest.approx(rows["graddot"]["lds"])
    assert rows["tracin:every=0"]["mislabel_auc"] == pytest.approx(rows["graddot"]["mislabel_auc"])
    assert rows["tracin"]["lds"] != pytest.approx(rows["graddot"]["lds"])
    assert rows["tracin:every=2"]["lds"] != pytest.approx(rows["tracin"]["lds"])


def test_trainer_checkpoints_end_at_the_model_or_refuse():
    from influencekit.training import TrainConfig, train

    torch = pytest.importorskip("torch")
    x, y = torch.randn(40, 3), torch.randint(0, 2, (40,))

    def builder():
        torch.manual_seed(0)
        return torch.nn.Linear(3, 2)

    cfg = TrainConfig(epochs=3, batch_size=8, lr=0.1, seed=0)
    model = train(builder, (x, y), cfg, progress=False).model
    get = evaluate.trainer_checkpoints(builder, cfg)
    ckpts = get(1, model, (x, y))
    assert len(ckpts) == 3 and ckpts.steps == [5, 10, 15]
    assert all(torch.equal(ckpts.states[-1][k], v) for k, v in model.state_dict().items())
    assert get(1, model, (x, y)) is ckpts  # kept
    with pytest.raises(RuntimeError, match="did not end at the evaluated model"):
        get(1, builder(), (x, y))


def test_tracin_every_is_checked(capsys):
    assert main(TINY + ["--methods", "tracin:every=-1"]) == 2
    assert "every must be a whole number" in capsys.readouterr().err
    assert main(TINY + ["--methods", "graddot:every=2"]) == 2
    assert "only for tracin" in capsys.readouterr().err
