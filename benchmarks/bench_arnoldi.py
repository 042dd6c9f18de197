"""ABIF at scale: MNIST CNN, 4,000 training examples × 100 queries — the paper's Hessian
Arnoldi (``curvature="hessian"``; the default randomized GGN solver is measured by
bench_abif.py).

Measures, side by side in one run and with one thread for every method (this machine is shared;
two threads under contention are far noisier):
- one training epoch (the unit of the projection target);
- ABIF, default filter (horizon) and plain top-k: eigenbasis fit (Hessian streamed over all
  4,000 examples), train projections, 100 queries — wall time and peak memory of each stage;
- the projection method chosen (per-example gradients × basis vs rank forward-mode JVPs);
- GradDot (100 queries), LiSSA and CG (a few queries; per-query cost);
- Spearman rank correlation (mean over queries) with a full-batch reference: the same ABIF with
  every Arnoldi step on all 4,000 examples (cached under --out; ~20 min to compute once);
- the quality cost of streaming: eigenvalue errors and subspace overlap against the reference;
- with --compare-python PY: captum / pyDVL / dattri Arnoldi on the same workload, run by
  ``compare_arnoldi.py`` under that interpreter (see requirements-compare.txt).

    .venv/bin/python benchmarks/bench_arnoldi.py --stage reference   # once, in the background
    .venv/bin/python benchmarks/bench_arnoldi.py --compare-python /tmp/benchvenv/bin/python
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

import influencekit as ik
from influencekit import data as ikdata
from influencekit import models as ikmodels
from influencekit.groundtruth.metrics import mean_spearman
from influencekit.profiling import peak_memory

HERE = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- measurement
@contextlib.contextmanager
def measured(out: dict[str, float], key: str) -> Iterator[None]:
    """Wall time (``key``_s) and peak extra resident memory (``key``_mb) of the block."""
    t0 = time.perf_counter()
    with peak_memory() as mem:
        try:
            yield
        finally:
            out[f"{key}_s"] = time.perf_counter() - t0
    out[f"{key}_mb"] = mem["peak_mb"]


# --------------------------------------------------------------------------- workload
def workload(out: Path, n_train: int = 4000, n_queries: int = 100, epochs: int = 5,
             seed: int = 0) -> dict:
    """MNIST 4,000 train / 100 queries and a CNN trained on it (cached in ``out``)."""
    d = ikdata.load("mnist")
    (x, y), (xt, yt) = d.train, d.test
    train, queries = (x[:n_train], y[:n_train]), (xt[:n_queries], yt[:n_queries])
    model = ikmodels.build("cnn", seed=seed)
    path = out / f"cnn-e{epochs}-s{seed}.pt"
    epoch_s = []
    if path.exists():
        saved = torch.load(path)
        model.load_state_dict(saved["state"])
        epoch_s = saved["epoch_s"]
    else:
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            t0 = time.perf_counter()
            perm = torch.randperm(len(train[1]), generator=gen)
            for i in range(0, len(perm), 64):
                idx = perm[i:i + 64]
                opt.zero_grad()
                F.cross_entropy(model(train[0][idx]), train[1][idx]).backward()
                opt.step()
            epoch_s.append(time.perf_counter() - t0)
        torch.save({"state": model.state_dict(), "epoch_s": epoch_s}, path)
    model.eval()
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == yt).float().mean())
    return {"train": train, "queries": queries, "model": model, "epoch_s": epoch_s,
            "test_acc": acc, "model_path": str(path)}


def one_epoch_seconds(model: torch.nn.Module, train: tuple) -> float:
    """Time one training epoch (forward, backward, Adam step; batch 64) on a throwaway copy."""
    import copy

    m = copy.deepcopy(model).train()
    opt = torch.optim.Adam(m.parameters(), lr=1e-4)
    t0 = time.perf_counter()
    for i in range(0, len(train[1]), 64):
        opt.zero_grad()
        F.cross_entropy(m(train[0][i:i + 64]), train[1][i:i + 64]).backward()
        opt.step()
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- stages
def reference(w: dict, out: Path, rank: int, iterations: int) -> ik.ArnoldiInfluence:
    """Full-batch ABIF: every Arnoldi step on all 4,000 examples (stored; computed once)."""
    task = ik.ClassificationTask(w["model"])
    solver = ik.Eigensolver(which="magnitude", sampling="full", micro_batch_size=500)
    est = ik.ArnoldiInfluence(task, rank=rank, iterations=iterations, filter="topk",
                              curvature="hessian",
                              solver=solver, store=out / "reference-store", progress=True)
    return est.fit(w["train"])


def abif_stages(task: ik.Task, w: dict, row: dict, **kw) -> ik.ArnoldiInfluence:
    """``Estimator.fit`` split in its two stages (eigenbasis, stored train features), each
    timed alone, then the queries."""
    est = ik.ArnoldiInfluence(task, **kw)
    task.check_batch(tuple(t[:est.batch_size] for t in w["train"]))  # as fit() does
    est.train, est.n_train = w["train"], len(w["train"][1])
    with measured(row, "fit"):
        est._fit(w["train"])  # eigenbasis and filter weights
    with measured(row, "projection"):
        est._features = est._train_features(w["train"], stored=True)
    with measured(row, "query"):
        row["scores"] = est.scores(w["queries"])
    row["projection_method"] = est.projection_method
    row["projection_timings"] = est.projection_timings
    row["info"] = {k: v for k, v in est.eigen.info.items() if k != "ritz_values"}
    return est


def overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared cosine between two subspaces (1 = identical)."""
    a, b = a.double(), b.double()
    return float((a @ b.T).pow(2).sum() / min(a.shape[0], b.shape[0]))


def restricted_scores(ref: ik.ArnoldiInfluence, idx: torch.Tensor, filt: str, w: dict,
                      base: dict) -> torch.Tensor:
    """Scores from the reference's eigenpairs ``idx`` under the filter ``filt`` (the stored
    projections reused; a filter with a complement streams the training gradients)."""
    from influencekit.curvature import Eigenpairs
    from influencekit.estimators.features import TrainFeatures

    est = ik.ArnoldiInfluence(ref.task, filter=filt, **base)
    est.eigen = Eigenpairs(ref.eigen.values[idx], ref.eigen.vectors[idx])
    est._weights = est.filter.weights(est.eigen.values, est.damping)
    est._features = TrainFeatures(chunks=[{"G": ref.train_projections()[:, idx]}])
    est.train, est.n_train = w["train"], len(w["train"][1])
    est.projection_method = ref.projection_method
    return est.scores(w["queries"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=["reference", "main"], default="main")
    ap.add_argument("--out", type=Path, default=HERE / "out" / "arnoldi")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--n-queries", type=int, default=100)
    ap.add_argument("--rank", type=int, default=50)
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--lissa-queries", type=int, default=5)
    ap.add_argument("--lissa-depth", type=int, default=100)
    ap.add_argument("--cg-queries", type=int, default=1)
    ap.add_argument("--cg-iterations", type=int, default=5)
    ap.add_argument("--compare-python", default=None,
                    help="interpreter with captum / pydvl / dattri (compare_arnoldi.py)")
    ap.add_argument("--compare-timeout", type=int, default=300)
    ap.add_argument("--compare-hessian", type=int, default=1000,
                    help="examples other libraries' Arnoldi sees per Hessian product")
    ap.add_argument("--sweep", default="64",
                    help="extra Eigensolver(batch=...) values (examples per Arnoldi step) "
                    "for the default filter (quality/time)")
    ap.add_argument("--skip", default="", help="comma list: lissa,cg,graddot,topk,sweep")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))

    w = workload(args.out, args.n_train, args.n_queries)
    task = ik.ClassificationTask(w["model"])
    print(f"workload: MNIST {args.n_train} train × {args.n_queries} queries, "
          f"CNN P={task.num_params}, "
          f"test acc {w['test_acc']:.3f}, threads {args.threads}", flush=True)
    if args.stage == "reference":
        t0 = time.perf_counter()
        reference(w, args.out, args.iterations, args.iterations)
        print(f"reference eigenbasis ready in {time.perf_counter() - t0:.0f} s")
        return

    res: dict = {"P": task.num_params, "threads": args.threads, "test_acc": w["test_acc"],
                 "rows": {}}
    rows = res["rows"]
    res["epoch_s"] = one_epoch_seconds(w["model"], w["train"])
    print(f"one training epoch: {res['epoch_s']:.2f} s", flush=True)

    # ABIF: default filter (horizon) and the paper's top-k, both streamed
    base = dict(rank=args.rank, iterations=args.iterations, curvature="hessian")
    rows["abif"] = {}
    est = abif_stages(task, w, rows["abif"], **base)
    print("abif", {k: v for k, v in rows["abif"].items() if k != "scores"}, flush=True)
    if "topk" not in skip:
        rows["abif-topk"] = {}
        top = abif_stages(task, w, rows["abif-topk"], filter="topk", **base)
        print("abif-topk", {k: v for k, v in rows["abif-topk"].items() if k != "scores"},
              flush=True)

    for b in filter(None, args.sweep.split(",")):
        rows[f"abif-hb{b}"] = {"batch": int(b)}
        abif_stages(task, w, rows[f"abif-hb{b}"], solver=ik.Eigensolver(batch=int(b)), **base)

    # reference (full-batch ABIF, all Ritz pairs), from the cache
    ref_ref: dict[str, torch.Tensor] = {}
    if (args.out / "reference-store" / "arnoldi-eigenbasis" / "manifest.json").exists():
        ref = reference(w, args.out, args.iterations, args.iterations)
        vals = ref.eigen.values
        mag = vals.abs().argsort(descending=True)[:args.rank]
        pos = vals.argsort(descending=True)[:args.rank]
        pos = pos[vals[pos] > 0]
        ref_ref["abif"] = restricted_scores(ref, pos, "horizon", w, base)
        ref_ref["abif-topk"] = restricted_scores(ref, mag, "topk", w, base)
        res["reference"] = {"top_eigenvalues": vals[mag[:10]].tolist(),
                            "examples_seen": ref.eigen.info.get("examples_seen")}
        sq = res["stream_quality"] = {
            "horizon_top10_eig_rel_err": ((est.eigen.values[:10] - vals[pos[:10]]).abs()
                                          / vals[pos[:10]].abs()).tolist(),
            "horizon_subspace_overlap": overlap(est.eigen.vectors, ref.eigen.vectors[pos]),
        }
        if "topk" not in skip:
            sq["topk_subspace_overlap"] = overlap(top.eigen.vectors, ref.eigen.vectors[mag])
    else:
        print("no reference cached: run --stage reference first", flush=True)

    # GradDot, LiSSA, CG
    if "graddot" not in skip:
        rows["graddot"] = {}
        with measured(rows["graddot"], "query"):
            rows["graddot"]["scores"] = ik.GradDot(task).scores(w["queries"], w["train"])
    lam_max = float(est.eigen.values.abs().max())
    damping = 0.01 * lam_max
    res["damping_lissa_cg"] = damping
    if "lissa" not in skip:
        rows["lissa"] = {"n_queries": args.lissa_queries, "depth": args.lissa_depth}
        # scale from the Arnoldi eigenvalue; the damping is 1% of |λ|max, so H + λI may be
        # indefinite on this CNN: the fit-time definiteness check (two power iterations of 30
        # full-batch products) is skipped, as before it existed.
        lissa = ik.LiSSAInfluence(task, damping=damping, depth=args.lissa_depth,
                                  scale=1.5 * (lam_max + damping), curvature_batch=64,
                                  check_definite=False)
        q = (w["queries"][0][:args.lissa_queries], w["queries"][1][:args.lissa_queries])
        with measured(rows["lissa"], "fit"):
            lissa.fit(w["train"])
        with measured(rows["lissa"], "query"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rows["lissa"]["scores"] = lissa.scores(q)
    if "cg" not in skip:
        rows["cg"] = {"n_queries": args.cg_queries, "iterations": args.cg_iterations,
                      "curvature": "ggn"}
        cg = ik.CGInfluence(task, damping=damping, curvature="ggn",
                            max_iter=args.cg_iterations, micro_batch_size=500)
        q = (w["queries"][0][:args.cg_queries], w["queries"][1][:args.cg_queries])
        cg.fit(w["train"])
        with measured(rows["cg"], "query"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rows["cg"]["scores"] = cg.scores(q)

    # other libraries
    if args.compare_python:
        torch.save({"train": w["train"], "queries": w["queries"]}, args.out / "workload.pt")
        for lib in ("captum", "pydvl", "dattri"):
            rows[lib] = run_other(args, lib, w)

    # correlations with the reference
    for name, row in rows.items():
        s = row.get("scores")
        if s is None or not ref_ref:
            continue
        r = ref_ref.get(name.split("-hb")[0], ref_ref["abif"])
        row["spearman_ref"] = mean_spearman(s.double(), r[:s.shape[0]].double())
        if name not in ("abif", "abif-topk"):
            row["spearman_ref_topk"] = mean_spearman(s.double(), ref_ref["abif-topk"][
                :s.shape[0]].double())
    report(res, args)


def run_other(args: argparse.Namespace, lib: str, w: dict) -> dict:
    cmd = [args.compare_python, str(HERE / "compare_arnoldi.py"), lib, "--model",
           w["model_path"], "--workload", str(args.out / "workload.pt"), "--out",
           str(args.out / f"{lib}.pt"), "--rank", str(args.rank), "--iterations",
           str(args.iterations), "--hessian", str(args.compare_hessian), "--threads",
           str(args.threads)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.compare_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {args.compare_timeout} s",
                "total_s": time.perf_counter() - t0}
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines()
                 if "Error" in ln or "error" in ln] or ["(no error message)"]
        return {"error": f"exit {proc.returncode}: {lines[-1].strip()[:200]}",
                "total_s": time.perf_counter() - t0}
    got = torch.load(args.out / f"{lib}.pt")
    return {"scores": got["scores"], "total_s": got["total_s"], "total_mb": got["peak_mb"],
            "hessian_examples": args.compare_hessian}


def report(res: dict, args: argparse.Namespace) -> None:
    rows = res["rows"]
    lines = [f"MNIST CNN (P={res['P']}), {args.n_train} train × {args.n_queries} queries, "
             f"{res['threads']} thread(s); "
             f"one training epoch {res['epoch_s']:.2f} s", "",
             "| method | queries | fit s | projection s | query s | per-query s | peak MB | "
             "Spearman vs ref | notes |", "|---|---|---|---|---|---|---|---|---|"]
    abif_total = sum(rows["abif"].get(k, 0.0) for k in ("fit_s", "projection_s", "query_s"))
    for name, r in rows.items():
        nq = r.get("n_queries", args.n_queries)
        if "error" in r:
            lines.append(f"| {name} | {nq} | | | | | | | {r['error']} |")
            continue
        q = r.get("query_s", r.get("total_s", float("nan")))
        peak = max(r.get(k, 0.0) for k in ("fit_mb", "projection_mb", "query_mb", "total_mb"))
        note = ""
        if name.startswith("abif"):
            note = (f"projection by {r['projection_method']}; Hessian "
                    f"{r['info']['batch']}/iteration")
        elif "total_s" in r:
            note = (f"total {r['total_s']:.1f} s = {r['total_s'] / abif_total:.1f}× ABIF "
                    f"pipeline; Hessian on {r['hessian_examples']}")
        elif name == "lissa":
            note = f"depth {r['depth']}, batch 64"
        elif name == "cg":
            note = f"{r['iterations']} iterations, GGN"
        sp = r.get("spearman_ref", float("nan"))
        lines.append(
            f"| {name} | {nq} | {r.get('fit_s', float('nan')):.1f} | "
            f"{r.get('projection_s', float('nan')):.1f} | {q:.1f} | {q / nq:.3g} | "
            f"{peak:.0f} | {sp:.3f} | {note} |")
    a = rows["abif"]
    lines += ["", f"ABIF pipeline (fit + projection + {args.n_queries} queries): "
              f"{abif_total:.1f} s; "
              f"projection = {a['projection_s'] / res['epoch_s']:.2f} training epochs"]
    if "lissa" in rows and "query_s" in rows["lissa"]:
        lissa_q = rows["lissa"]["query_s"] / rows["lissa"]["n_queries"]
        line = f"per-query cost: LiSSA / ABIF = {lissa_q / (a['query_s'] / args.n_queries):.0f}×"
        if "abif-topk" in rows:
            t = rows["abif-topk"]["query_s"] / args.n_queries
            line += f" (default, complement streamed); LiSSA / ABIF-topk = {lissa_q / t:.0f}×"
        lines.append(line)
    if a.get("projection_timings"):
        t = a["projection_timings"]
        lines.append("projection method timing on one batch: " + ", ".join(
            f"{k} {v:.3f} s" for k, v in t.items()))
    if "stream_quality" in res:
        sq = res["stream_quality"]
        lines.append(f"streamed vs full-batch Hessian: subspace overlap {json.dumps(sq)}")
    text = "\n".join(lines)
    print(text)
    (args.out / "table.md").write_text(text + "\n")
    slim = {k: v for k, v in res.items() if k != "rows"}
    slim["rows"] = {n: {k: v for k, v in r.items() if k != "scores"} for n, r in rows.items()}
    (args.out / "results.json").write_text(json.dumps(slim, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
