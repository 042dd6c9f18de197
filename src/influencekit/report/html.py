"""``results.json`` → one self-contained ``index.html`` (figures inline as data URIs; no network).
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

from ..store import atomic_write_text

STYLE = """
body{font-family:system-ui,sans-serif;max-width:1080px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}
td,th{border:1px solid #ddd;padding:.3em .6em;text-align:right}
td:first-child,th:first-child{text-align:left}
.pending{color:#888;font-style:italic} .verdict-holds{background:#e3f4e3}
.verdict-weak{background:#fff3d6} .verdict-fails{background:#fbe0e0}
.note{color:#555;font-size:.92em} pre{white-space:pre-wrap;font-size:.85em}
.gallery td{text-align:center;vertical-align:top} .gallery img{width:56px;height:56px}
.pro{color:#1a7f37} .opp{color:#b42318} img.fig{max-width:100%}
.textgallery td,.textgallery th{text-align:left;vertical-align:top;max-width:480px}
ol.snippets{margin:0}
"""


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _num(x: Any) -> str:
    if isinstance(x, bool) or x is None:
        return "–" if x is None else str(x)
    if isinstance(x, float):
        if not math.isfinite(x):
            return "–"
        return f"{x:.3f}" if abs(x) < 1000 else f"{x:,.0f}"
    return _esc(x)


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for _, h in columns)
    body = "".join("<tr>" + "".join(f"<td>{_num(r.get(k))}</td>" for k, _ in columns) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def figure(figures: dict[str, bytes], name: str, alt: str) -> str:
    if name not in figures:
        return ""
    return f'<p><img class="fig" alt="{_esc(alt)}" src="{data_uri(figures[name])}"></p>'


def _section(title: str, section: dict[str, Any], body: str) -> str:
    if section.get("status") != "done":
        why = section.get("reason", "not computed yet")
        return f'<h2>{_esc(title)}</h2><p class="pending">{_esc(why)}</p>'
    secs = section.get("seconds")
    timing = f'<p class="note">computed in {secs:.0f} s</p>' if secs else ""
    return f"<h2>{_esc(title)}</h2>{body}{timing}"


def render(results: dict[str, Any], figures: dict[str, bytes], out: Path) -> Path:
    """Write ``out/index.html`` from ``results`` and PNG ``figures`` (name → bytes)."""
    s = results["sections"]
    env = s["environment"]
    parts = [
        f"<h1>influencekit: {_esc(results['title'])}</h1>",
        f'<p class="note">preset <b>{_esc(results["preset"])}</b> · influencekit '
        f'{_esc(env.get("influencekit"))} · torch {_esc(env.get("torch"))} · '
        f'{_esc(env.get("device"))}, {_esc(env.get("threads"))} threads · '
        f'{results.get("total_seconds", 0):.0f} s in all · every number is in '
        '<code>results.json</code></p>',
        "<p>Influence scores follow one convention: score(q, x) = ∇m(q)ᵀ (H + λI)⁻¹ ∇ℓ(x); "
        "<span class=pro>positive = proponent</span> (training more on x lowers the query's "
        "loss), <span class=opp>negative = opponent</span>.</p>",
    ]
    models = s["models"]
    parts.append(_section("Models", models, table(models.get("rows", []), [
        ("name", "model"), ("dataset", "dataset"), ("params", "parameters"),
        ("n_train", "train examples"), ("test_accuracy", "test accuracy"),
        ("accuracy_on", "measured on")])))
    est = s["estimators"]
    est_body = ""
    if est.get("status") == "done":
        cols = [("method", "method")] + [(k, h) for k, h in est["columns"]
                                         if any(k in r for r in est["rows"])]
        est_body = (f'<p>{_esc(est.get("setup", ""))}</p>' + table(est["rows"], cols)
                    + figure(figures, "quality_vs_cost", "estimator quality against cost"))
    parts.append(_section("Estimators against ground truth", est, est_body))
    spec = s["spectrum"]
    parts.append(_section("Curvature spectrum", spec,
                          f'<p>{_esc(spec.get("note", ""))}</p>'
                          + figure(figures, "spectrum", "curvature spectrum")))
    gal = s["gallery"]
    parts.append(_section("Influence gallery", gal, _gallery(gal, figures)))
    cor = s["correction"]
    parts.append(_section("Correcting mis-predictions", cor,
                          f'<p>{_esc(cor.get("summary", ""))}</p>'
                          + _runs(cor, figures, _correction_run)))
    for key, title in (("divergence", "Parameter divergence"), ("fading", "Influence fading")):
        parts.append(_section(title, s[key], _runs(s[key], figures, _figures_run)))
    diag = s["diagnostics"]
    parts.append(_section("Five-assumption diagnostics", diag, _diagnostics(diag, figures)))
    page = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>influencekit "
            f"report</title><style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")
    return atomic_write_text(page, out / "index.html")


def _runs(section: dict[str, Any], figures: dict[str, bytes], body: Any) -> str:
    """One sub-heading per run (model on dataset, with its test accuracy): ``body(run,
    figures)``, or why the run failed."""
    parts = []
    for r in section.get("runs", []):
        parts.append(f'<h3>{_esc(r.get("title", r.get("model")))}</h3>')
        if r.get("status") != "done":
            parts.append(f'<p class="pending">failed: {_esc(r.get("reason", ""))}</p>')
            continue
        secs = r.get("seconds")
        parts.append(body(r, figures)
                     + (f'<p class="note">computed in {secs:.0f} s</p>' if secs else ""))
    return "".join(parts)


# a run's figures by kind (``results.json``: run["figures"] = {kind: figure name}): alt texts
FIGURE_LABELS = {"divergence": "parameter divergence against step",
                 "fading": "influence fading: correlation against step",
                 "fading_magnitude": "influence fading: magnitude against step",
                 "correction": "fix rate against steps",
                 "correction_gallery": "fixed targets and the examples that fixed them",
                 "diagnostics_convexity": "curvature spectrum (convexity)",
                 "diagnostics_divergence": "fading along the continued run (divergence)",
                 "diagnostics_linearity": "linearity of up-weights and groups"}


def _run_figure(r: dict[str, Any], figures: dict[str, bytes], kind: str) -> str:
    name = r.get("figures", {}).get(kind)
    label = FIGURE_LABELS.get(kind, kind)
    return figure(figures, name, f"{r.get('title', '')}: {label}") if name else ""


def _run_figures(r: dict[str, Any], figures: dict[str, bytes]) -> str:
    """The run's figures, but its correction gallery (placed last by its section)."""
    return "".join(_run_figure(r, figures, kind) for kind in r.get("figures", {})
                   if kind != "correction_gallery")


def _figures_run(r: dict[str, Any], figures: dict[str, bytes]) -> str:
    """A dynamics run (divergence or fading): its summary and figures."""
    return f'<p>{_esc(r.get("summary", ""))}</p>' + _run_figures(r, figures)


CORRECTION_COLUMNS = [
    ("method", "selection"), ("examples", "m"), ("targets", "targets"), ("fixed", "fixed"),
    ("fix_rate", "fix rate"), ("median_steps_to_fix", "median steps"),
    ("accuracy_change", "Δ accuracy (rest)"), ("flips", "flips")]


def _correction_run(r: dict[str, Any], figures: dict[str, bytes]) -> str:
    """A correction run: its summary, table, fix-rate figure and gallery of fixed targets (an
    image, or for text the snippets)."""
    gallery = _run_figure(r, figures, "correction_gallery")
    if not gallery and r.get("gallery"):
        gallery = _text_gallery(r["gallery"])
    return (f'<p>{_esc(r.get("summary", ""))}</p>' + table(r.get("rows", []),
                                                           CORRECTION_COLUMNS)
            + _run_figures(r, figures) + gallery)


def _text_gallery(rows: list[dict[str, Any]]) -> str:
    """Fixed text targets, each beside the training snippets it was fine-tuned on."""
    def label(g: dict[str, Any], y: int) -> str:
        classes = g.get("classes") or []
        return _esc(classes[y] if 0 <= y < len(classes) else y)

    out = []
    for g in rows:
        examples = "".join(
            f'<li><span class=pro>{_num(e.get("score"))}</span> #{_esc(e["index"])} '
            f'({label(g, e["label"])}) {_esc(e.get("text", ""))}</li>' for e in g["examples"])
        out.append(f'<tr><td>“{_esc(g.get("text", ""))}”<br>label {label(g, g["label"])}, '
                   f'was {label(g, g["predicted_before"])}; fixed in {_esc(g["steps_to_fix"])} '
                   f'step(s) by {_esc(g["method"])}</td><td><ol class=snippets>{examples}'
                   "</ol></td></tr>")
    return ("<p>Fixed targets and the training examples whose fine-tuning fixed them "
            "(scores: positive = proponent):</p><table class=textgallery><tr><th>target</th>"
            f"<th>training examples fine-tuned on</th></tr>{''.join(out)}</table>")


def _gallery(gal: dict[str, Any], figures: dict[str, bytes]) -> str:
    if gal.get("status") != "done":
        return ""
    rows = []
    for q in gal["queries"]:
        verdict = "correct" if q["predicted"] == q["label"] else "mis-predicted"
        fix, extra = q.get("correction"), ""
        if fix:
            acc = fix.get("accuracy_change")
            extra = (f'<br><span class=pro>fixed in {fix["steps_to_fix"]} step(s)</span>'
                     if fix["fixed"] else "<br><span class=opp>not fixed</span>")
            extra += (f'<br><span class=note>tuned on the {fix["examples"]} proponents shown'
                      + ("" if acc is None else f"; test acc. {100 * acc:+.1f}%") + "</span>")
        cells = [f'<td><img alt="query {q["index"]}" src="{data_uri(figures[q["image"]])}">'
                 f'<br>query #{q["index"]}<br>label {q["label"]}, predicted {q["predicted"]}'
                 f"<br><b>{verdict}</b>{extra}</td>"]
        for kind, css in (("proponents", "pro"), ("opponents", "opp")):
            for ex in q[kind]:
                cells.append(f'<td><img alt="train {ex["index"]}" '
                             f'src="{data_uri(figures[ex["image"]])}"><br>#{ex["index"]} '
                             f'label {ex["label"]}<br><span class={css}>{ex["score"]:+.3g}'
                             "</span></td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    k = len(gal["queries"][0]["proponents"]) if gal["queries"] else 0
    head = ("<tr><th>query</th>" + f'<th colspan={k} class=pro>top proponents</th>'
            + f'<th colspan={k} class=opp>top opponents</th></tr>')
    return (f'<p>{_esc(gal.get("note", ""))}</p><table class=gallery>{head}{"".join(rows)}'
            "</table>")


ASSUMPTIONS = (("convexity", "convexity"), ("stability", "numeric stability"),
               ("trajectory", "training trajectory"), ("divergence", "parameter divergence"),
               ("linearity", "first-order expansion"))


def _diagnostics(diag: dict[str, Any], figures: dict[str, bytes]) -> str:
    """A verdict table (model × assumption), then per model its trust summary and figures."""
    if diag.get("status") != "done":
        return ""
    head = "<tr><th>model</th>" + "".join(f"<th>{_esc(t)}</th>" for _, t in ASSUMPTIONS) + \
        "</tr>"
    rows = []
    for r in diag["runs"]:
        if r.get("status") != "done":
            rows.append(f"<tr><td>{_esc(r.get('title'))}</td><td colspan={len(ASSUMPTIONS)} "
                        'class="pending">failed</td></tr>')
            continue
        cells = "".join(
            f'<td class="verdict-{_esc(r["verdicts"].get(k, "skipped"))}" '
            f'title="{_esc(r["sections"].get(k, {}).get("summary", ""))}">'
            f'{_esc(r["verdicts"].get(k, "skipped"))}</td>' for k, _ in ASSUMPTIONS)
        rows.append(f"<tr><td>{_esc(r['title'])}</td>{cells}</tr>")

    def details(r: dict[str, Any], figures: dict[str, bytes]) -> str:
        return f"<pre>{_esc(r['trust'])}</pre>" + _run_figures(r, figures)

    return (f'<p>{_esc(diag.get("summary", ""))}</p><table>{head}{"".join(rows)}</table>'
            + _runs(diag, figures, details))


def load_results(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
