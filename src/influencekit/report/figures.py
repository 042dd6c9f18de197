"""Figures for the report, as PNG bytes (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import torch


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png(fig: Any) -> bytes:
    """A figure as PNG bytes (the figure is closed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return buf.getvalue()


def quality_vs_cost(rows: Sequence[dict[str, Any]], metric: str = "lds") -> bytes:
    """Each method's ``metric`` against its wall time (log scale)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.2, 4.0))
    for r in rows:
        t, q = r.get("time_s"), r.get(metric)
        if r.get("error") or t is None or q is None or not math.isfinite(q):
            continue
        ax.scatter([t], [q], s=40)
        ax.annotate(r["method"], (t, q), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("fit + scores, seconds (log scale)")
    name = metric.upper() if metric == "lds" else metric
    ax.set_ylabel(name)
    ax.set_title(f"Estimator quality ({name}) against cost")
    ax.grid(alpha=0.3)
    return png(fig)


def spectrum(values: Sequence[float], title: str) -> bytes:
    """Ritz values of the curvature, sorted, on a symmetric log scale."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.2, 3.6))
    v = sorted(values, reverse=True)
    ax.plot(range(1, len(v) + 1), v, marker=".", lw=1)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xlabel("index (largest first)")
    ax.set_ylabel("eigenvalue")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return png(fig)


def grey_image(image: torch.Tensor) -> Any:
    """A grey-scale image ``[H, W]``, ``[1, H, W]`` or flat square ``[H·W]`` as an ``[H, W]``
    numpy array (for ``imshow``)."""
    img = image.detach().float().cpu()
    if img.dim() == 3:
        img = img[0]
    if img.dim() == 1:
        side = int(math.isqrt(img.numel()))
        img = img.reshape(side, side)
    return img.numpy()


def thumbnail(image: torch.Tensor, size: float = 0.9) -> bytes:
    """A grey-scale image (see :func:`grey_image`) as a small PNG."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(grey_image(image), cmap="gray_r")
    ax.axis("off")
    return png(fig)
