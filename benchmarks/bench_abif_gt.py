"""LDS ground truth for the MNIST CNN workload of bench_arnoldi.py (8 data-order seeds).

60 random half-subsets of the 4,000 training examples; each retrained from the workload CNN's
initialisation with the workload recipe (Adam, lr 2e-3, 5 epochs, batch 64) under 8 data-order
seeds; the target is the query loss averaged over the seeds. Every run is cached by
``influencekit.groundtruth`` (one artifact per run, atomic), so a killed run resumes.

    nohup .venv/bin/python benchmarks/bench_abif_gt.py > benchmarks/out/abif/gt.log 2>&1 &
    .venv/bin/python benchmarks/bench_abif_gt.py --time-one     # cost of one retrain

``load_groundtruth()`` returns the subsets, the mean measurements and the per-seed ones.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_arnoldi import workload  # noqa: E402

from influencekit import models as ikmodels  # noqa: E402
from influencekit.groundtruth import Cache, Retrainer, random_subsets  # noqa: E402
from influencekit.training import TrainConfig  # noqa: E402

OUT = HERE / "out" / "abif"
N_SUBSETS, ALPHA, SEEDS = 60, 0.5, 8


def recipe(seed: int) -> TrainConfig:
    """The workload CNN's training (bench_arnoldi.workload) with data-order ``seed``."""
    return TrainConfig(epochs=5, batch_size=64, lr=2e-3, optimizer="adam", seed=seed)


class CachedOnly(Cache):
    """The cache, read only: a run not computed yet raises LookupError."""

    def get_or_compute(self, group, key, compute):  # type: ignore[override]
        def missing():
            raise LookupError(key)

        return super().get_or_compute(group, key, missing)


def retrainer(w: dict, cache: Path | Cache | None) -> Retrainer:
    return Retrainer(lambda: ikmodels.build("cnn", seed=0), w["train"], recipe(0),
                     cache=cache if isinstance(cache, Cache) else Cache(cache), progress=False)


def measurements(w: dict, cache: Path | Cache, n_subsets: int = N_SUBSETS, seeds: int = SEEDS,
                 verbose: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Subset masks ``[M, N]`` and measurements ``[S, M, Q]`` (computing what is missing;
    with a :class:`CachedOnly` cache, the seeds complete so far)."""
    rt = retrainer(w, cache)
    masks = random_subsets(rt.n, n_subsets, ALPHA, seed=0)
    vals = torch.zeros(seeds, n_subsets, len(w["queries"][1]), dtype=torch.float64)
    t0 = time.perf_counter()
    for s in range(seeds):  # seed-major: a partial run already gives whole seeds
        for m in range(n_subsets):
            try:
                vals[s, m] = rt.measured(w["queries"], subset=masks[m].nonzero().squeeze(1),
                                         config=recipe(s))
            except LookupError:
                return masks, vals[:s]
            if verbose and m % 10 == 9:
                print(f"seed {s} subset {m + 1}/{n_subsets}  {time.perf_counter() - t0:.0f} s",
                      flush=True)
    return masks, vals


def load_groundtruth(w: dict, cache_dir: Path = OUT / "gt-cache", seeds: int = SEEDS
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(masks [M, N], mean measurement [M, Q], per-seed [S, M, Q])``."""
    masks, vals = measurements(w, cache_dir, seeds=seeds)
    return masks, vals.mean(0), vals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=OUT / "gt-cache")
    ap.add_argument("--workload-dir", type=Path, default=HERE / "out" / "arnoldi")
    ap.add_argument("--time-one", action="store_true")
    ap.add_argument("--seeds", type=int, default=SEEDS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    w = workload(args.workload_dir)
    if args.time_one:
        rt = retrainer(w, None)
        masks = random_subsets(rt.n, 1, ALPHA, seed=123)
        t0 = time.perf_counter()
        rt.measured(w["queries"], subset=masks[0].nonzero().squeeze(1), config=recipe(0))
        dt = time.perf_counter() - t0
        print(f"one retrain: {dt:.1f} s; {N_SUBSETS * SEEDS} runs ≈ "
              f"{dt * N_SUBSETS * SEEDS / 60:.0f} min")
        return
    measurements(w, args.cache, seeds=args.seeds, verbose=True)
    print("ground truth complete", flush=True)


if __name__ == "__main__":
    main()
