"""kronfluence's EK-FAC on the bench_ekfac workload (run by bench_ekfac.py).

Runs under a separate interpreter with kronfluence (see requirements-compare-ekfac.txt), so the
project's environment stays clean; influencekit is read from ``src/`` (for the model class and
the memory sampler only):

    PYTHONPATH=src /tmp/kfvenv/bin/python benchmarks/compare_ekfac.py --model M.pt \
        --workload W.pt --out R.pt [--empirical] [--damping 1e-8]

Same model, the same 4,000 training examples and 100 queries, strategy ``"ekfac"``, query
measurement = the query's cross-entropy (our default), the given damping. The result file holds
the ``[100, 4000]`` scores, wall time (factors + scores) and peak extra resident memory.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--workload", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--damping", type=float, default=1e-8)
    ap.add_argument("--empirical", action="store_true")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=None,
                    help="torch.manual_seed before fitting (the labels kronfluence draws); "
                    "default: torch's fixed start-up seed")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.seed is not None:
        torch.manual_seed(args.seed)

    from kronfluence import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from peer_workload import load_workload, save_result

    from influencekit.profiling import peak_memory

    class CE(Task):
        def compute_train_loss(self, batch, model: nn.Module, sample: bool = False):
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model: nn.Module):
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    model, train, queries = load_workload(args.model, args.workload)
    train, queries = TensorDataset(*train), TensorDataset(*queries)
    task = CE()
    with tempfile.TemporaryDirectory() as d, peak_memory(interval=0.02) as mem:
        t0 = time.perf_counter()
        model = prepare_model(model, task)
        analyzer = Analyzer("bench", model, task, output_dir=d, disable_model_save=True,
                            cpu=True, disable_tqdm=True)
        fargs = FactorArguments(strategy="ekfac", use_empirical_fisher=args.empirical)
        analyzer.fit_all_factors("f", train, per_device_batch_size=args.batch_size,
                                 factor_args=fargs, overwrite_output_dir=True)
        t_fit = time.perf_counter() - t0
        analyzer.compute_pairwise_scores(
            "s", "f", queries, train, per_device_query_batch_size=len(queries),
            per_device_train_batch_size=args.batch_size,
            score_args=ScoreArguments(damping_factor=args.damping), overwrite_output_dir=True)
        scores = analyzer.load_pairwise_scores("s")["all_modules"]
        total = time.perf_counter() - t0
    scores = save_result(args.out, scores, total, t_fit, mem["peak_mb"])
    print(f"kronfluence ekfac: {total:.1f} s (factors {t_fit:.1f} s), scores "
          f"{tuple(scores.shape)}")


if __name__ == "__main__":
    main()
