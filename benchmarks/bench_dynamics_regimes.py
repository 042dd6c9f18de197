"""Regime map of training dynamics on the digits MLP (issue 11).

For every regime — start checkpoint (early: 2 epochs; converged: 30 epochs, cosine), continued
training optimizer and learning rate (SGD with momentum at 0.005 / 0.02 / 0.1; Adam at 1e-3) —
runs ``influencekit dynamics --quick`` (400 training examples, 16 removed, 30 queries, 2
data-order controls) and tabulates:

- the growth rate of log‖Δθ‖ per step for the twins and the control (95% bootstrap CI), and the
  rate over the first and the second half of the run (exponential growth: equal halves);
- ‖Δθ‖ of the twins relative to the control at the end;
- the influence horizon (Spearman of predicted vs actual Δ loss over (example, query) pairs
  falls below ``--threshold`` after reaching it; inf: never falls; 0: never reaches it) and the
  Spearman at the first / best / last recorded step, per estimator;
- the effect-magnitude ratio mean|actual| / mean|predicted| (exact influence at θ_s) at the
  first and last step.

    python benchmarks/bench_dynamics_regimes.py --threads 1      # ≈ 3–6 min on 2 loaded cores

Writes benchmarks/out/dynamics-regimes/{REGIME}/ (results.json, plots) and regimes.md.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from influencekit.cli import main as cli
from influencekit.dynamics import log_slope

SGD_METHODS = "exact,arnoldi,arnoldi-topk,graddot,unrolled,same-time"
ADAM_METHODS = "exact,arnoldi,arnoldi-topk,graddot"
REGIMES = [  # name, start epochs, optimizer, lr
    ("early/sgd/0.005", 2, "sgd", 0.005),
    ("early/sgd/0.02", 2, "sgd", 0.02),
    ("early/sgd/0.1", 2, "sgd", 0.1),
    ("early/adam/1e-3", 2, "adam", 1e-3),
    ("conv/sgd/0.005", 30, "sgd", 0.005),
    ("conv/sgd/0.02", 30, "sgd", 0.02),
    ("conv/sgd/0.1", 30, "sgd", 0.1),
    ("conv/adam/1e-3", 30, "adam", 1e-3),
]


def fmt(x: float, spec: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    return format(x, spec)


def summarise(name: str, r: dict, threshold: float) -> dict:
    tw = r["twins"]
    steps = np.array(tw["steps"], dtype=float)
    div = np.array(tw["divergence"])
    ctrl = np.array(tw["control_divergence"])
    mid = steps[len(steps) // 2]
    first = log_slope(steps, div, stop=mid).rate
    second = log_slope(steps, div, start=mid).rate
    g = r["growth_rate"]
    exact = r["fading"]["exact"]
    row = {
        "regime": name, "acc": r["start_accuracy"]["test"], "steps": int(steps[-1]),
        "twin_rate": g["twins"], "control_rate": g["control"], "rate_halves": (first, second),
        "div_end": float(np.median(div[-1])), "ctrl_end": float(np.median(ctrl[-1])),
        "mag_ratio": (exact["actual_magnitude"][0] / exact["predicted_magnitude"],
                      exact["actual_magnitude"][-1] / exact["predicted_magnitude"]),
        "horizon": r["horizon"],
        "spearman": {k: (c["spearman"][0], float(np.nanmax(c["spearman"])),
                         int(steps[int(np.nanargmax(c["spearman"]))]), c["spearman"][-1])
                     for k, c in r["fading"].items()},
        "seconds": r["seconds"]["total"],
    }
    return row


def table(rows: list[dict], threshold: float) -> str:
    out = ["| regime | test acc θ_s | steps | twin rate /step [95% CI] | control rate [95% CI] | "
           "twin rate 1st / 2nd half | median ‖Δθ‖ end: twin / control | "
           "|actual|/|pred| (exact) first → last | s |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t, c = r["twin_rate"], r["control_rate"]
        out.append(
            f"| {r['regime']} | {r['acc']:.3f} | {r['steps']} | {t['rate']:.2e} "
            f"[{t['low']:.2e}, {t['high']:.2e}] | {c['rate']:.2e} [{c['low']:.2e}, "
            f"{c['high']:.2e}] | {r['rate_halves'][0]:.2e} / {r['rate_halves'][1]:.2e} | "
            f"{r['div_end']:.1e} / {r['ctrl_end']:.1e} | {r['mag_ratio'][0]:.2f} → "
            f"{r['mag_ratio'][1]:.2f} | {r['seconds']:.0f} |")
    methods = list(dict.fromkeys(k for r in rows for k in r["horizon"]))
    out += ["", f"Influence horizon (first step where the pooled Spearman falls below "
            f"{threshold:g} after reaching it; ∞ never falls, 0 never reaches it), and Spearman "
            "first step / max (at step) / last step:", "",
            "| regime | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for r in rows:
        cells = []
        for m in methods:
            if m not in r["horizon"]:
                cells.append("n/a")
                continue
            s0, smax, at, s1 = r["spearman"][m]
            cells.append(f"**{fmt(r['horizon'][m], 'g')}**: {s0:.2f} / {smax:.2f} ({at}) / "
                         f"{s1:.2f}")
        out.append(f"| {r['regime']} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--epochs", type=int, default=16, help="continued epochs (13 steps each)")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--out", default="benchmarks/out/dynamics-regimes")
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "influencekit"))
    args = p.parse_args()
    rows = []
    t0 = time.perf_counter()
    for name, start_epochs, opt, lr in REGIMES:
        out = Path(args.out) / name.replace("/", "-")
        argv = ["dynamics", "--dataset", "digits", "--model", "mlp", "--quick",
                "--start-epochs", str(start_epochs), "--epochs", str(args.epochs),
                "--optimizer", opt, "--lr", str(lr), "--threshold", str(args.threshold),
                "--methods", SGD_METHODS if opt == "sgd" else ADAM_METHODS,
                "--threads", str(args.threads), "--no-progress", "--out", str(out),
                "--cache-dir", args.cache_dir]
        if cli(argv) != 0:
            raise SystemExit(f"regime {name} failed")
        rows.append(summarise(name, json.loads((out / "results.json").read_text()),
                              args.threshold))
    text = table(rows, args.threshold)
    text += f"\n\nTotal {time.perf_counter() - t0:.0f} s, {args.threads} thread(s).\n"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "regimes.md").write_text(text)
    (Path(args.out) / "regimes.json").write_text(json.dumps(rows, default=str, indent=1))
    print(text)


if __name__ == "__main__":
    main()
