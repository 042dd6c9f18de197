"""On-disk cache of retraining results: atomic writes, content-addressed keys, resumable.

Every result is one file written to a temporary name and renamed into place, so a killed run
leaves either the whole file or nothing; rerunning the same work picks up what is there.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..batching import tree_leaves
from ..errors import ArtifactError

T = TypeVar("T")


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file in the same folder, then rename into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(text: str, path: str | Path) -> Path:
    """Write text atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(path: str | Path) -> Any:
    """Load a cached file, naming the fix if it is unreadable."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise ArtifactError(f"cannot read the cached file {path} ({type(e).__name__}: {e}); "
                            "delete it and rerun to recompute it.") from e


def fingerprint(*parts: Any) -> str:
    """A short hash of JSON-able parts and tensors (their dtype, shape and bytes)."""
    h = hashlib.sha256()
    for part in parts:
        leaves = tree_leaves(part)
        if leaves:
            for t in leaves:
                t = t.detach().cpu().contiguous()
                h.update(f"{t.dtype}{tuple(t.shape)}".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(part, (list, tuple)) and part and isinstance(part[0], str):
            h.update("\x00".join(part).encode())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"|")
    return h.hexdigest()[:16]


class Cache:
    """A folder of results, each under ``<root>/<group>/<key>.pt``; ``root=None`` caches nothing.
    """

    def __init__(self, root: str | Path | None):
        self.root = None if root is None else Path(root)

    def path(self, group: str, key: str) -> Path | None:
        return None if self.root is None else self.root / group / f"{key}.pt"

    def get_or_compute(self, group: str, key: str, compute: Callable[[], T]) -> T:
        """The cached value for ``(group, key)``, computing and storing it when absent."""
        path = self.path(group, key)
        if path is not None and path.is_file():
            return load(path)
        value = compute()
        if path is not None:
            atomic_save(value, path)
        return value
