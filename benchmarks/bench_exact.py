"""Exact influence (dense curvature + eigendecomposition) on a small model: digits MLP.

The small-model stage of the before/after comparison (``before_after.py``): a 64-32-10 MLP
(2,410 parameters) trained on the 1,438 digits training examples, then ``ExactInfluence`` fit
(the dense ``P × P`` Hessian or GGN of the mean loss, built 64 columns at a time, and its
eigendecomposition) and scores for the first 100 test examples. Uses only the estimator's
public face (``ExactInfluence(task, damping=, curvature=)``, ``fit``, ``scores``), which is the
same before and after the redesign, so the same script times both.

    .venv/bin/python benchmarks/bench_exact.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import influencekit as ik
from influencekit.profiling import peak_memory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--curvature", default="hessian", choices=["hessian", "ggn"])
    ap.add_argument("--damping", type=float, default=1e-3)
    ap.add_argument("--n-queries", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--json", type=Path, default=None, help="write the timings here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    d = ik.data.load("digits")
    (x, y), (xt, yt) = d.train, d.test
    queries = (xt[:args.n_queries], yt[:args.n_queries])
    model = ik.models.build("mlp", in_features=64, num_classes=10, hidden=(32,), seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(args.epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    res = {"train_s": time.perf_counter() - t0}
    model.eval()

    task = ik.ClassificationTask(model)
    est = ik.ExactInfluence(task, damping=args.damping, curvature=args.curvature,
                            progress=False)
    with peak_memory() as mem:
        t0 = time.perf_counter()
        est.fit((x, y))
        res["fit_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        s = est.scores(queries)
        res["query_s"] = time.perf_counter() - t0
    res.update(peak_mb=mem["peak_mb"], P=task.num_params, n_train=len(y),
               n_queries=len(queries[1]), scores_norm=float(s.double().norm()))
    print(json.dumps(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
