"""Per-example gradients on the MNIST CNN workload (4,000 train × 100 queries, 105,866
parameters): this tree against a baseline revision, side by side in one process.

The baseline (default: the merge base with ``main``) is extracted with ``git archive`` into a
temporary folder and imported as ``influencekit_base``, so both versions run on the same model,
data and thread, interleaved (``--repeats`` rounds; medians). Rows:

- one training epoch (forward, backward, Adam; batch 64), the unit of the projection goal;
- per-example gradients of all 4,000 examples (batch 64), also with this tree's layer path
  switched off (``vmap``: what the other fixes alone give);
- projection of the training set onto 50 orthonormal directions (``ArnoldiInfluence``'s
  feature pass: ``G Eᵀ`` and squared norms), in epochs;
- ``GradDot`` scores of 100 queries against 4,000 examples, with peak memory;
- ``CGInfluence`` (GGN, 10 CG iterations, 2 queries) — its time is Hessian-vector products;
- with ``--compare-python PY`` (an interpreter with captum): captum's ``TracInCP`` on the same
  model and data (``compare_tracin.py``; same scores as ``GradDot``);
- with ``--abif``: ``ArnoldiInfluence(task)`` end to end (eigenbasis, projection, queries), once.

    .venv/bin/python benchmarks/bench_per_example.py --out benchmarks/out/arnoldi \\
        --compare-python /tmp/cmpvenv/bin/python
"""

from __future__ import annotations

import argparse
import importlib
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import influencekit as ik
from influencekit.profiling import peak_memory

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_arnoldi import one_epoch_seconds, workload  # noqa: E402


def import_baseline(rev: str, where: Path):
    """``src/influencekit`` at ``rev`` as the package ``influencekit_base``."""
    blob = subprocess.run(["git", "archive", rev, "src/influencekit"], cwd=HERE.parent,
                          check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(where, filter="data")
    (where / "src" / "influencekit").rename(where / "influencekit_base")
    sys.path.insert(0, str(where))
    return importlib.import_module("influencekit_base")


def timed(fn: Callable[[], object]) -> tuple[float, float, object]:
    with peak_memory() as mem:
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
    return dt, mem["peak_mb"], out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "out" / "arnoldi",
                    help="folder of the cached CNN (bench_arnoldi.py's)")
    ap.add_argument("--baseline", default=None, help="git revision (default: merge base with "
                    "main)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rank", type=int, default=50)
    ap.add_argument("--skip", default="", help="comma list of rows to skip: epoch,grads,"
                    "grads_vmap,projection,graddot,cg")
    ap.add_argument("--compare-python", default=None)
    ap.add_argument("--abif", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    skip = set(filter(None, args.skip.split(",")))

    rev = args.baseline or subprocess.run(["git", "merge-base", "HEAD", "main"], cwd=HERE.parent,
                                          check=True, capture_output=True,
                                          text=True).stdout.strip()
    tmp = Path(tempfile.mkdtemp(prefix="ikbase-"))
    ikb = import_baseline(rev, tmp)
    w = workload(args.out)
    model, train, queries = w["model"], w["train"], w["queries"]
    n = len(train[1])
    new_task, old_task = ik.ClassificationTask(model), ikb.ClassificationTask(model)
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(new_task.num_params, args.rank, generator=gen,
                                        dtype=torch.float64)).Q.T.contiguous()

    def grads(pkg, task):
        def run():
            buf = pkg.autodiff.grad_buffer(task, 64) if pkg is ik else None
            kw = {"out": buf} if pkg is ik else {}
            for i in range(0, n, 64):
                pkg.autodiff.per_example_grads(task, (train[0][i:i + 64], train[1][i:i + 64]),
                                               **kw)
        return run

    def projection(pkg, task):
        def run():
            est = pkg.ArnoldiInfluence(task, rank=args.rank, filter="topk")
            est.eigen = pkg.curvature.Eigenpairs(torch.ones(args.rank), basis)
            est._weights = (torch.ones(args.rank, dtype=torch.float64), 0.0)
            feats = est._train_features(train, stored=False)
            getattr(est, "_drop_scratch", lambda: None)()
            return feats.cat("G")
        return run

    def graddot(pkg, task):
        return lambda: pkg.GradDot(task).scores(queries, train)

    def cg(pkg, task):
        return lambda: pkg.CGInfluence(task, damping=1e-2, curvature="ggn", max_iter=10).fit(
            train).scores((queries[0][:2], queries[1][:2]), train)

    vmap_task = ik.ClassificationTask(model)
    vmap_task._layerwise_off = True  # this tree's vmap path, for the split of the gain

    def grads_vmap(pkg, task):
        return grads(pkg, vmap_task if pkg is ik else task)

    rows = {"grads": grads, "grads_vmap": grads_vmap, "projection": projection,
            "graddot": graddot, "cg": cg}
    rows = {k: v for k, v in rows.items() if k not in skip}
    times: dict[str, list[float]] = {"epoch": []}
    peaks: dict[str, list[float]] = {}
    agree: dict[str, float] = {}
    epochs: dict[str, list[float]] = {}  # new time / the epoch timed just before it
    for r in range(args.repeats):
        for name, make in rows.items():
            outs = {}
            for label, pkg, task in (("old", ikb, old_task), ("new", ik, new_task)):
                if r % 2:  # alternate the order
                    label, pkg, task = ("new", ik, new_task) if label == "old" else \
                        ("old", ikb, old_task)
                if label == "new" and "epoch" not in skip:  # the unit, timed alongside
                    times["epoch"].append(one_epoch_seconds(model, train))
                dt, mb, out = timed(make(pkg, task))
                if label == "new" and "epoch" not in skip:
                    epochs.setdefault(name, []).append(dt / times["epoch"][-1])
                times.setdefault(f"{name} {label}", []).append(dt)
                peaks.setdefault(f"{name} {label}", []).append(mb)
                outs[label] = out
            if r == 0 and isinstance(outs["old"], torch.Tensor):
                a, b = outs["new"].double(), outs["old"].double()
                agree[name] = float((a - b).norm() / b.norm())
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in times.items()
                                             if v), flush=True)

    med = {k: statistics.median(v) for k, v in times.items() if v}
    epoch = med.get("epoch", float("nan"))
    print(f"\nMNIST CNN, {n} train × {len(queries[1])} queries, P = {new_task.num_params:,}, "
          f"1 thread, medians of {args.repeats} interleaved rounds; baseline {rev[:10]}\n")
    print("| work | old s | new s | old/new | new in epochs* | new peak MB | rel. diff |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| one training epoch (median of {len(times['epoch'])}) | | {epoch:.2f} | | 1.00 | | |")
    labels = {"grads": f"per-example gradients, {n} examples",
              "grads_vmap": "same, new tree with the layer path off (vmap)",
              "projection": f"projection onto {args.rank} directions",
              "graddot": f"GradDot, {len(queries[1])} queries",
              "cg": "CGInfluence (GGN), 10 iterations, 2 queries"}
    for name in rows:
        o, nw = med[f"{name} old"], med[f"{name} new"]
        pk = statistics.median(peaks[f"{name} new"])
        ep = statistics.median(epochs[name]) if name in epochs else nw / epoch
        print(f"| {labels[name]} | {o:.2f} | {nw:.2f} | {o / nw:.2f} | {ep:.2f} | "
              f"{pk:.0f} | {agree.get(name, float('nan')):.1e} |")
    print("\n*median over rounds of the new time / an epoch timed just before it")
    if "graddot" in rows:
        print(f"GradDot peak MB: old {statistics.median(peaks['graddot old']):.0f}, new "
              f"{statistics.median(peaks['graddot new']):.0f}")

    if args.compare_python:
        wl = tmp / "workload.pt"
        torch.save({"train": train, "queries": queries}, wl)
        res = tmp / "tracin.pt"
        subprocess.run([args.compare_python, str(HERE / "compare_tracin.py"), "--model",
                        w["model_path"], "--workload", str(wl), "--out", str(res), "--repeats",
                        str(args.repeats)], check=True)
        got = torch.load(res)
        cap = statistics.median(got["times"])
        dt, mb, ours = timed(graddot(ik, new_task))
        rel = float((ours.double() - got["scores"].double()).norm() / ours.double().norm())
        print(f"\ncaptum TracInCP: {cap:.2f} s (median of {len(got['times'])}), peak "
              f"{got['peak_mb']:.0f} MB; GradDot new right after: {dt:.2f} s, {mb:.0f} MB "
              f"(captum/new {cap / dt:.2f}×); scores rel. diff {rel:.1e}")

    if args.abif:
        print("\nArnoldiInfluence(task) end to end (one run each):")
        print("| version | eigenbasis s | projection s | queries s | total s | peak MB | "
              "epoch s (just before) |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        scores: dict[str, torch.Tensor] = {}
        for label, pkg, task in (("old", ikb, old_task), ("new", ik, new_task)):
            ep = one_epoch_seconds(model, train)
            est = pkg.ArnoldiInfluence(task)
            task.check_batch(tuple(t[:est.batch_size] for t in train))
            est.train, est.n_train = train, n
            with peak_memory() as mem:
                t0 = time.perf_counter()
                est._fit(train)
                t1 = time.perf_counter()
                est._features = est._train_features(train, stored=False)
                getattr(est, "_drop_scratch", lambda: None)()
                t2 = time.perf_counter()
                scores[label] = est.scores(queries).double()
                t3 = time.perf_counter()
            print(f"| {label} | {t1 - t0:.1f} | {t2 - t1:.1f} | {t3 - t2:.1f} | {t3 - t0:.1f} | "
                  f"{mem['peak_mb']:.0f} | {ep:.2f} |", flush=True)

        from influencekit.groundtruth.metrics import mean_spearman
        a, b = scores["new"], scores["old"]
        print(f"scores new vs old: rel. diff {float((a - b).norm() / b.norm()):.1e}, mean "
              f"Spearman per query {mean_spearman(a, b):.4f}")


if __name__ == "__main__":
    main()
