"""``influencekit diagnose``: which of the paper's five assumptions hold on a built-in model.

1. Trains the model on the dataset (the same cached start point as ``influencekit dynamics``
   with the same flags: ``--start-epochs`` with SGD, cosine, ``--weight-decay``).
2. Runs ``ik.diagnose`` at it: Lanczos on the Hessian and GGN (convexity, numeric stability),
   then short continued runs (``--epochs`` at ``--lr``, SGD with momentum, the same weight
   decay) with examples removed, up-weighted and removed in groups (training trajectory,
   parameter divergence, first-order expansion).
3. Writes diagnosis.json (every number, a ``schema_version``), diagnosis.md (the ``trust``
   summary first, then one section per assumption with its verdict and recommendation) and the
   figures to ``--out``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from ..diagnostics import SECTIONS, diagnose
from ..diagnostics.diagnose import check_sections
from ..errors import InputError
from ..task import ClassificationTask
from . import arguments as arg
from .dynamics import DATASETS, MODELS, load_data, sizes, start_point
from .text import BERT_LR, add_bert_options, check_inputs

# continued-run and probe sizes by model kind (full / --quick); a flag given wins
SIZES: dict[str, dict[str, Any]] = {
    "vector": {"rank": 30, "iterations": 60, "curvature_batch": 1024, "pool": 512,
               "n_removed": 8, "epochs": 2},
    "image": {"rank": 20, "iterations": 40, "curvature_batch": 256, "pool": 512,
              "n_removed": 6, "epochs": 1},
    "text": {"rank": 20, "iterations": 30, "curvature_batch": 128, "pool": 512,
             "n_removed": 6, "epochs": 1},
}
QUICK_SIZES: dict[str, dict[str, Any]] = {
    "vector": {"rank": 20, "iterations": 30, "curvature_batch": 512, "pool": 256,
               "n_removed": 6, "epochs": 1},
    "image": {"rank": 10, "iterations": 20, "curvature_batch": 128, "pool": 256,
              "n_removed": 4, "epochs": 1},
    "text": {"rank": 10, "iterations": 20, "curvature_batch": 128, "pool": 256,
             "n_removed": 4, "epochs": 1},
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diagnose", help="which of the five assumptions behind influence "
                                        "functions hold on a built-in model",
                       description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    S = argparse.SUPPRESS  # sized flags: absent unless given

    def sized(key: str) -> str:
        return (" (default by model kind: " + ", ".join(
            f"{k} {SIZES[k][key]}" for k in SIZES) + "; with --quick: " + ", ".join(
            f"{k} {QUICK_SIZES[k][key]}" for k in QUICK_SIZES) + ")")

    a("--dataset", default="digits", choices=DATASETS, help="built-in dataset")
    a("--model", default="mlp", choices=MODELS, help="built-in model")
    a("--hidden", default="32", type=arg.counts(), help="MLP hidden widths")
    add_bert_options(p)
    a("--n-train", type=arg.count(), default=S, help="training examples (as `dynamics`)")
    a("--n-queries", type=arg.count(), default=S, help="test examples used as queries")
    a("--start-epochs", type=arg.count(0), default=S, help="epochs of the diagnosed model")
    a("--start-lr", type=arg.number(0.0, strict=True), default=None,
      help="its peak lr (cosine; default 0.1, bert 0.05)")
    a("--batch-size", type=arg.count(), default=S, help="batch size")
    a("--weight-decay", type=arg.number(0.0), default=1e-3,
      help="L2 coefficient of training (and the scores' damping)")
    a("--epochs", type=arg.count(), default=S,
      help="epochs of the continued runs that sections 3–5 perturb" + sized("epochs"))
    a("--lr", type=arg.number(0.0, strict=True), default=0.02,
      help="lr of the continued runs (SGD, momentum 0.9, constant)")
    a("--rank", type=arg.count(), default=S, help="eigenpairs kept" + sized("rank"))
    a("--iterations", type=arg.count(), default=S,
      help="Lanczos steps per curvature run (4 runs)" + sized("iterations"))
    a("--curvature-batch", type=arg.count(), default=S,
      help="examples the curvature averages over" + sized("curvature_batch"))
    a("--pool", type=arg.count(), default=S, help="training examples scored" + sized("pool"))
    a("--n-removed", type=arg.count(), default=S,
      help="single-removal twin runs" + sized("n_removed"))
    a("--sections", default=",".join(SECTIONS),
      type=arg.checked(lambda s: [x.strip() for x in s.split(",") if x.strip()],
                       "comma-separated section names", check_sections),
      help=f"which assumptions to diagnose (comma-separated: {', '.join(SECTIONS)})")
    a("--seed", type=arg.count(0), default=0, help="split, init, subsets and removals")
    a("--quick", action="store_true", help="small sizes (see each flag's default)")
    arg.add_run_options(p, "diagnose", "where the model and the continued runs are stored")
    p.set_defaults(run=run)


def _prepare(args: argparse.Namespace) -> None:
    """Fill the sized defaults (the start point's from `dynamics`, the probe's from here)."""
    kind = "text" if check_inputs(args) else (
        "vector" if args.model == "mlp" else "image")
    own = (QUICK_SIZES if args.quick else SIZES)[kind]
    start = sizes(args)
    for key in ("n_train", "n_queries", "start_epochs", "batch_size"):
        if not hasattr(args, key):
            setattr(args, key, start[key])
    for key, value in own.items():
        if not hasattr(args, key):
            setattr(args, key, value)
    if args.start_lr is None:
        args.start_lr = BERT_LR if kind == "text" else 0.1


def run(args: argparse.Namespace) -> int:
    """Entry point of ``influencekit diagnose``."""
    t0 = time.perf_counter()
    _prepare(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = False if args.no_progress else None
    d, full_test, builder = load_data(args, progress)
    if args.n_removed > len(d.train[1]):
        raise InputError(f"--n-removed {args.n_removed} exceeds the training set.")
    model, start_cfg, cache, acc = start_point(args, d, full_test, builder, progress)
    train_s = time.perf_counter() - t0
    arg.log(f"model: {args.start_epochs} epochs, test accuracy {acc['test']:.4f} on "
            f"{acc['n_test']}, train {acc['train']:.4f} ({train_s:.0f}s)")
    config = replace(start_cfg, epochs=args.epochs, lr=args.lr, schedule="constant")
    t1 = time.perf_counter()
    report = diagnose(ClassificationTask(model), d.train, d.test, config=config,
                      rank=args.rank, iterations=args.iterations,
                      curvature_batch=args.curvature_batch, pool=args.pool,
                      n_removed=args.n_removed, sections=args.sections, seed=args.seed,
                      store=cache / "diagnose", progress=progress)
    out = Path(args.out or f"runs/diagnose/{args.dataset}-{args.model}")
    report.setup.update(command=arg.command_line("diagnose", args), accuracy=acc,
                        dataset=args.dataset, model=args.model, start_config=asdict(start_cfg),
                        threads=torch.get_num_threads(),
                        seconds_model=train_s, seconds_diagnose=time.perf_counter() - t1)
    report.save(out)
    print(report.trust)
    arg.log(f"saved {out}/diagnosis.json, diagnosis.md and figures "
            f"({time.perf_counter() - t0:.0f}s in all; diagnosis "
            f"{time.perf_counter() - t1:.0f}s)")
    return 0
