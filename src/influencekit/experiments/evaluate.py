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
option "mislabel=False" skips that method's self-influence run. "tracin" sums over checkpoints of
θ*'s own training run, kept every epoch ("tracin:every=5": every 5 epochs; "tracin:every=0": θ*
alone with η = 1, which is GradDot); the run is repeated with the deterministic trainer and
checked to end bit for bit at θ*. The first "exact" spec listed
is the reference of the "Spearman vs exact" column. Models and datasets come from the registries
influencekit.models.BUILDERS and influencekit.data.LOADERS. Unknown names and bad values are
refused before anything is trained.
Retraining results are cached under --cache-dir; a rerun (or a killed run) resumes.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import data as ik_data
from .. import models as ik_models
from ..errors import InfluenceError, InputError
from ..estimators import METHODS
from ..estimators.tracin import Checkpoints, TracIn
from ..groundtruth import (
    Cache,
    Retrainer,
    flip_labels,
    lds_retrain,
    leave_one_out,
    pbrf,
    with_epochs,
)
from ..store import atomic_write_text
from ..task import ClassificationTask, Task
from ..training import TrainConfig, train
from . import arguments as arg
from .benchmark import GroundTruth, MethodResult, describe_error, evaluate_method
from .benchmark import summary as row_summary

# TRAK's kernel is not the loss curvature: it keeps its own (scale-free) damping, not wd
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {"lissa": {"depth": 200}, "tracin": {"every": 1},
                                              "trak": {"damping": "auto"}}
# options read by evaluate itself, not passed to the estimator
OWN_OPTIONS = {"mislabel": None, "every": "tracin"}
# the registries' entries that take tensors (text needs a tokenising experiment of its own)
DATASETS = [name for name in ik_data.LOADERS if ik_data.INPUTS[name] != "text"]
MODELS = [name for name in ik_models.BUILDERS if ik_models.INPUTS[name] != "text"]
COLUMNS = [("spearman_vs_exact", "Spearman vs exact"), ("loo_warm", "LOO warm"),
           ("loo_scratch", "LOO scratch"), ("lds", "LDS"), ("pbrf", "PBRF"),
           ("mislabel_auc", "mislabel AUC"), ("time_s", "time (s)"), ("peak_mb", "peak MB")]


# --------------------------------------------------------------------------- ground truths
@dataclass
class Setup:
    """What the ground truths are computed from: the data, θ* and the run's settings."""

    args: argparse.Namespace
    data: ik_data.DataSplits
    builder: Callable[[], nn.Module]
    config: TrainConfig
    cache: Cache
    retrainer: Retrainer
    model: nn.Module  # θ*
    damping: float
    removed: list[int]  # the examples left out for LOO (the first n_pbrf for the PBRF)
    progress: bool | None


def _loo_warm(s: Setup, gt: GroundTruth) -> None:
    warm = with_epochs(s.config, s.args.warm_epochs)
    gt.loo["warm"] = leave_one_out(s.retrainer, s.removed, s.data.test, warm_start=s.model,
                                   warm_config=warm)


def _loo_scratch(s: Setup, gt: GroundTruth) -> None:
    gt.loo["scratch"] = leave_one_out(s.retrainer, s.removed, s.data.test)


def _lds(s: Setup, gt: GroundTruth) -> None:
    gt.lds = lds_retrain(s.retrainer, s.data.test, n_subsets=s.args.lds_subsets,
                         alpha=s.args.lds_alpha, seed=s.args.seed + 2)


def _pbrf(s: Setup, gt: GroundTruth) -> None:
    removed = s.removed[:s.args.n_pbrf]
    key = s.retrainer.key("pbrf", asdict(s.config), [s.damping, removed], s.data.test)
    gt.pbrf = s.cache.get_or_compute(
        "pbrf", key, lambda: pbrf(ClassificationTask(s.model), s.data.train, removed,
                                  s.data.test, damping=s.damping, progress=s.progress))


def _mislabel(s: Setup, gt: GroundTruth) -> None:
    noisy_y, flipped = flip_labels(s.data.train[1], s.args.mislabel_fraction,
                                   s.data.num_classes, seed=s.args.seed + 3)
    noisy_train = (s.data.train[0], noisy_y)
    noisy = Retrainer(s.builder, noisy_train, s.config, cache=s.cache,
                      progress=s.progress).fit()
    gt.noisy_task, gt.noisy_train, gt.flipped = ClassificationTask(noisy), noisy_train, flipped


# name -> computes that ground truth into the GroundTruth (in this order)
GROUND_TRUTHS: dict[str, Callable[[Setup, GroundTruth], None]] = {
    "loo-warm": _loo_warm,
    "loo-scratch": _loo_scratch,
    "lds": _lds,
    "pbrf": _pbrf,
    "mislabel": _mislabel,
}


# --------------------------------------------------------------------------- CLI
class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the description's layout and show every default."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="score influence estimators against LOO, LDS, PBRF and mislabels",
        description=__doc__, formatter_class=_HelpFormatter)
    a = p.add_argument
    a("--dataset", default="digits", choices=DATASETS, help="built-in dataset")
    a("--model", default="mlp", choices=MODELS,
      help="built-in model (logreg = MLP without hidden layers)")
    a("--hidden", default="32", type=arg.counts(), help="MLP hidden widths, comma-separated")
    a("--methods", default="exact,cg,lissa,arnoldi,graddot,gradcos",
      type=arg.checked(str, "method specs", parse_methods),
      help="comma-separated method specs, e.g. exact,cg:curvature=ggn (lissa defaults to "
           f"depth=200); known methods: {', '.join(METHODS)}")
    a("--n-train", type=arg.count(), default=None,
      help="training examples; None means the whole split")
    a("--n-queries", type=arg.count(), default=100, help="test examples used as queries")
    g = p.add_argument_group("training (deterministic; SGD with momentum 0.9, cosine schedule)")
    g.add_argument("--epochs", type=arg.count(), default=30, help="epochs")
    g.add_argument("--batch-size", type=arg.count(), default=64, help="batch size")
    g.add_argument("--lr", type=arg.number(0.0, strict=True), default=0.1,
                   help="peak learning rate")
    g.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"], help="optimizer")
    g.add_argument("--weight-decay", type=arg.number(0.0), default=1e-3,
                   help="L2 coefficient; also the estimators' damping unless --damping")
    g.add_argument("--seed", type=arg.count(0), default=0,
                   help="data split, order and init seed")
    g = p.add_argument_group("ground truth")
    g.add_argument("--ground-truth", default=",".join(GROUND_TRUTHS),
                   type=arg.checked(str, "ground-truth names", _ground_truths),
                   help="which ground truths to compute (comma-separated)")
    g.add_argument("--n-removed", type=arg.count(), default=40,
                   help="random training examples left out for LOO")
    g.add_argument("--warm-epochs", type=arg.count(), default=10,
                   help="epochs of warm-started LOO retraining from θ*")
    g.add_argument("--lds-subsets", type=arg.count(2), default=50,
                   help="LDS subsets retrained (M)")
    g.add_argument("--lds-alpha", type=arg.fraction, default=0.5, help="LDS subset fraction α")
    g.add_argument("--n-pbrf", type=arg.count(), default=20,
                   help="examples (the first of the LOO set) for the PBRF")
    g.add_argument("--mislabel-fraction", type=arg.fraction, default=0.1,
                   help="training labels flipped for mislabel detection")
    g = p.add_argument_group("run")
    g.add_argument("--damping", type=arg.number(0.0), default=None,
                   help="λ for the estimators and the PBRF; None means the weight decay")
    g.add_argument("--out", type=arg.folder, default=None,
                   help="output folder for results.json and results.md"
                        "; None means runs/evaluate/DATASET-MODEL")
    g.add_argument("--cache-dir", type=arg.folder,
                   default=str(Path.home() / ".cache" / "influencekit"),
                   help="where retraining results are cached")
    g.add_argument("--no-cache", action="store_true", help="do not read or write the cache")
    g.add_argument("--threads", type=arg.count(), default=None,
                   help="torch CPU threads (1 is often fastest for small models on a busy "
                        "machine)")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(run=run)


def parse_methods(spec: str) -> list[tuple[str, str, dict[str, Any]]]:
    """``"exact,cg:curvature=ggn"`` -> ``[(label, name, options), ...]``.

    Unknown method names and options that the method's constructor does not take raise an
    :class:`InputError` that lists the known ones.
    """
    out = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        name, *opts = item.split(":")
        if name not in METHODS:
            raise InputError(f"unknown method {name!r} in --methods; known: "
                             f"{', '.join(sorted(METHODS))}.")
        options: dict[str, Any] = dict(DEFAULT_OPTIONS.get(name, {}))
        for opt in opts:
            key, sep, value = opt.partition("=")
            if not sep:
                raise InputError(f"method option {opt!r} in {item!r} is not key=value.")
            try:
                options[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                options[key] = value
        _check_options(item, name, options)
        out.append((item, name, options))
    if not out:
        raise InputError("--methods is empty; name at least one method.")
    return out


def _check_options(item: str, name: str, options: dict[str, Any]) -> None:
    """Build the estimator on a tiny stand-in model, so that its own checks refuse unknown
    options and bad values now, before anything is trained."""
    for key, only in OWN_OPTIONS.items():
        if key in options and only not in (None, name):
            raise InputError(f"method spec {item!r}: option {key!r} is only for {only}.")
    every = options.get("every", 0)
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise InputError(f"method spec {item!r}: every must be a whole number of epochs ≥ 0 "
                         f"(0: θ* alone), got {every!r}.")
    kw = {k: v for k, v in options.items() if k not in OWN_OPTIONS}
    try:
        METHODS[name](ClassificationTask(nn.Linear(2, 2)), **kw)
    except (InfluenceError, TypeError) as e:
        raise InputError(f"method spec {item!r}: {e}") from e


def _ground_truths(value: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in GROUND_TRUTHS]
    if bad:
        raise InputError(f"unknown ground truth {bad} in --ground-truth; choose from "
                         f"{', '.join(GROUND_TRUTHS)}.")
    return items


# --------------------------------------------------------------------------- setup
def _image_layout(shape: tuple[int, ...], args: argparse.Namespace) -> tuple[int, int]:
    """``(channels, side)`` of square images stored as ``[C, S, S]`` or flattened ``[S·S]``."""
    if len(shape) == 3 and shape[1] == shape[2]:
        return shape[0], shape[1]
    side = math.isqrt(math.prod(shape))
    if len(shape) == 1 and side * side == shape[0]:
        return 1, side
    raise InputError(f"--model {args.model} needs square images; --dataset {args.dataset} has "
                     f"inputs of shape {shape}. Use --model mlp.")


def _model_builder(args: argparse.Namespace, d: ik_data.DataSplits) -> Callable[[], nn.Module]:
    """A builder of the registry's ``--model`` sized for ``d``'s inputs."""
    kw: dict[str, Any] = {"num_classes": d.num_classes}
    params = inspect.signature(ik_models.BUILDERS[args.model]).parameters
    if ik_models.INPUTS[args.model] == "image":
        kw["in_channels"], side = _image_layout(d.input_shape, args)
        if "image_size" in params:
            kw["image_size"] = side
    else:
        kw["in_features"] = math.prod(d.input_shape)
        if "hidden" in params:
            kw["hidden"] = args.hidden
    return lambda: ik_models.build(args.model, seed=args.seed, **kw)


def load_dataset(args: argparse.Namespace) -> ik_data.DataSplits:
    """The built-in ``--dataset`` (split with ``--seed``, ``--n-train`` examples), refusing more
    ``--n-queries`` than it has test examples."""
    kw: dict[str, Any] = {"seed": args.seed}
    if args.n_train is not None:
        kw["n_train"] = args.n_train
    try:
        d = ik_data.load(args.dataset, **kw)
    except InputError as e:
        raise InputError(f"--dataset {args.dataset}: {e}") from e
    n_test = len(d.test[1])
    if args.n_queries > n_test:
        raise InputError(f"--n-queries {args.n_queries} exceeds the {n_test} test examples.")
    return d


def _load(args: argparse.Namespace) -> ik_data.DataSplits:
    d = load_dataset(args)
    if ik_models.INPUTS[args.model] == "image" and len(d.input_shape) == 1:
        channels, side = _image_layout(d.input_shape, args)
        d.train = (d.train[0].reshape(-1, channels, side, side), d.train[1])
        d.test = (d.test[0].reshape(-1, channels, side, side), d.test[1])
    d.test = (d.test[0][:args.n_queries], d.test[1][:args.n_queries])
    return d


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_ground_truth(args: argparse.Namespace, d: ik_data.DataSplits,
                       builder: Callable[[], nn.Module], cfg: TrainConfig, cache: Cache,
                       damping: float, which: list[str], progress: bool | None
                       ) -> tuple[GroundTruth, nn.Module, dict]:
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
    n = len(d.train[1])
    gen = torch.Generator().manual_seed(args.seed + 1)
    removed = torch.randperm(n, generator=gen)[:min(args.n_removed, n)].tolist()
    setup = Setup(args, d, builder, cfg, cache, rt, model, damping, removed, progress)
    gt = GroundTruth(train=d.train, queries=d.test)
    timings: dict[str, float] = {}
    for kind in which:
        t0 = time.perf_counter()
        GROUND_TRUTHS[kind](setup, gt)
        timings[kind] = time.perf_counter() - t0
        _log(f"ground truth {kind}: {timings[kind]:.1f}s")
    info["ground_truth_seconds"] = timings
    info["removed"] = removed
    return gt, model, info


def trainer_checkpoints(builder: Callable[[], nn.Module], cfg: TrainConfig
                        ) -> Callable[[int, nn.Module, Any], Checkpoints]:
    """``(every, model, train) -> Checkpoints``: the run that trained ``model`` on ``train``
    (θ*, or the model with flipped labels) repeated with a TracIn collector, checked to end
    bit for bit at ``model``; kept for reuse."""
    kept: dict[tuple[int, int], Checkpoints] = {}

    def get(every: int, model: nn.Module, train_data: Any) -> Checkpoints:
        key = (every, id(model))
        if key not in kept:
            ckpts = TracIn.collector(every, "epoch")
            end = train(builder, train_data, cfg, callback=ckpts, progress=False).model
            ours, theirs = model.state_dict(), end.state_dict()
            if any(not torch.equal(ours[k], theirs[k].to(ours[k].device)) for k in ours):
                raise RuntimeError("the repeated training run did not end at the evaluated "
                                   "model, so its checkpoints are not that run's "
                                   "(non-deterministic kernels?); use tracin:every=0.")
            kept[key] = ckpts
        return kept[key]

    return get


def run_methods(methods: list[tuple[str, str, dict[str, Any]]], task: ClassificationTask,
                gt: GroundTruth, damping: float, progress: bool | None,
                checkpoints: Callable[[int, nn.Module, Any], Checkpoints] | None = None
                ) -> tuple[list[MethodResult], str | None]:
    """Evaluate each method; the "exact" specs run first, the first that works is the
    reference. ``checkpoints(every, model, train)`` gives TracIn the checkpoints of the run
    that trained ``model`` (θ*, or the model with flipped labels). Returns
    the results and the reference's label."""
    order = sorted(methods, key=lambda m: m[1] != "exact")
    results: list[MethodResult] = []
    reference: torch.Tensor | None = None
    reference_label: str | None = None
    for label, name, options in order:
        cls = METHODS[name]
        kw = {"damping": damping, "progress": progress, **options}
        mislabel = bool(kw.pop("mislabel", True))
        every = kw.pop("every", 0)
        if every and checkpoints is None:
            raise InputError(f"method {label}: no training run to take checkpoints from.")

        def make(t: Task, cls: Any = cls, kw: dict = kw, every: int = every) -> Any:
            if not every:
                return cls(t, **kw)
            data = gt.noisy_train if t is gt.noisy_task else gt.train
            return cls(t, checkpoints=checkpoints(every, t.model, data), **kw)

        _log(f"method {label}: running")
        try:
            res = evaluate_method(label, make, task, gt,
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
    """Entry point of ``influencekit evaluate`` (arguments were checked while parsing; an
    :class:`InputError` found later is reported by :func:`influencekit.cli.main`)."""
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = parse_methods(args.methods)
    which = _ground_truths(args.ground_truth)
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
    results, reference = run_methods(methods, ClassificationTask(model), gt, damping, progress,
                                     trainer_checkpoints(builder, cfg))
    rows = [row_summary(r) for r in results]
    report = {
        "command": arg.command_line("evaluate", args),
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
