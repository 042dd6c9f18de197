"""``influencekit demo``: a one-minute tour on generated data.

Trains a small MLP on three Gaussian blobs with a few flipped labels, fits an influence
estimator, and prints each query's top proponents and opponents and the training examples with
the highest self-influence (where the flipped labels should surface).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from ..data.synthetic import make_blobs
from ..errors import InputError
from ..estimators import METHODS
from ..models import MLP
from ..task import ClassificationTask
from ..training import TrainConfig, train
from . import arguments as arg

__all__ = ["add_parser", "make_blobs", "run", "train_mlp"]

WEIGHT_DECAY = 1e-3


def train_mlp(x: torch.Tensor, y: torch.Tensor, *, hidden: int = 16, classes: int = 3,
              weight_decay: float = WEIGHT_DECAY, epochs: int = 300, seed: int = 0) -> nn.Module:
    """A one-hidden-layer tanh MLP trained to (near) convergence with the deterministic trainer:
    full-batch Adam (lr 0.05), weight decay as the L2 term ``(wd/2)‖θ‖²``."""
    config = TrainConfig(epochs=epochs, batch_size=len(y), optimizer="adam", lr=0.05,
                         weight_decay=weight_decay, seed=seed, init_seed=seed)

    def builder() -> nn.Module:
        return MLP(x.shape[1], classes, hidden=(hidden,)).to(x.dtype)

    return train(builder, (x, y), config, progress=False).model


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="train a small model on generated data and show influential examples",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="exact", choices=sorted(METHODS),
                   help="influence estimator (default: exact)")
    p.add_argument("--curvature", default="ggn", choices=["ggn", "hessian"],
                   help="curvature for the methods that use one (default: ggn, which is "
                        "positive semi-definite; the MLP's Hessian is indefinite)")
    p.add_argument("--n-train", type=arg.count(), default=300,
                   help="training examples (default 300)")
    p.add_argument("--queries", type=arg.count(), default=3, help="test queries shown (default 3)")
    p.add_argument("--top", type=arg.count(), default=3,
                   help="proponents/opponents shown (default 3)")
    p.add_argument("--seed", type=arg.count(0), default=0)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.top > args.n_train:
        raise InputError(f"--top {args.top} exceeds --n-train {args.n_train}.")
    t0 = time.perf_counter()
    x, y, flipped = make_blobs(args.n_train, flips=min(6, args.n_train // 10), seed=args.seed)
    xq, yq, _ = make_blobs(args.queries, flips=0, seed=args.seed + 1)
    model = train_mlp(x, y, weight_decay=WEIGHT_DECAY, seed=args.seed)
    task = ClassificationTask(model)
    cls = METHODS[args.method]
    takes = arg.constructor_options(cls)  # e.g. GradDot has no curvature
    settings = {"damping": WEIGHT_DECAY, "curvature": args.curvature}
    est = cls(task, **{k: v for k, v in settings.items() if takes is None or k in takes})
    est.fit((x, y))
    acc = (task.predict(x) == y).float().mean().item()
    print(f"Trained a {task.num_params}-parameter MLP on {len(y)} points "
          f"(3 blobs, {len(flipped)} labels flipped); train accuracy {acc:.1%}.")
    print(f"Estimator: {est!r}. score > 0: a proponent (training more on it "
          "lowers the query's loss).\n")
    top = est.top_k((xq, yq), k=args.top)
    for q in range(len(yq)):
        print(f"Query {q}: x=({xq[q, 0]:+.2f}, {xq[q, 1]:+.2f}) label {int(yq[q])}")
        for kind, idx, sc in (("proponents", top.proponents, top.proponent_scores),
                              ("opponents", top.opponents, top.opponent_scores)):
            rows = ", ".join(
                f"#{int(i)} (label {int(y[i])}{', flipped' if int(i) in flipped else ''}) "
                f"{float(s):+.3g}" for i, s in zip(idx[q], sc[q]))
            print(f"  {kind:11s} {rows}")
    self_inf = est.self_influence()
    ranked = self_inf.argsort(descending=True)[: 2 * len(flipped)].tolist()
    found = sorted(set(ranked) & set(flipped))
    print(f"\nHighest self-influence: {ranked}")
    print(f"Flipped labels among them: {len(found)} of {len(flipped)} ({found}).")
    print(f"Done in {time.perf_counter() - t0:.1f} s.")
    return 0
