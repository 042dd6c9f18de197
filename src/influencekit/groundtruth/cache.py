"""On-disk cache of retraining results: atomic writes, content-addressed keys, resumable.

Every result is one file written to a temporary name and renamed into place, so a killed run
leaves either the whole file or nothing; rerunning the same work picks up what is there.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..batching import tree_leaves
from ..errors import ArtifactError
from ..store import atomic_write, tensor_fingerprint

T = TypeVar("T")


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` atomically (see :func:`influencekit.store.atomic_write`)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(Path(path), buf.getvalue())
    return Path(path)


def atomic_write_text(text: str, path: str | Path) -> Path:
    """Write text atomically (temporary file + rename)."""
    atomic_write(Path(path), text.encode("utf-8"))
    return Path(path)


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
            h.update(tensor_fingerprint(*leaves).encode())
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
