"""One stage of the bench_arnoldi workload, timed in-process, under either API.

For fine-grained before/after pairs: each call is one short process, so an old and a new run
of the same stage can alternate every few seconds (drift of a shared machine then cancels
better than over whole benchmark runs). The same script runs against the code before the
redesign (``variant=``, ``hessian_batch_size=``) and after it (``filter=``, ``Eigensolver``,
``curvature_batch=``); it picks the spelling from what ``influencekit`` exports.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_stage.py abif-fit
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_arnoldi import workload  # noqa: E402

import influencekit as ik  # noqa: E402

NEW = hasattr(ik, "Eigensolver")
STAGES = ("abif-fit", "abif", "abif-topk", "graddot", "lissa", "cg")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=STAGES)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "arnoldi")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--queries", type=int, default=None, help="default: 100 (5 LiSSA, 1 CG)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    w = workload(args.out)
    task = ik.ClassificationTask(w["model"])
    train = w["train"]
    nq = args.queries or {"lissa": 5, "cg": 1}.get(args.stage, 100)
    q = (w["queries"][0][:nq], w["queries"][1][:nq])
    damping = 0.07  # 0.01·λ_max of this CNN, as bench_arnoldi uses
    t0 = time.perf_counter()
    if args.stage == "abif-fit":
        ik.ArnoldiInfluence(task, iterations=args.iterations)._eigenbasis(train)
    elif args.stage in ("abif", "abif-topk"):
        kw = {} if args.stage == "abif" else ({"filter": "topk"} if NEW else {"variant": "topk"})
        ik.ArnoldiInfluence(task, iterations=args.iterations, progress=False, **kw
                            ).fit(train).scores(q)
    elif args.stage == "graddot":
        ik.GradDot(task).scores(q, train)
    elif args.stage == "lissa":
        kw = (dict(curvature_batch=64, check_definite=False) if NEW
              else dict(hessian_batch_size=64))
        est = ik.LiSSAInfluence(task, damping=damping, depth=100, scale=11.0, **kw).fit(train)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est.scores(q)
    elif args.stage == "cg":
        kw = dict(micro_batch_size=500) if NEW else dict(hessian_batch_size=500)
        est = ik.CGInfluence(task, damping=damping, curvature="ggn", max_iter=5, **kw).fit(train)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est.scores(q)
    print(json.dumps({"stage": args.stage, "api": "new" if NEW else "old",
                      "seconds": time.perf_counter() - t0}))


if __name__ == "__main__":
    main()
