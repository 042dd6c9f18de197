"""Generated classification data (Gaussian class clusters) for tests and quick experiments."""

from __future__ import annotations

import torch

from .. import validate
from ..errors import InputError
from .base import DataSplits


def load_synthetic(*, n_train: int = 200, n_test: int = 50, features: int = 8,
                   num_classes: int = 3, separation: float = 2.0, noise: float = 1.0,
                   seed: int = 0) -> DataSplits:
    """``num_classes`` Gaussian clusters in ``features`` dimensions (float32 ``[N, features]``).

    Class means are drawn with ``seed`` at distance about ``separation`` from the origin;
    examples are ``mean + noise · N(0, I)``. Labels cycle through the classes, then are shuffled.
    """
    n_train = validate.positive_int("n_train", n_train)
    n_test = validate.positive_int("n_test", n_test)
    features = validate.positive_int("features", features)
    num_classes = validate.integer("num_classes", num_classes, minimum=2)
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


def make_blobs(n: int, *, classes: int = 3, flips: int = 6, seed: int = 0,
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``n`` points of ``classes`` 2-D Gaussian blobs (centres on a circle of radius 2.5, unit
    noise), labels cycling through the classes; ``flips`` labels moved to the next class.

    Returns ``(x [n, 2], y [n], flipped)`` with ``flipped`` the sorted indices of the flipped
    labels (the demo and the README's quickstart use it).
    """
    n = validate.positive_int("n", n)
    classes = validate.integer("classes", classes, minimum=2)
    flips = validate.integer("flips", flips, minimum=0)
    if flips > n:
        raise InputError(f"flips must be ≤ n = {n} (one flip per point at most), got {flips}.")
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    angle = 2 * torch.pi * y.to(dtype) / classes
    centres = 2.5 * torch.stack([angle.cos(), angle.sin()], 1)
    x = centres + torch.randn(n, 2, generator=g, dtype=dtype)
    flipped = torch.randperm(n, generator=g)[:flips].tolist()
    for i in flipped:
        y[i] = (y[i] + 1) % classes
    return x, y, sorted(flipped)
