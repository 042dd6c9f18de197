"""Diagnose the five assumptions behind influence functions on a fitted model.

    import influencekit as ik
    report = ik.diagnose(task, train, queries, config=finetune_config)
    print(report.trust)            # the ten-second summary
    report.sections["convexity"]   # verdict, numbers, recommendation
    report.save("runs/diagnosis")  # diagnosis.json, diagnosis.md, figures

Sections (see the paper digest's table): convexity and numeric stability from the curvature at
the fitted point (:mod:`.curvature`); training trajectory, parameter divergence and the
first-order expansion from short continued runs with examples removed or up-weighted
(:mod:`.training`). Each ends in ``holds`` / ``weak`` / ``fails`` with the numbers behind it.
"""

from .curvature import CurvatureProbe, lanczos_spectrum, lissa_convergence
from .diagnose import SECTIONS, diagnose
from .verdicts import Diagnosis, Section

__all__ = ["SECTIONS", "CurvatureProbe", "Diagnosis", "Section", "diagnose",
           "lanczos_spectrum", "lissa_convergence"]
