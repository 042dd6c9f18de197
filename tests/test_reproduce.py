"""``influencekit reproduce`` on the tiny preset: the results.json schema, a self-contained page,
and a rerun that only rebuilds the report."""

from __future__ import annotations

import json
import re

import pytest

from influencekit.cli import main
from influencekit.experiments.reproduce import SCHEMA_VERSION, SECTIONS
from influencekit.report.html import FIGURE_LABELS


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
    runs = {}  # section -> {(dataset, model): run}
    for name in ("divergence", "fading", "correction", "diagnostics"):
        assert s[name]["status"] == "done", name
        assert s[name]["seconds"] == pytest.approx(sum(r["seconds"] for r in s[name]["runs"]))
        runs[name] = {(r["dataset"], r["model"]): r for r in s[name]["runs"]}
        assert list(runs[name]) == [("digits", "mlp"), ("mnist", "cnn")], name  # preset order
        for r in s[name]["runs"]:
            assert r["status"] == "done" and r["seconds"] >= 0 and r["command"], name
            assert r["summary"] and r["title"].startswith(("MLP on digits", "CNN on mnist"))
            assert 0 <= r["test_accuracy"] <= 1 and r["n_test"] > 0, name  # beside every study
            assert f"test accuracy {r['test_accuracy']:.3f}" in r["title"], name
            assert r["figures"] and all(f.endswith(f"-{r['dataset']}-{r['model']}")
                                        for f in r["figures"].values()), name
            assert all((report / "figures" / f"{f}.png").is_file()
                       for f in r["figures"].values()), name
    fading = runs["fading"][("digits", "mlp")]
    assert {"graddot", "unrolled", "same-time"} <= set(fading["horizon"]) <= set(fading["curves"])
    assert set(runs["fading"][("mnist", "cnn")]["horizon"]) == {"graddot", "same-time"}
    for r in runs["divergence"].values():
        assert {"rate", "low", "high"} <= set(r["growth_rate"]["twins"]) and r["n_removed"] > 0
    cor = runs["correction"]
    assert {r["method"] for r in cor[("digits", "mlp")]["rows"]} == {"graddot", "random"}
    assert {r["method"] for r in cor[("mnist", "cnn")]["rows"]} == {"graddot", "target"}
    for run in cor.values():
        assert run["params"] > 0 and set(run["figures"]) == {"correction", "correction_gallery"}
        assert all(0 <= r["fixed"] <= r["targets"] for r in run["rows"])
        for g in run["gallery"]:  # fixed targets with the examples that fixed them
            assert g["steps_to_fix"] is not None and g["examples"]
    for row in runs["diagnostics"].values():
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
    results = json.loads((report / "results.json").read_text())
    chunks = dict(re.findall(r"<h2>([^<]+)</h2>(.*?)(?=<h2>|</body>)", page, re.S))
    for name, title in (("divergence", "Parameter divergence"), ("fading", "Influence fading"),
                        ("correction", "Correcting mis-predictions"),
                        ("diagnostics", "Five-assumption diagnostics")):
        runs = results["sections"][name]["runs"]  # a sub-heading per model, with its figures
        assert re.findall(r"<h3>([^<]+)</h3>", chunks[title]) == [r["title"] for r in runs]
        for r in runs:
            assert all(f'alt="{r["title"]}: {FIGURE_LABELS[kind]}"' in chunks[title]
                       for kind in r["figures"])
    verdict_rows = re.findall(r'<tr><td>[^<]*</td><td class="verdict-', page)
    assert len(verdict_rows) == 2  # the verdict table: one row per diagnosed model


@pytest.mark.slow
def test_rerun_only_rebuilds_the_report(report, capsys):
    capsys.readouterr()
    assert main(["reproduce", "--preset", "tiny", "--out", str(report), "--no-progress"]) == 0
    err = capsys.readouterr().err
    for stage in ("models", "estimators", "spectrum", "gallery"):
        assert f"[{stage}] cached" in err
    for stage in ("dynamics", "correction", "diagnostics"):  # one stage per run
        for run in ("digits-mlp", "mnist-cnn"):
            assert f"[{stage}-{run}] cached" in err
    assert "running" not in err


@pytest.mark.slow
def test_text_correction_gallery_and_failed_run(report, tmp_path):
    """A correction run on text data shows its fixed targets as snippets (escaped); a failed
    run shows its reason under its model's sub-heading and in the verdict table."""
    from influencekit.report.html import render

    results = json.loads((report / "results.json").read_text())
    s = results["sections"]
    text_run = {**s["correction"]["runs"][0], "model": "bert", "dataset": "rotten_tomatoes",
                "title": "MiniLM-BERT on rotten_tomatoes (test accuracy 0.758)", "figures": {},
                "gallery": [{"method": "graddot", "target": 3, "label": 1, "predicted_before": 0,
                             "steps_to_fix": 2, "text": "a <b>fine</b> film",
                             "classes": ["rotten", "fresh"],
                             "examples": [{"index": 5, "label": 1, "score": 0.25,
                                           "text": "funny & warm"}]}]}
    s["correction"]["runs"].append(text_run)
    s["diagnostics"]["runs"].append({"status": "failed", "model": "bert",
                                     "dataset": "rotten_tomatoes", "title": "MiniLM-BERT on "
                                     "rotten_tomatoes", "reason": "RuntimeError: no weights"})
    figures = {f.stem: f.read_bytes() for f in (report / "figures").glob("*.png")}
    page = render(results, figures, tmp_path).read_text()
    assert "<h3>MiniLM-BERT on rotten_tomatoes (test accuracy 0.758)</h3>" in page
    assert "a &lt;b&gt;fine&lt;/b&gt; film" in page and "funny &amp; warm" in page
    assert "label fresh, was rotten; fixed in 2 step(s)" in page
    assert "failed: RuntimeError: no weights" in page
