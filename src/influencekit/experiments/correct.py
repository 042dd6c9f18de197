"""``influencekit correct``: fix mis-predicted test examples with a few fine-tuning steps.

1. Trains a model on a built-in dataset with the deterministic trainer (cosine schedule;
   checkpoints kept under --cache-dir, which TracIn reads and a rerun resumes).
2. For every mis-predicted example among the first --n-queries test examples, and for each
   selection method and each budget m in --examples: fine-tunes a copy of the model for up to
   --steps full-batch SGD steps on the m selected training examples (ik.correct_all; each
   target from the same start; records stored under --cache-dir, so a rerun resumes).
3. Writes results.json, results.md (fix rate with a 95% Wilson interval, fixed within 1 step
   and within K/4, median steps to fix, mean collateral accuracy change on the rest of the
   queries and flipped correct predictions, time), fix_rate.png (fix rate vs steps and vs m)
   and, for image data, gallery.png: a few fixed targets beside the training examples that
   fixed them (the first influence method at the smallest m; also under "gallery" in
   results.json).

Models: the registry's; bert (text data) is MiniLM with the last --train-last encoder layers and
the head trained: the frozen layers' output is computed once per example and cached under
--cache-dir, and training, scoring and fine-tuning run on the trainable top (the same function).
Sized defaults (--epochs, --train-lr, --lr) depend on the model; see each flag.

Methods: names from influencekit.estimators.METHODS with options ("exact:curvature=ggn"),
fitted once on the whole training set (tracin reads the training checkpoints), and the
baselines random (m random training examples), class-random (m random examples of the
target's true class) and target (the target itself: an upper bound that uses its label; run at
the first budget only, since m does not apply).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .. import data as ik_data
from .. import models as ik_models
from ..batching import slice_batch
from ..correction import SELECTIONS, STRATEGIES, correct_all
from ..errors import InputError
from ..estimators import METHODS, TracIn
from ..store import atomic_write, atomic_write_text, hash_value
from ..task import ClassificationTask
from ..training import TrainConfig, Trainer
from . import arguments as arg
from .dynamics import accuracy, load_data
from .evaluate import parse_methods
from .text import BERT_LR, add_bert_options, check_inputs

BASELINES = tuple(s for s in SELECTIONS if s != "influence")
DEFAULT_METHODS = "exact:curvature=ggn,arnoldi,ekfac,graddot,tracin,random,class-random,target"
DATASETS = list(ik_data.LOADERS)
MODELS = list(ik_models.BUILDERS)
# defaults that depend on the model's inputs (a flag given on the command line wins)
SIZES: dict[str, dict[str, Any]] = {
    "vector": {"epochs": 30, "train_lr": 0.1, "lr": 0.05},
    "image": {"epochs": 30, "train_lr": 0.1, "lr": 0.005},  # lr 0.05: −74% accuracy (resnet)
    "text": {"epochs": 3, "train_lr": BERT_LR, "lr": 0.002},  # lr 0.05: one step collapses it
}


def _methods(spec: str) -> list[tuple[str, str, dict[str, Any]]]:
    """``"graddot,random"`` -> ``[(label, name, options)]`` (baselines have name = label)."""
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise InputError("--methods is empty; e.g. --methods graddot,random.")
    out = []
    for item in items:
        if item in BASELINES:
            out.append((item, item, {}))
        else:
            try:
                out += parse_methods(item)
            except InputError as e:
                raise InputError(f"{e} Baselines: {', '.join(BASELINES)}.") from e
    return out


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("correct", help="fix mis-predictions by fine-tuning on influential "
                                       "examples; compare selection methods",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--dataset", default="digits", choices=DATASETS, help="built-in dataset")
    a("--model", default="mlp", choices=MODELS,
      help="built-in model (bert: text data; MiniLM, frozen layers cached, top trained)")
    a("--hidden", default="32", type=arg.counts(), help="MLP hidden widths")
    add_bert_options(p)
    a("--methods", default=DEFAULT_METHODS,
      type=arg.checked(str, "method specs", lambda s: _methods(s) and s),
      help=f"selection methods: {', '.join(METHODS)} (with :key=value options) and "
           f"{', '.join(BASELINES)}")
    a("--examples", default="16", type=arg.counts(), help="budgets m, comma-separated")
    a("--steps", type=arg.count(), default=20, help="step budget K")
    a("--lr", type=arg.number(0.0, strict=True), default=None,
      help="fine-tuning lr (SGD)" + _sized("lr"))
    a("--strategy", default="proponents", choices=STRATEGIES,
      help="influence selections: descend on proponents, ascend on opponents, or both")
    a("--n-train", type=arg.count(), default=None, help="training examples (None: all)")
    a("--n-queries", type=arg.count(), default=None,
      help="test examples searched for mis-predictions (None: all)")
    a("--epochs", type=arg.count(), default=None, help="training epochs" + _sized("epochs"))
    a("--batch-size", type=arg.count(), default=64, help="training batch size")
    a("--train-lr", type=arg.number(0.0, strict=True), default=None,
      help="training lr (cosine)" + _sized("train_lr"))
    a("--weight-decay", type=arg.number(0.0), default=1e-3,
      help="training L2; also the estimators' damping")
    a("--seed", type=arg.count(0), default=0, help="split, init, order and selection seed")
    arg.add_run_options(p, "correct",
                        "training checkpoints and per-target records (a rerun resumes)")
    p.set_defaults(run=run)


def _sized(key: str) -> str:
    return " (default by model inputs: " + ", ".join(f"{k} {v[key]:g}" for k, v in
                                                     SIZES.items()) + ")"


def _prepare(args: argparse.Namespace) -> bool:
    """Refuse mismatched data and model, fill the sized defaults; True for text."""
    text = check_inputs(args)
    for key, value in SIZES[ik_models.INPUTS[args.model]].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return text


def _estimator(name: str, options: dict[str, Any], task: ClassificationTask, ckpt: Path,
               damping: float, progress: bool | None) -> Any:
    kw = {"damping": damping, "progress": progress, **options}
    if name == "tracin" and "checkpoints" not in options:
        return TracIn.from_trainer(task, ckpt, **kw)
    return METHODS[name](task, **kw)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``influencekit correct``."""
    t_start = time.perf_counter()
    text = _prepare(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = _methods(args.methods)
    progress = False if args.no_progress else None
    if args.n_queries is None:
        args.n_queries = len(ik_data.load(args.dataset, seed=args.seed).test[1])
    d, full_test, builder = load_data(args, progress)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.train_lr,
                      weight_decay=args.weight_decay, schedule="cosine", seed=args.seed,
                      init_seed=args.seed)
    key = hash_value(args.dataset, args.model, args.hidden, args.n_train, asdict(cfg),
                     *([args.train_last, args.max_length] if text else []))[:16]
    cache = Path(args.cache_dir) / "correct"
    ckpt = cache / f"train-{key}"
    t0 = time.perf_counter()
    model = Trainer(builder, d.train, cfg, checkpoint_dir=ckpt,
                    checkpoint_every=max(1, args.epochs // 6), progress=progress).run().model
    task = ClassificationTask(model)
    right = task.predict(d.test[0]) == d.test[1]
    acc = float(right.float().mean())
    wrong = (~right).nonzero().squeeze(1).tolist()  # the targets
    full_acc = accuracy(model, full_test)
    arg.log(f"model: {task.num_params} parameters, test accuracy {full_acc:.4f} on "
            f"{len(full_test[1])} ({acc:.4f} on the {len(d.test[1])} queries; "
            f"{time.perf_counter() - t0:.0f}s)")
    rows: list[dict[str, Any]] = []
    shown: tuple[str, Any] | None = None  # the gallery: the first influence method's smallest m
    for label, name, options in methods:
        scores = None
        fit_s = 0.0
        for m in args.examples[:1] if name == "target" else args.examples:  # m is moot there
            kw: dict[str, Any] = dict(examples=m, steps=args.steps, lr=args.lr, seed=args.seed,
                                      strategy=args.strategy if name not in BASELINES
                                      else "proponents",
                                      store=cache / f"records-{key}", progress=progress,
                                      label=label)
            if name in BASELINES:
                res = correct_all(model, d.test, d.train, selection=name, **kw)
            elif scores is not None:
                res = correct_all(model, d.test, d.train, scores=scores, **kw)
            else:
                t1 = time.perf_counter()
                est = _estimator(name, options, task, ckpt, args.weight_decay, progress)
                est.fit(d.train)
                scores = torch.zeros(len(d.test[1]), len(d.train[1]), dtype=torch.float64)
                if wrong:  # only the targets' rows are read
                    scores[wrong] = est.scores(slice_batch(d.test, torch.tensor(wrong)),
                                               d.train).double().cpu()
                fit_s = time.perf_counter() - t1
                res = correct_all(model, d.test, d.train, scores=scores, **kw)
            if shown is None and name not in BASELINES:
                shown = (label, res)
            row = res.summary()
            row["fit_seconds"] = fit_s
            rows.append(row)
            arg.log(f"{label} m={m}: fixed {row['fixed']}/{row['targets']}, median steps "
                 f"{row['median_steps_to_fix']}, Δacc {_pct(row['accuracy_change'])}, "
                 f"flips {_num(row['flips'])}")
    report = {
        "command": arg.command_line("correct", args),
        "settings": {k: v for k, v in vars(args).items() if k != "run"},
        "train_config": asdict(cfg), "params": task.num_params, "test_accuracy": full_acc,
        "n_test": len(full_test[1]), "query_accuracy": acc,
        "n_train": len(d.train[1]), "n_queries": len(d.test[1]),
        "threads": torch.get_num_threads(), "results": rows,
        "gallery": [] if shown is None else gallery(shown[0], shown[1], d),
        "total_seconds": time.perf_counter() - t_start,
    }
    out = Path(args.out or f"runs/correct/{args.dataset}-{args.model}")
    atomic_write_text(json.dumps(report, indent=2, default=str), out / "results.json")
    n_wrong = rows[0]["targets"] if rows else 0
    md = (f"# influencekit correct: {args.dataset} / {args.model}\n\n"
          f"{task.num_params} parameters, test accuracy {full_acc:.4f} on "
          f"{len(full_test[1])}; {n_wrong} mis-predicted of {len(d.test[1])} queries, "
          f"{len(d.train[1])} training examples; K = {args.steps} steps, lr {args.lr:g}, "
          f"strategy {args.strategy}.\n\n{markdown_table(rows, args.steps)}\n")
    atomic_write_text(md, out / "results.md")
    atomic_write(out / "fix_rate.png", plot(rows))
    if report["gallery"] and ik_data.INPUTS[args.dataset] != "text":
        atomic_write(out / "gallery.png", gallery_png(report["gallery"], d))
    print(markdown_table(rows, args.steps))
    arg.log(f"saved {out}/results.json, results.md, fix_rate.png "
         f"({report['total_seconds']:.0f}s in all)")
    return 0


def gallery(label: str, res: Any, d: ik_data.DataSplits, n: int = 4,
            shown: int = 8) -> list[dict[str, Any]]:
    """Up to ``n`` fixed targets of ``res`` (a CorrectionSet) with the training examples (first
    ``shown``) whose fine-tuning fixed them."""
    out = []
    for r in [r for r in res.results if r.fixed][:n]:
        out.append({"method": label, "target": r.target_index, "label": r.target_label,
                    "predicted_before": r.predictions[0], "steps_to_fix": r.steps_to_fix,
                    "examples": [{"index": int(i), "label": int(d.train[1][i]),
                                  "score": None if sc is None else float(sc)}
                                 for i, sc in zip(r.examples[:shown], r.scores[:shown],
                                                  strict=True)]})
    return out


def gallery_png(rows: list[dict[str, Any]], d: ik_data.DataSplits) -> bytes:
    """Each fixed target (first column) beside the training examples that fixed it."""
    from ..report.figures import grey_image, png, pyplot

    plt = pyplot()
    cols = 1 + max(len(r["examples"]) for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.1 * cols, 1.35 * len(rows)),
                             squeeze=False)
    for ax_row, r in zip(axes, rows, strict=True):
        images = [(d.test[0][r["target"]], f"target {r['label']}\n(was {r['predicted_before']}"
                   f", {r['steps_to_fix']} st.)")]
        images += [(d.train[0][e["index"]], f"#{e['index']} ({e['label']})")
                   for e in r["examples"]]
        for ax in ax_row:
            ax.axis("off")
        for ax, (img, title) in zip(ax_row, images, strict=False):
            ax.imshow(grey_image(img), cmap="gray_r")
            ax.set_title(title, fontsize=7)
    fig.suptitle(f"fixed targets and the training examples that fixed them ({rows[0]['method']})",
                 fontsize=9)
    fig.tight_layout()
    return png(fig)


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:+.2f}%"


def _num(v: float | None, fmt: str = ".2f") -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def markdown_table(rows: list[dict[str, Any]], steps: int) -> str:
    """One row per (method, m): fix rate [95% CI], fixed within 1 and K/4 steps, median steps,
    collateral accuracy change and flips (means over targets), time."""
    q = max(1, steps // 4)
    lines = [f"| method | m | fixed (≤{steps}) [95% CI] | ≤1 step | ≤{q} steps | median steps "
             "| Δ accuracy | flips | s/target | fit s |", "|---|---:|---|---:|---:|---:|---:|"
             "---:|---:|---:|"]
    for r in rows:
        n = r["targets"]
        lo, hi = r["fix_rate_ci"]
        w = r["fixed_within"]
        lines.append(
            f"| {r['method']} | {r['examples']} | {r['fixed']}/{n} = {_num(r['fix_rate'])} "
            f"[{_num(lo)}, {_num(hi)}] | {w[min(1, steps)]}/{n} | {w[q]}/{n} | "
            f"{_num(r['median_steps_to_fix'], 'g')} | {_pct(r['accuracy_change'])} | "
            f"{_num(r['flips'])} | {_num(r['seconds_per_target'], '.3f')} | "
            f"{_num(r['fit_seconds'], '.1f')} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]]) -> bytes:
    """Fix rate vs steps, one line per method, one panel per budget m; with several budgets, a
    last panel of the fix rate within K (95% Wilson interval) vs m (PNG bytes)."""
    from ..report.figures import png, pyplot

    plt = pyplot()
    ms = sorted({r["examples"] for r in rows})
    panels = len(ms) + (len(ms) > 1)
    color = {k: f"C{i % 10}" for i, k in enumerate(dict.fromkeys(r["method"] for r in rows))}
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 3.8), squeeze=False)
    for ax, m in zip(axes[0], ms):
        for r in (r for r in rows if r["examples"] == m):
            n = max(r["targets"], 1)
            ax.plot(range(len(r["fixed_within"])), [f / n for f in r["fixed_within"]],
                    marker=".", label=r["method"], color=color[r["method"]])
        ax.set(xlabel="fine-tuning steps", ylabel="fraction of targets fixed", ylim=(0, 1.02),
               title=f"m = {m} examples")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if len(ms) > 1:
        ax = axes[0][-1]
        for method in dict.fromkeys(r["method"] for r in rows):
            mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["examples"])
            if len(mine) < 2:  # e.g. the target itself: one budget
                continue
            x = [r["examples"] for r in mine]
            y = [r["fix_rate"] for r in mine]
            err = [[v - r["fix_rate_ci"][0] for v, r in zip(y, mine)],
                   [r["fix_rate_ci"][1] - v for v, r in zip(y, mine)]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=method, color=color[method])
        ax.set(xscale="log", xlabel="examples m", ylabel=f"fixed within K = {rows[0]['steps']}",
               ylim=(0, 1.02), title="fix rate vs m (95% CI)")
        ax.set_xticks(ms, [str(m) for m in ms])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return png(fig)
