"""Multi-layer perceptron (logistic regression when ``hidden=()``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import InputError

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "softplus": nn.Softplus}


class MLP(nn.Module):
    """``Flatten → [Linear → activation] × len(hidden) → Linear``.

    Inputs of any shape ``[B, ...]`` are flattened. A smooth activation (default ``tanh``) keeps
    the Hessian well defined everywhere, which influence functions assume.
    """

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (32,),
                 activation: str = "tanh"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise InputError(f"unknown activation {activation!r}; known: {sorted(ACTIVATIONS)}.")
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
