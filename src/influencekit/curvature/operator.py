"""The curvature (Hessian or GGN) of the *mean* training loss over a data set, as one operator.

Every method that needs ``H v`` goes through :class:`CurvatureOperator`: conjugate gradients,
LiSSA, the dense matrix of :class:`~influencekit.ExactInfluence`, Arnoldi, power iteration.
What it sees of the data is a setting (``sampling``):

- ``"full"``    every product uses all examples (deterministic);
- ``"fixed"``   one seeded random subset of ``batch`` examples, every product;
- ``"stream"``  each product takes the next ``batch`` examples of a seeded shuffle (reshuffled
  each epoch), so successive products together cover the whole set;
- ``"sampled"`` each product draws ``batch`` examples with replacement (LiSSA's mini-batches).

Products are evaluated ``micro_batch_size`` examples at a time (this bounds memory and does not
change results beyond summation order), summed in float64 and divided by the examples used.
"""

from __future__ import annotations

import torch

from ..autodiff import CURVATURES, curvature_vp
from ..batching import Data, batch_size_of, iter_batches, num_examples, take, to_device
from ..progress import progress_bar
from ..task import Task
from ..validate import choice, optional_positive_int, positive_int

SAMPLINGS = ("full", "fixed", "stream", "sampled")


class CurvatureOperator:
    """``v ↦ C v`` for the rows of ``[k, P]`` tensors, ``C`` the curvature of the mean loss.

    Args:
        task: the model, loss and parameter selection. data: the examples the mean runs over.
        curvature: ``"hessian"`` or ``"ggn"``.
        sampling: ``"full"``, ``"fixed"``, ``"stream"`` or ``"sampled"`` (module docstring).
        batch: examples per product for the non-full samplings (default: all of them).
        micro_batch_size: examples per autodiff evaluation (memory bound only).
        seed: of the subset, shuffle or draws.
    """

    def __init__(self, task: Task, data: Data, curvature: str = "hessian", *,
                 sampling: str = "full", batch: int | None = None,
                 micro_batch_size: int = 256, seed: int = 0):
        self.task, self.data = task, data
        self.curvature = choice("curvature", curvature, CURVATURES)
        self.sampling = choice("sampling", sampling, SAMPLINGS)
        self.n = num_examples(data)
        self.batch = min(optional_positive_int("batch", batch) or self.n, self.n)
        self.micro = positive_int("micro_batch_size", micro_batch_size)
        self.gen = torch.Generator().manual_seed(int(seed))
        self.examples_seen = 0
        self._order = torch.empty(0, dtype=torch.long)
        self._fixed = None
        if sampling == "fixed":
            self._fixed = take(data, torch.randperm(self.n, generator=self.gen)[:self.batch])

    @property
    def dim(self) -> int:
        return self.task.num_params

    def _examples(self) -> Data:
        if self.sampling == "full":
            return self.data
        if self.sampling == "fixed":
            return self._fixed
        if self.sampling == "sampled":
            return take(self.data, torch.randint(self.n, (self.batch,), generator=self.gen))
        while self._order.numel() < self.batch:  # next epoch of the stream
            self._order = torch.cat([self._order, torch.randperm(self.n, generator=self.gen)])
        idx, self._order = self._order[:self.batch], self._order[self.batch:]
        return take(self.data, idx)

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        """``C v`` for each row of ``vectors [k, P]`` (or one ``[P]`` vector), in float64."""
        if vectors.dim() == 1:
            return self(vectors[None])[0]
        vectors = vectors.to(self.task.device)
        total = torch.zeros(vectors.shape, dtype=torch.float64, device=vectors.device)
        n = 0
        for batch in iter_batches(self._examples(), self.micro):
            batch = to_device(batch, self.task.device)
            total += curvature_vp(self.task, batch, vectors, self.curvature).to(torch.float64)
            n += batch_size_of(batch)
        self.examples_seen += n
        return total / n

    def power_iteration(self, iterations: int = 30, *, seed: int = 0,
                        shift: float = 0.0) -> float:
        """The largest-magnitude eigenvalue of ``C − shift·I`` (a Rayleigh quotient)."""
        gen = torch.Generator().manual_seed(seed)
        v = torch.randn(self.dim, generator=gen, dtype=torch.float64)
        v /= v.norm()
        lam = 0.0
        for _ in range(positive_int("iterations", iterations)):
            w = self(v).cpu() - shift * v
            lam = float(v @ w)
            norm = w.norm()
            if norm == 0:
                return 0.0
            v = w / norm
        return lam

    def dense(self, *, block: int = 128, progress: bool | None = None) -> torch.Tensor:
        """The ``P × P`` matrix in float64, symmetrised, built ``block`` columns at a time
        (memory ``8·P² + O(block × P)`` bytes)."""
        p = self.dim
        h = torch.empty(p, p, dtype=torch.float64)
        eye = torch.eye(p, dtype=self.task.dtype, device=self.task.device)
        for start in progress_bar(range(0, p, block), desc=f"dense {self.curvature}",
                                  progress=progress):
            h[start:start + block] = self(eye[start:start + block]).cpu()
        return (h + h.T) / 2

    def __repr__(self) -> str:
        return (f"CurvatureOperator({self.curvature!r}, sampling={self.sampling!r}, "
                f"batch={self.batch}, n={self.n}, P={self.dim})")


def dense_curvature(task: Task, data: Data, curvature: str = "hessian", *,
                    batch_size: int = 256, progress: bool | None = None) -> torch.Tensor:
    """The dense ``P × P`` curvature of the mean loss over ``data`` (small models only)."""
    return CurvatureOperator(task, data, curvature, micro_batch_size=batch_size
                             ).dense(progress=progress)
