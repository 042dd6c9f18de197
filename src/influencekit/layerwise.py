"""Per-example gradients from one batched forward and backward, layer by layer.

For a layer ``y = W a + b`` applied at positions ``t`` (tokens, pixels, repeated calls), the
gradient of example ``n``'s value is ``Σ_t δ_{n,t} a_{n,t}ᵀ`` (and ``Σ_t δ_{n,t}`` for the bias),
with ``a`` the layer's input and ``δ`` the gradient at its output. One ordinary batched forward
with hooks recording the inputs, and one backward of the *summed* per-example values to the
layer outputs, give every ``a`` and ``δ``; the per-example products are then written straight
into the ``[B, P]`` result in the task's parameter order. Because each example's value depends
on that example alone (the :class:`~influencekit.task.Task` contract, in eval mode), ``δ`` of the
summed values is each example's own ``δ``: no scaling, whatever the loss.

Covered (every selected parameter must lie in one of these, used through its own ``forward``
and owned by no other module; otherwise :func:`plan` returns ``None`` and callers use
``vmap``):

- ``nn.Linear`` (any leading shape: the middle dimensions are positions);
- ``nn.Conv1d/2d/3d`` (any stride, padding — also ``'same'`` and non-zero padding modes —,
  dilation and groups): the per-example weight gradient is the weight gradient of one convolution
  with the batch folded into the groups (``convolution_backward`` with ``B·groups`` groups);
- ``nn.LayerNorm``, ``nn.GroupNorm`` and ``nn.BatchNorm*d`` in eval mode on running statistics:
  ``Σ δ ⊙ x̂`` with ``x̂`` the normalised input, recomputed by the same functional op;
- ``nn.Embedding`` (no ``max_norm`` or ``scale_grad_by_freq``; ``padding_idx`` rows get zero, as
  in autograd): rows scattered into a zeroed block.

The first batch of each task and measurement kind is checked against per-example autograd on
its first examples; a mismatch (a weight also used outside its module, a loss that mixes
examples, …) switches the task to ``vmap`` for good, with a warning. ``task._layerwise_off =
True`` switches it off by hand (benchmarks, tests); ``plan(task).ok`` says what was checked.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .batching import Batch, batch_size_of

ValueFn = Callable[[dict[str, torch.Tensor], Batch], torch.Tensor]

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_LINEAR_LIKE = (nn.Linear,) + _CONVS + _NORMS + (nn.Embedding,)


class Unsupported(Exception):
    """The layer path cannot handle this model or batch (callers fall back to vmap)."""


@dataclass(frozen=True)
class Layer:
    """A module whose selected parameters are written by the layer path."""

    name: str
    module: nn.Module
    weight: slice | None  # columns of the [B, P] result (None: not selected)
    bias: slice | None


@dataclass(frozen=True)
class Plan:
    layers: tuple[Layer, ...]
    size: int  # P
    needs_zero: bool  # some block is scattered (embedding): start from zeros
    ok: dict[str, bool] = field(default_factory=dict)  # checked against autograd, per key


def _base(m: nn.Module) -> type | None:
    """The supported class whose ``forward`` ``m`` uses unchanged, else ``None``."""
    for cls in _LINEAR_LIKE:
        if isinstance(m, cls):
            return cls if type(m).forward is cls.forward else None
    return None


def _why_not(m: nn.Module, base: type | None) -> str | None:
    if base is None:
        return f"{type(m).__name__} is not a layer with a per-example rule here"
    if isinstance(m, nn.Embedding) and (m.max_norm is not None or m.scale_grad_by_freq):
        return "embedding with max_norm or scale_grad_by_freq"
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and (
            m.training or not m.track_running_stats or m.running_mean is None):
        return "batch norm on batch statistics"
    return None


def plan(task: Any) -> Plan | None:
    """The layer plan of ``task``'s selected parameters, or ``None`` when some selected
    parameter lies outside a covered layer (the reason is kept in ``task._layerwise_why``).
    Cached on the task, keyed by the model's modules (a copy of the task with another model,
    or a replaced submodule, gets its own plan) and batch norm's modes."""
    with task.evaluating():  # the mode the gradients are taken in
        key = tuple((id(m), isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training)
                    for m in task.model.modules())
        cache = task.__dict__.get("_layerwise_plans")
        if cache is None or cache[0] != key:
            cache = (key, task.model, _make_plan(task))  # the model: keeps key's ids valid
            task.__dict__["_layerwise_plans"] = cache
    return cache[2]


def _make_plan(task: Any) -> Plan | None:
    offsets: dict[str, slice] = {}
    start = 0
    for n, size in zip(task.layout.names, task.layout.numels):
        offsets[n] = slice(start, start + size)
        start += size
    owners: dict[int, int] = {}
    for _, m in task.model.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    name_of: dict[int, str] = {}
    for n, p in task.model.named_parameters(remove_duplicate=False):
        if id(p) in name_of:
            owners[id(p)] = owners.get(id(p), 0) + 1  # one tensor under two names: shared
        name_of.setdefault(id(p), n)
    layers, covered, why = [], set(), None
    for mname, m in task.model.named_modules():
        own = dict(m.named_parameters(recurse=False))
        sel = {pn: name_of[id(p)] for pn, p in own.items() if name_of.get(id(p)) in offsets}
        if not sel:
            continue
        reason = _why_not(m, _base(m))
        if reason is None and set(sel) - {"weight", "bias"}:
            reason = f"parameters {sorted(set(sel) - {'weight', 'bias'})}"
        if reason is None and any(owners[id(own[pn])] > 1 for pn in sel):
            reason = "a parameter shared between modules"
        if reason is not None:
            why = f"{mname or type(m).__name__}: {reason}"
            break
        layers.append(Layer(mname, m, offsets.get(sel.get("weight", "")),
                            offsets.get(sel.get("bias", ""))))
        covered.update(sel.values())
    if why is None and covered != set(offsets):
        why = f"parameters outside modules: {sorted(set(offsets) - covered)[:4]}"
    task.__dict__["_layerwise_why"] = why
    if why is not None:
        return None
    return Plan(tuple(layers), start, any(isinstance(la.module, nn.Embedding) for la in layers))


# --------------------------------------------------------------------------- capture
class _Capture:
    """Forward hooks recording each layer's input and adding a zero probe to its output (so
    the gradient at the output can be taken, also if the output is later changed in place).
    Shared by the per-example gradients here and the K-FAC factors
    (:mod:`influencekit.curvature.kfac`); a layer input that is not batch-first raises
    :class:`Unsupported`."""

    def __init__(self, layers: tuple[Layer, ...], batch_size: int):
        self.layers, self.b = layers, batch_size
        self.inputs: list[list[torch.Tensor]] = [[] for _ in layers]
        self.probes: list[list[torch.Tensor]] = [[] for _ in layers]

    @contextlib.contextmanager
    def hooked(self) -> Iterator[_Capture]:
        handles = [la.module.register_forward_hook(self._hook(i))
                   for i, la in enumerate(self.layers)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def _hook(self, i: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor):
                raise Unsupported(f"{type(module).__name__} called without a tensor input")
            if x.dim() < 2 or x.shape[0] != self.b or output.shape[0] != self.b:
                raise Unsupported(f"{type(module).__name__} input is not batch-first "
                                  f"({tuple(x.shape)} for {self.b} examples)")
            self.inputs[i].append(x.detach())
            probe = torch.zeros((), dtype=output.dtype, device=output.device).expand(
                output.shape).requires_grad_(True)
            self.probes[i].append(probe)
            return output + probe

        return hook

    def deltas(self, outputs: torch.Tensor, grad_outputs: torch.Tensor | None = None, *,
               retain_graph: bool = False) -> list[list[torch.Tensor | None]]:
        """Per layer, per call: the gradient of ``Σ ⟨grad_outputs, outputs⟩`` (of the scalar
        ``outputs`` when ``grad_outputs`` is ``None``) at the layer's output, ``None`` where
        it is not reached."""
        flat = [p for ps in self.probes for p in ps]
        if not flat or not outputs.requires_grad:
            return [[None] * len(ps) for ps in self.probes]
        gs = torch.autograd.grad(outputs, flat, grad_outputs=grad_outputs,
                                 retain_graph=retain_graph, allow_unused=True)
        out, k = [], 0
        for ps in self.probes:
            out.append(list(gs[k:k + len(ps)]))
            k += len(ps)
        return out


def _captured(task: Any, the_plan: Plan, batch: Batch, value: ValueFn
              ) -> tuple[int, list[list[tuple[torch.Tensor, torch.Tensor]]]]:
    """One batched forward and backward: ``B`` and, per layer, its calls' (input, output
    gradient) pairs (calls whose output no value reached are left out)."""
    b = batch_size_of(batch)
    cap = _Capture(the_plan.layers, b)
    theta = task.theta()
    with torch.enable_grad(), cap.hooked():
        total = value(theta, batch).sum()
    deltas = cap.deltas(total)
    return b, [[(a, d) for a, d in zip(cap.inputs[i], deltas[i]) if d is not None]
               for i in range(len(the_plan.layers))]


def grads(task: Any, the_plan: Plan, batch: Batch, value: ValueFn,
          out: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, P]``: the gradient of each example's ``value(theta, batch)[n]`` (into ``out``)."""
    b, calls = _captured(task, the_plan, batch, value)
    if out is None:
        out = torch.empty(b, the_plan.size, dtype=task.dtype, device=task.device)
    if the_plan.needs_zero:
        out.zero_()
    with torch.no_grad():
        for layer, layer_calls in zip(the_plan.layers, calls):
            _write(out, layer, layer_calls, b)
    return out


class Projection:
    """A basis ``E [k, P]`` (rows, the model's dtype) prepared for :func:`projections`: each
    ``nn.Linear`` weight block as ``[in, k·out]``, so that an example's ``⟨E_j, δ aᵀ⟩`` is
    ``δᵀ (E_j a)`` without its ``out × in`` gradient block; the other columns as one
    ``[k, P_rest]`` block for the per-example gradients of the remaining parameters."""

    def __init__(self, the_plan: Plan, basis: torch.Tensor):
        self.plan, self.basis, self.k = the_plan, basis, basis.shape[0]
        self.direct: dict[int, torch.Tensor] = {}
        rest: list[torch.Tensor] = []
        self.compact: list[Layer] = []
        start = 0

        def take(cols: slice | None) -> slice | None:
            nonlocal start
            if cols is None:
                return None
            rest.append(torch.arange(cols.start, cols.stop))
            start += cols.stop - cols.start
            return slice(start - (cols.stop - cols.start), start)

        for i, layer in enumerate(the_plan.layers):
            direct = isinstance(layer.module, nn.Linear) and layer.weight is not None
            if direct:
                o, n_in = layer.module.weight.shape
                self.direct[i] = basis[:, layer.weight].reshape(self.k * o, n_in).T.contiguous()
            self.compact.append(Layer(layer.name, layer.module,
                                      None if direct else take(layer.weight), take(layer.bias)))
        index = torch.cat(rest) if rest else torch.zeros(0, dtype=torch.long)
        self.rest = basis[:, index.to(basis.device)].contiguous()  # [k, P_rest]
        self.rest_size = start


def projections(task: Any, proj: Projection, batch: Batch, value: ValueFn, *,
                keep: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor] | None]:
    """``(G Eᵀ [B, k], ‖g‖² [B], parts)`` of the per-example gradients ``G`` without
    ``[B, P]``: a Linear weight applied once per example contributes ``δᵀ (E_j a)`` and
    ``‖δ‖² ‖a‖²``, every other block is written into a ``[B, P_rest]`` buffer and projected.

    ``keep``: ``parts`` also holds the gradients themselves in factored form, from which
    :func:`gradient_dots` gives exact ``⟨g_q, g_x⟩`` (``None`` otherwise): ``in<i>``/``out<i>``
    (``a``, ``δ``) for such a Linear weight, ``block<i>`` for one applied at several positions,
    ``rest`` for the other columns."""
    b, calls = _captured(task, proj.plan, batch, value)
    parts: dict[str, torch.Tensor] | None = {} if keep else None
    dtype, device = task.dtype, task.device
    compact = (torch.zeros if proj.plan.needs_zero else torch.empty)(
        b, proj.rest_size, dtype=dtype, device=device)
    coords = torch.zeros(b, proj.k, dtype=dtype, device=device)
    sq = torch.zeros(b, dtype=dtype, device=device)
    with torch.no_grad():
        for i, (layer, layer_calls) in enumerate(zip(proj.plan.layers, calls)):
            _write(compact, proj.compact[i], layer_calls, b)
            if i not in proj.direct:
                continue
            o, n_in = layer.module.weight.shape
            if not layer_calls:  # not reached: a zero gradient
                if parts is not None:
                    parts[f"in{i}"] = torch.zeros(b, n_in, dtype=dtype, device=device)
                    parts[f"out{i}"] = torch.zeros(b, o, dtype=dtype, device=device)
                continue
            a, d = layer_calls[0]
            if len(layer_calls) == 1 and a.numel() == b * n_in:  # one position per example
                a, d = a.reshape(b, n_in), d.reshape(b, o).to(dtype)
                m = (proj.direct[i].T @ a.T).view(proj.k, o, b)  # E_j a (this order: faster)
                coords.add_((m * d.T).sum(1).T)
                sq.add_((d * d).sum(1) * (a * a).sum(1))
                if parts is not None:
                    parts[f"in{i}"], parts[f"out{i}"] = a.to(dtype), d
            else:  # positions or repeated calls: the block itself
                block = torch.empty(b, o * n_in, dtype=dtype, device=device)
                _write(block, Layer(layer.name, layer.module, slice(0, o * n_in), None),
                       layer_calls, b)
                coords.addmm_(block, proj.basis[:, layer.weight].T)
                sq.add_((block * block).sum(1))
                if parts is not None:
                    parts[f"block{i}"] = block
        coords.addmm_(compact, proj.rest.T)
        sq.add_((compact * compact).sum(1))
    if parts is not None:
        parts["rest"] = compact
    return coords, sq, parts


def gradient_dots(q: dict[str, torch.Tensor], t: dict[str, torch.Tensor]) -> torch.Tensor:
    """``⟨g_q, g_x⟩ [Q, N]`` (float64) from the ``parts`` of :func:`projections` (or any dict
    whose ``in<i>``/``out<i>`` pairs are Linear factors and whose other keys are gradient
    columns): ``Σ_i (δ_q·δ_x)(a_q·a_x) + Σ_blocks g_q·g_x``. Keys present on one side only
    (a layer applied at several positions in one batch and at one in the other) refuse."""
    if set(q) != set(t):
        raise ValueError(f"gradient parts differ: {sorted(set(q) ^ set(t))}")
    out = None
    for key in q:
        if key.startswith("out"):
            continue
        prod = (q[key] @ t[key].T).to(torch.float64)
        if key.startswith("in"):
            prod *= (q["out" + key[2:]] @ t["out" + key[2:]].T).to(torch.float64)
        out = prod if out is None else out.add_(prod)
    return out


def _block(out: torch.Tensor, cols: slice, shape: tuple[int, ...]) -> torch.Tensor:
    return out[:, cols].view(out.shape[0], *shape)


def _put(view: torch.Tensor, value: torch.Tensor, first: bool) -> None:
    if first:
        view.copy_(value)
    else:
        view.add_(value)


def _write(out: torch.Tensor, layer: Layer, calls: list[tuple[torch.Tensor, torch.Tensor]],
           b: int) -> None:
    """Write (sum over calls) the layer's per-example gradient blocks into ``out``."""
    m = layer.module
    w_shape = tuple(m.weight.shape) if layer.weight is not None else ()
    if not calls:  # the layer was not reached by any value: zero gradient
        for cols in (layer.weight, layer.bias):
            if cols is not None:
                out[:, cols] = 0
        return
    for j, (a, d) in enumerate(calls):
        first = j == 0
        d = d.to(out.dtype)
        if isinstance(m, nn.Linear):
            a2 = a.reshape(b, -1, a.shape[-1])
            d2 = d.reshape(b, -1, d.shape[-1])
            if layer.weight is not None:
                view = _block(out, layer.weight, w_shape)
                if a2.shape[1] == 1 and first:
                    torch.mul(d2[:, 0, :, None], a2[:, 0, None, :], out=view)
                elif a2.shape[1] == 1:
                    view.addcmul_(d2[:, 0, :, None], a2[:, 0, None, :])
                else:
                    _put(view, torch.bmm(d2.transpose(1, 2), a2), first)
            if layer.bias is not None:
                _put(out[:, layer.bias], d2.sum(1), first)
        elif isinstance(m, _CONVS):
            if layer.weight is not None:
                _put(_block(out, layer.weight, w_shape), _conv_weight_grads(m, a, d), first)
            if layer.bias is not None:
                _put(out[:, layer.bias], d.reshape(b, d.shape[1], -1).sum(2), first)
        elif isinstance(m, nn.Embedding):
            if layer.weight is not None:
                view = _block(out, layer.weight, w_shape)
                idx = a.reshape(b, -1)
                rows = torch.arange(b, device=idx.device)[:, None].expand_as(idx)
                dd = d.reshape(b, -1, d.shape[-1])
                if m.padding_idx is not None:
                    keep = idx != m.padding_idx
                    rows, idx, dd = rows[keep], idx[keep], dd[keep]
                view.index_put_((rows.reshape(-1), idx.reshape(-1)),
                                dd.reshape(-1, dd.shape[-1]), accumulate=True)
        else:  # normalisation: y = x̂ ⊙ w + b over the affine dims
            xhat, dims = _normalised(m, a)
            d = d.reshape(xhat.shape)
            if layer.weight is not None:
                _put(_block(out, layer.weight, w_shape), _sum_to(d * xhat, dims), first)
            if layer.bias is not None:
                _put(_block(out, layer.bias, tuple(m.bias.shape)), _sum_to(d, dims), first)


def _sum_to(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return t.sum(dims) if dims else t


def _normalised(m: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``x̂`` as the module computes it, and the dims to sum for ``[B, *affine shape]``."""
    if isinstance(m, nn.LayerNorm):
        xhat = F.layer_norm(x, m.normalized_shape, None, None, m.eps)
        k = len(m.normalized_shape)
        return xhat, tuple(range(1, x.dim() - k))
    if isinstance(m, nn.GroupNorm):
        xhat = F.group_norm(x, m.num_groups, None, None, m.eps)
        return xhat, tuple(range(2, x.dim()))
    xhat = F.batch_norm(x, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)
    return xhat, tuple(range(2, x.dim()))


def _conv_weight_grads(m: nn.Module, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``[B, *weight shape]``: one weight gradient of the convolution with the batch folded
    into the groups."""
    b = x.shape[0]
    if isinstance(m.padding, str) or m.padding_mode != "zeros":
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        x = F.pad(x, m._reversed_padding_repeated_twice, mode=mode)
        padding = [0] * (x.dim() - 2)
    else:
        padding = list(m.padding)
    o, cg = m.weight.shape[:2]
    kernel = tuple(m.weight.shape[2:])
    xs = x.reshape(1, b * x.shape[1], *x.shape[2:])
    ds = d.reshape(1, b * o, *d.shape[2:])
    weight = x.new_empty((b * o, cg, *kernel))  # its shape only: no input gradient is asked
    gw = torch.ops.aten.convolution_backward(
        ds, xs, weight, None, list(m.stride), padding, list(m.dilation), False,
        [0] * len(kernel), b * m.groups, [False, True, False])[1]
    return gw.reshape(b, o, cg, *kernel)


# --------------------------------------------------------------------------- checked use
def checked_grads(task: Any, batch: Batch, value: ValueFn, key: str,
                  reference: Callable[[Batch], torch.Tensor],
                  out: torch.Tensor | None = None) -> torch.Tensor | None:
    """``[B, P]`` by the layer path, or ``None`` when the task is not covered (use vmap).
    The first batch for each ``key`` is compared with ``reference`` (per-example autograd)
    on its first two examples; a mismatch turns the layer path off for the task."""
    the_plan = plan(task)
    if the_plan is None:
        return None
    flags = the_plan.ok
    if task.__dict__.get("_layerwise_off"):  # switched off by hand (tests, benchmarks)
        return None
    if flags.get(key) is False:
        return None
    try:
        g = grads(task, the_plan, batch, value, out)
    except Unsupported as e:
        flags[key] = False
        task.__dict__["_layerwise_why"] = str(e)
        return None
    if key not in flags:
        n = min(2, g.shape[0])
        ref = reference(batch).to(g.dtype)[:n] if n else g[:0]
        if not bool(torch.isfinite(ref).all()):  # undecided: the callers' finiteness checks
            return g  # report the non-finite values (a NaN batch says nothing of the path)
        err = _mismatch(g[:n], ref, task)
        flags[key] = err is None
        if err is not None:
            task.__dict__["_layerwise_why"] = err
            warnings.warn(f"per-example gradients from layer captures disagree with autograd "
                          f"({err}); using vmap for this task.", stacklevel=4)
            return None
    return g


def _mismatch(g: torch.Tensor, ref: torch.Tensor, task: Any) -> str | None:
    """Where the layer-path rows ``g`` differ from ``ref`` beyond rounding, per parameter."""
    tol = 1e-3 if g.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-8
    floor = float(ref.norm()) * 1e-3
    start = 0
    for name, size in zip(task.layout.names, task.layout.numels):
        a, r = g[:, start:start + size], ref[:, start:start + size]
        start += size
        err = float((a - r).norm())
        if not err <= tol * max(float(r.norm()), floor):
            return f"{name}: relative error {err / max(float(r.norm()), 1e-300):.2e}"
    return None
