"""Measuring what a block of work costs: wall time and peak memory."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import resource
import threading
from collections.abc import Iterator

import torch


def _trim() -> None:
    """Hand freed heap memory back to the OS (glibc), so the next peak is measured from a low
    base rather than hidden inside memory the allocator kept."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * resource.getpagesize() / 2**20
    except OSError:  # not Linux: the process high-water mark (KiB on Linux, bytes on macOS)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


@contextlib.contextmanager
def peak_memory(interval: float = 0.005) -> Iterator[dict[str, float]]:
    """Peak extra memory (MiB) while the block runs: resident set size sampled by a thread on
    CPU, ``torch.cuda.max_memory_allocated`` on GPU. Result in ``out["peak_mb"]``.

    On CPU this is approximate: peaks shorter than ``interval`` can be missed, and memory the
    allocator kept from earlier work is not counted."""
    out: dict[str, float] = {}
    gc.collect()
    _trim()
    base = _rss_mb()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_mb())
            stop.wait(interval)

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], _rss_mb())
        out["peak_mb"] = peak[0] - base
        if cuda:
            out["peak_mb"] = max(out["peak_mb"],
                                 (torch.cuda.max_memory_allocated() - cuda_base) / 2**20)
