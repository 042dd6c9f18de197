"""``influencekit correct`` and ``dynamics`` with ``--model bert`` end to end, on a tiny text
dataset standing in for rotten_tomatoes: frozen features cached once, the top trained, scored
(vmap per-example gradients), fine-tuned and run as twins."""

from __future__ import annotations

import json

import pytest
import torch

from influencekit import data as ik_data
from influencekit.cli import main
from influencekit.data.base import DataSplits, subset

WORDS = {1: ["great", "moving", "funny", "a delight", "superb"],
         0: ["dull", "tedious", "a mess", "boring", "awful"]}


def _tiny_text(*, seed: int = 0, n_train: int | None = None, n_test: int | None = None,
               **_: object) -> DataSplits:
    gen = torch.Generator().manual_seed(seed)
    texts, labels = [], []
    for i in range(40):
        y = i % 2
        a, b = torch.randint(0, 5, (2,), generator=gen).tolist()
        texts.append(f"{WORDS[y][a]} and {WORDS[y][b]}")
        labels.append(y)
    y = torch.tensor(labels)
    y[28:32] = 1 - y[28:32]  # mislabelled test examples: mis-predictions to correct
    train = subset((texts[:28], y[:28]), n_train, "n_train")
    test = subset((texts[28:], y[28:]), n_test, "n_test")
    return DataSplits("rotten_tomatoes", train, test, ["rotten", "fresh"])


@pytest.fixture
def tiny_text(monkeypatch):
    monkeypatch.setitem(ik_data.LOADERS, "rotten_tomatoes", _tiny_text)


COMMON = ["--dataset", "rotten_tomatoes", "--model", "bert", "--max-length", "8",
          "--threads", "1", "--no-progress"]


def test_correct_runs_on_bert(tiny_text, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = ["correct", *COMMON, "--n-queries", "12", "--epochs", "1", "--batch-size", "8",
            "--methods", "graddot,class-random", "--examples", "2", "--steps", "2",
            "--cache-dir", str(cache), "--out", str(out)]
    assert main(args) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["n_train"] == 28 and r["n_queries"] == 12 and r["n_test"] == 12
    assert r["params"] == 1_775_234  # the last encoder layer and the head
    assert r["results"][0]["targets"] >= 1
    assert [row["method"] for row in r["results"]] == ["graddot", "class-random"]
    assert r["settings"]["epochs"] == 1 and r["settings"]["train_lr"] == 0.05  # sized default
    assert (out / "fix_rate.png").read_bytes()[:4] == b"\x89PNG"
    stored = sorted(p.name for p in (cache / "bert-features").iterdir())
    assert len(stored) == 2  # train and test features, computed once
    assert main(args) == 0  # a rerun reads them (and the model, and the records)
    assert sorted(p.name for p in (cache / "bert-features").iterdir()) == stored


def test_dynamics_runs_on_bert(tiny_text, tmp_path):
    out = tmp_path / "out"
    assert main(["dynamics", *COMMON, "--quick", "--n-train", "24", "--n-queries", "4",
                 "--n-removed", "2", "--start-epochs", "1", "--epochs", "1", "--batch-size",
                 "8", "--record-every", "1", "--control-seeds", "1",
                 "--methods", "graddot,unrolled,same-time", "--cache-dir",
                 str(tmp_path / "cache"), "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["n_train"] == 24 and set(r["fading"]) == {"graddot", "unrolled", "same-time"}
    assert r["twins"]["steps"] == [1, 2, 3]


def test_text_model_needs_text_data(tmp_path, capsys):
    assert main(["correct", "--dataset", "digits", "--model", "bert", "--no-progress",
                 "--cache-dir", str(tmp_path)]) == 2
    assert "--model bert" in capsys.readouterr().err
