"""Differentiation primitives over a :class:`~influencekit.task.Task`.

All vectors are flat ``[..., P]`` tensors in the task's parameter layout. Everything streams over
batches, so the full ``N × P`` gradient matrix is never built unless a caller asks for it.

- :func:`per_example_grads`: ``[B, P]`` from one batched backward with layer captures
  (:mod:`influencekit.layerwise`) when every selected parameter lies in a covered layer, else by
  ``vmap(grad)``, with a per-example loop fallback for models that ``vmap`` cannot trace (e.g.
  data-dependent control flow).
- :func:`curvature_vp`: Hessian- or GGN-vector products of the *summed* batch loss, for a block of
  vectors at once (Hessian: reverse-over-reverse; GGN: ``Jᵀ H_out J`` by forward and reverse
  mode; each with a double-backward / per-vector fallback).
- :func:`value_jvps`: directional derivatives of per-example losses/measurements, ``[k, B]``.

The curvature of the *mean* loss over a data set is :class:`~influencekit.curvature.
CurvatureOperator`, built on :func:`curvature_vp`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator

import torch
from torch.func import grad, jvp, vjp, vmap

from . import layerwise
from .batching import (
    Batch,
    Data,
    batch_size_of,
    iter_batches,
    num_examples,
    slice_batch,
    to_device,
    tree_map,
)
from .errors import check_finite
from .progress import progress_bar
from .task import Task, output_tensor
from .validate import choice

CURVATURES = ("hessian", "ggn")


def _try_vmap(task: Task, key: str, fast: Callable[[], torch.Tensor],
              slow: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Run ``fast`` (vmap-based) unless it failed before for this task; else ``slow``."""
    flags = task.__dict__.setdefault("_vmap_ok", {})
    if flags.get(key, True):
        try:
            out = fast()
            flags[key] = True
            return out
        except (RuntimeError, NotImplementedError, ValueError, TypeError) as e:
            if flags.get(key) is True:  # worked before: a genuine error
                raise
            warnings.warn(
                f"torch.func could not trace the model for {key} ({type(e).__name__}: "
                f"{str(e)[:200]}); falling back to a slower per-example loop.",
                stacklevel=3,
            )
            flags[key] = False
    return slow()


# --------------------------------------------------------------------------- per-example grads
def per_example_grads(task: Task, batch: Batch, kind: str = "loss", *,
                      vectors: torch.Tensor | None = None,
                      out: torch.Tensor | None = None, check: bool = True) -> torch.Tensor:
    """Gradients of each example's loss (``kind="loss"``) or measurement, ``[B, P]``; with
    ``vectors [B, ...]`` (one per example, the outputs' shape), of ``⟨output_n, vectors_n⟩``
    instead (Jacobian-transpose products; ``kind`` unused).

    When every selected parameter lies in a linear, convolution, normalisation or embedding
    layer, one batched forward and backward with the layers' inputs and output gradients
    captured (:mod:`influencekit.layerwise`); otherwise ``vmap(grad)``, and a per-example loop
    for models ``vmap`` cannot trace.

    ``out``: a ``[≥B, P]`` buffer to write the result into (its first ``B`` rows are returned).
    Streaming loops pass the same buffer for every batch: a fresh ``[B, P]`` allocation per
    batch costs page faults that, on the MNIST CNN, took a quarter of the time.

    ``check=False`` skips the NaN/inf check (a pass over ``[B, P]``, 5% of the time here) for
    callers that check a reduction of the rows that any NaN/inf reaches (norms, products) with
    :func:`check_grads`."""
    task.check_batch(batch)
    theta = task.theta()
    if vectors is None:  # the layer path is checked once per value function
        key = f"{kind}:{id(task.loss_fn if kind == 'loss' else task.measurement_fn)}"

        def value(th: dict[str, torch.Tensor], b: Batch, v: torch.Tensor | None
                  ) -> torch.Tensor:
            return task.values(th, b, kind)
    else:
        key = "vector"
        vectors = vectors.to(task.dtype)

        def value(th: dict[str, torch.Tensor], b: Batch, v: torch.Tensor | None
                  ) -> torch.Tensor:
            o = output_tensor(task.outputs(th, b))
            return (o.reshape(o.shape[0], -1) * v.reshape(v.shape[0], -1)).sum(1)

    def fast() -> torch.Tensor:
        def one(th: dict[str, torch.Tensor], example: Batch, v: torch.Tensor | None
                ) -> torch.Tensor:
            lift = lambda t: t.unsqueeze(0)  # noqa: E731
            return value(th, tree_map(lift, example), None if v is None else lift(v)).sum()

        g = vmap(grad(one), in_dims=(None, 0, None if vectors is None else 0))(
            theta, batch, vectors)
        return task.layout.flatten(g, batch_dims=1)

    def slow(part: Batch = batch) -> torch.Tensor:
        rows = []
        params = {n: t.detach().requires_grad_(True) for n, t in theta.items()}
        for i in range(batch_size_of(part)):
            v = None if vectors is None else vectors[i:i + 1]
            with torch.enable_grad():
                total = value(params, slice_batch(part, slice(i, i + 1)), v).sum()
            gs = torch.autograd.grad(total, list(params.values()), allow_unused=True)
            rows.append(torch.cat([
                (torch.zeros_like(p) if g is None else g).reshape(-1)
                for p, g in zip(params.values(), gs)
            ]))
        return torch.stack(rows)

    with task.evaluating():
        rows = None if out is None else out[:batch_size_of(batch)]
        g = layerwise.checked_grads(
            task, batch, lambda th, b: value(th, b, vectors), key,
            lambda b: slow(slice_batch(b, slice(0, 2))), out=rows)
        if g is None:
            what = "Jacobian-transpose products" if vectors is not None else f"{kind} gradients"
            g = _try_vmap(task, f"per-example {what}", fast, slow)
            if rows is not None:
                g = rows.copy_(g)
    g = g.detach()
    return check_grads(g, kind) if check else g


def project_grads(task: Task, batch: Batch, kind: str, basis: torch.Tensor, cache: dict, *,
                  grads: Callable[[], torch.Tensor] | None = None,
                  parts: dict[str, torch.Tensor] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G Eᵀ [B, k], ‖g_n‖² [B])``: the per-example gradients ``G`` of :func:`per_example_grads`
    projected on the rows of ``basis [k, P]`` (the model's dtype), and their squared norms.

    Once the layer path has been checked for this task and kind (on a first batch through
    :func:`per_example_grads`), without ``[B, P]`` where the layers allow
    (:func:`influencekit.layerwise.projections`: an ``nn.Linear`` weight contributes
    ``δᵀ (E_j a)``, saving its gradient block and a third of the projection's time on the MNIST
    CNN); otherwise from ``grads()`` (default: :func:`per_example_grads`). ``cache``: a dict the
    caller keeps while the basis is in use (the basis rearranged per layer). ``parts``: a dict
    to fill with the gradients themselves in factored form, for exact inner products with
    :func:`influencekit.layerwise.gradient_dots` (Linear weights as input and output gradient,
    the rest as columns; without the layer path, ``{"rest": G}``)."""
    task.check_batch(batch)
    key = f"{kind}:{id(task.loss_fn if kind == 'loss' else task.measurement_fn)}"
    the_plan = None if task.__dict__.get("_layerwise_off") else layerwise.plan(task)
    if parts is not None and the_plan is not None and key not in the_plan.ok:
        per_example_grads(task, batch, kind, check=False)  # decide the layer path first
    if the_plan is not None and the_plan.ok.get(key) is True:
        if cache.get("plan") is not the_plan or cache.get("basis") is not basis:
            cache.clear()
            cache.update(plan=the_plan, basis=basis,
                         projection=layerwise.Projection(the_plan, basis))
        with task.evaluating():
            coords, sq, got = layerwise.projections(
                task, cache["projection"], batch, lambda th, b: task.values(th, b, kind),
                keep=parts is not None)
        if bool(torch.isfinite(sq.sum() + coords.sum())):
            if parts is not None:
                parts.update(got)
            return coords, sq
    g = grads() if grads is not None else per_example_grads(task, batch, kind, check=False)
    norms = torch.linalg.vector_norm(g, dim=1)
    check_grads(g, kind, reduced=norms)  # NaN/inf in g reaches its norms
    if parts is not None:
        parts["rest"] = g.clone()  # g may be a reused buffer
    return (basis @ g.T).T, norms * norms  # E Gᵀ: 25% faster than G Eᵀ on the MNIST CNN


def check_grads(g: torch.Tensor, kind: str = "loss",
                reduced: torch.Tensor | None = None) -> torch.Tensor:
    """Raise :class:`~influencekit.errors.NumericalError` if per-example gradients ``g`` hold
    NaN/inf; with ``reduced`` (norms or products of the rows: NaN/inf in ``g`` reaches them)
    ``g`` itself is scanned only when ``reduced`` is not finite."""
    if reduced is not None and bool(torch.isfinite(reduced.sum())):
        return g
    return check_finite(g, f"per-example {kind} gradients",
                        "Check the inputs for NaN/inf and the model for overflow (e.g. log of 0).")


def iter_grads(
    task: Task, data: Data, batch_size: int, kind: str = "loss", *,
    desc: str | None = None, progress: bool | None = None, reuse: bool = False,
    check: bool = True,
) -> Iterator[torch.Tensor]:
    """Stream ``[B, P]`` per-example gradients over ``data`` in order. ``reuse``: write every
    batch into one buffer (each yielded tensor is overwritten by the next batch: for loops that
    consume a batch before asking for the next). ``check``: as for :func:`per_example_grads`."""
    bar = progress_bar(total=num_examples(data), desc=desc or f"{kind} gradients", unit="ex",
                       progress=progress)
    buffer = grad_buffer(task, min(batch_size, num_examples(data))) if reuse else None
    with bar:
        for batch in iter_batches(data, batch_size):
            g = per_example_grads(task, to_device(batch, task.device), kind, out=buffer,
                                  check=check)
            yield g
            bar.update(g.shape[0])


def grad_buffer(task: Task, rows: int) -> torch.Tensor:
    """An uninitialised ``[rows, P]`` buffer for :func:`per_example_grads`'s ``out``."""
    return torch.empty(rows, task.num_params, dtype=task.dtype, device=task.device)


def all_grads(task: Task, data: Data, batch_size: int = 64, kind: str = "loss",
              progress: bool | None = None) -> torch.Tensor:
    """Every example's gradient as one ``[N, P]`` matrix (small problems only)."""
    return torch.cat(list(iter_grads(task, data, batch_size, kind, progress=progress)))


# --------------------------------------------------------------------------- curvature products
def curvature_vp(task: Task, batch: Batch, vectors: torch.Tensor,
                 curvature: str = "hessian") -> torch.Tensor:
    """``C v`` for each row ``v`` of ``vectors [k, P]``, where ``C`` is the Hessian or GGN of the
    *summed* loss over ``batch``. Returns ``[k, P]``."""
    choice("curvature", curvature, CURVATURES)
    if vectors.dim() == 1:
        return curvature_vp(task, batch, vectors[None], curvature)[0]
    task.check_batch(batch)
    theta = task.theta()
    layout = task.layout
    vectors = vectors.to(task.dtype)

    def summed(th: dict[str, torch.Tensor]) -> torch.Tensor:
        return task.losses(th, batch).sum()

    def ggn_one(v: torch.Tensor) -> torch.Tensor:
        def outputs(th: dict[str, torch.Tensor]) -> torch.Tensor:
            return output_tensor(task.outputs(th, batch))

        out, jv = jvp(outputs, (theta,), (layout.unflatten(v),))
        _, hjv = jvp(grad(lambda o: task.loss_fn(o, batch).sum()), (out,), (jv,))
        _, pullback = vjp(outputs, theta)
        return layout.flatten(pullback(hjv)[0])

    def fast() -> torch.Tensor:
        if curvature == "ggn":
            return vmap(ggn_one)(vectors)
        # Reverse-over-reverse: the gradient's graph is built once and only its pullback is
        # vmapped over the vectors (1.3-1.9x faster than forward-over-reverse on the digits
        # MLP, 1.0-1.4x on the MNIST CNN; benchmarks/RESULTS.md, issue 8 goal 5).
        _, pullback = vjp(grad(summed), theta)
        return vmap(lambda v: layout.flatten(pullback(layout.unflatten(v))[0]))(vectors)

    def slow() -> torch.Tensor:
        if curvature == "ggn":
            return torch.stack([ggn_one(v) for v in vectors])
        params = {n: t.detach().requires_grad_(True) for n, t in theta.items()}
        gs = torch.autograd.grad(summed(params), list(params.values()), create_graph=True)
        flat = torch.cat([g.reshape(-1) for g in gs])
        rows = []
        for v in vectors:
            hv = torch.autograd.grad(flat, list(params.values()), grad_outputs=v,
                                     retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(torch.zeros_like(p) if h is None else h).reshape(-1)
                                   for p, h in zip(params.values(), hv)]))
        return torch.stack(rows)

    with task.evaluating():
        out = _try_vmap(task, f"{curvature}-vector products", fast, slow)
    return check_finite(out.detach(), f"{curvature}-vector product",
                        "The loss is not twice differentiable here or overflowed.")


# --------------------------------------------------------------------------- JVPs
def value_jvps(task: Task, batch: Batch, vectors: torch.Tensor,
               kind: str = "loss") -> torch.Tensor:
    """``⟨∇ value_i, v_j⟩`` for each example ``i`` of ``batch`` and each row ``v_j`` of
    ``vectors [k, P]``, by forward-mode differentiation. Returns ``[k, B]``."""
    task.check_batch(batch)
    theta = task.theta()
    layout = task.layout

    vectors = vectors.to(task.dtype)

    def one(v: torch.Tensor) -> torch.Tensor:
        return jvp(lambda th: task.values(th, batch, kind), (theta,),
                   (layout.unflatten(v),))[1]

    with task.evaluating():
        out = _try_vmap(task, f"{kind} JVPs", lambda: vmap(one)(vectors),
                        lambda: torch.stack([one(v) for v in vectors]))
    return check_finite(
        out.detach(), f"directional derivatives of the per-example {kind}",
        "Check the inputs for NaN/inf and the model for overflow (e.g. log of 0).")
