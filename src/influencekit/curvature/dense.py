"""The dense curvature matrix of the mean training loss (small models only)."""

from __future__ import annotations

import torch

from ..autodiff import mean_curvature_vp
from ..batching import Data
from ..progress import progress_bar
from ..task import Task


def dense_curvature(task: Task, data: Data, curvature: str = "hessian", *,
                    batch_size: int = 256, block: int = 64,
                    progress: bool | None = None) -> torch.Tensor:
    """``P × P`` Hessian or GGN of the mean loss over ``data``, in float64, symmetrised.

    Built column block by column block from curvature-vector products, so memory is
    ``8·P² + O(block × P)`` bytes.
    """
    p = task.num_params
    h = torch.empty(p, p, dtype=torch.float64)
    eye = torch.eye(p, dtype=task.dtype, device=task.device)
    for start in progress_bar(range(0, p, block), desc=f"dense {curvature}", leave=False,
                      progress=progress):
        cols = eye[start:start + block]
        h[start:start + block] = mean_curvature_vp(
            task, data, cols, curvature, batch_size=batch_size).cpu()
    return (h + h.T) / 2
