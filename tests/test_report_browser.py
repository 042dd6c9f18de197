"""The report renders in headless Chromium: no console errors, every image loaded.

Needs Debian's ``chromium`` (``.ci/run`` installs it) and the ``playwright`` package (a dev
dependency; it drives the system browser, nothing is downloaded). Without them the test is
skipped — unless ``INFLUENCEKIT_REQUIRE_BROWSER=1`` (set by ``.ci/run``), which makes a missing
browser a failure instead.
"""

from __future__ import annotations

import os
import shutil

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _browser_or_skip() -> str:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing = "the playwright package"
    else:
        missing = None if CHROMIUM else "Debian's chromium"
    if missing:
        if os.environ.get("INFLUENCEKIT_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{missing} is missing but INFLUENCEKIT_REQUIRE_BROWSER=1.")
        pytest.skip(f"{missing} is not installed")
    return CHROMIUM


@pytest.mark.slow
def test_report_renders_without_errors(tiny_report, tmp_path):
    chromium = _browser_or_skip()
    from playwright.sync_api import sync_playwright

    out = tiny_report
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=FLAGS[1:])
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
        page.goto((out / "index.html").as_uri())
        page.wait_for_load_state("load")
        images = page.eval_on_selector_all(
            "img", "els => els.map(e => [e.alt, e.complete && e.naturalWidth > 0])")
        headings = page.eval_on_selector_all("h2", "els => els.map(e => e.textContent)")
        runs = page.eval_on_selector_all("h3", "els => els.map(e => e.textContent)")
        page.screenshot(path=str(tmp_path / "report.png"), full_page=False)
        browser.close()
    assert not errors, errors
    assert images and all(ok for _, ok in images), [alt for alt, ok in images if not ok]
    assert {"Models", "Influence gallery", "Parameter divergence",
            "Five-assumption diagnostics"} <= set(headings)
    # a sub-heading per model in each of the four per-model sections
    assert sum(h.startswith("CNN on mnist") for h in runs) == 4, runs
