"""Verdicts and the diagnosis report: one :class:`Section` per assumption, a ``trust`` summary.

A verdict is ``"holds"``, ``"weak"`` or ``"fails"`` (or ``"skipped"`` when a section could not
run, with the reason). Each section keeps the numbers behind its verdict (``numbers``), the
rule that produced it (``rule``: the thresholds, stated) and a recommendation.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..store import atomic_write, atomic_write_text

VERDICTS = ("holds", "weak", "fails", "skipped")
SCHEMA_VERSION = 1
TITLES = {
    "convexity": "1. Convexity (a unique minimum, H ≻ 0)",
    "stability": "2. Numeric stability (H⁻¹v computable)",
    "trajectory": "3. Training trajectory (the end point is all that matters)",
    "divergence": "4. Parameter divergence (perturbed runs stay close)",
    "linearity": "5. First-order expansion (effects linear and additive)",
}


def worst(*verdicts: str) -> str:
    """The worst of several verdicts (``skipped`` parts are ignored)."""
    ranked = [v for v in verdicts if v != "skipped"]
    if not ranked:
        return "skipped"
    return max(ranked, key=("holds", "weak", "fails").index)


def grade(value: float, holds: float, fails: float) -> str:
    """``holds`` when ``value`` is on the good side of ``holds``, ``fails`` beyond ``fails``,
    ``weak`` between; the direction follows from the two thresholds. NaN fails."""
    if not math.isfinite(value):
        return "fails"
    if holds <= fails:  # smaller is better
        return "holds" if value <= holds else "fails" if value > fails else "weak"
    return "holds" if value >= holds else "fails" if value < fails else "weak"


@dataclass
class Section:
    """One assumption's diagnosis."""

    name: str
    verdict: str
    summary: str  # one sentence with the number behind the verdict
    recommendation: str
    numbers: dict[str, Any] = field(default_factory=dict)
    rule: str = ""  # the thresholds that turned the numbers into the verdict
    seconds: float = 0.0
    figures: dict[str, bytes] = field(default_factory=dict)  # name -> PNG

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "summary": self.summary,
                "recommendation": self.recommendation, "rule": self.rule,
                "seconds": round(self.seconds, 2), "numbers": _plain(self.numbers),
                "figures": sorted(self.figures)}


def skipped(name: str, why: str) -> Section:
    return Section(name, "skipped", f"not run: {why}", "—")


@dataclass
class Diagnosis:
    """The report of :func:`~influencekit.diagnose`: ``sections`` by assumption, in order."""

    sections: dict[str, Section]
    setup: dict[str, Any]

    @property
    def verdicts(self) -> dict[str, str]:
        return {k: s.verdict for k, s in self.sections.items()}

    @property
    def trust(self) -> str:
        """The ten-second summary: overall verdict and one line per assumption."""
        overall = worst(*self.verdicts.values())
        head = {"holds": "Influence scores can be trusted on this model and data.",
                "weak": "Influence scores are usable with the caveats below.",
                "fails": "Do not read influence scores at face value here: see the failing "
                         "assumptions.",
                "skipped": "Nothing was diagnosed."}[overall]
        lines = [f"trust: {overall.upper()} — {head}"]
        for s in self.sections.values():
            lines.append(f"- {s.name}: {s.verdict} — {s.summary}")
            if s.verdict in ("weak", "fails"):
                lines.append(f"  → {s.recommendation}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "trust": self.trust,
                "overall": worst(*self.verdicts.values()), "verdicts": self.verdicts,
                "setup": _plain(self.setup),
                "sections": {k: s.to_dict() for k, s in self.sections.items()}}

    def markdown(self) -> str:
        out = ["# Influence diagnostics", "", "```", self.trust, "```", ""]
        for key, s in self.sections.items():
            out += [f"## {TITLES.get(key, key)}: **{s.verdict}**", "", s.summary, "",
                    f"*Recommendation*: {s.recommendation}", ""]
            if s.rule:
                out += [f"*Rule*: {s.rule}", ""]
            scalars = {k: v for k, v in s.numbers.items() if isinstance(v, (int, float, str))
                       or v is None}
            if scalars:
                out += ["| number | value |", "|---|---|"]
                out += [f"| {k} | {_fmt(v)} |" for k, v in scalars.items()]
                out.append("")
            out += [f"![{name}]({key}-{name}.png)" for name in s.figures] + [""]
            out.append(f"({s.seconds:.1f} s)")
            out.append("")
        return "\n".join(out)

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``diagnosis.json``, ``diagnosis.md`` and the figures into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for key, s in self.sections.items():
            for name, data in s.figures.items():
                atomic_write(folder / f"{key}-{name}.png", data)
        atomic_write_text(json.dumps(self.to_dict(), indent=1), folder / "diagnosis.json")
        atomic_write_text(self.markdown(), folder / "diagnosis.md")
        return folder


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "∞" if v == math.inf else f"{v:.4g}"
    return str(v)


def _plain(v: Any) -> Any:
    """JSON-ready: tensors/arrays to lists, non-finite floats to strings."""
    if hasattr(v, "tolist"):
        v = v.tolist()
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v
