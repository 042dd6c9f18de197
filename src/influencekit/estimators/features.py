"""Per-example features of a training set, computed once and read back a chunk at a time.

One mechanism for every estimator that scores queries against stored training features
(Arnoldi's eigen-projections, TRAK's random projections, EK-FAC's preconditioned gradients):
features are computed in chunks of ``chunk_size`` examples and kept in memory, or — with an
:class:`~influencekit.store.Artifact` — written atomically chunk by chunk, so an interrupted
computation resumes at the first missing chunk and a finished one is reused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from ..batching import Batch, Data, iter_batches, num_examples, take, to_device
from ..progress import progress_bar
from ..store import Artifact

Features = dict[str, torch.Tensor]


class TrainFeatures:
    """Feature chunks (dicts of ``[rows, ...]`` tensors), in memory or in a chunked artifact."""

    def __init__(self, chunks: list[Features] | None = None, art: Artifact | None = None):
        self.chunks, self.art = chunks, art

    def __iter__(self) -> Iterator[Features]:
        if self.art is not None:
            yield from self.art.iter_chunks()
        else:
            yield from self.chunks or []

    def cat(self, key: str) -> torch.Tensor:
        """One feature of every example, ``[N, ...]``."""
        return torch.cat([c[key] for c in self])

    @classmethod
    def compute(cls, data: Data, featurize: Callable[[Batch], Features], *, batch_size: int,
                chunk_size: int, device: torch.device, art: Artifact | None = None,
                progress: bool | None = None, desc: str = "train features",
                **info: object) -> TrainFeatures:
        """Features of every example of ``data``; with ``art``, stored chunks are skipped and
        new ones stored (resumable), and the artifact is finished with ``info``."""
        n = num_examples(data)
        chunks: list[Features] = []
        with progress_bar(total=n, desc=desc, unit="ex", progress=progress) as bar:
            for i, start in enumerate(range(0, n, chunk_size)):
                stop = min(start + chunk_size, n)
                if art is not None and art.has_chunk(i):
                    bar.update(stop - start)
                    continue
                part = data if (start, stop) == (0, n) else take(data, torch.arange(start, stop))
                pieces: list[Features] = []
                for batch in iter_batches(part, batch_size):
                    pieces.append({k: v.cpu() for k, v in
                                   featurize(to_device(batch, device)).items()})
                    bar.update(next(iter(pieces[-1].values())).shape[0])
                chunk = {k: torch.cat([p[k] for p in pieces]) for k in pieces[0]}
                if art is not None:
                    art.write_chunk(i, chunk)
                else:
                    chunks.append(chunk)
        if art is not None:
            art.finish(chunks=math.ceil(n / chunk_size), n=n, **info)
            return cls(art=art)
        return cls(chunks=chunks)
