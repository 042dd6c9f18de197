"""Generated classification data (Gaussian class clusters) for tests and quick experiments."""

from __future__ import annotations

import torch

from ..errors import InputError
from .base import DataSplits


def load_synthetic(*, n_train: int = 200, n_test: int = 50, features: int = 8,
                   num_classes: int = 3, separation: float = 2.0, noise: float = 1.0,
                   seed: int = 0) -> DataSplits:
    """``num_classes`` Gaussian clusters in ``features`` dimensions (float32 ``[N, features]``).

    Class means are drawn with ``seed`` at distance about ``separation`` from the origin;
    examples are ``mean + noise · N(0, I)``. Labels cycle through the classes, then are shuffled.
    """
    if n_train < 1 or n_test < 1 or num_classes < 2 or features < 1:
        raise InputError("synthetic data needs n_train, n_test, features ≥ 1 and "
                         "num_classes ≥ 2.")
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, features, generator=gen)
    means = separation * means / means.norm(dim=1, keepdim=True)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % num_classes
        y = y[torch.randperm(n, generator=gen)]
        x = means[y] + noise * torch.randn(n, features, generator=gen)
        return x, y

    return DataSplits("synthetic", draw(n_train), draw(n_test),
                      [f"class{c}" for c in range(num_classes)],
                      description="Gaussian clusters", meta={"seed": seed})
