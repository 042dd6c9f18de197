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

With ``--model bert`` the frozen MiniLM layers' output is computed once per example and cached
under ``--cache-dir``; the start point, the twins and every estimator run on the trainable top
(the last ``--train-last`` layers and the head), which computes the same function.

Writes results.json and divergence.png, correlation.png, magnitude.png to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import data as ik_data
from .. import models as ik_models
from ..batching import slice_batch
from ..dynamics import (
    effect_magnitude,
    fading_curve,
    growth_rate,
    trajectory_influence,
    twin_runs,
)
from ..errors import InputError
from ..estimators import METHODS
from ..groundtruth import Cache, Retrainer
from ..report.figures import png, pyplot
from ..store import atomic_write, atomic_write_text
from ..task import ClassificationTask, default_forward, output_tensor
from ..training import TrainConfig
from . import arguments as arg
from .evaluate import _image_layout, _model_builder, load_dataset, parse_methods
from .text import BERT_LR, add_bert_options, bert_setup, check_inputs

TRAJECTORY_METHODS = ("unrolled", "same-time")
DEFAULT_METHODS = "exact,arnoldi,arnoldi-topk,graddot,unrolled,same-time"
QUICK_METHODS = "arnoldi:iterations=60,graddot,unrolled,same-time"
# sizes by the model's inputs ("vector" / "image" / "text") and, where it matters, the model:
# full sizes (no --quick) and --quick sizes; a flag given on the command line wins.
SIZES: dict[str, dict[str, Any]] = {
    "vector": {"n_train": None, "n_queries": 50, "n_removed": 24, "start_epochs": 30,
               "epochs": 15, "batch_size": 64, "record_every": 10, "methods": DEFAULT_METHODS},
    "image": {"n_train": None, "n_queries": 50, "n_removed": 24, "start_epochs": 20,
              "epochs": 4, "batch_size": 64, "record_every": 8,
              "methods": "arnoldi,arnoldi-topk,graddot,unrolled,same-time"},
    "resnet": {"n_train": None, "n_queries": 50, "n_removed": 16, "start_epochs": 20,
               "epochs": 3, "batch_size": 64, "record_every": 8,
               "methods": "arnoldi:iterations=100,graddot,same-time"},
    "text": {"n_train": 4096, "n_queries": 50, "n_removed": 16, "start_epochs": 3,
             "epochs": 2, "batch_size": 32, "record_every": 8,
             "methods": "arnoldi:iterations=60:rank=30,graddot,same-time"},
}
QUICK_SIZES: dict[str, dict[str, Any]] = {
    "vector": {"n_train": 400, "n_queries": 30, "n_removed": 16, "start_epochs": 10,
               "epochs": 8, "batch_size": 32, "record_every": 4, "methods": QUICK_METHODS},
    "image": {"n_train": None, "n_queries": 30, "n_removed": 12, "start_epochs": 20,
              "epochs": 2, "batch_size": 64, "record_every": 4,
              "methods": "arnoldi:iterations=40:rank=20,graddot,unrolled,same-time"},
    "resnet": {"n_train": None, "n_queries": 30, "n_removed": 10, "start_epochs": 12,
               "epochs": 1, "batch_size": 64, "record_every": 2,
               "methods": "arnoldi:iterations=30:rank=15,graddot,same-time"},
    # bert: 2,048 examples × 6 epochs (or 4,096 × 3) reach 76.5% test accuracy on the cached
    # features; 256 × 3 reached 68.8%
    "text": {"n_train": 2048, "n_queries": 30, "n_removed": 10, "start_epochs": 6,
             "epochs": 2, "batch_size": 32, "record_every": 4,
             "methods": "arnoldi:iterations=30:rank=15,graddot,same-time"},
}
QUICK = QUICK_SIZES["vector"]  # (kept: the digits/MLP quick sizes)
DATASETS = [name for name in ik_data.LOADERS if name != "synthetic"] + ["synthetic"]
MODELS = list(ik_models.BUILDERS)


def sizes(args: argparse.Namespace) -> dict[str, Any]:
    """The default sizes for ``args.model`` (``--quick`` or full)."""
    table = QUICK_SIZES if args.quick else SIZES
    kind = ik_models.INPUTS[args.model]
    return table.get(args.model, table[kind])


def _methods(spec: str) -> tuple[list[tuple[str, str, dict[str, Any]]], list[str]]:
    items = [s.strip() for s in spec.split(",") if s.strip()]
    trajectory = [s for s in items if s in TRAJECTORY_METHODS]
    rest = [s for s in items if s not in TRAJECTORY_METHODS]
    if not items:
        raise InputError("no method given; e.g. --methods graddot,unrolled.")
    return (parse_methods(",".join(rest)) if rest else []), trajectory


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dynamics", help="twin runs: parameter divergence and influence fading",
                       description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    S = argparse.SUPPRESS  # sized flags: absent unless given, then filled by sizes()

    def sized(key: str) -> str:
        full = {k: SIZES.get(k, SIZES["vector"])[key] for k in ("vector", "image", "resnet",
                                                                   "text")}
        quick = {k: QUICK_SIZES[k][key] for k in full}
        return (f" (default by model: {', '.join(f'{k} {v}' for k, v in full.items())}; with "
                f"--quick: {', '.join(f'{k} {v}' for k, v in quick.items())})")

    a("--dataset", default="digits", choices=DATASETS, help="built-in dataset")
    a("--model", default="mlp", choices=MODELS,
      help="built-in model (bert: MiniLM with the last --train-last layers and the head "
           "trained, dropout off; text data only)")
    a("--hidden", default="32", type=arg.counts(), help="MLP hidden widths")
    add_bert_options(p)
    a("--methods", default=S, type=arg.checked(str, "method specs", lambda s: _methods(s) and s),
      help=f"estimators ({', '.join(METHODS)}) and {', '.join(TRAJECTORY_METHODS)}"
           + sized("methods"))
    a("--n-train", type=arg.count(), default=S,
      help="training examples (None: all)" + sized("n_train"))
    a("--n-queries", type=arg.count(), default=S,
      help="test examples used as queries" + sized("n_queries"))
    a("--n-removed", type=arg.count(), default=S,
      help="twin runs (random removed examples)" + sized("n_removed"))
    a("--start-epochs", type=arg.count(0), default=S,
      help="epochs to the start point θ_s" + sized("start_epochs"))
    a("--epochs", type=arg.count(), default=S, help="epochs of continued training"
      + sized("epochs"))
    a("--lr", type=arg.number(0.0, strict=True), default=None,
      help="continued training lr (default 0.02 with sgd, 0.001 with adam)")
    a("--optimizer", default="sgd", choices=["sgd", "adam"],
      help="continued training optimizer (the start point is trained with SGD, cosine); "
           "unrolled and same-time need sgd")
    a("--start-lr", type=arg.number(0.0, strict=True), default=None,
      help="lr to θ_s (cosine; default 0.1, bert 0.05)")
    a("--batch-size", type=arg.count(), default=S, help="batch size" + sized("batch_size"))
    a("--weight-decay", type=arg.number(0.0), default=1e-3,
      help="L2 coefficient; also the estimators' damping")
    a("--record-every", type=arg.count(), default=S,
      help="record every so many steps" + sized("record_every"))
    a("--control-seeds", default="1,2", type=arg.counts(), help="data-order control seeds")
    a("--threshold", type=arg.number(), default=0.5, help="correlation of the horizon")
    a("--seed", type=arg.count(0), default=0, help="split, order, init and removal seed")
    a("--quick", action="store_true", help="small sizes (see each flag's default)")
    arg.add_run_options(p, "dynamics", "where the start point and the twin runs are stored")
    p.set_defaults(run=run)


def _prepare(args: argparse.Namespace) -> None:
    """Fill the sized defaults and refuse inconsistent flags (before any work)."""
    for key, value in sizes(args).items():
        if not hasattr(args, key):
            setattr(args, key, value)
    text = check_inputs(args)
    if args.lr is None:
        args.lr = 0.02 if args.optimizer == "sgd" else 1e-3
    if args.start_lr is None:
        args.start_lr = BERT_LR if text else 0.1
    _, trajectory = _methods(args.methods)
    if trajectory and args.optimizer != "sgd":
        raise InputError(f"--methods {','.join(trajectory)} differentiate through SGD steps; "
                         f"with --optimizer {args.optimizer} leave them out of --methods.")


def load_data(args: argparse.Namespace, progress: bool | None = None
              ) -> tuple[ik_data.DataSplits, tuple[Any, Any], Callable[[], torch.nn.Module]]:
    """The training data, the queries (the first ``--n-queries`` test examples), the whole
    test set (for the start point's accuracy), shaped for ``--model``, and its builder. bert:
    the frozen layers' features (cached under ``--cache-dir``) and the trainable top, dropout
    off (twin runs and unrolled influence need the training-mode forward to be a deterministic
    function of θ); see :mod:`influencekit.experiments.text`."""
    d = load_dataset(args)
    if ik_models.INPUTS[args.model] == "text":
        builder = bert_setup(args, d, args.cache_dir, progress)
    else:
        if ik_models.INPUTS[args.model] == "image" and len(d.input_shape) == 1:
            channels, side = _image_layout(d.input_shape, args)
            d.train = (d.train[0].reshape(-1, channels, side, side), d.train[1])
            d.test = (d.test[0].reshape(-1, channels, side, side), d.test[1])
        builder = _model_builder(args, d)
    full_test = d.test
    d.test = slice_batch(full_test, slice(0, args.n_queries))
    return d, full_test, builder


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: tuple[Any, Any], batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on ``data``."""
    was = model.training
    model.eval()
    n, correct = len(data[1]), 0
    for i in range(0, n, batch_size):
        b = slice_batch(data, slice(i, i + batch_size))
        correct += int((output_tensor(default_forward(model, b)).argmax(-1) == b[1]).sum())
    model.train(was)
    return correct / n


def start_point(args: argparse.Namespace, d: ik_data.DataSplits, full_test: tuple[Any, Any],
                builder: Callable[[], torch.nn.Module], progress: bool | None
                ) -> tuple[torch.nn.Module, TrainConfig, Path, dict[str, Any]]:
    """The trained start point (``--start-epochs`` of SGD, cosine, cached under
    ``--cache-dir/dynamics`` and shared by every command with the same flags), its config, the
    cache folder and its accuracy (test, train)."""
    start_cfg = TrainConfig(epochs=args.start_epochs, batch_size=args.batch_size,
                            lr=args.start_lr, schedule="cosine",
                            weight_decay=args.weight_decay, seed=args.seed,
                            init_seed=args.seed)
    cache = Path(args.cache_dir) / "dynamics"
    start = Retrainer(builder, d.train, start_cfg, cache=Cache(cache),
                      progress=progress).fit()
    acc = {"test": accuracy(start, full_test), "train": accuracy(start, d.train),
           "n_test": len(full_test[1])}
    return start, start_cfg, cache, acc


def run(args: argparse.Namespace) -> int:
    """Entry point of ``influencekit dynamics``."""
    t0 = time.perf_counter()
    _prepare(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods, trajectory = _methods(args.methods)
    progress = False if args.no_progress else None
    d, full_test, builder = load_data(args, progress)
    if args.n_removed > len(d.train[1]):
        raise InputError(f"--n-removed {args.n_removed} exceeds the training set.")
    start, start_cfg, cache, acc = start_point(args, d, full_test, builder, progress)
    cfg = replace(start_cfg, epochs=args.epochs, lr=args.lr, schedule="constant",
                  optimizer=args.optimizer)
    gen = torch.Generator().manual_seed(args.seed + 1)
    removed = torch.randperm(len(d.train[1]), generator=gen)[:args.n_removed].tolist()
    arg.log(f"start point: {args.start_epochs} epochs, test accuracy {acc['test']:.4f} on "
         f"{acc['n_test']}, train {acc['train']:.4f} ({time.perf_counter() - t0:.0f}s)")

    t1 = time.perf_counter()
    runs = twin_runs(start, d.train, cfg, d.test, remove=removed,
                     record_every=args.record_every, control_seeds=args.control_seeds,
                     store=cache, progress=progress)
    twin_s = time.perf_counter() - t1
    arg.log(f"twin runs: {len(removed)} twins, {len(args.control_seeds)} controls, "
         f"{int(runs.steps[-1])} steps ({twin_s:.0f}s)")

    scores: dict[str, torch.Tensor] = {}
    timings: dict[str, float] = {}
    for label, name, options in methods:
        t1 = time.perf_counter()
        est = METHODS[name](ClassificationTask(start), **{"damping": args.weight_decay,
                                                          "progress": progress, **options})
        # curvature from all the training data; features of the removed examples only
        scores[label] = est.fit(d.train).scores(d.test, slice_batch(d.train, removed))
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
        "command": arg.command_line("dynamics", args),
        "settings": {k: v for k, v in vars(args).items() if k != "run"},
        "start_config": asdict(start_cfg), "config": asdict(cfg), "removed": removed,
        "n_train": len(d.train[1]), "n_queries": len(d.test[1]), "start_accuracy": acc,
        "threads": torch.get_num_threads(),
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
    arg.log(f"growth rate of log‖Δθ‖: {g.rate:.2e}/step [{g.low:.2e}, {g.high:.2e}]"
         + (f"; control {growth.control.rate:.2e}/step" if growth.control else ""))
    for label, c in curves.items():
        print(f"{label:>20}: Spearman {c.spearman[0]:.3f} (step {int(c.steps[0])}) → "
              f"{c.spearman[-1]:.3f} (step {int(c.steps[-1])}), max {np.nanmax(c.spearman):.3f};"
              f" horizon({args.threshold:g}) = {horizons[label]:g}; |actual|/|predicted| "
              f"{c.magnitude_ratio[0]:.2f} → {c.magnitude_ratio[-1]:.2f}")
    arg.log(f"saved {out}/results.json and plots ({time.perf_counter() - t0:.0f}s in all)")
    return 0


def plot(runs: Any, curves: dict[str, Any], out: Path) -> None:
    """divergence.png, correlation.png and magnitude.png."""
    plt = pyplot()
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
    atomic_write(out / "divergence.png", png(fig))

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, c in curves.items():
        ax.plot(c.steps, c.spearman, label=label)
    ax.set(xlabel="step", ylabel="Spearman(predicted, actual Δm)", title="influence fading")
    ax.axhline(0, color="grey", lw=0.5)
    ax.legend()
    fig.tight_layout()
    atomic_write(out / "correlation.png", png(fig))

    fig, ax = plt.subplots(figsize=(6, 4))
    first = next(iter(curves.values()), None)
    mag = effect_magnitude(runs)
    ax.plot(steps, mag, color="k", label="actual mean |Δm|")
    for i, (label, c) in enumerate(curves.items()):
        ax.axhline(c.predicted_magnitude, ls="--", color=f"C{i}", label=f"{label} predicted")
    ax.set(yscale="log", xlabel="step", ylabel="mean |Δm(q)|", title="effect magnitude")
    if first is not None:
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(out / "magnitude.png", png(fig))
