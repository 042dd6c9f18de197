"""EK-FAC / K-FAC at scale: the MNIST CNN workload of bench_arnoldi.py (4,000 train × 100
queries, one torch thread), side by side in one run:

- our EK-FAC (true Fisher, one sampled label per example; and the empirical Fisher) and K-FAC:
  factor fit, eigenvalue correction and 100 queries — wall time and peak memory of each stage;
- Spearman agreement (mean over queries) with ArnoldiInfluence (default settings), GradDot, and
  with kronfluence's EK-FAC on the same model, data and damping (``--compare-python``: an
  interpreter with kronfluence, see requirements-compare-ekfac.txt; run by compare_ekfac.py).

    .venv/bin/python benchmarks/bench_ekfac.py --compare-python /tmp/kfvenv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_arnoldi import measured, workload  # noqa: E402

import influencekit as ik  # noqa: E402
from influencekit.estimators.ekfac import EKFACInfluence, KFACInfluence  # noqa: E402
from influencekit.groundtruth.metrics import mean_spearman  # noqa: E402


def ours(cls: type, task: ik.Task, w: dict, row: dict, **kw) -> None:
    """Fit (factors, then eigen / correction) and 100 queries, each stage timed."""
    est = cls(task, **kw)
    task.check_batch(tuple(t[:est.batch_size] for t in w["train"]))
    with measured(row, "fit"):
        est.fit(w["train"])
    row.update({f"{k}_s": v for k, v in est.timings.items()})
    with measured(row, "query"):
        row["scores"] = est.scores(w["queries"])


def kronfluence(args: argparse.Namespace, w: dict, empirical: bool) -> dict:
    out = args.out / f"kronfluence{'-emp' if empirical else ''}.pt"
    cmd = [args.compare_python, str(HERE / "compare_ekfac.py"), "--model", w["model_path"],
           "--workload", str(args.out / "workload.pt"), "--out", str(out), "--damping",
           str(args.damping), "--threads", str(args.threads)] + (["--empirical"] * empirical)
    if getattr(args, "kf_seed", None) is not None:
        cmd += ["--seed", str(args.kf_seed)]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src")}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.compare_timeout,
                              env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {args.compare_timeout} s"}
    if proc.returncode != 0:
        tail = (proc.stderr + proc.stdout).strip().splitlines()[-1:] or ["(no message)"]
        return {"error": f"exit {proc.returncode}: {tail[0][:200]}",
                "total_s": time.perf_counter() - t0}
    got = torch.load(out)
    return {"scores": got["scores"], "fit_s": got["fit_s"],
            "query_s": got["total_s"] - got["fit_s"], "total_s": got["total_s"],
            "total_mb": got["peak_mb"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "out" / "ekfac")
    ap.add_argument("--workload-dir", type=Path, default=HERE / "out" / "arnoldi",
                    help="where bench_arnoldi caches the trained CNN (shared)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--damping", type=float, default=1e-8,
                    help="λ for every EK-FAC / K-FAC row (kronfluence's default is 1e-8)")
    ap.add_argument("--compare-python", default=None, help="interpreter with kronfluence")
    ap.add_argument("--compare-timeout", type=int, default=600)
    ap.add_argument("--skip", default="", help="comma list: arnoldi,graddot,kfac,empirical")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    args.workload_dir.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))

    w = workload(args.workload_dir)
    task = ik.ClassificationTask(w["model"])
    print(f"MNIST {len(w['train'][1])} train × {len(w['queries'][1])} queries, CNN "
          f"P={task.num_params}, test acc {w['test_acc']:.3f}, threads {args.threads}",
          flush=True)
    rows: dict[str, dict] = {}
    lam = args.damping
    rows["ekfac"] = {}
    ours(EKFACInfluence, task, w, rows["ekfac"], damping=lam)
    if "empirical" not in skip:
        rows["ekfac-empirical"] = {}
        ours(EKFACInfluence, task, w, rows["ekfac-empirical"], damping=lam, fisher="empirical")
    if "kfac" not in skip:
        rows["kfac"] = {}
        ours(KFACInfluence, task, w, rows["kfac"], damping=lam)
    for name, r in rows.items():
        print(name, {k: round(v, 2) for k, v in r.items() if k.endswith(("_s", "_mb"))},
              flush=True)
    if args.compare_python:
        torch.save({"train": w["train"], "queries": w["queries"]}, args.out / "workload.pt")
        rows["kronfluence"] = kronfluence(args, w, empirical=False)
        if "empirical" not in skip:
            rows["kronfluence-empirical"] = kronfluence(args, w, empirical=True)
        print("kronfluence", {k: v for k, v in rows["kronfluence"].items() if k != "scores"},
              flush=True)
    if "arnoldi" not in skip:
        rows["arnoldi"] = {}
        with measured(rows["arnoldi"], "fit"):
            ab = ik.ArnoldiInfluence(task).fit(w["train"])
        with measured(rows["arnoldi"], "query"):
            rows["arnoldi"]["scores"] = ab.scores(w["queries"])
    if "graddot" not in skip:
        rows["graddot"] = {}
        with measured(rows["graddot"], "query"):
            rows["graddot"]["scores"] = ik.GradDot(task).scores(w["queries"], w["train"])

    scored = [n for n, r in rows.items() if "scores" in r]
    agree = {a: {b: mean_spearman(rows[a]["scores"].double(), rows[b]["scores"].double())
                 for b in scored if b != a} for a in scored}
    report(rows, agree, args, task.num_params, w)


def report(rows: dict, agree: dict, args: argparse.Namespace, p: int, w: dict) -> None:
    lines = [f"MNIST CNN (P={p}), {len(w['train'][1])} train × {len(w['queries'][1])} queries, "
             f"{args.threads} thread(s), damping {args.damping:g}", "",
             "| method | factors s | eigen/correction s | fit s | query s | total s | peak MB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    nan = float("nan")
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | | | | | | {r['error']} |")
            continue
        total = r.get("total_s", r.get("fit_s", 0.0) + r.get("query_s", 0.0))
        peak = max(r.get(k, 0.0) for k in ("fit_mb", "query_mb", "total_mb"))
        lines.append(f"| {name} | {r.get('factors_s', nan):.1f} | {r.get('eigen_s', nan):.1f} | "
                     f"{r.get('fit_s', nan):.1f} | {r.get('query_s', nan):.1f} | {total:.1f} | "
                     f"{peak:.0f} |")
    names = list(agree)
    lines += ["", "Spearman (mean over queries) between rows:", "",
              "| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for a in names:
        lines.append(f"| {a} | " + " | ".join("–" if a == b else f"{agree[a][b]:.3f}"
                                               for b in names) + " |")
    text = "\n".join(lines)
    print(text)
    (args.out / "table.md").write_text(text + "\n")
    slim = {n: {k: v for k, v in r.items() if k != "scores"} for n, r in rows.items()}
    (args.out / "results.json").write_text(json.dumps({"rows": slim, "spearman": agree},
                                                      indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
