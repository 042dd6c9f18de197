"""``influencekit demo``: a one-minute tour on generated data.

Trains a small MLP on three Gaussian blobs with a few flipped labels, fits an influence
estimator, and prints each query's top proponents and opponents and the training examples with
the highest self-influence (where the flipped labels should surface).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..estimators import METHODS
from ..task import ClassificationTask


def make_blobs(n: int, *, classes: int = 3, flips: int = 6, seed: int = 0,
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``n`` points of ``classes`` 2-D Gaussian blobs; ``flips`` labels flipped at random."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    angle = 2 * torch.pi * y.to(dtype) / classes
    centres = 2.5 * torch.stack([angle.cos(), angle.sin()], 1)
    x = centres + torch.randn(n, 2, generator=g, dtype=dtype)
    flipped = torch.randperm(n, generator=g)[:flips].tolist()
    for i in flipped:
        y[i] = (y[i] + 1) % classes
    return x, y, sorted(flipped)


def train_mlp(x: torch.Tensor, y: torch.Tensor, *, hidden: int = 16, classes: int = 3,
              weight_decay: float = 1e-3, epochs: int = 300, seed: int = 0) -> nn.Module:
    """Full-batch training to (near) convergence, deterministic."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, classes)).to(x.dtype)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(epochs):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss = loss + 0.5 * weight_decay * sum((p**2).sum() for p in model.parameters())
        loss.backward()
        opt.step()
    return model


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="train a small model on generated data and show influential examples",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="exact", choices=sorted(METHODS),
                   help="influence estimator (default: exact)")
    p.add_argument("--curvature", default="ggn", choices=["ggn", "hessian"],
                   help="curvature for the methods that use one (default: ggn, which is "
                        "positive semi-definite; the MLP's Hessian is indefinite)")
    p.add_argument("--n-train", type=int, default=300, help="training examples (default 300)")
    p.add_argument("--queries", type=int, default=3, help="test queries shown (default 3)")
    p.add_argument("--top", type=int, default=3, help="proponents/opponents shown (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    wd = 1e-3
    x, y, flipped = make_blobs(args.n_train, seed=args.seed)
    xq, yq, _ = make_blobs(args.queries, flips=0, seed=args.seed + 1)
    model = train_mlp(x, y, weight_decay=wd, seed=args.seed)
    task = ClassificationTask(model)
    kwargs = ({} if args.method in ("graddot", "gradcos")
              else {"damping": wd, "curvature": args.curvature})
    est = METHODS[args.method](task, **kwargs).fit((x, y))
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
