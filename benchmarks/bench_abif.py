"""ABIF quality at speed (issue 8): the MNIST CNN workload of bench_arnoldi.py (4,000 train ×
100 queries), LDS against 60 half-subsets × 8 data-order seeds (bench_abif_gt.py), one torch
thread for every method, side by side in one run:

- ``ArnoldiInfluence(task)`` as shipped, end to end (fit = eigenbasis + train projections,
  then 100 queries), wall time and peak extra memory of each stage, LDS with its standard error
  over queries; variants (``--variants``: rank, passes, filters, the paper's Hessian Arnoldi);
- kronfluence EK-FAC on the same model, data and queries (``--compare-python``, an interpreter
  with kronfluence; run by compare_ekfac.py);
- one training epoch (the unit of the projection target); LiSSA's per-query cost (a few
  queries) against the default's per-query cost from its stored features;
- GradDot for reference.

    nohup .venv/bin/python benchmarks/bench_abif_gt.py > benchmarks/out/abif/gt.log 2>&1 &
    .venv/bin/python benchmarks/bench_abif.py --compare-python /tmp/kfvenv/bin/python

``--seeds-available`` scores against the ground-truth seeds finished so far (while it runs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_abif_gt import N_SUBSETS, SEEDS, CachedOnly, measurements  # noqa: E402
from bench_arnoldi import measured, one_epoch_seconds, workload  # noqa: E402

import influencekit as ik  # noqa: E402
from influencekit.groundtruth.metrics import rowwise_spearman  # noqa: E402

OUT = HERE / "out" / "abif"

VARIANTS: dict[str, dict] = {
    "default": {},
    "old-default": {"curvature": "hessian"},  # the paper's Hessian Arnoldi, streamed
    "rank100": {"rank": 100},
    "rank200": {"rank": 200},
    "passes3": {"solver": ik.Eigensolver(passes=3)},
    "labels": {"solver": ik.Eigensolver(fisher="sampled")},
    "gaussian": {"solver": ik.Eigensolver(fisher="gaussian")},
    "gaussian-rank100": {"solver": ik.Eigensolver(fisher="gaussian"), "rank": 100},
    "topk": {"filter": "topk"},
    "topk-rank100": {"filter": "topk", "rank": 100},
    "complement": {"filter": "complement"},
    "horizon": {"filter": "horizon"},
    "horizon-nocomp": {"filter": ik.HorizonFilter(complement=False)},
    "stream": {"sketch": None},  # the exact complement streamed per query chunk (old default)
    "sketch4096": {"sketch": 4096},
    "sketch8192": {"sketch": 8192},
    "sketch16384": {"sketch": 16384},
    "sketch32768": {"sketch": 32768},
    "hessian-arnoldi": {"curvature": "hessian"},
    "ggn-arnoldi": {"solver": ik.Eigensolver(method="arnoldi")},
}


def groundtruth(w: dict, cache: Path, available: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Subset masks, mean measurement over the seeds, and how many seeds it averages."""
    if not available:
        masks, vals = measurements(w, cache)
        return masks, vals.mean(0), SEEDS
    masks, vals = measurements(w, CachedOnly(cache))
    if not len(vals):
        raise SystemExit("no complete ground-truth seed yet: run bench_abif_gt.py")
    return masks, vals.mean(0), vals.shape[0]


def lds_with_se(scores: torch.Tensor, masks: torch.Tensor, values: torch.Tensor
                ) -> tuple[float, float]:
    """LDS (mean over queries of Spearman(Σ_S scores, −measurement)) and its standard error
    over queries."""
    pred = masks.double() @ scores.double().T  # [M, Q]
    per_q = rowwise_spearman(pred.T.numpy(), (-values.T).numpy())
    per_q = torch.as_tensor(per_q)
    return float(per_q.mean()), float(per_q.std() / len(per_q) ** 0.5)


def run_abif(task: ik.Task, w: dict, row: dict, **kw) -> torch.Tensor:
    """fit (eigenbasis + train projections) then the queries, each timed; per-query cost."""
    est = ik.ArnoldiInfluence(task, **kw)
    with measured(row, "fit"):
        est.fit(w["train"])
    row.update({f"{k}_s": v for k, v in est.timings.items()})
    with measured(row, "query"):
        scores = est.scores(w["queries"])
    t0 = time.perf_counter()  # again: without the first call's one-time set-up (layer checks)
    est.scores(w["queries"])
    row["query_warm_s"] = time.perf_counter() - t0
    row["total_s"] = row["fit_s"] + row["query_s"]
    row["projection_method"] = est.projection_method
    row["reads_store_only"] = est.scores_from_features()
    row["top_eigenvalues"] = est.eigen.values[:5].tolist()
    return scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--workload-dir", type=Path, default=HERE / "out" / "arnoldi")
    ap.add_argument("--gt-cache", type=Path, default=OUT / "gt-cache")
    ap.add_argument("--variants", default="default",
                    help=f"comma list of {','.join(VARIANTS)}")
    ap.add_argument("--compare-python", default=None, help="interpreter with kronfluence")
    ap.add_argument("--compare-timeout", type=int, default=900)
    ap.add_argument("--damping", type=float, default=1e-8, help="kronfluence's damping")
    ap.add_argument("--lissa-queries", type=int, default=2)
    ap.add_argument("--seeds-available", action="store_true")
    ap.add_argument("--skip", default="", help="comma list: epoch,lissa,graddot")
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.threads = 1
    args.out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    w = workload(args.workload_dir)
    task = ik.ClassificationTask(w["model"])
    print(f"MNIST CNN P={task.num_params}, {len(w['train'][1])} train × "
          f"{len(w['queries'][1])} queries", flush=True)
    res: dict = {"P": task.num_params, "rows": {}}
    rows = res["rows"]
    if "epoch" not in skip:
        res["epoch_s"] = one_epoch_seconds(w["model"], w["train"])
        print(f"one training epoch {res['epoch_s']:.2f} s", flush=True)
    scores: dict[str, torch.Tensor] = {}
    for name in filter(None, args.variants.split(",")):
        rows[name] = {}
        scores[name] = run_abif(task, w, rows[name], **VARIANTS[name])
        print(name, json.dumps(rows[name], default=str), flush=True)
    if args.compare_python:
        from bench_ekfac import kronfluence

        torch.save({"train": w["train"], "queries": w["queries"]}, args.out / "workload.pt")
        kf = kronfluence(args, w, empirical=False)
        rows["kronfluence-ekfac"] = {k: v for k, v in kf.items() if k != "scores"}
        if "scores" in kf:
            scores["kronfluence-ekfac"] = kf["scores"]
        print("kronfluence", json.dumps(rows["kronfluence-ekfac"], default=str), flush=True)
    if "graddot" not in skip:
        rows["graddot"] = {}
        with measured(rows["graddot"], "query"):
            scores["graddot"] = ik.GradDot(task).scores(w["queries"], w["train"])
        rows["graddot"]["total_s"] = rows["graddot"]["query_s"]
    if "lissa" not in skip:
        first = next(iter(rows.values()))
        lam_max = float(first.get("top_eigenvalues", [1.0])[0])
        damping = 0.01 * lam_max
        lissa = ik.LiSSAInfluence(task, damping=damping, depth=100, curvature_batch=64,
                                  scale=1.5 * (lam_max + damping), check_definite=False)
        rows["lissa"] = {"n_queries": args.lissa_queries, "depth": 100}
        lissa.fit(w["train"])
        q = tuple(t[:args.lissa_queries] for t in w["queries"])
        with measured(rows["lissa"], "query"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lissa.scores(q)
        rows["lissa"]["per_query_s"] = rows["lissa"]["query_s"] / args.lissa_queries
    while True:  # the ground truth last: it may still be computing in the background
        masks, values, seeds = groundtruth(w, args.gt_cache, True)
        if seeds == SEEDS or args.seeds_available:
            break
        print(f"waiting for the ground truth ({seeds}/{SEEDS} seeds)", flush=True)
        time.sleep(30)
    res["seeds"] = seeds
    for name, s in scores.items():
        rows[name]["lds"], rows[name]["lds_se"] = lds_with_se(s, masks, values)
    torch.save(scores, args.out / "scores.pt")
    report(res, args, len(w["queries"][1]))


def report(res: dict, args: argparse.Namespace, n_q: int) -> None:
    rows = res["rows"]
    nan = float("nan")
    ref = rows.get("kronfluence-ekfac", {}).get("total_s")
    lines = [f"MNIST CNN (P={res['P']}), 4,000 train × {n_q} queries, one thread; LDS over "
             f"{N_SUBSETS} half-subsets × {res['seeds']} data-order seeds (± s.e. over queries)"
             + (f"; one training epoch {res['epoch_s']:.2f} s" if "epoch_s" in res else ""),
             "", "| method | eigenbasis s | projection s | queries s | total s | × kronfluence "
             "| peak MB | LDS |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | | | | | | | {r['error']} |")
            continue
        if name == "lissa":
            continue
        peak = max(r.get(k, 0.0) for k in ("fit_mb", "query_mb", "total_mb"))
        total = r.get("total_s", nan)
        lines.append(
            f"| {name} | {r.get('eigenbasis_s', nan):.1f} | {r.get('projection_s', nan):.1f} | "
            f"{r.get('query_s', nan):.1f} | {total:.1f} | "
            f"{total / ref if ref else nan:.2f} | {peak:.0f} | "
            f"{r.get('lds', nan):.3f} ± {r.get('lds_se', nan):.3f} |")
    d = rows.get("default")
    if d:
        if "epoch_s" in res:
            lines.append(f"\nprojection = {d['projection_s'] / res['epoch_s']:.2f} training "
                         f"epochs (method {d['projection_method']!r}, chosen by rule)")
        if "lissa" in rows:
            pq, warm = d["query_s"] / n_q, d["query_warm_s"] / n_q
            lissa = rows["lissa"]["per_query_s"]
            lines.append(f"per-query cost: LiSSA {lissa:.2f} s, default {pq * 1e3:.2f} ms in "
                         f"the first call of {n_q} queries, {warm * 1e3:.2f} ms in a second "
                         f"(reads store only: {d['reads_store_only']}) → {lissa / pq:.0f}× / "
                         f"{lissa / warm:.0f}×")
    text = "\n".join(lines)
    print(text)
    (args.out / "table.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
