"""The README's Python quickstart runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs():
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    quickstart = next(b for b in blocks if "make_blobs" in b)
    namespace: dict = {}
    exec(compile(quickstart, "README quickstart", "exec"), namespace)
    assert tuple(namespace["S"].shape) == (10, 300)
    assert namespace["s"].shape == (300,)
