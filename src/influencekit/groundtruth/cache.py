"""The ground-truth cache: retraining results as artifacts of the store, keyed by content.

Each result is one artifact (safetensors + manifest, written atomically, checksummed, no pickle),
so a killed run leaves either the whole result or nothing, and rerunning the same work picks up
what is there. Keys are hashes of everything that determines a result (see ``Retrainer.key``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ..store import ArtifactStore

T = TypeVar("T")


class Cache:
    """Results under ``<root>/<group>/<key>/``; ``root=None`` caches nothing.

    A value is a tree of tensors, numbers, strings, lists, tuples, dicts and dataclasses (see
    :func:`influencekit.store.pack_tree`): a ``state_dict``, a measurement, a result dataclass.
    """

    def __init__(self, root: str | Path | None):
        self.root = None if root is None else Path(root)

    def path(self, group: str, key: str) -> Path | None:
        """The folder of the result ``(group, key)`` (``None`` when nothing is cached)."""
        return None if self.root is None else self.root / group / key

    def get_or_compute(self, group: str, key: str, compute: Callable[[], T]) -> T:
        """The cached value for ``(group, key)``, computing and storing it when absent.

        A damaged entry raises :class:`~influencekit.errors.ArtifactError` naming it.
        """
        if self.root is None:
            return compute()
        art = ArtifactStore(self.root / group).open(key, {"key": key}, {"group": group})
        if art.complete:
            return art.load()
        value = compute()
        art.save(value)
        return value
