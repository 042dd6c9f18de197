"""``influencekit reproduce`` on the tiny preset: the results.json schema, a self-contained page,
and a rerun that only rebuilds the report."""

from __future__ import annotations

import json
import re

import pytest

from influencekit.cli import main
from influencekit.experiments.reproduce import SCHEMA_VERSION, SECTIONS


@pytest.fixture
def report(tiny_report):
    return tiny_report


@pytest.mark.slow
def test_results_schema(report):
    results = json.loads((report / "results.json").read_text())
    assert results["schema_version"] == SCHEMA_VERSION and results["preset"] == "tiny"
    assert set(results["sections"]) == set(SECTIONS)
    for name, section in results["sections"].items():
        assert section["status"] in ("done", "pending"), name
        if section["status"] == "pending":
            assert re.search(r"issue \d+", section["reason"]), name
        elif name != "environment":
            assert section["seconds"] >= 0, name
    s = results["sections"]
    assert {"torch", "influencekit", "device", "threads", "seeds"} <= set(s["environment"])
    models = {(r["name"], r["dataset"]): r for r in s["models"]["rows"]}
    assert set(models) == {("mlp", "digits"), ("cnn", "mnist")}
    assert all(0 <= r["test_accuracy"] <= 1 and r["params"] > 0 for r in models.values())
    methods = {r["method"] for r in s["estimators"]["rows"]}
    assert "graddot" in methods and all("lds" in r for r in s["estimators"]["rows"])
    assert s["spectrum"]["largest"] >= s["spectrum"]["most_negative"]
    assert s["divergence"]["status"] == s["fading"]["status"] == "done"
    assert {"graddot", "unrolled", "same-time"} <= set(s["fading"]["horizon"])
    assert {r["method"] for r in s["correction"]["rows"]} == {"graddot", "random"}
    assert all(0 <= r["fixed"] <= r["targets"] for r in s["correction"]["rows"])
    diag = s["diagnostics"]
    assert diag["status"] == "done" and len(diag["rows"]) == 2  # digits MLP, mnist model
    row = diag["rows"][0]
    assert set(row["verdicts"]) == {"convexity", "stability", "trajectory", "divergence",
                                    "linearity"}
    assert set(row["verdicts"].values()) <= {"holds", "weak", "fails"}
    assert row["trust"].startswith("trust: ")
    for q in s["gallery"]["queries"]:
        assert len(q["proponents"]) == len(q["opponents"]) == 3
        if q["label"] != q["predicted"]:  # mis-predicted: the correction that was tried
            fix = q["correction"]
            assert fix["fixed"] == (fix["steps_to_fix"] is not None)
            assert fix["predictions"][0] == q["predicted"]
        assert all(p["score"] >= o["score"] for p, o in zip(q["proponents"], q["opponents"]))


@pytest.mark.slow
def test_page_is_self_contained(report):
    page = (report / "index.html").read_text()
    assert "<h2>Influence gallery</h2>" in page and "positive = proponent" in page
    sources = re.findall(r'src="([^"]+)"', page)
    assert sources and all(src.startswith("data:image/png;base64,") for src in sources)
    assert not re.search(r'(href|src)="(https?:)?//', page)  # nothing from the network
    assert "<h2>Five-assumption diagnostics</h2>" in page and "verdict-" in page
    assert "<h2>Correcting mis-predictions</h2>" in page
    assert "<h2>Parameter divergence</h2>" in page and "horizon" in page


@pytest.mark.slow
def test_rerun_only_rebuilds_the_report(report, capsys):
    capsys.readouterr()
    assert main(["reproduce", "--preset", "tiny", "--out", str(report), "--no-progress"]) == 0
    err = capsys.readouterr().err
    for stage in ("models", "estimators", "spectrum", "gallery", "dynamics", "correction",
                  "diagnostics"):
        assert f"[{stage}] cached" in err
    assert "running" not in err
