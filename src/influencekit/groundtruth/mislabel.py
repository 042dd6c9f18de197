"""Mislabel detection: flip a fraction of the training labels, then look for them by
self-influence (mislabelled examples tend to be their own strongest proponents; score it with
:func:`~influencekit.groundtruth.metrics.auc` and
:func:`~influencekit.groundtruth.metrics.fraction_found`)."""

from __future__ import annotations

import torch

from ..errors import InputError


def flip_labels(labels: torch.Tensor, fraction: float, num_classes: int, seed: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Give ``round(fraction · N)`` randomly chosen examples a different, random label.

    Returns ``(noisy_labels, flipped)`` with ``flipped`` a boolean mask ``[N]``.
    """
    if not 0 < fraction < 1 or num_classes < 2:
        raise InputError("flip_labels needs 0 < fraction < 1 and at least two classes.")
    gen = torch.Generator().manual_seed(seed)
    n = len(labels)
    k = max(1, int(round(fraction * n)))
    idx = torch.randperm(n, generator=gen)[:k]
    shift = torch.randint(1, num_classes, (k,), generator=gen)
    noisy = labels.clone()
    noisy[idx] = (labels[idx] + shift) % num_classes
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[idx] = True
    return noisy, flipped
