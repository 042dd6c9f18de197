"""Screenshot of a report page at a desktop width, in headless Chromium (Debian's package).

    .venv/bin/python docs/screenshot.py runs/reproduce/index.html docs/report.png
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

FLAGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def main(page_path: str, png: str, width: int = 1280, height: int = 2200) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("Debian's chromium is not installed (apt-get install chromium).")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=FLAGS)
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(Path(page_path).resolve().as_uri())
        page.wait_for_load_state("load")
        page.screenshot(path=png, full_page=False)
        browser.close()


if __name__ == "__main__":
    main(*sys.argv[1:3])
