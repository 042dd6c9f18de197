"""``influencekit evaluate``: score influence estimators against ground truth.

Trains (or loads from the cache) a model on a built-in dataset with the deterministic trainer,
computes the ground truths, runs every requested estimator and prints and saves a table:

  spearman_vs_exact  mean Spearman (per query, across training examples) with the exact scores
  loo_warm           leave-one-out correlation, retrained warm from θ* (base: the same continued
                     training without removal)
  loo_scratch        leave-one-out correlation, retrained from scratch (same seeds and order)
  lds                linear datamodeling score over random α-subsets retrained from scratch
  pbrf               correlation with the proximal Bregman response function (from θ*)
  mislabel_auc       AUC of self-influence for finding flipped labels (model retrained on them)
  time_s, peak_mb    fit + scores wall time and peak extra memory (self-influence not included
                     in time_s; see mislabel_time_s in the JSON)

Correlations are Spearman per query, averaged over queries. Weight decay wd enters training as
(wd/2)‖θ‖², so the estimators get damping = wd (override with --damping).

Methods are names from influencekit.estimators.METHODS, optionally with options passed to the
estimator: "cg:curvature=ggn:max_iter=50" (the label in the table is the whole spec); the
option "mislabel=False" skips that method's self-influence run. The first "exact" spec listed
is the reference of the "Spearman vs exact" column.
Retraining results are cached under --cache-dir; a rerun (or a killed run) resumes.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .. import data as ik_data
from .. import models as ik_models
from ..errors import InputError
from ..estimators import METHODS
from ..groundtruth import (
    Cache,
    Retrainer,
    TrainConfig,
    atomic_write_text,
    flip_labels,
    lds_retrain,
    leave_one_out,
    pbrf,
    with_epochs,
)
from ..groundtruth.benchmark import GroundTruth, MethodResult, describe_error, evaluate_method
from ..groundtruth.benchmark import summary as row_summary
from ..task import ClassificationTask

GROUND_TRUTHS = ("loo-warm", "loo-scratch", "lds", "pbrf", "mislabel")
PLANNED = ("ekfac", "tracin", "trak")  # in DESIGN.md, may not be registered yet
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {"lissa": {"depth": 200}}
IMAGE_DATASETS = ("digits", "mnist", "synthetic")
COLUMNS = [("spearman_vs_exact", "Spearman vs exact"), ("loo_warm", "LOO warm"),
           ("loo_scratch", "LOO scratch"), ("lds", "LDS"), ("pbrf", "PBRF"),
           ("mislabel_auc", "mislabel AUC"), ("time_s", "time (s)"), ("peak_mb", "peak MB")]


# --------------------------------------------------------------------------- CLI
class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the description's layout and show every default."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="score influence estimators against LOO, LDS, PBRF and mislabels",
        description=__doc__, formatter_class=_HelpFormatter)
    a = p.add_argument
    a("--dataset", default="digits", choices=IMAGE_DATASETS, help="built-in dataset")
    a("--model", default="mlp", choices=["mlp", "logreg", "cnn", "resnet"],
      help="built-in model (logreg = MLP without hidden layers)")
    a("--hidden", default="32", help="MLP hidden widths, comma-separated")
    a("--methods", default="exact,cg,lissa,arnoldi,graddot,gradcos",
      help="comma-separated method specs, e.g. exact,cg:curvature=ggn (lissa defaults to "
           "depth=200)")
    a("--n-train", type=int, default=None, help="training examples; None means the whole split")
    a("--n-queries", type=int, default=100, help="test examples used as queries")
    g = p.add_argument_group("training (deterministic; SGD with momentum 0.9, cosine schedule)")
    g.add_argument("--epochs", type=int, default=30, help="epochs")
    g.add_argument("--batch-size", type=int, default=64, help="batch size")
    g.add_argument("--lr", type=float, default=0.1, help="peak learning rate")
    g.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"], help="optimizer")
    g.add_argument("--weight-decay", type=float, default=1e-3,
                   help="L2 coefficient; also the estimators' damping unless --damping")
    g.add_argument("--seed", type=int, default=0, help="data split, order and init seed")
    g = p.add_argument_group("ground truth")
    g.add_argument("--ground-truth", default=",".join(GROUND_TRUTHS),
                   help="which ground truths to compute (comma-separated)")
    g.add_argument("--n-removed", type=int, default=40,
                   help="random training examples left out for LOO")
    g.add_argument("--warm-epochs", type=int, default=10,
                   help="epochs of warm-started LOO retraining from θ*")
    g.add_argument("--lds-subsets", type=int, default=50, help="LDS subsets retrained (M)")
    g.add_argument("--lds-alpha", type=float, default=0.5, help="LDS subset fraction α")
    g.add_argument("--n-pbrf", type=int, default=20,
                   help="examples (the first of the LOO set) for the PBRF")
    g.add_argument("--mislabel-fraction", type=float, default=0.1,
                   help="training labels flipped for mislabel detection")
    g = p.add_argument_group("run")
    g.add_argument("--damping", type=float, default=None,
                   help="λ for the estimators and the PBRF; None means the weight decay")
    g.add_argument("--out", default=None,
                   help="output folder for results.json and results.md"
                        "; None means runs/evaluate/DATASET-MODEL")
    g.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "influencekit"),
                   help="where retraining results are cached")
    g.add_argument("--no-cache", action="store_true", help="do not read or write the cache")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 is often fastest for small models on a busy "
                        "machine)")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(run=run)


def parse_methods(spec: str) -> list[tuple[str, str, dict[str, Any]]]:
    """``"exact,cg:curvature=ggn"`` -> ``[(label, name, options), ...]``; unknown names raise."""
    out = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        name, *opts = item.split(":")
        options: dict[str, Any] = dict(DEFAULT_OPTIONS.get(name, {}))
        for opt in opts:
            key, sep, value = opt.partition("=")
            if not sep:
                raise InputError(f"method option {opt!r} in {item!r} is not key=value.")
            try:
                options[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                options[key] = value
        if name not in METHODS and name not in PLANNED and not name.startswith("arnoldi"):
            raise InputError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}.")
        out.append((item, name, options))
    if not out:
        raise InputError("--methods is empty; name at least one method.")
    return out


def _csv(value: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise InputError(f"unknown {what} {bad}; choose from {', '.join(allowed)}.")
    return items


# --------------------------------------------------------------------------- setup
def _model_builder(args: argparse.Namespace, d: ik_data.DataSplits) -> Any:
    shape = d.input_shape
    in_features = math.prod(shape)
    hidden = tuple(int(h) for h in args.hidden.split(",") if h.strip())
    if args.model == "mlp":
        return lambda: ik_models.MLP(in_features, d.num_classes, hidden=hidden)
    if args.model == "logreg":
        return lambda: ik_models.MLP(in_features, d.num_classes, hidden=())
    side = int(math.isqrt(in_features))
    if len(shape) != 3 and side * side != in_features:
        raise InputError(f"--model {args.model} needs square images; {args.dataset} has inputs "
                         f"of shape {shape}. Use --model mlp.")
    if args.model == "cnn":
        return lambda: ik_models.CNN(1, d.num_classes, image_size=side)
    return lambda: ik_models.ResNet(1, d.num_classes)


def _images(x: torch.Tensor, model: str) -> torch.Tensor:
    if model in ("cnn", "resnet") and x.dim() == 2:
        side = int(math.isqrt(x.shape[1]))
        return x.reshape(len(x), 1, side, side)
    return x


def _load(args: argparse.Namespace) -> ik_data.DataSplits:
    kw: dict[str, Any] = {"seed": args.seed}
    if args.n_train is not None:
        kw["n_train"] = args.n_train
    d = ik_data.load(args.dataset, **kw)
    n_test = len(d.test[1])
    if args.n_queries > n_test:
        raise InputError(f"--n-queries {args.n_queries} exceeds the {n_test} test examples.")
    d.train = (_images(d.train[0], args.model), d.train[1])
    d.test = (_images(d.test[0][:args.n_queries], args.model), d.test[1][:args.n_queries])
    return d


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_ground_truth(args: argparse.Namespace, d: ik_data.DataSplits, builder: Any,
                       cfg: TrainConfig, cache: Cache, damping: float, which: list[str],
                       progress: bool | None) -> tuple[GroundTruth, torch.nn.Module, dict]:
    """Train θ* and compute the selected ground truths; returns (gt, θ*, info for the report)."""
    info: dict[str, Any] = {}
    rt = Retrainer(builder, d.train, cfg, cache=cache, progress=progress)
    t0 = time.perf_counter()
    model = rt.fit()
    task = ClassificationTask(model)
    info["test_accuracy"] = (task.predict(d.test[0]) == d.test[1]).float().mean().item()
    info["train_accuracy"] = (task.predict(d.train[0]) == d.train[1]).float().mean().item()
    info["params"] = task.num_params
    _log(f"θ*: {task.num_params} parameters, train accuracy {info['train_accuracy']:.3f}, "
         f"query accuracy {info['test_accuracy']:.3f} ({time.perf_counter() - t0:.1f}s)")
    gt = GroundTruth(train=d.train, queries=d.test)
    n = len(d.train[1])
    gen = torch.Generator().manual_seed(args.seed + 1)
    removed = torch.randperm(n, generator=gen)[:min(args.n_removed, n)].tolist()
    timings: dict[str, float] = {}
    for kind in which:
        t0 = time.perf_counter()
        if kind == "loo-warm":
            warm = with_epochs(cfg, args.warm_epochs)
            gt.loo["warm"] = leave_one_out(rt, removed, d.test, warm_start=model,
                                           warm_config=warm)
        elif kind == "loo-scratch":
            gt.loo["scratch"] = leave_one_out(rt, removed, d.test)
        elif kind == "lds":
            gt.lds = lds_retrain(rt, d.test, n_subsets=args.lds_subsets, alpha=args.lds_alpha,
                                 seed=args.seed + 2)
        elif kind == "pbrf":
            key = (damping, removed[:args.n_pbrf])
            gt.pbrf = cache.get_or_compute(
                "pbrf", rt.key("pbrf", asdict(cfg), list(key), d.test),
                lambda: pbrf(task, d.train, removed[:args.n_pbrf], d.test, damping=damping,
                             progress=progress))
        elif kind == "mislabel":
            noisy_y, flipped = flip_labels(d.train[1], args.mislabel_fraction, d.num_classes,
                                           seed=args.seed + 3)
            noisy_train = (d.train[0], noisy_y)
            noisy = Retrainer(builder, noisy_train, cfg, cache=cache, progress=progress).fit()
            gt.noisy_task, gt.noisy_train, gt.flipped = (ClassificationTask(noisy),
                                                         noisy_train, flipped)
        timings[kind] = time.perf_counter() - t0
        _log(f"ground truth {kind}: {timings[kind]:.1f}s")
    info["ground_truth_seconds"] = timings
    info["removed"] = removed
    return gt, model, info


def run_methods(methods: list[tuple[str, str, dict[str, Any]]], task: ClassificationTask,
                gt: GroundTruth, damping: float, progress: bool | None
                ) -> tuple[list[MethodResult], str | None]:
    """Evaluate each method; the "exact" specs run first, the first that works is the
    reference. Returns the results and the reference's label."""
    order = sorted(methods, key=lambda m: m[1] != "exact")
    results: list[MethodResult] = []
    reference: torch.Tensor | None = None
    reference_label: str | None = None
    for label, name, options in order:
        if name not in METHODS:
            _log(f"skipping {label!r}: {name!r} is not registered in "
                 "influencekit.estimators.METHODS yet.")
            continue
        cls = METHODS[name]
        kw = {"damping": damping, "progress": progress, **options}
        mislabel = bool(kw.pop("mislabel", True))
        _log(f"method {label}: running")
        try:
            res = evaluate_method(label, lambda t, cls=cls, kw=kw: cls(t, **kw), task, gt,
                                  reference, mislabel=mislabel)
        except Exception as e:  # noqa: BLE001 - a failing method is a result, not a crash
            res = MethodResult(label, error=describe_error(e))
            _log(f"method {label} failed: {res.error}")
        else:
            _log(f"method {label}: {res.time_s:.1f}s, " + ", ".join(
                f"{k} {v:.3f}" for k, v in res.metrics.items()))
        if name == "exact" and res.error is None and reference is None:
            reference, reference_label = res.scores, label
        results.append(res)
    return results, reference_label


# --------------------------------------------------------------------------- reports
def _fmt(value: Any, key: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if key == "time_s":
        return f"{value:.1f}"
    if key == "peak_mb":
        return f"{value:.0f}"
    return f"{value:.3f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    lines = ["| method | " + " | ".join(h for _, h in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for r in rows:
        if r.get("error"):
            short = r["error"].split(" (")[0].split(". ")[0][:90]  # the JSON has it all
            lines.append(f"| {r['method']} | failed: {short} |" + " |" * (len(cols) - 1))
            continue
        lines.append(f"| {r['method']} | " + " | ".join(_fmt(r.get(k), k) for k, _ in cols)
                     + " |")
    return "\n".join(lines)


def write_reports(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    table = markdown_table(report["results"])
    s = report["settings"]
    info = report["model"]
    md = (f"# influencekit evaluate: {s['dataset']} / {s['model']}\n\n"
          f"Command: `{report['command']}`\n\n"
          f"{info['params']} parameters; {report['n_train']} training examples, "
          f"{report['n_queries']} queries; query accuracy {info['test_accuracy']:.3f}; "
          f"damping {report['damping']:g}; reference for 'Spearman vs exact': "
          f"{report['reference'] or 'none'}; total {report['total_seconds']:.0f}s.\n\n"
          f"{table}\n")
    json_path = atomic_write_text(json.dumps(report, indent=2, default=str),
                                  out / "results.json")
    md_path = atomic_write_text(md, out / "results.md")
    return json_path, md_path


# --------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> int:
    """Entry point of ``influencekit evaluate``; bad arguments print an error and return 2."""
    try:
        return _run(args)
    except InputError as e:
        print(f"influencekit evaluate: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = parse_methods(args.methods)
    which = _csv(args.ground_truth, GROUND_TRUTHS, "ground truth")
    progress = False if args.no_progress else None
    d = _load(args)
    builder = _model_builder(args, d)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      optimizer=args.optimizer, weight_decay=args.weight_decay,
                      schedule="cosine", seed=args.seed, init_seed=args.seed)
    damping = args.weight_decay if args.damping is None else args.damping
    cache = Cache(None if args.no_cache else Path(args.cache_dir) / "evaluate")
    gt, model, info = build_ground_truth(args, d, builder, cfg, cache, damping, which,
                                         progress)
    results, reference = run_methods(methods, ClassificationTask(model), gt, damping, progress)
    rows = [row_summary(r) for r in results]
    report = {
        "command": "influencekit evaluate " + " ".join(_argv(args)),
        "settings": {k: v for k, v in vars(args).items() if k != "run"},
        "train_config": asdict(cfg), "damping": damping, "model": info, "reference": reference,
        "n_train": len(d.train[1]), "n_queries": len(d.test[1]),
        "threads": torch.get_num_threads(), "results": rows,
        "total_seconds": time.perf_counter() - t_start,
    }
    out = Path(args.out or f"runs/evaluate/{args.dataset}-{args.model}")
    json_path, md_path = write_reports(report, out)
    print(markdown_table(rows))
    _log(f"saved {json_path} and {md_path} ({report['total_seconds']:.0f}s in all)")
    return 0


def _argv(args: argparse.Namespace) -> list[str]:
    """The arguments as a command line that reproduces the run."""
    out = []
    for k, v in vars(args).items():
        if k in ("run", "command") or v is None or v is False:
            continue
        flag = "--" + k.replace("_", "-")
        out.append(flag if v is True else f"{flag}={v}")
    return out
