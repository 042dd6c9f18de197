"""Training dynamics: twin runs, parameter divergence, influence fading, the influence horizon,
and trajectory-aware (unrolled) influence.

    import influencekit as ik
    runs = ik.dynamics.twin_runs(checkpoint, train, config, queries, remove=[3, 17],
                                 record_every=10, store="runs/twins")
    ik.dynamics.growth_rate(runs)                    # d log‖Δθ‖/dstep, twins vs control
    curve = ik.dynamics.fading_curve(runs, scores)   # predicted vs actual Δm over steps
    curve.horizon(0.5)                               # the influence horizon
    S = ik.dynamics.unrolled_influence(checkpoint, train, config, queries)  # [Q, N]
"""

from .fading import (
    FadingCurve,
    GrowthRate,
    Slope,
    effect_magnitude,
    fading_curve,
    growth_rate,
    influence_horizon,
    log_slope,
    predicted_effect,
)
from .twins import TwinRuns, record_steps, twin_runs
from .unrolled import (
    TrajectoryInfluence,
    same_time_influence,
    trajectory_influence,
    unrolled_influence,
)

__all__ = [
    "FadingCurve", "GrowthRate", "Slope", "TrajectoryInfluence", "TwinRuns", "effect_magnitude",
    "fading_curve", "growth_rate", "influence_horizon", "log_slope", "predicted_effect",
    "record_steps", "same_time_influence", "trajectory_influence", "twin_runs",
    "unrolled_influence",
]
