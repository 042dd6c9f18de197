"""captum's TracInCP (one checkpoint, learning rate 1: the same scores as ``GradDot``) on a
workload written by ``bench_per_example.py``. Run under an interpreter with captum installed
(see requirements-compare.txt); influencekit is imported from ``src/`` for the model class only.

    /tmp/cmpvenv/bin/python benchmarks/compare_tracin.py --model M.pt --workload W.pt --out O.pt
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--workload", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from captum.influence import TracInCP
    from peer_workload import load_workload

    from influencekit.profiling import peak_memory

    model, (x, y), (xq, yq) = load_workload(args.model, args.workload)

    times, peak, scores = [], 0.0, None
    for _ in range(args.repeats):
        with peak_memory(interval=0.02) as mem:
            t0 = time.perf_counter()
            tracin = TracInCP(
                model, DataLoader(TensorDataset(x, y), batch_size=args.batch_size),
                checkpoints=[args.model], checkpoints_load_func=lambda m, path: 1.0,
                loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=args.batch_size,
                sample_wise_grads_per_batch=True)
            scores = tracin.influence((xq, yq), show_progress=False)
            times.append(time.perf_counter() - t0)
        peak = max(peak, mem["peak_mb"])
    torch.save({"scores": scores.detach().float(), "times": times, "peak_mb": peak}, args.out)
    print(f"captum TracInCP: {min(times):.2f} s (min of {len(times)}), peak {peak:.0f} MB")


if __name__ == "__main__":
    main()
