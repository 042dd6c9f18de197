"""pyDVL's DirectInfluence / CgInfluence on a bench_peers.py workload (run by bench_peers.py).

Runs under a separate interpreter with pyDVL (``pydvl[influence]==0.10.0``, torch pinned), so the
project's environment stays clean; influencekit is read from ``src/`` (to unpickle the model only):

    PYTHONPATH=src /tmp/pydvlvenv/bin/python benchmarks/compare_pydvl.py --workload W.pt \
        --method cg --out R.pt [--damping 1e-3] [--rtol 0 --atol 1e-4 --maxiter 100] [--block]

The workload file holds the whole model (``torch.save(model)``), ``train`` and ``queries``
(``(x, y)`` tensors). Loss: mean cross-entropy (pyDVL averages the per-batch Hessians over the
DataLoader: its CG operator weights every *batch* equally (ChunkAveraging), so pass a batch size
that divides the training set or the Hessian is biased; DirectInfluence weights by batch size).
Scores: pyDVL's ``influences(x_q, y_q, x, y, mode="up")`` equal ours (fitted scale +1, measured).
The result file holds the ``[n_q, n]`` scores, wall time (fit + scores), fit time and peak extra
resident memory.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--method", choices=("direct", "cg"), required=True)
    ap.add_argument("--damping", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=256, help="DataLoader batch (HVP batch)")
    ap.add_argument("--rtol", type=float, default=0.0)
    ap.add_argument("--atol", type=float, default=1e-6)
    ap.add_argument("--maxiter", type=int, default=100)
    ap.add_argument("--block", action="store_true", help="CgInfluence(solve_simultaneously=True)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from peer_workload import save_result
    from pydvl.influence import InfluenceMode
    from pydvl.influence.torch import CgInfluence, DirectInfluence

    from influencekit.profiling import peak_memory

    w = torch.load(args.workload, weights_only=False)
    model = w["model"].eval()
    (x, y), (xq, yq) = w["train"], w["queries"]
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size, shuffle=False)
    if args.method == "direct":
        infl = DirectInfluence(model, F.cross_entropy, regularization=args.damping)
    else:
        infl = CgInfluence(model, F.cross_entropy, regularization=args.damping, rtol=args.rtol,
                           atol=args.atol, maxiter=args.maxiter,
                           solve_simultaneously=args.block, warn_on_max_iteration=False)
    with warnings.catch_warnings(), peak_memory(interval=0.02) as mem:
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        infl = infl.fit(loader)
        t_fit = time.perf_counter() - t0
        scores = infl.influences(xq, yq, x, y, mode=InfluenceMode.Up)
        total = time.perf_counter() - t0
    scores = save_result(args.out, scores, total, t_fit, mem["peak_mb"])
    print(f"pydvl {args.method}{'-block' if args.block else ''}: {total:.2f} s "
          f"(fit {t_fit:.2f} s), peak {mem['peak_mb']:.0f} MB, scores {tuple(scores.shape)}")


if __name__ == "__main__":
    main()
