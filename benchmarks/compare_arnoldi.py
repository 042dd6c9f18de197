"""Other libraries' Arnoldi influence on the bench_arnoldi workload (run by bench_arnoldi.py).

Runs under a separate interpreter that has the library installed (see requirements-compare.txt),
so the project's environment stays clean:

    python benchmarks/compare_arnoldi.py captum --model M.pt --workload W.pt --out R.pt

Every library gets the same model, the same 4,000 training examples, the same 100 queries,
rank 50 and 200 Krylov / Arnoldi vectors, and its Hessian on the first ``--hessian`` training
examples (each Hessian-vector product over all of them, as these libraries do). The result file
holds the ``[100, 4000]`` scores, the total wall time and the peak extra resident memory.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def run_captum(model, train, queries, hess, args):
    from captum.influence._core.arnoldi_influence_function import ArnoldiInfluenceFunction

    with tempfile.TemporaryDirectory() as d:
        ckpt = str(Path(d) / "model.pt")
        torch.save(model.state_dict(), ckpt)
        inf = ArnoldiInfluenceFunction(
            model, DataLoader(TensorDataset(*train), batch_size=500), ckpt,
            loss_fn=nn.CrossEntropyLoss(reduction="none"), batch_size=500,
            hessian_dataset=DataLoader(TensorDataset(*hess), batch_size=500),
            projection_dim=args.rank, arnoldi_dim=args.iterations, hessian_reg=1e-6)
        return inf.influence(queries)


def run_pydvl(model, train, queries, hess, args):
    from pydvl.influence.torch import ArnoldiInfluence

    inf = ArnoldiInfluence(model, F.cross_entropy, regularization=1e-6, rank=args.rank,
                           krylov_dimension=args.iterations)
    inf = inf.fit(DataLoader(TensorDataset(*hess), batch_size=500))
    return inf.influences(queries[0], queries[1], train[0], train[1])


def run_dattri(model, train, queries, hess, args):
    from dattri.algorithm.influence_function import IFAttributorArnoldi
    from dattri.task import AttributionTask

    def loss_func(params, data):
        x, y = data
        return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    task = AttributionTask(loss_func=loss_func, model=model, checkpoints=model.state_dict())
    att = IFAttributorArnoldi(task, proj_dim=args.rank, max_iter=args.iterations,
                              regularization=0.0)
    att.cache(DataLoader(TensorDataset(*hess), batch_size=500))
    return att.attribute(DataLoader(TensorDataset(*train), batch_size=500),
                         DataLoader(TensorDataset(*queries), batch_size=100)).T


RUNNERS = {"captum": run_captum, "pydvl": run_pydvl, "dattri": run_dattri}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("library", choices=sorted(RUNNERS))
    ap.add_argument("--model", required=True)
    ap.add_argument("--workload", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--rank", type=int, default=50)
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--hessian", type=int, default=4000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from peer_workload import load_workload

    from influencekit.profiling import peak_memory

    model, train, queries = load_workload(args.model, args.workload)
    hess = (train[0][:args.hessian], train[1][:args.hessian])

    with peak_memory(interval=0.02) as mem:
        t0 = time.perf_counter()
        scores = RUNNERS[args.library](model, train, queries, hess, args)
        total = time.perf_counter() - t0
    scores = torch.as_tensor(scores).detach().float().cpu()
    torch.save({"scores": scores, "total_s": total, "peak_mb": mem["peak_mb"]}, args.out)
    print(f"{args.library}: {total:.1f} s, scores {tuple(scores.shape)}")


if __name__ == "__main__":
    main()
