"""Before/after timing of two checkouts of influencekit, side by side in one run.

Runs the same benchmark stages under an old and a new source tree in alternation (old, new,
old, new, ...: pairing keeps each ratio meaningful when the machine's speed drifts), each run a
fresh process with one torch thread, and reports per stage the median time of each side and the
new/old ratio taken pair by pair (median, min–max over the pairs).

Stages: ``bench_arnoldi.py`` (ABIF default and top-k: fit, projection, 100 queries; GradDot;
LiSSA and CG on a few queries; the training-epoch time, which exercises plain torch only and
so is the noise control) and ``bench_exact.py`` (ExactInfluence on the digits MLP). Each side
runs the benchmark script written for its own API (``--old-bench``: the old checkout's
benchmarks folder) on the same cached CNN (trained once, copied to both sides).

    git worktree add /tmp/old <old-commit>
    .venv/bin/python benchmarks/before_after.py --old-src /tmp/old/src \\
        --old-bench /tmp/old/benchmarks --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NEW_SRC = HERE.parent / "src"

ARNOLDI_STAGES = [("abif", "fit_s"), ("abif", "projection_s"), ("abif", "query_s"),
                  ("abif-topk", "fit_s"), ("abif-topk", "projection_s"),
                  ("abif-topk", "query_s"), ("graddot", "query_s"), ("lissa", "query_s"),
                  ("cg", "query_s")]


def run(cmd: list[str], src: Path, log: Path) -> float:
    """Run ``cmd`` with ``src`` first on PYTHONPATH; whole-process wall seconds."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    with log.open("a") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {log}")
    return wall


def one_side(side: str, src: Path, bench: Path, out: Path, args: argparse.Namespace) -> dict:
    d = out / side
    py = sys.executable
    t = {}
    t["bench_arnoldi wall"] = run(
        [py, str(bench / "bench_arnoldi.py"), "--out", str(d), "--threads", "1", "--sweep", "",
         "--lissa-queries", str(args.lissa_queries), "--cg-queries", str(args.cg_queries)],
        src, out / f"{side}.log")
    res = json.loads((d / "results.json").read_text())
    t["training epoch (control)"] = res["epoch_s"]
    for row, key in ARNOLDI_STAGES:
        t[f"{row} {key[:-2]}"] = res["rows"][row][key]
    t["abif pipeline"] = sum(res["rows"]["abif"][k] for k in ("fit_s", "projection_s",
                                                               "query_s"))
    t["abif-topk pipeline"] = sum(res["rows"]["abif-topk"][k]
                                  for k in ("fit_s", "projection_s", "query_s"))
    ex = out / f"{side}-exact.json"
    t["bench_exact wall"] = run(
        [py, str(HERE / "bench_exact.py"), "--threads", "1", "--json", str(ex)],
        src, out / f"{side}.log")
    e = json.loads(ex.read_text())
    t["exact fit"], t["exact query"] = e["fit_s"], e["query_s"]
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old-src", type=Path, required=True)
    ap.add_argument("--old-bench", type=Path, required=True,
                    help="the old checkout's benchmarks/ (scripts for the old API)")
    ap.add_argument("--runs", type=int, default=3, help="pairs (old, new)")
    ap.add_argument("--out", type=Path, default=HERE / "out" / "before-after")
    ap.add_argument("--lissa-queries", type=int, default=5)
    ap.add_argument("--cg-queries", type=int, default=1)
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "new").mkdir(exist_ok=True)
    (out / "old").mkdir(exist_ok=True)

    # one trained CNN for both sides (bench_arnoldi caches it under its --out)
    sys.path.insert(0, str(HERE))
    from bench_arnoldi import workload
    workload(out / "new")
    for f in (out / "new").glob("cnn-*.pt"):
        shutil.copy(f, out / "old" / f.name)

    sides = {"old": (args.old_src, args.old_bench), "new": (NEW_SRC, HERE)}
    runs: list[dict[str, dict]] = []
    for i in range(args.runs):
        pair = {}
        for side in ("old", "new"):
            pair[side] = one_side(side, *sides[side], out, args)
            print(f"run {i + 1} {side}: " + ", ".join(f"{k} {v:.2f}"
                                                      for k, v in pair[side].items()),
                  flush=True)
        runs.append(pair)
        (out / "runs.json").write_text(json.dumps(runs, indent=1))

    lines = [f"{args.runs} pairs (old, new), alternating, 1 thread; seconds", "",
             "| stage | old median | new median | new/old median | new/old min–max |",
             "|---|---:|---:|---:|---:|"]
    for k in runs[0]["old"]:
        old = [r["old"][k] for r in runs]
        new = [r["new"][k] for r in runs]
        ratio = [n / o for n, o in zip(new, old, strict=True)]
        lines.append(f"| {k} | {statistics.median(old):.2f} | {statistics.median(new):.2f} | "
                     f"{statistics.median(ratio):.3f} | {min(ratio):.3f}–{max(ratio):.3f} |")
    text = "\n".join(lines)
    print(text)
    (out / "table.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
