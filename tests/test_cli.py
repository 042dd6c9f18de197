"""The ``influencekit`` command: bad arguments are refused up front with a message that names the
flag and exit status 2, never a traceback; unknown methods fail before anything is trained."""

from __future__ import annotations

import pytest

import influencekit.experiments.evaluate as evaluate
from influencekit.cli import main
from influencekit.estimators import METHODS

EVALUATE = ["evaluate", "--dataset", "synthetic", "--n-train", "40", "--n-queries", "4",
            "--hidden", "4", "--epochs", "2", "--no-cache", "--no-progress"]


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if evaluate loads data or trains anything."""

    def refuse(*args, **kwargs):
        raise AssertionError("evaluate started working before refusing its arguments")

    monkeypatch.setattr(evaluate, "Retrainer", refuse)
    monkeypatch.setattr(evaluate.ik_data, "load", refuse)


def test_help_lists_the_subcommands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "demo" in out and "evaluate" in out
    assert main([]) == 0  # no subcommand: the same help
    assert "evaluate" in capsys.readouterr().out


@pytest.mark.parametrize("method", [
    "arnoldiX",  # a typo
    next(n for n in ("ekfac", "tracin", "trak", "not-yet-a-method") if n not in METHODS),
])
def test_unknown_method_fails_before_any_work(no_work, capsys, method):
    assert main(EVALUATE + ["--methods", f"exact,{method}"]) == 2
    err = capsys.readouterr().err
    assert "--methods" in err and f"unknown method {method!r}" in err
    assert all(name in err for name in METHODS)  # the known names are listed
    assert "Traceback" not in err


@pytest.mark.parametrize("flag, value", [
    ("--n-queries", "-1"), ("--n-queries", "0"), ("--n-removed", "-3"), ("--n-train", "-5"),
    ("--lds-subsets", "0"), ("--lds-subsets", "1"), ("--weight-decay", "-1"),
    ("--weight-decay", "nan"), ("--damping", "-0.1"), ("--lr", "0"), ("--epochs", "2.5"),
    ("--batch-size", "0"), ("--warm-epochs", "-1"), ("--n-pbrf", "0"), ("--threads", "0"),
    ("--lds-alpha", "1.5"), ("--mislabel-fraction", "0"), ("--hidden", "32,x"),
    ("--hidden", "32,-4"), ("--seed", "-1"), ("--ground-truth", "loo"),
    ("--methods", "cg:curvature"), ("--methods", ","), ("--methods", "cg:max_iters=5"),
    ("--methods", "cg:max_iter=0"), ("--methods", "arnoldi:rank=x"),
    ("--dataset", "rotten_tomatoes"), ("--model", "bert"),
])
def test_evaluate_bad_values_name_the_flag(no_work, capsys, flag, value):
    assert main(EVALUATE + [flag, value]) == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err


def test_evaluate_output_paths_must_be_folders(no_work, tmp_path, capsys):
    file = tmp_path / "results.json"
    file.write_text("{}")
    for flag, path in (("--out", file), ("--out", file / "sub"), ("--cache-dir", file)):
        assert main(EVALUATE + [flag, str(path)]) == 2
        err = capsys.readouterr().err
        assert flag in err and "not a folder" in err


@pytest.mark.parametrize("extra, message", [
    (["--n-queries", "1000"], "--n-queries 1000 exceeds"),  # synthetic has 50 test examples
    (["--model", "cnn"], "--model cnn needs square images"),  # 8 features
])
def test_evaluate_errors_found_after_loading(monkeypatch, capsys, extra, message):
    monkeypatch.setattr(evaluate, "Retrainer", lambda *a, **k: pytest.fail("trained"))
    assert main(EVALUATE + extra) == 2
    err = capsys.readouterr().err
    assert message in err and "InputError" in err and "Traceback" not in err


@pytest.mark.parametrize("flag, value", [
    ("--n-train", "-5"), ("--n-train", "0"), ("--queries", "0"), ("--top", "-1"),
    ("--top", "x"), ("--seed", "-2"), ("--method", "arnoldiX"),
])
def test_demo_bad_values_name_the_flag(capsys, flag, value):
    assert main(["demo", flag, value]) == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err


def test_demo_top_cannot_exceed_the_training_set(capsys):
    assert main(["demo", "--n-train", "5", "--top", "6"]) == 2
    assert "--top 6 exceeds --n-train 5" in capsys.readouterr().err


def test_demo_finds_flipped_labels(capsys):
    assert main(["demo", "--queries", "1", "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "99-parameter MLP on 300 points" in out and "Query 0" in out
    found = int(out.split("Flipped labels among them: ")[1].split(" of ")[0])
    assert found >= 4  # of 6, among the 12 highest self-influences
