"""EK-FAC / K-FAC, TracIn and TRAK on the MNIST CNN workload (issue 10), against the 8-seed LDS
ground truth of bench_abif_gt.py, side by side in one run (one torch thread):

- our EK-FAC (true Fisher, one sampled label per example) and K-FAC at several dampings (the
  factors and the eigenvalue correction are fitted once; each damping rescored), against
  kronfluence's EK-FAC on the same model, data, queries and dampings (``--compare-python``);
- TracIn over the checkpoints of a run of the deterministic trainer (the workload's recipe: Adam,
  lr 2e-3, 5 epochs, batch 64, data-order seed 0, the ground truth's seed-0 run on all data),
  every epoch and every 16 steps;
- TRAK with an ensemble of models trained by the same recipe under data-order seeds 0..M−1 (the
  ground truth's own seeds), loss kernel (our default) and margin kernel (the published one);
  an ensemble's scores are the mean of its members' scores (TRAKInfluence's definition), so each
  member is scored once and every ensemble size read off the same members;
- GradDot for reference.

    .venv/bin/python benchmarks/bench_abif_gt.py           # ground truth, once (cached)
    .venv/bin/python benchmarks/bench_estimators_cnn.py --compare-python /tmp/kfvenv/bin/python

Scores are kept under ``--out/scores`` (one file per row); ``--reuse`` skips rows already there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_abif import groundtruth, lds_with_se  # noqa: E402
from bench_abif_gt import recipe  # noqa: E402
from bench_arnoldi import measured, one_epoch_seconds, workload  # noqa: E402

import influencekit as ik  # noqa: E402
from influencekit import data as ikdata  # noqa: E402
from influencekit import models as ikmodels  # noqa: E402
from influencekit.estimators.ekfac import EKFACInfluence, KFACInfluence  # noqa: E402
from influencekit.training import train  # noqa: E402

OUT = HERE / "out" / "estimators-cnn"


def trained(seed: int, data: tuple, out: Path, every: int | None = None
            ) -> tuple[torch.nn.Module, dict]:
    """The recipe's run with data-order ``seed`` from the ground truth's initialisation (cached);
    with ``every``, rerun to collect TracIn checkpoints every epoch and every ``every`` steps."""
    path = out / "models" / f"cnn-seed{seed}.pt"
    model = ikmodels.build("cnn", seed=0)
    if path.exists() and not every:
        model.load_state_dict(torch.load(path))
        return model.eval(), {}
    collectors = {"epoch": ik.TracIn.collector(1, "epoch")}
    if every:
        collectors["step"] = ik.TracIn.collector(every, "step")

    def callback(info) -> None:
        for c in collectors.values():
            c(info)

    result = train(model, data, recipe(seed), callback=callback)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(result.model.state_dict(), path)
    return result.model.eval(), collectors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--workload-dir", type=Path, default=HERE / "out" / "arnoldi")
    ap.add_argument("--gt-cache", type=Path, default=HERE / "out" / "abif" / "gt-cache")
    ap.add_argument("--dampings", default="1e-8,1e-4,1e-3,1e-2",
                    help="λ for EK-FAC / K-FAC, ours and kronfluence's (1e-8: its default)")
    ap.add_argument("--members", type=int, default=8, help="TRAK ensemble size (max)")
    ap.add_argument("--trak-dim", type=int, default=2048)
    ap.add_argument("--trak-dampings", default="auto,0",
                    help="TRAK kernel dampings: 'auto' (tr(K)/k, our default) and/or numbers "
                    "(0: TRAK's own, undamped)")
    ap.add_argument("--tracin-every", type=int, default=16, help="steps between checkpoints")
    ap.add_argument("--compare-python", default=None, help="interpreter with kronfluence")
    ap.add_argument("--compare-timeout", type=int, default=900)
    ap.add_argument("--skip", default="", help="comma list: ekfac,kfac,kronfluence,tracin,"
                    "trak,margin,graddot")
    ap.add_argument("--reuse", action="store_true", help="skip rows whose scores are saved")
    ap.add_argument("--ekfac-fisher", default="sampled",
                    help="our EK-FAC/K-FAC's fisher= (rows tagged with it unless 'sampled')")
    ap.add_argument("--ekfac-samples", type=int, default=1,
                    help="label draws per example for our EK-FAC/K-FAC (rows tagged ×S if > 1)")
    ap.add_argument("--label-seeds", default=None,
                    help="comma list: fit EK-FAC/K-FAC (our seed=) and kronfluence "
                    "(torch.manual_seed) once per seed of the drawn labels; rows named "
                    "'… seed=S λ=…' (default: one fit, our seed 0, kronfluence unseeded)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.threads = 1
    skip = set(filter(None, args.skip.split(",")))
    (args.out / "scores").mkdir(parents=True, exist_ok=True)
    w = workload(args.workload_dir)
    task = ik.ClassificationTask(w["model"])
    dampings = [float(d) for d in args.dampings.split(",")]
    masks, values, seeds = groundtruth(w, args.gt_cache, True)
    print(f"MNIST CNN P={task.num_params}, workload model test acc {w['test_acc']:.4f}; "
          f"ground truth {seeds} seeds", flush=True)
    res: dict = {"P": task.num_params, "seeds": seeds, "test_acc": w["test_acc"], "rows": {}}
    rows = res["rows"]
    res["epoch_s"] = one_epoch_seconds(w["model"], w["train"])

    def record(name: str, scores: torch.Tensor, row: dict) -> None:
        row["lds"], row["lds_se"] = lds_with_se(scores, masks, values)
        rows[name] = row
        torch.save(scores, args.out / "scores" / f"{name}.pt")
        print(name, json.dumps(row, default=str), flush=True)
        save(res, args)

    def reused(name: str) -> bool:
        f = args.out / "scores" / f"{name}.pt"
        if args.reuse and f.exists():
            old = json.loads((args.out / "results.json").read_text())["rows"].get(name)
            if old:
                rows[name] = old
                return True
        return False

    # ---- EK-FAC / K-FAC: fit once, every damping rescored (damping only enters the queries)
    label_seeds = ([None] if args.label_seeds is None
                   else [int(x) for x in args.label_seeds.split(",")])

    def tag(seed: int | None, ours: bool = False) -> str:
        draws = f" ×{args.ekfac_samples}" if ours and args.ekfac_samples > 1 else ""
        if ours and args.ekfac_fisher != "sampled":
            draws = f" {args.ekfac_fisher}" + draws
        return draws + ("" if seed is None else f" seed={seed}")

    for cls, key in ((EKFACInfluence, "ekfac"), (KFACInfluence, "kfac")):
        for seed in label_seeds:
            if key in skip or all(reused(f"{key}{tag(seed, True)} λ={d:g}") for d in dampings):
                continue
            est = cls(task, damping=dampings[0], seed=seed or 0, samples=args.ekfac_samples,
                      fisher=args.ekfac_fisher)
            fit: dict = {}
            with measured(fit, "fit"):
                est.fit(w["train"])
            fit.update({f"{k}_s": v for k, v in est.timings.items()})
            for d in dampings:
                est.damping = d
                row = dict(fit)
                with measured(row, "query"):
                    scores = est.scores(w["queries"])
                row["total_s"] = row["fit_s"] + row["query_s"]
                record(f"{key}{tag(seed, True)} λ={d:g}", scores, row)

    # ---- kronfluence EK-FAC, same run, same dampings
    if args.compare_python and "kronfluence" not in skip:
        from bench_ekfac import kronfluence

        torch.save({"train": w["train"], "queries": w["queries"]}, args.out / "workload.pt")
        for seed, d in ((seed, d) for seed in label_seeds for d in dampings):
            name = f"kronfluence-ekfac{tag(seed)} λ={d:g}"
            if reused(name):
                continue
            args.damping, args.kf_seed = d, seed
            kf = kronfluence(args, w, empirical=False)
            row = {k: v for k, v in kf.items() if k != "scores"}
            if "scores" in kf:
                record(name, kf["scores"], row)
            else:
                rows[name] = row
                print(name, row, flush=True)

    # ---- TracIn over the trainer's checkpoints (seed-0 run of the ground truth's recipe)
    if "tracin" not in skip and not (reused("tracin every epoch")
                                     and reused(f"tracin every {args.tracin_every} steps")):
        t0 = time.perf_counter()
        model0, ckpts = trained(0, w["train"], args.out, every=args.tracin_every)
        train_s = time.perf_counter() - t0
        xt, yt = ikdata.load("mnist").test
        with torch.no_grad():
            res["seed0_test_acc"] = float((model0(xt).argmax(1) == yt).float().mean())
        for unit, c in ckpts.items():
            name = "tracin every epoch" if unit == "epoch" else \
                f"tracin every {args.tracin_every} steps"
            row = {"checkpoints": len(c), "train_s": train_s}
            with measured(row, "query"):
                scores = ik.TracIn.from_trainer(ik.ClassificationTask(model0), c).scores(
                    w["queries"], w["train"])
            row["total_s"] = row["query_s"]
            record(name, scores, row)

    # ---- TRAK: one member at a time (features stored once per member and output, every
    # damping rescored from them), ensembles = means of members' scores
    outputs = [o for o in ("loss", "margin") if o not in skip]
    trak_dampings = [d if d == "auto" else float(d) for d in args.trak_dampings.split(",")]
    if "trak" not in skip:
        members: dict[tuple, list[torch.Tensor]] = {}
        cost: dict[tuple, list[float]] = {}
        for m in range(args.members):
            model_m, _ = trained(m, w["train"], args.out)
            task_m = ik.ClassificationTask(model_m)
            for o in outputs:
                for d in trak_dampings:
                    key = (o, d)
                    f = args.out / "scores" / f"trak-{o}-{d}-member{m}.pt"
                    members.setdefault(key, [])
                    cost.setdefault(key, [])
                    if args.reuse and f.exists():
                        members[key].append(torch.load(f))
                        cost[key].append(float("nan"))
                        continue
                    row: dict = {}
                    with measured(row, "query"):
                        est = ik.TRAKInfluence(task_m, projection_dim=args.trak_dim, output=o,
                                               damping=d,
                                               store=args.out / "trak-store" / f"{o}-m{m}")
                        s = est.fit(w["train"]).scores(w["queries"])
                    torch.save(s, f)
                    members[key].append(s)
                    cost[key].append(row["query_s"])
                    print(f"trak {o} λ={d} member {m}: {row['query_s']:.1f} s, kernel λ "
                          f"{est.kernel_dampings[0]:.3g}", flush=True)
        for (o, d), got in members.items():
            for size in sorted({1, 2, 4, 8, args.members}):
                if size > len(got):
                    continue
                c = cost[(o, d)]
                row = {"members": size, "k": args.trak_dim, "damping": d,
                       "total_s": float(sum(c[:size])),
                       "per_member_s": float(torch.tensor(c).nanmean())}
                record(f"trak-{o} λ={d} M={size}", torch.stack(got[:size]).mean(0), row)

    if "graddot" not in skip and not reused("graddot"):
        row = {}
        with measured(row, "query"):
            scores = ik.GradDot(task).scores(w["queries"], w["train"])
        row["total_s"] = row["query_s"]
        record("graddot", scores, row)
    report(res, args)


def save(res: dict, args: argparse.Namespace) -> None:
    (args.out / "results.json").write_text(json.dumps(res, indent=1, default=str))


def report(res: dict, args: argparse.Namespace) -> None:
    nan = float("nan")
    lines = [f"MNIST CNN (P={res['P']}), 4,000 train × 100 queries, one thread; LDS over 60 "
             f"half-subsets × {res['seeds']} data-order seeds (± s.e. over queries); one "
             f"training epoch {res['epoch_s']:.2f} s", "",
             "| method | fit s | queries s | total s | peak MB | LDS |",
             "|---|---:|---:|---:|---:|---|"]
    for name, r in res["rows"].items():
        if "error" in r:
            lines.append(f"| {name} | | | | | {r['error']} |")
            continue
        peak = max(r.get(k, 0.0) for k in ("fit_mb", "query_mb", "total_mb"))
        lines.append(f"| {name} | {r.get('fit_s', nan):.1f} | {r.get('query_s', nan):.1f} | "
                     f"{r.get('total_s', nan):.1f} | {peak:.0f} | "
                     f"{r['lds']:.3f} ± {r['lds_se']:.3f} |")
    text = "\n".join(lines)
    print(text)
    (args.out / "table.md").write_text(text + "\n")
    save(res, args)


if __name__ == "__main__":
    sys.exit(main())
