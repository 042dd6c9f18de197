"""Top eigenpairs of a symmetric operator by Arnoldi iteration (Schioppa et al. 2022, ABIF).

Three layers, each usable alone:

- :func:`arnoldi`: the iteration on any ``matvec`` (``[k, P] -> [k, P]``): modified Gram–Schmidt
  (two passes), early stop on an invariant subspace, seeded start, optionally ``block`` vectors
  per pass (block Krylov: one pass over the data serves several vectors).
- :func:`distill`: the Rayleigh–Ritz step: symmetrise the projected matrix, keep the top ``rank``
  eigenpairs by ``|λ|`` (or only positive ones), map eigenvectors back to parameter space.
- :class:`Eigensolver` + :func:`curvature_eigenpairs`: the mean-loss Hessian / GGN of a task
  (a :class:`~influencekit.curvature.CurvatureOperator`) as the operator, by default on a
  *stream*: each pass takes the next batch of a seeded shuffle of the training set, so that the
  passes together cover it (as the paper's reference implementation does).

Memory: ``(iterations + block) × P`` basis values (float64 when that is at most
``basis_budget`` bytes, float32 beyond) plus one micro-batch of curvature products; it never
grows with the number of examples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch

from ..batching import Data, num_examples
from ..errors import InputError, check_finite
from ..progress import progress_bar
from ..task import Task
from ..validate import choice, integer, non_negative, optional_positive_int, positive, positive_int
from .operator import CurvatureOperator
from .randomized import FisherGradients, randomized_eigh
from .spectral import WHICH, Eigenpairs

MatVec = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Krylov:
    """An orthonormal Krylov basis and the operator's coefficients in it.

    ``operator(basis[j]) ≈ Σ_i projected[i, j] · basis[i]`` for the ``applied`` first vectors.
    """

    basis: torch.Tensor  # [m, P], orthonormal rows
    projected: torch.Tensor  # [m, m] float64
    applied: int  # vectors the operator was applied to (the square block used by distill)
    stopped_early: bool  # an invariant subspace was found


# --------------------------------------------------------------------------- iteration
def arnoldi(
    matvec: MatVec, dim: int, iterations: int, *, block: int = 1, seed: int = 0,
    start: torch.Tensor | None = None, tol: float = 1e-9, dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu", progress: bool | None = None,
    resume: list[dict[str, Any]] | None = None,
    on_checkpoint: Callable[[dict[str, Any]], None] | None = None, checkpoint_every: int = 25,
) -> Krylov:
    """Run ``iterations`` operator applications of (block) Arnoldi.

    Args:
        matvec: applies the operator to each row of a ``[k, P]`` float64 tensor.
        dim: ``P``; iterations: number of vectors the operator is applied to in total.
        block: vectors per pass (``matvec`` is called with up to ``block`` rows at once).
        seed, start: the start block is ``start`` (``[P]`` or ``[block, P]``) or seeded noise.
        tol: stop when a new direction's norm falls below ``tol × ‖operator‖`` (invariant
            subspace); dtype: storage of the basis (coefficients are always float64).
        on_checkpoint: called every ``checkpoint_every`` operator applications with the new
            basis rows since the last call and the state (``rows``, ``coef``, ``applied``,
            ``m``, ``scale``); resume: those checkpoints, in order, to continue from the last
            (an operator with state, e.g. a data stream, must be restored by the caller).
    """
    if iterations < 1 or block < 1 or dim < 1:
        raise InputError(
            f"arnoldi needs iterations ≥ 1, block ≥ 1 and dim ≥ 1 (got {iterations}, {block}, "
            f"{dim}).")
    block = min(block, iterations, dim)
    cap = min(iterations + block, dim)
    basis = torch.zeros(cap, dim, dtype=dtype, device=device)
    coef = torch.zeros(cap, cap, dtype=torch.float64)
    if start is None:
        gen = torch.Generator().manual_seed(seed)
        start = torch.randn(block, dim, generator=gen, dtype=torch.float64)
    start = start.reshape(-1, dim).to(device=device, dtype=torch.float64)
    m = 0
    for v in start:
        v, _ = _orthogonalize(v, basis[:m])
        norm = v.norm()
        if norm > 1e-12 and m < cap:
            basis[m] = (v / norm).to(dtype)
            m += 1
    if m == 0:
        raise InputError("arnoldi: the start vector is zero; give a nonzero start.")

    scale = 0.0
    applied = 0
    stopped = False
    if resume:
        rows = torch.cat([c["rows"] for c in resume]).to(device, dtype)
        last = resume[-1]
        m, applied, scale = int(last["m"]), int(last["applied"]), float(last["scale"])
        if rows.shape != (m, dim) or m > cap:
            raise InputError("arnoldi: the stored iterations do not fit these settings; "
                             "clear them (overwrite=True).")
        basis[:m] = rows
        coef[:m, :applied] = last["coef"]
    saved_m, saved_applied = m if resume else 0, applied
    bar = progress_bar(total=iterations, desc="Arnoldi", unit="hvp", leave=False,
               progress=progress)
    with bar:
        while applied < iterations:
            stop = min(applied + block, m, iterations)
            if stop == applied:  # every basis vector applied, nothing new: invariant subspace
                stopped = True
                break
            w_block = matvec(basis[applied:stop].to(torch.float64)).to(torch.float64)
            check_finite(w_block, "an Arnoldi operator product",
                         "The curvature overflowed; check the loss and model.")
            for j, w in zip(range(applied, stop), w_block, strict=True):
                scale = max(scale, float(w.norm()))
                w, c = _orthogonalize(w, basis[:m])
                coef[:m, j] = c
                norm = float(w.norm())
                if norm > tol * max(scale, 1e-300) and m < cap:
                    basis[m] = (w / norm).to(dtype)
                    coef[m, j] = norm
                    m += 1
            bar.update(stop - applied)
            applied = stop
            if on_checkpoint is not None and (applied - saved_applied >= checkpoint_every
                                              and applied < iterations):
                on_checkpoint({"rows": basis[saved_m:m].clone(),
                               "coef": coef[:m, :applied].clone(), "applied": applied,
                               "m": m, "scale": scale})
                saved_m, saved_applied = m, applied
    return Krylov(basis[:m], coef[:m, :m], applied, stopped)


def _orthogonalize(w: torch.Tensor, q: torch.Tensor, chunk: int = 16,
                   passes: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove the span of ``q``'s rows from ``w`` by modified Gram–Schmidt, chunk by chunk,
    twice ("twice is enough"). Returns the residual and the float64 coefficients."""
    coef = torch.zeros(q.shape[0], dtype=torch.float64, device=w.device)
    w = w.to(torch.float64)
    for _ in range(passes):
        for i in range(0, q.shape[0], chunk):
            rows = q[i:i + chunk].to(torch.float64)
            c = rows @ w
            w = w - c @ rows
            coef[i:i + chunk] += c
    return w, coef.cpu()


# --------------------------------------------------------------------------- distillation
def distill(krylov: Krylov, rank: int, which: str = "magnitude",
            dtype: torch.dtype | None = None) -> Eigenpairs:
    """Top ``rank`` eigenpairs of the operator from its Krylov basis.

    The square block of the projected (Hessenberg) matrix is symmetrised, ``½(A + Aᵀ)`` (the
    operator is symmetric; with a streamed operator this also averages the two noisy estimates
    of each entry), eigen-decomposed, and eigenvectors are mapped back: ``e_j = Σ_i U_ij q_i``.

    Args:
        which: ``"magnitude"`` (largest ``|λ|`` first) or ``"positive"`` (largest positive
            eigenvalues only; fewer than ``rank`` when the operator has fewer).
        dtype: of the returned eigenvectors (default: the basis's).
    """
    rank = positive_int("rank", rank)
    n = krylov.applied
    a = krylov.projected[:n, :n]
    values, u = torch.linalg.eigh((a + a.T) / 2)
    ritz = Eigenpairs(values, u.T).select(rank, which)  # eigenvectors in Krylov coordinates
    basis = krylov.basis[:n]
    vectors = ritz.vectors.to(basis.device, torch.float64) @ basis.to(torch.float64)
    vectors = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-300)
    info = {"krylov_dim": n, "stopped_early": krylov.stopped_early,
            "ritz_values": values.flip(0).tolist()}
    return Eigenpairs(ritz.values, vectors.to(dtype or basis.dtype), info)


def top_eigenpairs(matvec: MatVec, dim: int, rank: int, iterations: int | None = None, *,
                   which: str = "magnitude", **kw: Any) -> Eigenpairs:
    """:func:`arnoldi` then :func:`distill` (``iterations`` defaults to ``max(2·rank, 20)``)."""
    iterations = iterations or max(2 * rank, 20)
    return distill(arnoldi(matvec, dim, iterations, **kw), rank, which)


# --------------------------------------------------------------------------- data curvature
METHODS = ("auto", "randomized", "arnoldi")


@dataclass(frozen=True)
class Eigensolver:
    """How the eigenbasis of the curvature is found (besides ``rank``, ``iterations`` and
    ``curvature``, which the estimator takes directly).

    Args:
        method: ``"randomized"`` (randomized subspace iteration, :mod:`.randomized`: for the
            GGN, on per-example sampled-label Fisher gradients of *all* examples, ``passes``
            passes over the data), ``"arnoldi"`` (the paper's Arnoldi iteration on curvature
            products) or ``"auto"`` (default: randomized for ``curvature="ggn"``, Arnoldi for
            ``"hessian"``).
        which: ``"magnitude"`` (largest ``|λ|``) or ``"positive"``; ``None``: what the spectral
            filter needs (positive for the horizon filter, which explodes on negative ones).
        passes, oversample, fisher, samples: randomized only: passes over the data, extra
            block vectors beyond ``rank`` (``None``: see :meth:`plan`), and the GGN's output
            vectors, ``samples`` per example (``None``: see :meth:`plan`): ``"gaussian"``
            (default; ``H_o^{1/2} ε``), ``"sampled"`` (labels drawn from the model), ``"ggn"``
            (exact, ``C`` per example) or ``"empirical"``; see
            :class:`~influencekit.curvature.randomized.FisherGradients`.
        sampling: Arnoldi only: the data each pass sees: ``"stream"`` (default; the next
            batch of a seeded shuffle, so the passes cover the set), ``"fixed"`` or ``"full"``.
        batch: Arnoldi only: examples per pass; ``None``: ``epochs × N / passes``, at least
            ``max(32, budget / (passes × P))`` (small models get the whole set every pass).
        epochs, budget: see ``batch``; the budget also sizes the randomized solver
            (:meth:`plan`). block: Arnoldi vectors per pass (block Krylov).
        micro_batch_size: examples per curvature or gradient evaluation (memory only).
        seed: start vectors, data stream and label draws.
    """

    method: str = "auto"
    which: str | None = None
    passes: int | None = None
    oversample: int | None = None
    fisher: str = "gaussian"
    samples: int | None = None
    sampling: str = "stream"
    batch: int | None = None
    epochs: float = 1.0
    budget: float = 1e9
    block: int = 1
    micro_batch_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        choice("method", self.method, METHODS)
        if self.which is not None:
            choice("which", self.which, WHICH)
        optional_positive_int("passes", self.passes)
        if self.oversample is not None:
            integer("oversample", self.oversample, minimum=0)
        choice("fisher", self.fisher, ("sampled", "gaussian", "ggn", "empirical"))
        optional_positive_int("samples", self.samples)
        choice("sampling", self.sampling, ("stream", "fixed", "full"))
        optional_positive_int("batch", self.batch)
        positive("epochs", self.epochs)
        non_negative("budget", self.budget)
        positive_int("block", self.block)
        positive_int("micro_batch_size", self.micro_batch_size)
        integer("seed", self.seed)

    def plan(self, n: int, p: int) -> tuple[int, int, int]:
        """``(samples, passes, oversample)`` of the randomized solver for ``n`` examples and
        ``p`` parameters: what is not set is ``(1, 2, 10)``, or ``(16, 3, 30)`` when that much
        work (``48 · n · p`` example-parameters) fits in ``budget`` — small models get a less
        noisy Fisher and one more power step for the cost of one pass on a large model."""
        cheap = 48 * n * p <= self.budget
        return (self.samples or (16 if cheap else 1), self.passes or (3 if cheap else 2),
                self.oversample if self.oversample is not None else (30 if cheap else 10))

    def resolved(self, curvature: str) -> str:
        """The method used for ``curvature``."""
        if self.method != "auto":
            return self.method
        return "randomized" if curvature == "ggn" else "arnoldi"

    def settings(self, curvature: str = "hessian") -> dict[str, Any]:
        """What the eigenbasis depends on (only the settings of the method used)."""
        method = self.resolved(curvature)
        if method == "randomized":
            s = {"method": method, "which": self.which, "passes": self.passes,
                 "oversample": self.oversample, "seed": self.seed, "budget": self.budget}
            if curvature == "ggn":
                s.update(fisher=self.fisher, samples=self.samples)
                if self.fisher in ("gaussian", "sampled"):
                    s["final_pass"] = "fresh draws"
            return s
        s = asdict(self)
        for k in ("passes", "oversample", "fisher", "samples", "micro_batch_size"):
            s.pop(k)
        s["method"] = method
        if self.sampling == "full" or self.batch is not None:
            s.pop("budget")
        return s


def stream_batch_size(n: int, iterations: int, block: int = 1, epochs: float = 1.0,
                      minimum: int = 32, params: int | None = None,
                      budget: float = 0.0) -> int:
    """Examples per pass so that ``ceil(iterations / block)`` passes cover ``epochs × n``.

    With ``params`` and ``budget``, each pass takes at least ``budget / (passes × params)``
    examples: small models get (up to) the full training set every pass for the cost that a
    large model spends on one epoch.
    """
    passes = math.ceil(iterations / block)
    if params and budget > 0:
        minimum = max(minimum, math.ceil(budget / (passes * params)))
    return max(1, min(n, max(minimum, math.ceil(epochs * n / passes))))


def curvature_eigenpairs(
    task: Task, data: Data, rank: int = 50, iterations: int = 200, *,
    curvature: str = "hessian", solver: Eigensolver = Eigensolver(), which: str | None = None,
    basis_budget: int = 2 * 2**30, progress: bool | None = None,
    done: Mapping[int, Any] | None = None,
    on_pass: Callable[[int, Any], None] | None = None,
) -> Eigenpairs:
    """Top ``rank`` eigenpairs of the mean-loss curvature of ``task`` over ``data``.

    **Randomized** (``solver.resolved(curvature) == "randomized"``): ``solver.passes`` passes
    over all of ``data``, each applying the curvature to ``rank + oversample`` vectors — for the
    GGN through per-example Fisher gradients of drawn output vectors
    (:class:`~influencekit.curvature.randomized.FisherGradients`, Nyström at the end; the last
    pass draws afresh, so the eigenvalues are not fitted to the draws that chose the subspace:
    LDS +0.006 on the MNIST CNN over three seeds, unchanged on the digits MLPs), for the
    Hessian through block Hessian-vector products (Rayleigh–Ritz). ``done`` / ``on_pass``
    resume and record the passes (``{"y": Y}`` per pass, see
    :func:`~influencekit.curvature.randomized_eigh`); ``iterations`` is not used.

    **Arnoldi**: ``iterations`` steps. With the default stream and no ``solver.batch``, each
    pass takes ``ceil(epochs × N / passes)`` examples, so the curvature information comes from
    the whole training set at the cost of about ``epochs`` epochs of curvature products; and at
    least ``max(32, budget / (passes × P))``: the default budget (1e9 example-parameters) gives
    the digits MLP (P = 2.4k) the full set and the MNIST CNN (P = 106k) 48 examples per pass.
    ``done`` / ``on_pass`` resume and record checkpoints of the iteration (every 25
    applications: new basis rows, coefficients and the data stream's state).

    Eigenvectors are returned in the task's dtype, eigenvalues in float64.
    """
    p = task.num_params
    n = num_examples(data)
    if n == 0:
        raise InputError("the training data is empty: give at least one example.")
    which = which or solver.which or "magnitude"
    if solver.resolved(curvature) == "randomized":
        samples, passes, oversample = solver.plan(n, p)
        sketch = final = None
        if curvature == "ggn":
            fisher = FisherGradients(
                task, data, fisher=solver.fisher, samples=samples, seed=solver.seed,
                batch_size=min(solver.micro_batch_size, 64), progress=progress)
            op: Callable[[torch.Tensor], torch.Tensor] = fisher
            sketch = partial(fisher.sketch, seed=solver.seed)
            if solver.fisher in ("gaussian", "sampled") and passes > 1:
                final = fisher.fresh  # eigenvalues not fitted to the draws that chose Q
        else:
            op = CurvatureOperator(task, data, curvature, sampling="full",
                                   micro_batch_size=solver.micro_batch_size)
        pairs = randomized_eigh(
            op, p, rank, passes=passes, oversample=oversample, seed=solver.seed,
            psd=curvature == "ggn", which=which, sketch=sketch, final=final,
            done={i: t["y"] for i, t in (done or {}).items()},
            on_pass=None if on_pass is None else (lambda i, y: on_pass(i, {"y": y})))
        pairs.vectors = pairs.vectors.to(task.device, task.dtype)
        pairs.info.update(examples_seen=n * (passes - len(done or {})), samples=samples,
                          sampling="full", batch=n, curvature=curvature)
        return pairs
    batch = solver.batch
    if batch is None:
        batch = (n if solver.sampling == "full" else
                 stream_batch_size(n, iterations, solver.block, solver.epochs, params=p,
                                   budget=solver.budget))
    op = CurvatureOperator(task, data, curvature, sampling=solver.sampling, batch=batch,
                           micro_batch_size=solver.micro_batch_size, seed=solver.seed)
    dtype = torch.float64 if (iterations + solver.block) * p * 8 <= basis_budget \
        else torch.float32
    resume = [done[i] for i in sorted(done or {})]
    if resume:  # the data stream continues where the checkpoint left it
        st = resume[-1]["stream"]
        op.gen.set_state(st["rng"])
        op._order, op.examples_seen = st["order"], int(st["seen"])

    written = [len(resume)]

    def checkpoint(state: dict[str, Any]) -> None:
        state["stream"] = {"rng": op.gen.get_state(), "order": op._order.clone(),
                           "seen": op.examples_seen}
        on_pass(written[0], state)  # type: ignore[misc]
        written[0] += 1

    krylov = arnoldi(op, p, min(iterations, p), block=solver.block, seed=solver.seed,
                     dtype=dtype, device=task.device, progress=progress, resume=resume,
                     on_checkpoint=None if on_pass is None else checkpoint)
    pairs = distill(krylov, rank, which, dtype=task.dtype)
    pairs.info.update(solver="arnoldi", examples_seen=op.examples_seen,
                      sampling=solver.sampling, batch=op.batch, curvature=curvature)
    return pairs
