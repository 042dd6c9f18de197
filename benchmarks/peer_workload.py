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
