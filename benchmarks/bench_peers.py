"""Peer-speed parity (issue 8, goal 5): ours vs pyDVL computing the same quantity, same workload,
same run, one torch thread, runs interleaved (ours, pyDVL, ours, pyDVL, …; medians reported):

- ``ExactInfluence(task, damping=λ)`` vs pyDVL ``DirectInfluence(regularization=λ)``;
- ``CGInfluence(task, damping=λ, tol, max_iter)`` (block CG over each query chunk) vs pyDVL
  ``CgInfluence`` (per-query CG, and with ``--pydvl-block`` its block CG too;
  ``--no-pydvl-query-cg`` skips the per-query one), same iteration cap, absolute tolerance
  matched to our relative one (pyDVL stops a query when ``‖r‖ < atol²`` with ``rtol=0``, in
  both variants; we set ``atol = sqrt(tol · median ‖g_q‖)``).

Workloads: ``digits`` (the built-in SGD digits MLP of ``influencekit evaluate``, 2,410 params,
1,438 train × 100 queries, λ = 1e-3) and ``cnn`` (bench_arnoldi's MNIST CNN, 105,866 params,
4,000 × 100; CG only: the dense matrix is P×P).

pyDVL's "up" influences equal ours (``g_qᵀ(H+λI)⁻¹g_n``; fitted scale ``c`` = +1 measured);
agreement: fitted ``c``, relative error ``‖c·ours − pydvl‖/‖pydvl‖`` and mean Spearman. pyDVL's
CG averages per-batch Hessians unweighted: use a ``--micro-batch`` dividing N (digits: 719).

    .venv/bin/python benchmarks/bench_peers.py --compare-python /tmp/pydvlvenv/bin/python \
        --workloads digits,cnn
    .venv/bin/python benchmarks/bench_peers.py --compare-python /tmp/pydvlvenv/bin/python \
        --workloads lbfgs --methods cg --damping 0.1 --micro-batch 719 --pydvl-block \
        --no-pydvl-query-cg --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_arnoldi import measured  # noqa: E402

import influencekit as ik  # noqa: E402
from influencekit.autodiff import all_grads  # noqa: E402
from influencekit.groundtruth.metrics import mean_spearman  # noqa: E402


def digits_workload() -> dict:
    """The built-in SGD-trained digits MLP of ``influencekit evaluate`` (cached θ*)."""
    from influencekit.cli import build_parser
    from influencekit.experiments import evaluate as ev
    from influencekit.training import TrainConfig

    a = build_parser().parse_args(["evaluate", "--dataset", "digits", "--model", "mlp",
                                   "--threads", "1", "--no-progress"])
    d = ev._load(a)
    cfg = TrainConfig(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
                      optimizer=a.optimizer, weight_decay=a.weight_decay,
                      schedule="cosine", seed=a.seed, init_seed=a.seed)
    cache = ev.Cache(Path(a.cache_dir) / "evaluate")
    rt = ev.Retrainer(ev._model_builder(a, d), d.train, cfg, cache=cache, progress=False)
    return {"model": rt.fit().eval(), "train": d.train, "queries": d.test,
            "damping": a.weight_decay}


def lbfgs_workload(dir_: Path) -> dict:
    """bench_abif_mlp's digits MLP at an exact minimum (full-batch L-BFGS, weight decay 1e-3 in
    the objective, float64), cached in ``dir_`` as bench_abif_mlp does; λ = the weight decay, so
    ``H + λI`` is the curvature of the objective (positive semi-definite at the minimum)."""
    from bench_abif_mlp import WD, lbfgs

    from influencekit import data as ikdata
    from influencekit import models as ikmodels

    d = ikdata.load("digits")
    (x, y), (xt, yt) = d.train, d.test
    x, xt = x.double(), xt.double()
    model = ikmodels.build("mlp", seed=0, in_features=64, num_classes=10, hidden=(32,)).double()
    path = dir_ / "mlp-lbfgs.pt"
    if path.exists():
        model.load_state_dict(torch.load(path))
    else:
        dir_.mkdir(parents=True, exist_ok=True)
        lbfgs(model, x, y)
        torch.save(model.state_dict(), path)
    return {"model": model.eval(), "train": (x, y), "queries": (xt[:100], yt[:100]),
            "damping": WD}


def cnn_workload(dir_: Path) -> dict:
    from bench_arnoldi import workload
    w = workload(dir_)
    return {"model": w["model"], "train": w["train"], "queries": w["queries"]}


def pydvl(args: argparse.Namespace, wpath: Path, method: str, extra: list[str]) -> dict:
    out = args.out / f"pydvl-{method}.pt"
    cmd = [args.compare_python, str(HERE / "compare_pydvl.py"), "--workload", str(wpath),
           "--out", str(out), "--method", method, "--threads", "1"] + extra
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src")}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.compare_timeout,
                          env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"compare_pydvl failed: {(proc.stderr + proc.stdout)[-2000:]}")
    got = torch.load(out)
    got["wall_s"] = wall
    return got


def ours(make, w: dict) -> dict:
    row: dict = {}
    with measured(row, "total"):
        est = make()
        t0 = time.perf_counter()
        est.fit(w["train"])
        row["fit_s"] = time.perf_counter() - t0
        row["scores"] = est.scores(w["queries"]).double()
    row["iterations"] = getattr(est, "iterations_used", getattr(est, "solver", None))
    return row


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    """``b ≈ c·a``: fitted c, relative error after it, mean Spearman of c·a vs b."""
    c = float((a * b).sum() / (a * a).sum())
    rel = float((c * a - b).norm() / b.norm())
    return {"c": c, "rel": rel, "spearman": mean_spearman(c * a, b)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "out" / "peers")
    ap.add_argument("--workload-dir", type=Path, default=HERE / "out" / "arnoldi")
    ap.add_argument("--abif-dir", type=Path, default=HERE / "out" / "abif",
                    help="where bench_abif_mlp caches the L-BFGS digits MLP (shared)")
    ap.add_argument("--compare-python", required=True, help="interpreter with pydvl[influence]")
    ap.add_argument("--compare-timeout", type=int, default=900)
    ap.add_argument("--workloads", default="digits,lbfgs,cnn")
    ap.add_argument("--methods", default="exact,cg")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tol", type=float, default=1e-6,
                    help="our CG relative residual (pyDVL's atol is matched to it)")
    ap.add_argument("--our-tol", type=float, default=None,
                    help="our CG relative residual only (default: --tol), e.g. to match "
                         "pyDVL's accuracy against Exact")
    ap.add_argument("--max-iter", type=int, default=100)
    ap.add_argument("--micro-batch", type=int, default=256,
                    help="our CG micro_batch_size and pyDVL's DataLoader batch")
    ap.add_argument("--n-queries", type=int, default=None, help="first N queries only")
    ap.add_argument("--damping", type=float, default=None, help="override the workload's λ")
    ap.add_argument("--pydvl-block", action="store_true", help="also pyDVL block CG")
    ap.add_argument("--no-pydvl-query-cg", action="store_true",
                    help="skip pyDVL's per-query CG (with --pydvl-block: block CG only)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = []
    exact_scores: dict[str, torch.Tensor] = {}
    for wname in args.workloads.split(","):
        w = (digits_workload() if wname == "digits" else
             lbfgs_workload(args.abif_dir) if wname == "lbfgs" else
             cnn_workload(args.workload_dir))
        lam = args.damping if args.damping is not None else w.get("damping", 1e-3)
        if args.n_queries:
            w["queries"] = tuple(t[:args.n_queries] for t in w["queries"])
        task = ik.ClassificationTask(w["model"])
        wpath = args.out / f"workload-{wname}.pt"
        torch.save({"model": w["model"], "train": w["train"], "queries": w["queries"]}, wpath)
        gq = all_grads(task, w["queries"], 64, "measurement").double()
        bnorm = float(gq.norm(dim=1).median())
        atol = (args.tol * bnorm) ** 0.5
        print(f"{wname}: P={task.num_params}, {len(w['train'][1])} train × "
              f"{len(w['queries'][1])} queries, λ={lam:g}, median ‖g_q‖={bnorm:.3g}, "
              f"pyDVL atol={atol:.3g}", flush=True)
        pairs = []
        refused: dict[str, bool] = {}
        if "exact" in args.methods and wname != "cnn":
            pairs.append(("exact", lambda task=task, lam=lam: ik.ExactInfluence(task, damping=lam),
                          "direct", ["--damping", str(lam)]))
        if "cg" in args.methods:
            base = ["--damping", str(lam), "--rtol", "0", "--atol", str(atol), "--maxiter",
                    str(args.max_iter), "--batch-size", str(args.micro_batch)]
            peers = [] if args.no_pydvl_query_cg else [("cg", base)]
            if args.pydvl_block:
                peers.append(("cg-block", base + ["--block"]))
            for peer, extra in peers:
                pairs.append(("cg", lambda task=task, lam=lam: ik.CGInfluence(
                    task, damping=lam, tol=args.our_tol or args.tol, max_iter=args.max_iter,
                    micro_batch_size=args.micro_batch), peer, extra))
        for name, make, peer, extra in pairs:
            runs_o, runs_p = [], []
            for _ in range(args.repeats):
                if make is not None:
                    try:
                        runs_o.append(ours(make, w))
                    except ik.CurvatureError as e:
                        print(f"  ours {name}: refused ({str(e)[:90]}…)", flush=True)
                        make = None
                        refused[name] = True
                        continue
                    print(f"  ours {name}: {runs_o[-1]['total_s']:.2f} s "
                          f"(fit {runs_o[-1]['fit_s']:.2f}), {runs_o[-1]['total_mb']:.0f} MB, "
                          f"iters {runs_o[-1]['iterations']}", flush=True)
                method = "cg" if peer.startswith("cg") else "direct"
                runs_p.append(pydvl(args, wpath, method, extra))
                print(f"  pydvl {peer}: {runs_p[-1]['total_s']:.2f} s "
                      f"(fit {runs_p[-1]['fit_s']:.2f}, process {runs_p[-1]['wall_s']:.1f}), "
                      f"{runs_p[-1]['peak_mb']:.0f} MB", flush=True)
            tp = statistics.median(r["total_s"] for r in runs_p)
            mp = max(r["peak_mb"] for r in runs_p)
            if runs_o:
                to = statistics.median(r["total_s"] for r in runs_o)
                mo = max(r["total_mb"] for r in runs_o)
                ag = agreement(runs_o[-1]["scores"], runs_p[-1]["scores"])
                if name == "exact":
                    exact_scores[wname] = runs_o[-1]["scores"]
                elif wname in exact_scores:
                    for who, sc in (("ours", runs_o[-1]["scores"]),
                                    ("pydvl", runs_p[-1]["scores"])):
                        e = agreement(exact_scores[wname], sc)
                        print(f"  {who} {peer} vs our exact: c {e['c']:.4g}, rel "
                              f"{e['rel']:.2e}, Spearman {e['spearman']:.4f}", flush=True)
                torch.save({"ours": runs_o[-1]["scores"], "pydvl": runs_p[-1]["scores"]},
                           args.out / f"scores-{wname}-{peer}.pt")
                lines.append(f"| {wname} | {name} vs {peer} | {to:.2f} | {tp:.2f} | "
                             f"{to / tp:.2f} | {mo:.0f} | {mp:.0f} | {ag['c']:.4g} | "
                             f"{ag['rel']:.2e} | {ag['spearman']:.4f} |")
            else:
                ref = exact_scores.get(wname)
                ag = (agreement(ref, runs_p[-1]["scores"]) if ref is not None else
                      {"c": float("nan"), "rel": float("nan"), "spearman": float("nan")})
                what = "refused (CurvatureError)" if refused.get(name) else "–"
                lines.append(f"| {wname} | {name} {what} vs {peer} (agreement: vs our exact) | "
                             f"| {tp:.2f} | | | {mp:.0f} | {ag['c']:.4g} | {ag['rel']:.2e} | "
                             f"{ag['spearman']:.4f} |")
            print(lines[-1], flush=True)
    head = ["| workload | pair | ours s | pyDVL s | ratio | ours MB | pyDVL MB | c | rel err | "
            "Spearman |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    text = "\n".join(head + lines)
    print(text)
    (args.out / "table.md").write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
