"""What the compare_*.py scripts share (each runs in another library's interpreter, with
``PYTHONPATH=src``): the workload CNN and its data, as the calling bench_*.py script saved them."""

from __future__ import annotations

import torch


def load_workload(model_path: str, workload_path: str
                  ) -> tuple[torch.nn.Module, tuple, tuple]:
    """``(model in eval mode, train (x, y), queries (x, y))``."""
    from influencekit import models as ikmodels

    model = ikmodels.build("cnn")
    model.load_state_dict(torch.load(model_path)["state"])
    w = torch.load(workload_path)
    return model.eval(), w["train"], w["queries"]


def save_result(out: str, scores, total_s: float, fit_s: float, peak_mb: float) -> torch.Tensor:
    """Write what the calling bench_*.py reads back (scores as float64 ``[Q, N]``, times,
    peak memory); returns the scores."""
    scores = torch.as_tensor(scores).detach().double().cpu()
    torch.save({"scores": scores, "total_s": total_s, "fit_s": fit_s, "peak_mb": peak_mb}, out)
    return scores
