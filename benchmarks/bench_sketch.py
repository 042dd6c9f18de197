"""ABIF's complement term: exact (streams training gradients per query chunk) vs a CountSketch
stored with the projections (``ArnoldiInfluence(sketch=d)``).

Same workload as bench_arnoldi.py (MNIST CNN, 4,000 train × 100 queries). Every row computes
the same seeded eigenbasis, so the rows differ only in how the complement is scored.

    .venv/bin/python benchmarks/bench_sketch.py --sketch 4096,16384
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_arnoldi import workload  # noqa: E402

import influencekit as ik  # noqa: E402
from influencekit.groundtruth.metrics import mean_spearman  # noqa: E402
from influencekit.profiling import peak_memory  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "arnoldi")
    p.add_argument("--sketch", default="4096,16384", help="sketch dimensions, comma-separated")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    w = workload(args.out)
    task = ik.ClassificationTask(w["model"])
    rows = []
    ref = None
    for d in [None, *(int(s) for s in args.sketch.split(","))]:
        est = ik.ArnoldiInfluence(task, sketch=d, progress=False)
        with peak_memory() as fit_mem:
            est.fit(w["train"])
        t0 = time.perf_counter()
        with peak_memory() as q_mem:
            s = est.scores(w["queries"])
        query_s = time.perf_counter() - t0
        ref = s if ref is None else ref
        rows.append((d, est.timings.get("eigenbasis", 0.0), est.timings["projection"],
                     query_s, fit_mem["peak_mb"], q_mem["peak_mb"],
                     mean_spearman(s.double(), ref.double()),
                     float((s - ref).norm() / ref.norm())))
        print(rows[-1], flush=True)
    print("\n| complement | eigenbasis s | projection s | query s (100) | fit MB | query MB "
          "| Spearman vs exact complement | relative error |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for d, eig_s, proj_s, query_s, fm, qm, rho, err in rows:
        name = "exact (streams train gradients)" if d is None else f"sketch {d}"
        print(f"| {name} | {eig_s:.1f} | {proj_s:.1f} | {query_s:.2f} | {fm:.0f} | {qm:.0f} "
              f"| {rho:.3f} | {err:.3f} |")


if __name__ == "__main__":
    main()
