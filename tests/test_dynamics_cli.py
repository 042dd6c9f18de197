"""``influencekit dynamics`` end to end at tiny sizes (in-process), and its argument checks: bad
values end with exit status 2 and a message that names the flag, before anything is trained."""

from __future__ import annotations

import json

import pytest

import influencekit.experiments.dynamics as dynamics
from influencekit.cli import main

TINY = ["dynamics", "--dataset", "synthetic", "--model", "mlp", "--hidden", "4",
        "--n-train", "48", "--n-queries", "5", "--n-removed", "3", "--start-epochs", "2",
        "--epochs", "2", "--batch-size", "16", "--record-every", "2", "--control-seeds", "1",
        "--methods", "exact,graddot,unrolled,same-time", "--threads", "1", "--no-progress"]


def test_dynamics_writes_results_and_plots(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(TINY + ["--out", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    r = json.loads((out / "results.json").read_text())
    for key in ("settings", "start_config", "config", "removed", "n_train", "n_queries",
                "start_accuracy", "growth_rate", "horizon", "fading", "twins", "seconds"):
        assert key in r, key
    assert r["n_train"] == 48 and r["n_queries"] == 5 and len(r["removed"]) == 3
    assert 0.0 <= r["start_accuracy"]["test"] <= 1.0
    assert set(r["horizon"]) == set(r["fading"]) == {"exact", "graddot", "unrolled",
                                                     "same-time"}
    steps = r["twins"]["steps"]
    assert steps == [2, 4, 6]  # 48 / 16 = 3 steps an epoch, 2 epochs, every 2 and the last
    for curve in r["fading"].values():
        assert len(curve["spearman"]) == len(steps)
    assert {"twins", "control"} <= set(r["growth_rate"])
    for name in ("divergence.png", "correlation.png", "magnitude.png"):
        assert (out / name).stat().st_size > 0
    printed = capsys.readouterr()
    assert "unrolled" in printed.out and "test accuracy" in printed.err

    # a rerun reads the start point and the twin runs from the cache: same records
    out2 = tmp_path / "out2"
    assert main(TINY + ["--out", str(out2), "--cache-dir", str(tmp_path / "cache")]) == 0
    r2 = json.loads((out2 / "results.json").read_text())
    assert r2["twins"] == r["twins"]


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if dynamics loads data or trains anything."""

    def refuse(*args, **kwargs):
        raise AssertionError("dynamics started working before refusing its arguments")

    monkeypatch.setattr(dynamics, "Retrainer", refuse)
    monkeypatch.setattr(dynamics.ik_data, "load", refuse)


@pytest.mark.parametrize("flag, value", [
    ("--n-queries", "0"), ("--n-removed", "-3"), ("--n-train", "x"), ("--epochs", "0"),
    ("--start-epochs", "-1"), ("--lr", "0"), ("--lr", "nan"), ("--start-lr", "-1"),
    ("--batch-size", "0"), ("--record-every", "0"), ("--weight-decay", "-1"),
    ("--control-seeds", "1,x"), ("--threshold", "inf"), ("--threads", "0"),
    ("--methods", "arnoldiX"), ("--methods", ","), ("--optimizer", "rmsprop"),
    ("--dataset", "cifar"), ("--model", "vit"), ("--hidden", "4,-1"),
])
def test_bad_values_name_the_flag(no_work, capsys, flag, value):
    assert main(TINY + [flag, value]) == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err


@pytest.mark.parametrize("extra, named", [
    (["--dataset", "rotten_tomatoes"], "--dataset"),  # text data, vector model
    (["--model", "bert"], "--model"),  # a text model on vectors
    (["--optimizer", "adam"], "--optimizer"),  # unrolled / same-time need SGD
])
def test_inconsistent_flags_are_refused_before_work(no_work, capsys, extra, named):
    assert main(TINY + extra) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err


def test_adam_runs_without_the_trajectory_methods(tmp_path):
    argv = [a if a != "exact,graddot,unrolled,same-time" else "graddot" for a in TINY]
    assert main(argv + ["--optimizer", "adam", "--out", str(tmp_path / "o"),
                        "--cache-dir", str(tmp_path / "c")]) == 0
    r = json.loads((tmp_path / "o" / "results.json").read_text())
    assert r["config"]["optimizer"] == "adam" and r["config"]["lr"] == pytest.approx(1e-3)
    assert list(r["fading"]) == ["graddot"]
