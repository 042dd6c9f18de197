"""Assumptions 3, 4 and 5, from short continued runs of the fitted model (twin runs).

The *response* measured is what the paper says influence functions predict: the change of each
query's measurement after a short continued training run ``config`` from the fitted point, with
one training example removed or up-weighted, or a group removed (deterministic runs that share
data order; :func:`~influencekit.dynamics.twin_runs`).

- **trajectory** (3): at the end of the run, the correlation of the actual change with the
  prediction of influence at the fitted point (ABIF, plain inverse and finite-horizon filter),
  of TracIn's same-time sum over the run and of the exact unrolled first-order effect of the run
  (where it is affordable). A large gap says when an example is seen matters.
- **divergence** (4): the growth rate of ``log ‖θ_B − θ_A‖`` for the twins against a control pair
  that differs only in data order, and the fading curve of the prediction at the fitted point:
  the influence horizon (first step where its Spearman correlation, having reached 0.5, drops
  below it), turned into advice.
- **linearity** (5): the actual change per unit weight for up-weights ``Δw`` (``ε = Δw / N``)
  against the removal of the same examples (``Δw = −1``): linear when the ratio stays near 1;
  group removals of growing size against the sum of their members' actual effects (random
  groups: pure additivity) and against the summed predictions (top-influence groups, relative
  to the prediction's calibration on single removals of the most influential examples).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..batching import Batch, batch_size_of
from ..curvature.spectral import HorizonFilter, InverseFilter, SpectralFilter
from ..dynamics import TwinRuns, fading_curve, growth_rate, trajectory_influence, twin_runs
from ..dynamics.twins import record_steps
from ..dynamics.unrolled import _check_unrollable, bind_task
from ..errors import InputError
from ..groundtruth import Cache
from ..groundtruth.metrics import as_numpy, pearson, spearman
from ..groundtruth.retrain import measure
from ..store import data_fingerprint, hash_value, model_fingerprint
from ..training import TrainConfig, train
from .curvature import CurvatureProbe
from .verdicts import Section, grade, skipped

UNROLL_BUDGET = 2e9  # tangents × steps × batch × parameters affordable by default
LINEAR_TOLERANCE = 0.25  # |per-unit ratio − 1| still called linear / additive


def slope(actual: np.ndarray, predicted: np.ndarray) -> float:
    """Least-squares slope through the origin of ``actual`` on ``predicted``."""
    den = float((predicted * predicted).sum())
    return float((actual * predicted).sum() / den) if den > 0 else math.nan


@dataclass
class ContinuedRuns:
    """What sections 3–5 share: the continued run and its single-removal twins."""

    task: object
    train: Batch
    queries: Batch
    config: TrainConfig
    removed: list[int]  # training indices removed one at a time
    columns: list[int]  # their positions in the probe's pool
    twins: TwinRuns
    store: str | None
    progress: bool | None

    @property
    def n(self) -> int:
        return self.twins.n_train

    @property
    def record_steps(self) -> list[int]:
        """The recorded steps: other twin runs use them too, so they share the reference."""
        return [int(s) for s in self.twins.steps]

    def actual(self) -> np.ndarray:
        """``[P, Q]`` measured change at the end of the run for each single removal."""
        return as_numpy(self.twins.effect[-1])

    def group_effect(self, group: Sequence[int]) -> np.ndarray:
        """``[Q]`` change at the end of the run when ``group`` is removed (cached)."""
        task = self.task
        funcs = (task.loss_fn, task.forward_fn, task.measurement_fn, task.eval_mode)
        key = hash_value(model_fingerprint(task.model), data_fingerprint(self.train),
                         asdict(self.config), self.queries, funcs, sorted(int(i) for i in group))

        def run() -> torch.Tensor:
            net: nn.Module = train(task.model, self.train, self.config, remove=list(group),
                                   task=task, progress=False).model
            return measure(bind_task(task, net), self.queries)

        cache = Cache(None if self.store is None else Path(self.store) / "groups")
        m = cache.get_or_compute("measurements", key, run)
        return as_numpy(m) - as_numpy(self.twins.measure_ref[-1])


def continued_runs(task: object, train: Batch, queries: Batch, config: TrainConfig,
                   probe: CurvatureProbe, n_removed: int, *, record_every: int | None = None,
                   store: str | None = None, progress: bool | None = None) -> ContinuedRuns:
    """The reference continued run, ``n_removed`` single-removal twins (the first pool
    examples) and one data-order control."""
    n = batch_size_of(tuple(train))
    total = config.epochs * -(-n // config.batch_size)
    every = record_every or max(1, total // 16)
    columns = list(range(min(n_removed, len(probe.pool))))
    removed = [int(probe.pool[c]) for c in columns]
    twins = twin_runs(task.model, train, config, queries, remove=removed,
                      record_every=record_steps(total, every), control_seeds=(config.seed + 1,),
                      task=task, store=store, progress=progress)
    return ContinuedRuns(task, tuple(train), tuple(queries), config, removed, columns, twins,
                         store, progress)


def _horizon_lr(config: TrainConfig) -> float | None:
    if config.optimizer != "sgd":
        return None  # Adam: no single learning rate; 1/λ_max
    return config.lr / max(1e-12, 1.0 - config.momentum)


def _static_filters(runs: ContinuedRuns) -> list[tuple[str, SpectralFilter]]:
    """ABIF's plain inverse and the finite-horizon filter of the run (``T`` = its steps)."""
    total = int(runs.twins.steps[-1])
    return [("influence", InverseFilter(0.0)),
            ("influence, horizon filter",
             HorizonFilter(lr=_horizon_lr(runs.config), steps=max(total, 1)))]


def static_predictions(runs: ContinuedRuns, probe: CurvatureProbe) -> dict[str, np.ndarray]:
    """``[Q, P]`` scores of the removed examples at the fitted point (see _static_filters)."""
    return {k: as_numpy(probe.scores(spectral_filter=f)[:, runs.columns])
            for k, f in _static_filters(runs)}


def _unroll(runs: ContinuedRuns, unrolled: bool | str) -> tuple[bool, str]:
    """Whether to compute unrolled influence, and why not."""
    if unrolled is False:
        return False, "turned off"
    try:
        _check_unrollable(runs.config, runs.task.model)
    except InputError as e:
        return False, str(e)
    if unrolled == "auto":
        cost = (len(runs.removed) * int(runs.twins.steps[-1]) * runs.config.batch_size
                * runs.task.num_params)
        if cost > UNROLL_BUDGET:
            return False, (f"too costly for the default budget ({cost:.2g} > {UNROLL_BUDGET:.0g} "
                           "example-parameter tangent products); pass unrolled=True")
    return True, ""


def trajectory_section(runs: ContinuedRuns, probe: CurvatureProbe, *,
                       unrolled: bool | str = "auto") -> Section:
    """Assumption 3: does influence at the fitted point predict the run as well as
    trajectory-aware first-order methods do?"""
    t0 = time.perf_counter()
    actual = runs.actual()  # [P, Q]
    preds = {k: v.T / runs.n for k, v in static_predictions(runs, probe).items()}
    use_unrolled, why = _unroll(runs, unrolled)
    try:
        traj = trajectory_influence(runs.task.model, runs.train, runs.config, runs.queries,
                                    examples=runs.removed, task=runs.task,
                                    unrolled=use_unrolled, same_time=True,
                                    progress=runs.progress)
    except InputError as e:  # Adam, dropout or batch norm: no replayable SGD trajectory
        return skipped("trajectory", f"no trajectory-aware influence for this run: {e}")
    preds["TracIn (same-time sum)"] = as_numpy(traj.same_time).T / runs.n
    if traj.unrolled is not None:
        preds["unrolled (exact first order)"] = as_numpy(traj.unrolled).T / runs.n
    corr = {k: {"spearman": spearman(p.ravel(), actual.ravel()),
                "pearson": pearson(p.ravel(), actual.ravel()),
                "magnitude_ratio": float(np.abs(actual).mean() / max(np.abs(p).mean(), 1e-300))}
            for k, p in preds.items()}
    static = max(corr["influence"]["spearman"], corr["influence, horizon filter"]["spearman"])
    aware = [k for k in corr if k.startswith(("TracIn", "unrolled"))]
    best = max(aware, key=lambda k: corr[k]["spearman"])
    gap = corr[best]["spearman"] - static
    verdict = grade(gap, 0.1, 0.3)
    steps = int(runs.twins.steps[-1])
    lost = max(static, corr[best]["spearman"]) < 0.3  # nothing first-order tracks the run
    if lost:
        verdict = "fails" if verdict == "fails" else "weak"
    best_sp = corr[best]["spearman"]
    summary = (f"after {steps} continued steps, influence at the fitted point correlates "
               f"{static:.2f} (Spearman) with the actual change, {best} {best_sp:.2f}"
               f" (gap {gap:+.2f})" + ("" if use_unrolled else "; unrolled not computed") + ".")
    if lost:
        summary += (" Neither tracks the run at its end: divergence, not the choice of "
                    "trajectory, limits the prediction (see assumption 4).")
    advice = ("none: the end point carries the information." if verdict == "holds" else
              "inconclusive at this horizon: compare the estimators over shorter continued "
              "runs (a smaller config.epochs or learning rate)" if lost else
              f"when an example was seen matters here: prefer trajectory-aware influence "
              f"(ik.dynamics.trajectory_influence; {best}: {best_sp:.2f}) or TracIn over "
              "checkpoints to end-point influence for runs like this one")
    return Section("trajectory", verdict, summary, advice,
                   {"steps": steps, "correlations": corr, "gap": gap, "best": best,
                    "unrolled": use_unrolled, "unrolled_skipped_because": why or None,
                    "n_removed": len(runs.removed)},
                   rule="gap = best trajectory-aware Spearman − end-point Spearman; ≤ 0.1 holds,"
                        " > 0.3 fails; weak at best when no prediction reaches Spearman 0.3.",
                   seconds=time.perf_counter() - t0)


def divergence_section(runs: ContinuedRuns, probe: CurvatureProbe,
                       threshold: float = 0.5) -> Section:
    """Assumption 4: divergence growth vs the data-order control, and the influence horizon."""
    t0 = time.perf_counter()
    tw = runs.twins
    rate = growth_rate(tw)
    curves = {k: fading_curve(tw, v) for k, v in static_predictions(runs, probe).items()}
    horizons = {k: c.horizon(threshold) for k, c in curves.items()}
    best = max(curves, key=lambda k: (horizons[k], np.nanmax(np.r_[curves[k].spearman, -1])))
    h, curve = horizons[best], curves[best]
    steps = int(tw.steps[-1])
    lr = _horizon_lr(runs.config)
    at = (f"at lr {runs.config.lr:g}" + ("" if lr is None else f" (effective {lr:.3g})")
          if runs.config.optimizer == "sgd" else f"with Adam at lr {runs.config.lr:g}")
    peak = float(np.nanmax(np.r_[curve.spearman, -1.0]))
    end_div = float(tw.divergence[-1].mean())
    ctrl = float(tw.control_divergence[-1].mean()) if tw.control_divergence.numel() else math.nan
    if math.isinf(h):
        verdict = "holds"
        advice = (f"scores predict the effect of at least {steps} steps of fine-tuning {at} "
                  f"(Spearman {curve.spearman[-1]:.2f} at the end); longer horizons untested")
    elif h > 0:
        verdict = "weak"
        advice = (f"trust rankings for ≤ {int(h)} steps of fine-tuning {at}: beyond that the "
                  "perturbed run has drifted and influence has faded")
    else:
        verdict = "fails"
        advice = (f"influence never reached Spearman {threshold} with the actual change within "
                  f"{steps} steps {at} (peak {peak:.2f}): the runs diverge faster than any "
                  "first-order prediction; use shorter horizons, a smaller learning rate, or "
                  "trajectory-aware influence")
    summary = (f"‖Δθ‖ grows {rate.twins.rate:+.3g}/step (control {_rate(rate.control)}); "
               f"after {steps} steps ‖Δθ‖ = {end_div:.3g} vs data-order control {ctrl:.3g}; "
               f"influence horizon {'beyond the run' if math.isinf(h) else int(h)} "
               f"(best: {best}, peak Spearman {peak:.2f}).")
    return Section("divergence", verdict, summary, advice,
                   {"growth_rate": rate.to_dict(), "horizon": h, "threshold": threshold,
                    "best": best, "horizons": horizons, "steps": steps,
                    "divergence_end": end_div, "control_divergence_end": ctrl,
                    "fading": {k: c.to_dict() for k, c in curves.items()}},
                   rule=f"horizon (Spearman ≥ {threshold} then below) beyond the run holds, "
                        "inside it weak, never reached fails.",
                   seconds=time.perf_counter() - t0,
                   figures={"fading": _fading_png(tw, curves)})


def _rate(s: object) -> str:
    return "n/a" if s is None else f"{s.rate:+.3g}"


def linearity_section(runs: ContinuedRuns, probe: CurvatureProbe, *,
                      weights: Sequence[float] = (1.0, 8.0, 64.0), n_upweighted: int = 3,
                      random_groups: Sequence[int] = (2, 4),
                      top_groups: Sequence[int] = (4, 16, 64)) -> Section:
    """Assumption 5: linearity in the weight and additivity over groups."""
    t0 = time.perf_counter()
    actual = runs.actual()  # [P, Q]
    n_up = min(n_upweighted, len(runs.removed))
    per_unit = -actual[:n_up]  # the removal's change per unit weight
    lin = []
    for dw in sorted(float(w) for w in weights):
        tw = twin_runs(runs.task.model, runs.train, runs.config, runs.queries,
                       upweight=runs.removed[:n_up], epsilon=dw,
                       record_every=runs.record_steps, control_seeds=(),
                       task=runs.task, store=runs.store, progress=runs.progress)
        a = as_numpy(tw.effect[-1]) / dw
        lin.append({"delta_w": dw, "epsilon": dw / runs.n,
                    "ratio": slope(a.ravel(), per_unit.ravel()),
                    "pearson": pearson(a.ravel(), per_unit.ravel())})

    # the better-calibrated static prediction (on the single removals) picks and predicts the
    # top-influence groups; its slope on single removals is the reference of their ratio
    static = {k: as_numpy(probe.scores(spectral_filter=f)) for k, f in _static_filters(runs)}
    name = max(static, key=lambda k: spearman(static[k][:, runs.columns].T.ravel(),
                                               actual.ravel()))
    scores = static[name]  # [Q, pool]
    calib = slope(actual.ravel(), scores[:, runs.columns].T.ravel() / runs.n)
    groups = []
    for k in sorted(int(k) for k in random_groups):
        if k > len(runs.removed) or k < 2:
            continue
        g = runs.group_effect(runs.removed[:k])
        summed = actual[:k].sum(axis=0)
        groups.append({"kind": "random", "size": k, "ratio": slope(g, summed),
                       "pearson": pearson(g, summed)})
    # top-influence groups: the pool examples with the largest summed scores over the queries.
    # The prediction's calibration on such extreme examples is measured on single removals of
    # the first few of them (so the ratio isolates non-additivity, not a biased predictor).
    order = np.argsort(-scores.sum(axis=0))
    sizes = [k for k in sorted(int(k) for k in top_groups) if k <= len(probe.pool)]
    calib_top = math.nan
    if sizes:
        m = min(sizes[0], 4)
        singles = [int(probe.pool[c]) for c in order[:m]]
        tw = twin_runs(runs.task.model, runs.train, runs.config, runs.queries, remove=singles,
                       record_every=runs.record_steps, control_seeds=(),
                       task=runs.task, store=runs.store, progress=runs.progress)
        calib_top = slope(as_numpy(tw.effect[-1]).ravel(),
                          scores[:, order[:m]].T.ravel() / runs.n)
    for k in sizes:
        top = order[:k]
        g = runs.group_effect([int(probe.pool[c]) for c in top])
        pred = scores[:, top].sum(axis=1) / runs.n
        # against the calibrated prediction (its sign included: on chaotic runs the most
        # influential examples can move the queries against the prediction's direction)
        groups.append({"kind": "top influence", "size": k, "ratio": slope(g, pred) / calib_top,
                       "pearson": math.copysign(1.0, calib_top) * pearson(g, pred)})

    def ok(r: dict[str, float], corr: float) -> bool:
        return abs(r["ratio"] - 1) <= LINEAR_TOLERANCE and r["pearson"] >= corr

    linear = [ok(r, 0.9) for r in lin]
    additive = [ok(r, 0.9 if r["kind"] == "random" else 0.5) for r in groups]
    lin_range = _prefix(lin, linear, "delta_w")
    add_range = {kind: _prefix([r for r in groups if r["kind"] == kind],
                               [a for r, a in zip(groups, additive, strict=True)
                                if r["kind"] == kind], "size")
                 for kind in ("random", "top influence")}
    first_fail = (linear and not linear[0]) or any(
        not a for r, a in zip(groups, additive, strict=True)
        if r["size"] == min(x["size"] for x in groups if x["kind"] == r["kind"]))
    verdict = "fails" if first_fail else ("holds" if all(linear) and all(additive) else "weak")
    summary = (f"linear in the weight up to Δw = {_fmt_range(lin_range)} (ε = Δw/N, N = "
               f"{runs.n}); groups additive up to {_fmt_range(add_range['random'])} random / "
               f"{_fmt_range(add_range['top influence'])} top-influence examples"
               + (f"; removing single top-influence examples moves the queries against the "
                  f"predicted direction (slope {calib_top:.2f})" if calib_top < 0 else "")
               + ".")
    group_ok = min(add_range.values())
    smallest = min((g["size"] for g in groups), default=0)
    advice = ("none: predictions add up over the perturbations tried." if verdict == "holds" else
              ("do not read scores as effects of up-weighting: even Δw = "
               f"{lin[0]['delta_w']:g} is not linear" if lin_range == 0 else
               f"read scores as linear effects only for up-weights Δw ≤ {lin_range:g} (ε = Δw/N)")
              + ("; do not add scores over groups: even the smallest group tried "
                 f"({smallest} examples) is not additive" if group_ok == 0 else
                 f"; add scores over groups of ≤ {group_ok:g} examples only")
              + "; measure larger group effects by retraining (ik.groundtruth)")
    return Section("linearity", verdict, summary, advice,
                   {"upweights": lin, "groups": groups, "group_predictor": name,
                    "calibration_slope": calib, "calibration_slope_top": calib_top,
                    "linear_up_to": lin_range, "additive_up_to": add_range},
                   rule=f"linear/additive when |ratio − 1| ≤ {LINEAR_TOLERANCE} and Pearson ≥ 0.9 "
                        "(0.5 for top-influence groups, whose prediction is an estimate); "
                        "fails when the smallest perturbation is not, weak when a larger one is "
                        "not.",
                   seconds=time.perf_counter() - t0,
                   figures={"linearity": _linearity_png(lin, groups)})


def _prefix(rows: list[dict[str, float]], flags: list[bool], key: str) -> float:
    """The largest ``key`` up to which every row passes (0 when the first fails)."""
    best = 0.0
    for r, f in zip(rows, flags, strict=True):
        if not f:
            break
        best = r[key]
    return best


def _fmt_range(v: float) -> str:
    return "0 (not even the smallest tried)" if v == 0 else f"{v:g}"


def _fading_png(tw: TwinRuns, curves: dict[str, object]) -> bytes:
    from ..report.figures import png, pyplot

    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9.0, 3.3))
    steps = as_numpy(tw.steps)
    a1.semilogy(steps, as_numpy(tw.divergence).mean(axis=1), label="removal twins")
    if tw.control_divergence.numel():
        a1.semilogy(steps, as_numpy(tw.control_divergence).mean(axis=1), ls="--",
                    label="data-order control")
    a1.set_xlabel("continued step")
    a1.set_ylabel("‖θ_B − θ_A‖")
    a1.legend(fontsize=8)
    for k, c in curves.items():
        a2.plot(c.steps, c.spearman, marker=".", label=k)
    a2.axhline(0.5, color="k", lw=0.6, ls=":")
    a2.set_xlabel("continued step")
    a2.set_ylabel("Spearman(predicted, actual)")
    a2.legend(fontsize=8)
    fig.tight_layout()
    return png(fig)


def _linearity_png(lin: list[dict[str, float]], groups: list[dict[str, object]]) -> bytes:
    from ..report.figures import png, pyplot

    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9.0, 3.3))
    a1.semilogx([r["delta_w"] for r in lin], [r["ratio"] for r in lin], marker="o")
    a1.axhspan(1 - LINEAR_TOLERANCE, 1 + LINEAR_TOLERANCE, color="g", alpha=0.1)
    a1.set_xlabel("up-weight Δw (ε = Δw/N)")
    a1.set_ylabel("effect per unit weight / removal's")
    for kind in ("random", "top influence"):
        rows = [g for g in groups if g["kind"] == kind]
        if rows:
            a2.semilogx([g["size"] for g in rows], [g["ratio"] for g in rows], marker="o",
                        label=kind)
    a2.axhspan(1 - LINEAR_TOLERANCE, 1 + LINEAR_TOLERANCE, color="g", alpha=0.1)
    a2.set_xlabel("group size")
    a2.set_ylabel("group effect / sum of parts")
    a2.legend(fontsize=8)
    fig.tight_layout()
    return png(fig)


def default_config(n: int, lambda_max: float) -> TrainConfig:
    """One epoch of plain SGD at ``lr = 1/λ_max`` (the largest stable gradient-descent step)
    in batches of 64: the continued run used when the user gives none."""
    return TrainConfig(epochs=1, batch_size=min(64, n), lr=1.0 / max(lambda_max, 1e-8),
                       momentum=0.0)
