"""TRAK ensembles and TracIn checkpoints on the digits MLP, scored by LDS (issue 10).

Uses the ground truth of ``influencekit evaluate --dataset digits --model mlp`` (same split,
θ*, damping and LDS subsets; read from its cache, computed when missing), then:

- TRAK with ensembles of M = 1, 2, 4, ... models (θ* plus models trained with other
  initialisation and data-order seeds, same data and config), at several projection dims;
- ablations on the same features: without TRAK's ``1 − p`` (training side ``∇f`` instead of
  ``∇ℓ``), without the kernel inverse, and with other dampings;
- TracIn over θ*'s own training run (checkpoints collected by ``TracIn.collector``).

    .venv/bin/python benchmarks/bench_trak.py --threads 1 --models 8
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

import influencekit as ik
from influencekit.experiments import evaluate as ev
from influencekit.groundtruth import Cache, lds
from influencekit.training import train


def lds_of(scores: torch.Tensor, gt) -> float:
    return lds(scores, gt.lds.subsets.float(), gt.lds.values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", type=int, default=8, help="largest ensemble")
    ap.add_argument("--dims", default="2048,512,128", help="projection dims")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    parser = argparse.ArgumentParser()
    ev.add_parser(parser.add_subparsers())
    args = parser.parse_args(["evaluate", "--dataset", "digits", "--model", "mlp",
                              "--ground-truth", "lds", "--no-progress"])
    d = ev._load(args)
    builder = ev._model_builder(args, d)
    cfg = ik.training.TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                  optimizer=args.optimizer, weight_decay=args.weight_decay,
                                  schedule="cosine", seed=args.seed, init_seed=args.seed)
    damping = args.weight_decay
    cache = Cache(Path(args.cache_dir) / "evaluate")
    gt, model, _ = ev.build_ground_truth(args, d, builder, cfg, cache, damping, ["lds"], False)
    train_data, queries = d.train, d.test
    out: dict = {"damping": damping, "n_train": len(train_data[1]), "n_queries": len(queries[1])}

    # θ*'s own run again, collecting checkpoints (deterministic: the same θ*)
    t0 = time.perf_counter()
    ckpts = ik.TracIn.collector(every=1, unit="epoch")
    run = train(builder, train_data, cfg, callback=ckpts)
    same = all(torch.equal(p, q) for p, q in zip(run.model.parameters(), model.parameters()))
    # other members: other init and data-order seeds, same data and config
    members = [model]
    for s in range(1, a.models):
        kw = {"num_classes": d.num_classes, "in_features": 64, "hidden": args.hidden}
        members.append(train(lambda s=s, kw=kw: ik.models.build("mlp", seed=s, **kw),
                             train_data, replace(cfg, seed=s, init_seed=s)).model)
    out["train_s"] = time.perf_counter() - t0
    out["rerun_equals_theta_star"] = same
    task = ik.ClassificationTask(model)

    # TracIn
    res = {}
    for label, every in (("every epoch", 1), ("every 5 epochs", 5)):
        t0 = time.perf_counter()
        states = ckpts.states[every - 1::every]
        rates = [sum(ckpts.learning_rates[i:i + every])
                 for i in range(0, len(ckpts.states), every)]
        est = ik.TracIn(task, states, rates)
        res[f"tracin {label} ({len(states)} ckpts)"] = (lds_of(est.scores(queries, train_data),
                                                               gt), time.perf_counter() - t0)
    last = ik.TracIn(task, ckpts.states[-5:], ckpts.learning_rates[-5:])
    res["tracin last 5 epochs"] = (lds_of(last.scores(queries, train_data), gt), float("nan"))
    res["graddot (θ*)"] = (lds_of(ik.GradDot(task).scores(queries, train_data), gt), float("nan"))
    out["tracin"] = res
    for k, v in res.items():
        print(f"{k:40s} LDS {v[0]:.3f}  {v[1]:.1f}s", flush=True)

    # TRAK: per-model features once per dim, then ensembles and ablations from them
    out["trak"] = {}
    for dim in [int(x) for x in a.dims.split(",")]:
        per_model = []
        t0 = time.perf_counter()
        for m in members:
            est = ik.TRAKInfluence(ik.ClassificationTask(m), dim, damping=damping,
                                   output="margin").fit(train_data)
            f = est.train_features()
            per_model.append((f.cat("phi0").double(), f.cat("c0"),
                              est.features(queries, "measurement")["phi0"].double()))
        feat_s = (time.perf_counter() - t0) / len(members)
        n = len(train_data[1])

        def scores(m_list, lam=damping, one_minus_p=True, kernel=True, weights="none", n=n):
            total = 0
            for phi, c, q in m_list:
                right = phi * (c[:, None] if one_minus_p else -1.0)
                if kernel:
                    w = {"none": torch.ones_like(c), "(1-p)^2": c * c,
                         "p(1-p)": -(1 + c) * c}[weights]
                    kern = (phi * w[:, None]).T @ phi / n + lam * torch.eye(phi.shape[1],
                                                                           dtype=phi.dtype)
                    total = total + q @ torch.linalg.solve(kern, right.T)
                else:
                    total = total + q @ right.T
            return total / len(m_list)

        rows = {}
        sizes = [s for s in (1, 2, 4, 8, 16, 32) if s <= len(members)]
        for size in sizes:
            rows[f"M={size}"] = lds_of(scores(per_model[:size]), gt)
        for size in (1, sizes[-1]):
            rows[f"M={size} without 1-p"] = lds_of(scores(per_model[:size], one_minus_p=False),
                                                   gt)
            rows[f"M={size} without kernel inverse"] = lds_of(
                scores(per_model[:size], kernel=False), gt)
            for weights in ("(1-p)^2", "p(1-p)"):
                rows[f"M={size} kernel weights {weights}"] = lds_of(
                    scores(per_model[:size], weights=weights), gt)
            for lam in (1e-6, 1e-4, 1e-2, 1e-1):
                rows[f"M={size} damping {lam:g}"] = lds_of(scores(per_model[:size], lam=lam), gt)
        out["trak"][dim] = {"lds": rows, "feature_s_per_model": feat_s}
        for k, v in rows.items():
            print(f"trak k={dim:5d} {k:32s} LDS {v:.3f}", flush=True)
        print(f"trak k={dim}: {feat_s:.1f}s per model (fit + query features)", flush=True)
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
