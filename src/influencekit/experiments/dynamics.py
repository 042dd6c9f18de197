"""``influencekit dynamics``: parameter divergence and influence fading along continued training.

1. Trains a start point θ_s on a built-in dataset (``--start-epochs``, cosine; cached).
2. Continues training from θ_s (``--epochs`` at a constant ``--lr``, SGD with momentum) as the
   reference run, with one twin run per removed example (``--n-removed``, random) and control
   runs that differ only in the data-order seed (``--control-seeds``); records ‖Δθ‖ and the
   queries' losses every ``--record-every`` steps (stored: a rerun resumes).
3. Scores the removed examples at θ_s with each estimator (``--methods``, names from
   influencekit.estimators.METHODS, plus ``unrolled`` and ``same-time``: exact trajectory-aware
   influence and TracIn's same-time sum over the continued run itself) and reports, per method,
   the fading curve (Spearman / Pearson between predicted +score/N and actual change of the
   query loss, over (example, query) pairs, at every recorded step) and the influence horizon.

Writes results.json and divergence.png, correlation.png, magnitude.png to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..dynamics import (
    fading_curve,
    growth_rate,
    trajectory_influence,
    twin_runs,
)
from ..errors import InputError
from ..estimators import METHODS
from ..groundtruth import Cache, Retrainer
from ..store import atomic_write_text
from ..task import ClassificationTask
from ..training import TrainConfig
from . import arguments as arg
from .evaluate import _load, _model_builder, parse_methods

TRAJECTORY_METHODS = ("unrolled", "same-time")
DEFAULT_METHODS = "exact,arnoldi,arnoldi-topk,graddot,unrolled,same-time"
QUICK_METHODS = "arnoldi:iterations=60,graddot,unrolled,same-time"
QUICK = {"n_train": 400, "n_queries": 30, "n_removed": 16, "start_epochs": 10, "epochs": 8,
         "batch_size": 32, "record_every": 4}


def _methods(spec: str) -> tuple[list[tuple[str, str, dict[str, Any]]], list[str]]:
    items = [s.strip() for s in spec.split(",") if s.strip()]
    trajectory = [s for s in items if s in TRAJECTORY_METHODS]
    rest = [s for s in items if s not in TRAJECTORY_METHODS]
    return (parse_methods(",".join(rest)) if rest else []), trajectory


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dynamics", help="twin runs: parameter divergence and influence fading",
                       description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--dataset", default="digits", choices=["digits", "mnist"], help="built-in dataset")
    a("--model", default="mlp", choices=["mlp", "logreg", "cnn", "resnet"],
      help="built-in model")
    a("--hidden", default="32", type=arg.counts(), help="MLP hidden widths")
    a("--methods", default=None, type=arg.checked(str, "method specs", lambda s: _methods(s) and s),
      help=f"estimators ({', '.join(METHODS)}) and {', '.join(TRAJECTORY_METHODS)}; default "
           f"{DEFAULT_METHODS} ({QUICK_METHODS} with --quick)")
    a("--n-train", type=arg.count(), default=None, help="training examples (None: all)")
    a("--n-queries", type=arg.count(), default=50, help="test examples used as queries")
    a("--n-removed", type=arg.count(), default=24, help="twin runs (random removed examples)")
    a("--start-epochs", type=arg.count(0), default=30, help="epochs to the start point θ_s")
    a("--epochs", type=arg.count(), default=15, help="epochs of continued training")
    a("--lr", type=arg.number(0.0, strict=True), default=0.02, help="continued training lr")
    a("--start-lr", type=arg.number(0.0, strict=True), default=0.1, help="lr to θ_s (cosine)")
    a("--batch-size", type=arg.count(), default=64, help="batch size")
    a("--weight-decay", type=arg.number(0.0), default=1e-3,
      help="L2 coefficient; also the estimators' damping")
    a("--record-every", type=arg.count(), default=10, help="record every so many steps")
    a("--control-seeds", default="1,2", type=arg.counts(), help="data-order control seeds")
    a("--threshold", type=arg.number(), default=0.5, help="correlation of the horizon")
    a("--seed", type=arg.count(0), default=0, help="split, order, init and removal seed")
    a("--quick", action="store_true", help="small sizes: " + ", ".join(
        f"{k}={v}" for k, v in QUICK.items()))
    a("--out", type=arg.folder, default=None, help="output folder (runs/dynamics/DATA-MODEL)")
    a("--cache-dir", type=arg.folder, default=str(Path.home() / ".cache" / "influencekit"),
      help="where the start point and the twin runs are stored")
    a("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(run=run)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``influencekit dynamics``."""
    t0 = time.perf_counter()
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    if args.methods is None:
        args.methods = QUICK_METHODS if args.quick else DEFAULT_METHODS
    methods, trajectory = _methods(args.methods)
    progress = False if args.no_progress else None
    d = _load(args)
    if args.n_removed > len(d.train[1]):
        raise InputError(f"--n-removed {args.n_removed} exceeds the training set.")
    builder = _model_builder(args, d)
    start_cfg = TrainConfig(epochs=args.start_epochs, batch_size=args.batch_size,
                            lr=args.start_lr, schedule="cosine",
                            weight_decay=args.weight_decay, seed=args.seed,
                            init_seed=args.seed)
    cache = Path(args.cache_dir) / "dynamics"
    start = Retrainer(builder, d.train, start_cfg, cache=Cache(cache),
                      progress=progress).fit()
    cfg = replace(start_cfg, epochs=args.epochs, lr=args.lr, schedule="constant")
    gen = torch.Generator().manual_seed(args.seed + 1)
    removed = torch.randperm(len(d.train[1]), generator=gen)[:args.n_removed].tolist()
    _log(f"start point: {args.start_epochs} epochs ({time.perf_counter() - t0:.0f}s)")

    t1 = time.perf_counter()
    runs = twin_runs(start, d.train, cfg, d.test, remove=removed,
                     record_every=args.record_every, control_seeds=args.control_seeds,
                     store=cache, progress=progress)
    twin_s = time.perf_counter() - t1
    _log(f"twin runs: {len(removed)} twins, {len(args.control_seeds)} controls, "
         f"{int(runs.steps[-1])} steps ({twin_s:.0f}s)")

    scores: dict[str, torch.Tensor] = {}
    timings: dict[str, float] = {}
    for label, name, options in methods:
        t1 = time.perf_counter()
        est = METHODS[name](ClassificationTask(start), **{"damping": args.weight_decay,
                                                          "progress": progress, **options})
        scores[label] = est.fit(d.train).scores(d.test)[:, removed]
        timings[label] = time.perf_counter() - t1
    if trajectory:
        t1 = time.perf_counter()
        ti = trajectory_influence(start, d.train, cfg, d.test, examples=removed,
                                  unrolled="unrolled" in trajectory,
                                  same_time="same-time" in trajectory, progress=progress)
        for label, value in (("unrolled", ti.unrolled), ("same-time", ti.same_time)):
            if value is not None:
                scores[label] = value
                timings[label] = time.perf_counter() - t1

    growth = growth_rate(runs)
    curves = {label: fading_curve(runs, s) for label, s in scores.items()}
    horizons = {label: c.horizon(args.threshold) for label, c in curves.items()}
    report = {
        "command": "influencekit dynamics " + " ".join(sys.argv[2:]),
        "settings": {k: v for k, v in vars(args).items() if k != "run"},
        "start_config": asdict(start_cfg), "config": asdict(cfg), "removed": removed,
        "n_train": len(d.train[1]), "n_queries": len(d.test[1]),
        "growth_rate": growth.to_dict(), "horizon": horizons,
        "fading": {label: c.to_dict() for label, c in curves.items()},
        "twins": runs.to_dict(), "seconds": {"twins": twin_s, **timings,
                                             "total": time.perf_counter() - t0},
    }
    out = Path(args.out or f"runs/dynamics/{args.dataset}-{args.model}")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(report, default=str), out / "results.json")
    plot(runs, curves, out)
    g = growth.twins
    _log(f"growth rate of log‖Δθ‖: {g.rate:.2e}/step [{g.low:.2e}, {g.high:.2e}]"
         + (f"; control {growth.control.rate:.2e}/step" if growth.control else ""))
    for label, c in curves.items():
        print(f"{label:>20}: Spearman {c.spearman[0]:.3f} (step {int(c.steps[0])}) → "
              f"{c.spearman[-1]:.3f} (step {int(c.steps[-1])}), max {np.nanmax(c.spearman):.3f};"
              f" horizon({args.threshold:g}) = {horizons[label]:g}; |actual|/|predicted| "
              f"{c.magnitude_ratio[0]:.2f} → {c.magnitude_ratio[-1]:.2f}")
    _log(f"saved {out}/results.json and plots ({time.perf_counter() - t0:.0f}s in all)")
    return 0


def plot(runs: Any, curves: dict[str, Any], out: Path) -> None:
    """divergence.png, correlation.png and magnitude.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = runs.steps.numpy()
    fig, ax = plt.subplots(figsize=(6, 4))
    div = runs.divergence.numpy()
    ax.plot(steps, np.median(div, axis=1), label="twins (median)", color="C0")
    ax.fill_between(steps, np.quantile(div, 0.1, axis=1), np.quantile(div, 0.9, axis=1),
                    alpha=0.3, color="C0", label="twins (10–90%)")
    if runs.control_divergence.numel():
        ctrl = runs.control_divergence.numpy()
        ax.fill_between(steps, ctrl.min(axis=1), ctrl.max(axis=1), alpha=0.3, color="C3",
                        label="data-order control")
    ax.set(yscale="log", xlabel="step", ylabel="‖θ_B − θ_A‖", title="parameter divergence")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "divergence.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, c in curves.items():
        ax.plot(c.steps, c.spearman, label=label)
    ax.set(xlabel="step", ylabel="Spearman(predicted, actual Δm)", title="influence fading")
    ax.axhline(0, color="grey", lw=0.5)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "correlation.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    first = next(iter(curves.values()), None)
    mag = np.abs(runs.effect.numpy()).reshape(len(steps), -1).mean(axis=1)
    ax.plot(steps, mag, color="k", label="actual mean |Δm|")
    for i, (label, c) in enumerate(curves.items()):
        ax.axhline(c.predicted_magnitude, ls="--", color=f"C{i}", label=f"{label} predicted")
    ax.set(yscale="log", xlabel="step", ylabel="mean |Δm(q)|", title="effect magnitude")
    if first is not None:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "magnitude.png", dpi=120)
    plt.close(fig)
