"""Progress bars with one meaning of ``progress`` everywhere: ``None`` shows them on a
terminal only, ``True`` always, ``False`` never."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm


def progress_bar(iterable: Any = None, *, progress: bool | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar (``leave=False`` unless given) that follows the ``progress`` setting."""
    kwargs.setdefault("leave", False)
    return tqdm(iterable, disable=None if progress is None else not progress, **kwargs)


def log_stage(message: str, progress: bool | None = None) -> None:
    """One line on stderr announcing a stage of long work (unless ``progress`` is False)."""
    import sys

    if progress is not False:
        print(f"[influencekit] {message}", file=sys.stderr, flush=True)
