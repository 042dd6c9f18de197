"""Kronecker-factored curvature (K-FAC) and its eigenvalue correction (EK-FAC).

For a layer with per-example weight gradient ``G = Σ_t g_t a_tᵀ`` (``a``: the layer's input,
with a 1 appended for the bias; ``g``: the gradient at its output; ``t``: positions, i.e.
tokens or conv patches, or repeated calls of the module), the layer's block of the mean-loss
Fisher/GGN is approximated as ``S ⊗ A`` with

    A = E[a aᵀ]  (averaged over examples and positions)
    S = E_n[Σ_t g gᵀ]  (summed over positions, averaged over examples and output samples)

in the row-major layout of ``G`` (``vec(G) = g ⊗ a``). With ``A = Q_A Λ_A Q_Aᵀ`` and
``S = Q_S Λ_S Q_Sᵀ``, K-FAC's damped inverse is ``(Q_S ⊗ Q_A)(Λ_S ⊗ Λ_A + λI)⁻¹(Q_S ⊗ Q_A)ᵀ``;
EK-FAC keeps the eigenbasis and replaces ``Λ_S ⊗ Λ_A`` by the exact second moments of the
gradients in it, ``E[(Q_Sᵀ G Q_A)²]`` (George et al. 2018). Neither ever forms ``S ⊗ A``.

**Which output gradients** ``g`` (the *Fisher*): the GGN of a loss ``ℓ(o)`` of outputs ``o`` is
``Jᵀ H_o J`` with ``H_o = ∂²ℓ/∂o²``; any vectors ``v`` with ``E[v vᵀ] = H_o`` back-propagated from
the outputs give it.

- ``"sampled"`` (true Fisher): for cross-entropy classification (:class:`ClassificationTask`)
  ``v = p − e_y`` with ``y`` drawn from the model's own predictive distribution ``p`` (``samples``
  draws per example); for any other task ``v = H_o^{1/2} ε``, ``ε ~ N(0, I)``. Either way
  ``E[v vᵀ] = H_o``, so the result is the GGN in expectation.
- ``"gaussian"``: ``v = H_o^{1/2} ε``, ``ε ~ N(0, I)`` for every task (for cross-entropy in
  closed form, ``v = √p ⊙ ε − p ⟨√p, ε⟩``): also the GGN in expectation, with much less
  variance than a drawn label when the model is confident (a drawn label is then almost
  always the predicted one, whose gradient is tiny, and rarely another with a large one).
- ``"ggn"``: the exact expectation: the ``C`` columns of ``H_o^{1/2}`` (``C`` backward passes per
  batch; for squared loss ``H_o = I``, for cross-entropy ``diag(p) − ppᵀ``).
- ``"empirical"``: the gradient of the task's own loss at the true targets (the empirical
  Fisher, which is *not* the GGN).

Draws are seeded per example (``seed`` and the example's index), so results do not depend on
the batch size. The eigenvalue correction draws **afresh** (its own stream): with the factors'
draws reused, the correction is measured on the very noise that shaped the eigenbasis, and on
the MNIST CNN EK-FAC's LDS fell from 0.365 to 0.360 (mean over 8–12 seeds, s.e. 0.001;
benchmarks/RESULTS.md).

**Layers**: ``nn.Linear`` (any leading shape; the middle dimensions are positions),
``nn.Conv2d`` (``groups=1``, zero padding: unfolded patches, one position per output pixel) and
``nn.Embedding`` (one-hot inputs: ``A`` is diagonal, the token frequencies). A layer whose weight
is selected and whose bias is not (or the reverse) is a block over the selected part only.
Selected parameters of other modules (normalisation layers, grouped convolutions, parameters
shared between modules, …) get a **diagonal** Fisher from the same output gradients
(``unsupported="diagonal"``, default) or raise an :class:`~influencekit.errors.InputError`
naming them (``unsupported="error"``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, jvp, vmap

from .. import layerwise
from ..batching import (
    Batch,
    Data,
    batch_size_of,
    iter_batches,
    num_examples,
    to_device,
    tree_map,
)
from ..errors import InputError, check_finite
from ..progress import progress_bar
from ..task import ClassificationTask, Task, cross_entropy, output_tensor
from ..validate import choice, integer, positive_int

FISHERS = ("sampled", "ggn", "empirical", "gaussian")
UNSUPPORTED = ("diagonal", "error")


@dataclass(frozen=True)
class KroneckerLayer:
    """One Kronecker-factored block: a module and which of its parameters it covers."""

    module: str  # module name in the model
    kind: str  # "linear" | "conv2d" | "embedding"
    weight: str | None  # selected parameter names (None: not selected)
    bias: str | None
    d_out: int  # rows of the block's gradient matrix
    d_in: int  # columns: input features (+1 for a selected bias); vocabulary for embeddings

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def _conv_padding(m: nn.Conv2d) -> tuple[int, int] | None:
    if isinstance(m.padding, str):
        if m.padding == "valid":
            return (0, 0)
        pads = []
        for k, d in zip(m.kernel_size, m.dilation):
            total = d * (k - 1)
            if total % 2:
                return None  # asymmetric 'same' padding
            pads.append(total // 2)
        return (pads[0], pads[1])
    return (int(m.padding[0]), int(m.padding[1]))


def _why_unsupported(m: nn.Module) -> str | None:
    if isinstance(m, nn.Conv2d):
        if m.groups != 1:
            return "grouped convolution"
        if m.padding_mode != "zeros":
            return f"padding_mode={m.padding_mode!r}"
        if _conv_padding(m) is None:
            return "asymmetric 'same' padding"
        return None
    if isinstance(m, nn.Embedding):
        return "scale_grad_by_freq" if m.scale_grad_by_freq else None
    if isinstance(m, nn.Linear):
        return None
    return f"{type(m).__name__} has no Kronecker factorisation here"


def find_layers(task: Task) -> tuple[list[KroneckerLayer], list[str], dict[str, str]]:
    """The Kronecker blocks of ``task``'s selected parameters, the selected parameters left for
    the diagonal fallback, and why each of those is not factored (``{param: reason}``)."""
    selected = set(task.layout.names)
    owners: dict[int, list[str]] = {}
    for mname, m in task.model.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{mname}.{pname}" if mname else pname)
    name_of = {id(p): n for n, p in task.model.named_parameters()}
    layers: list[KroneckerLayer] = []
    covered: set[str] = set()
    reasons: dict[str, str] = {}
    for mname, m in task.model.named_modules():
        own = {pn: p for pn, p in m.named_parameters(recurse=False)}
        names = {pn: name_of.get(id(p)) for pn, p in own.items()}
        sel = {pn: n for pn, n in names.items() if n in selected}
        if not sel:
            continue
        why = _why_unsupported(m)
        shared = [n for pn, n in sel.items() if len(owners[id(own[pn])]) > 1]
        if why is None and shared:
            why = "parameter shared with another module"
        if why is not None:
            for n in sel.values():
                reasons.setdefault(n, f"{mname or type(m).__name__}: {why}")
            continue
        w, b = sel.get("weight"), sel.get("bias")
        if isinstance(m, nn.Linear):
            layers.append(KroneckerLayer(mname, "linear", w, b, m.out_features,
                                         (m.in_features if w else 0) + (1 if b else 0)))
        elif isinstance(m, nn.Conv2d):
            fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            layers.append(KroneckerLayer(mname, "conv2d", w, b, m.out_channels,
                                         (fan_in if w else 0) + (1 if b else 0)))
        else:
            layers.append(KroneckerLayer(mname, "embedding", w, None, m.embedding_dim,
                                         m.num_embeddings))
        covered.update(sel.values())
    fallback = [n for n in task.layout.names if n not in covered]
    for n in fallback:
        reasons.setdefault(n, "not a parameter of a supported layer")
    return layers, fallback, {n: reasons[n] for n in fallback}


# --------------------------------------------------------------------------- capture
def _activations(layer: KroneckerLayer, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    b = x.shape[0]
    if layer.kind == "embedding":
        return x.reshape(b, -1)
    if layer.kind == "conv2d":
        x = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=_conv_padding(m),
                     stride=m.stride).transpose(1, 2)
    else:
        x = x.reshape(b, -1, x.shape[-1])
    parts = [x] if layer.weight else []
    if layer.bias:
        parts.append(x.new_ones(*x.shape[:2], 1))
    return torch.cat(parts, -1)


def _positions(layer: KroneckerLayer, g: torch.Tensor) -> torch.Tensor:
    b = g.shape[0]
    if layer.kind == "conv2d":
        return g.reshape(b, g.shape[1], -1).transpose(1, 2)
    return g.reshape(b, -1, g.shape[-1])


# --------------------------------------------------------------------------- the curvature
class KroneckerCurvature:
    """Kronecker factors of a task's mean-loss GGN / Fisher, fitted by streaming over data.

    Args:
        task: the task (its parameter selection decides the blocks).
        fisher: ``"sampled"``, ``"ggn"`` or ``"empirical"`` (module docstring).
        samples: output draws per example for ``"sampled"``.
        seed: seed of the draws. batch_size: examples per pass (does not change results).
        unsupported: ``"diagonal"`` (fallback) or ``"error"`` for parameters outside supported
            layers.
    """

    def __init__(self, task: Task, *, fisher: str = "sampled", samples: int = 1, seed: int = 0,
                 batch_size: int = 64, unsupported: str = "diagonal",
                 progress: bool | None = None):
        self.task = task
        self.fisher = choice("fisher", fisher, FISHERS)
        self.samples = positive_int("samples", samples)
        self.seed = integer("seed", seed, minimum=0)
        self.batch_size = positive_int("batch_size", batch_size)
        self.unsupported = choice("unsupported", unsupported, UNSUPPORTED)
        self.progress = progress
        self.layers, self.fallback, self.reasons = find_layers(task)
        if self.fallback and self.unsupported == "error":
            listed = "; ".join(f"{n} ({r})" for n, r in list(self.reasons.items())[:8])
            raise InputError(
                f"unsupported='error' and {len(self.fallback)} selected parameter(s) lie outside "
                f"layers with a Kronecker factorisation: {listed}. Exclude them with params=, "
                "or pass unsupported='diagonal' to give them a diagonal Fisher.")
        offsets, start = {}, 0
        for n, size in zip(task.layout.names, task.layout.numels):
            offsets[n] = slice(start, start + size)
            start += size
        self._slices = offsets
        self._fallback_index = (torch.cat([torch.arange(offsets[n].start, offsets[n].stop)
                                           for n in self.fallback])
                                if self.fallback else torch.zeros(0, dtype=torch.long))
        self._classify = isinstance(task, ClassificationTask) and task.loss_fn is cross_entropy

    def settings(self) -> dict[str, Any]:
        """What fitted factors depend on besides task and data."""
        drawn = self.fisher in ("sampled", "gaussian")
        return {"fisher": self.fisher, "samples": self.samples if drawn else 0,
                "seed": self.seed if drawn else 0,
                "layers": [layer.describe() for layer in self.layers],
                "fallback": self.fallback, "params": self.task.param_names,
                "dtype": str(self.task.dtype)}

    # ----------------------------------------------------------------- output vectors
    def output_vectors(self, o: torch.Tensor, batch: Batch, start: int, stream: int = 0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """``v [K, B, C]`` with ``E_k[w_k v vᵀ] = H_o`` (or the empirical gradient), weights
        ``w [K]``, for the outputs ``o`` of examples ``start, start + 1, …``; ``stream``: an
        independent set of draws per value (public: the randomized eigensolver draws its
        Fisher gradients with the same sampler)."""
        b = o.shape[0]
        shape = o.shape
        flat = o.detach().reshape(b, -1)
        if self.fisher == "empirical":
            o_req = flat.clone().requires_grad_(True)
            g = torch.autograd.grad(self.task.loss_fn(o_req.reshape(shape), batch).sum(),
                                    o_req)[0]
            return g[None], torch.ones(1, dtype=torch.float64)
        if self.fisher == "sampled" and self._classify:
            p = torch.softmax(flat.to(torch.float64), -1)
            u = torch.stack([torch.rand(self.samples, generator=self._gen(start + i, stream),
                                        dtype=torch.float64) for i in range(b)], 1)
            cdf = p.cumsum(-1)
            y = torch.searchsorted(cdf, (u * cdf[:, -1]).T.contiguous()).clamp_max(
                p.shape[1] - 1).T  # [K, B]
            v = p[None] - F.one_hot(y, p.shape[1]).to(p.dtype)
            return v.to(flat.dtype), torch.full((self.samples,), 1.0 / self.samples,
                                                dtype=torch.float64)
        if self.fisher == "gaussian" and self._classify:
            p = torch.softmax(flat.to(torch.float64), -1)
            eps = torch.stack([torch.randn(self.samples, p.shape[1],
                                           generator=self._gen(start + i, stream),
                                           dtype=torch.float64)
                               for i in range(b)], 1)  # [K, B, C]
            sq = p.sqrt()
            v = sq * eps - p * (sq * eps).sum(-1, keepdim=True)
            return v.to(flat.dtype), torch.full((self.samples,), 1.0 / self.samples,
                                                dtype=torch.float64)
        root = self._hessian_root(flat, shape, batch)  # [B, C, C]
        if self.fisher == "ggn":
            keep = root.abs().amax(dim=(0, 1)) > 0
            v = root[:, :, keep].permute(2, 0, 1)
            return v, torch.ones(v.shape[0], dtype=torch.float64)
        eps = torch.stack([torch.randn(self.samples, root.shape[1],
                                       generator=self._gen(start + i, stream),
                                       dtype=torch.float64) for i in range(b)], 1)
        v = torch.einsum("bcd,kbd->kbc", root, eps.to(root.dtype))
        return v, torch.full((self.samples,), 1.0 / self.samples, dtype=torch.float64)

    def _gen(self, index: int, stream: int = 0) -> torch.Generator:
        if stream == 0:
            return torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        key = hashlib.sha256(f"influencekit-fisher:{self.seed}:{stream}:{index}".encode())
        return torch.Generator().manual_seed(int.from_bytes(key.digest()[:8], "little") >> 1)

    def _hessian_root(self, flat: torch.Tensor, shape: torch.Size, batch: Batch) -> torch.Tensor:
        """``L [B, C, C]`` with ``L Lᵀ = ∂²ℓ/∂o²`` per example (negative eigenvalues dropped)."""
        c = flat.shape[1]

        def summed(o: torch.Tensor) -> torch.Tensor:
            return self.task.loss_fn(o.reshape(shape), batch).sum()

        basis = torch.eye(c, dtype=flat.dtype).expand(flat.shape[0], c, c).permute(2, 0, 1)

        def column(e: torch.Tensor) -> torch.Tensor:
            return jvp(grad(summed), (flat,), (e,))[1]

        try:
            cols = vmap(column)(basis.contiguous())
        except (RuntimeError, NotImplementedError, ValueError, TypeError):
            cols = torch.stack([column(e) for e in basis])
        h = cols.permute(1, 2, 0).to(torch.float64)  # [B, C, C]
        h = 0.5 * (h + h.transpose(1, 2))
        vals, vecs = torch.linalg.eigh(h)
        root = vecs * vals.clamp_min(0).sqrt()[:, None, :]
        return check_finite(root, "output Hessian", "The loss is not twice differentiable "
                            "in the outputs or overflowed.").to(flat.dtype)

    # ----------------------------------------------------------------- passes
    def _passes(self, data: Data, desc: str, stream: int = 0
                ) -> Iterator[tuple[list, list, torch.Tensor, torch.Tensor, Batch]]:
        """Per batch: each layer's activations ``acts[i]`` (``[B, T, d_in]``; embedding: token
        indices ``[B, T]``; ``None`` if the layer was not called), output gradients per draw
        and layer ``grads[k][i]`` (``[B, T, d_out]``), weights ``w [K]``, output vectors
        ``v [K, B, C]`` (draws of ``stream``) and the batch. The layers' inputs and output
        gradients come from :mod:`influencekit.layerwise`'s capture."""
        task = self.task
        modules = dict(task.model.named_modules())
        captured = tuple(layerwise.Layer(la.module, modules[la.module], None, None)
                         for la in self.layers)
        theta = task.theta()
        start = 0
        bar = progress_bar(total=num_examples(data), desc=desc, unit="ex",
                           progress=self.progress)
        with bar, task.evaluating():
            for batch in iter_batches(data, self.batch_size):
                batch = to_device(batch, task.device)
                task.check_batch(batch)
                b = batch_size_of(batch)
                cap = layerwise._Capture(captured, b)
                with torch.enable_grad():
                    try:
                        with cap.hooked():
                            o = output_tensor(task.outputs(theta, batch))
                    except layerwise.Unsupported as e:
                        raise InputError(
                            f"K-FAC reads each layer's input per example: {e}. Exclude that "
                            "layer's parameters with params=, or use another estimator."
                        ) from None
                    acts = [torch.cat([_activations(la, modules[la.module], x) for x in xs], 1)
                            if xs else None for la, xs in zip(self.layers, cap.inputs)]
                    v, w = self.output_vectors(o, batch, start, stream)
                    flat = o.reshape(b, -1)
                    grads = [self._output_grads(cap, flat, vk.to(flat.dtype)) for vk in v]
                yield acts, grads, w, v, batch
                start += b
                bar.update(b)

    def _output_grads(self, cap: layerwise._Capture, outputs: torch.Tensor, v: torch.Tensor
                      ) -> list[torch.Tensor | None]:
        """``[B, T, d_out]`` gradients of ``Σ ⟨v, outputs⟩`` at each layer's output (over all
        its calls; zero for a call the outputs do not reach)."""
        if not self.layers:
            return []
        deltas = cap.deltas(outputs, v, retain_graph=True)
        out: list[torch.Tensor | None] = []
        for layer, probes, ds in zip(self.layers, cap.probes, deltas):
            parts = [_positions(layer, torch.zeros_like(p) if d is None else d)
                     for p, d in zip(probes, ds)]
            out.append(torch.cat(parts, 1) if parts else None)
        return out

    def _fallback_sq(self, batch: Batch, v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``Σ_n Σ_k w_k (∂⟨v_k, o_n⟩/∂θ)²`` over the fallback parameters (float64)."""
        task = self.task
        theta = task.theta()
        rest = {n: t for n, t in theta.items() if n not in set(self.fallback)}
        fb = {n: theta[n] for n in self.fallback}

        def one(th: dict[str, torch.Tensor], example: Batch, vk: torch.Tensor) -> torch.Tensor:
            ex = tree_map(lambda t: t.unsqueeze(0), example)
            o = output_tensor(task.outputs({**rest, **th}, ex)).reshape(-1)
            return (o * vk).sum()

        total = torch.zeros(len(self._fallback_index), dtype=torch.float64)
        for vk, wk in zip(v, w):
            try:
                g = vmap(grad(one), in_dims=(None, 0, 0))(fb, batch, vk)
                flat = torch.cat([g[n].reshape(g[n].shape[0], -1) for n in self.fallback], 1)
            except (RuntimeError, NotImplementedError, ValueError, TypeError):
                rows = []
                for i in range(vk.shape[0]):
                    params = {n: t.detach().requires_grad_(True) for n, t in fb.items()}
                    ex = tree_map(lambda t, i=i: t[i], batch)
                    gi = torch.autograd.grad(one(params, ex, vk[i]), list(params.values()),
                                             allow_unused=True)
                    rows.append(torch.cat([(torch.zeros_like(p) if x is None else x).reshape(-1)
                                           for p, x in zip(params.values(), gi)]))
                flat = torch.stack(rows)
            total += float(wk) * (flat.to(torch.float64) ** 2).sum(0)
        return total

    def fit_factors(self, data: Data) -> dict[str, Any]:
        """``{"A": [...], "S": [...], "diag": [...], "n": N}``: per layer ``A [d_in, d_in]``
        (embedding: its diagonal ``[V]``) and ``S [d_out, d_out]``, float64; ``diag``: the
        diagonal Fisher of the fallback parameters."""
        f64 = torch.float64
        a_sum = [torch.zeros(layer.d_in, dtype=f64) if layer.kind == "embedding"
                 else torch.zeros(layer.d_in, layer.d_in, dtype=f64) for layer in self.layers]
        s_sum = [torch.zeros(layer.d_out, layer.d_out, dtype=f64) for layer in self.layers]
        rows = [0] * len(self.layers)
        diag = torch.zeros(len(self._fallback_index), dtype=f64)
        n = 0
        with torch.no_grad():
            for acts, grads, w, v, batch in self._passes(data, "K-FAC factors"):
                for i, layer in enumerate(self.layers):
                    a = acts[i]
                    if a is None:
                        continue
                    rows[i] += a.shape[0] * a.shape[1]
                    if layer.kind == "embedding":
                        a_sum[i] += torch.bincount(a.reshape(-1).cpu(),
                                                   minlength=layer.d_in).to(f64)
                    else:
                        a2 = a.reshape(-1, a.shape[-1]).to(f64).cpu()
                        a_sum[i] += a2.T @ a2
                    for wk, gk in zip(w, grads):
                        g2 = gk[i].reshape(-1, gk[i].shape[-1]).to(f64).cpu()
                        s_sum[i] += float(wk) * (g2.T @ g2)
                if self.fallback:
                    with torch.enable_grad():
                        diag += self._fallback_sq(batch, v, w)
                n += batch_size_of(batch)
        a_out = [a / max(r, 1) for a, r in zip(a_sum, rows)]
        return {"A": a_out, "S": [s / n for s in s_sum], "diag": diag / n, "n": n}

    @staticmethod
    def eigendecompose(factors: dict[str, Any]) -> dict[str, Any]:
        """``{"QA", "lA", "QS", "lS"}`` per layer (embedding: ``QA`` is ``None``, A diagonal)."""
        out: dict[str, list[Any]] = {"QA": [], "lA": [], "QS": [], "lS": []}
        for a, s in zip(factors["A"], factors["S"]):
            if a.dim() == 1:
                out["QA"].append(None)
                out["lA"].append(a.clone())
            else:
                la, qa = torch.linalg.eigh(0.5 * (a + a.T))
                out["QA"].append(qa)
                out["lA"].append(la.clamp_min(0))
            ls, qs = torch.linalg.eigh(0.5 * (s + s.T))
            out["QS"].append(qs)
            out["lS"].append(ls.clamp_min(0))
        return out

    @staticmethod
    def kfac_values(eigen: dict[str, Any]) -> list[torch.Tensor]:
        """``Λ_S ⊗ Λ_A`` per layer as ``[d_out, d_in]`` matrices."""
        return [ls[:, None] * la[None, :] for ls, la in zip(eigen["lS"], eigen["lA"])]

    def fit_correction(self, data: Data, eigen: dict[str, Any]) -> list[torch.Tensor]:
        """EK-FAC eigenvalues ``E[(Q_Sᵀ G Q_A)²]`` per layer, ``[d_out, d_in]`` float64."""
        f64 = torch.float64
        acc = [torch.zeros(layer.d_out, layer.d_in, dtype=f64) for layer in self.layers]
        n = 0
        with torch.no_grad():
            for acts, grads, w, _v, batch in self._passes(data, "EK-FAC correction", stream=1):
                n += batch_size_of(batch)
                for i, layer in enumerate(self.layers):
                    a = acts[i]
                    if a is None:
                        continue
                    qs = eigen["QS"][i].to(a.device)
                    qa = eigen["QA"][i]
                    for wk, gk in zip(w, grads):
                        gt = gk[i].to(f64) @ qs  # [B, T, d_out] in S's eigenbasis
                        if layer.kind == "embedding":
                            acc[i] += float(wk) * _embedding_sq(gt, a, layer.d_in).cpu()
                        else:
                            at = a.to(f64) @ qa.to(a.device)
                            if at.shape[1] == 1:  # (g̃ ãᵀ)² = g̃² (ã²)ᵀ: no [B, o, i] tensor
                                sq = (gt[:, 0] ** 2).T @ (at[:, 0] ** 2)
                            else:
                                proj = torch.einsum("bto,bti->boi", gt, at)
                                sq = (proj * proj).sum(0)
                            acc[i] += float(wk) * sq.cpu()
        return [x / n for x in acc]

    # ----------------------------------------------------------------- preconditioning
    def precondition(self, g: torch.Tensor, eigen: dict[str, Any], values: list[torch.Tensor],
                     diag: torch.Tensor, damping: float) -> torch.Tensor:
        """``(C + λI)⁻¹ g`` block by block for the rows of ``g [k, P]`` (float64), ``C`` the
        block-diagonal K-FAC / EK-FAC curvature with eigenvalues ``values``. With ``λ = 0``,
        eigenvalues below ``1e-10 ×`` the block's largest are treated as zero and left out
        (a pseudo-inverse)."""
        g = g.to(torch.float64)
        out = torch.zeros_like(g)
        for i, layer in enumerate(self.layers):
            mat = self._block(g, layer)  # [k, d_out, d_in]
            qs = eigen["QS"][i].to(g.device)
            qa = eigen["QA"][i]
            x = qs.T @ mat
            if qa is not None:
                x = x @ qa.to(g.device)
            x = x * _inverse(values[i].to(g.device), damping)
            x = qs @ x
            if qa is not None:
                x = x @ qa.to(g.device).T
            self._unblock(out, x, layer)
        if self.fallback:
            idx = self._fallback_index.to(g.device)
            out[:, idx] = g[:, idx] * _inverse(diag.to(g.device), damping)
        return out

    def _block(self, g: torch.Tensor, layer: KroneckerLayer) -> torch.Tensor:
        k = g.shape[0]
        if layer.kind == "embedding":
            return g[:, self._slices[layer.weight]].reshape(k, layer.d_in, layer.d_out
                                                            ).transpose(1, 2)
        parts = []
        if layer.weight:
            parts.append(g[:, self._slices[layer.weight]].reshape(k, layer.d_out, -1))
        if layer.bias:
            parts.append(g[:, self._slices[layer.bias]].reshape(k, layer.d_out, 1))
        return torch.cat(parts, -1)

    def _unblock(self, out: torch.Tensor, x: torch.Tensor, layer: KroneckerLayer) -> None:
        k = x.shape[0]
        if layer.kind == "embedding":
            out[:, self._slices[layer.weight]] = x.transpose(1, 2).reshape(k, -1)
            return
        if layer.weight:
            out[:, self._slices[layer.weight]] = x[:, :, :x.shape[2] - bool(layer.bias)
                                                   ].reshape(k, -1)
        if layer.bias:
            out[:, self._slices[layer.bias]] = x[:, :, -1]


def _inverse(values: torch.Tensor, damping: float) -> torch.Tensor:
    """``1/(v + λ)``; with ``λ = 0``, zero for ``v ≤ 1e-10 · max v`` (pseudo-inverse)."""
    v = values.clamp_min(0)
    if damping > 0:
        return 1.0 / (v + damping)
    top = float(v.max()) if v.numel() else 0.0
    keep = v > 1e-10 * top
    return torch.where(keep, 1.0 / torch.where(keep, v, torch.ones_like(v)), torch.zeros_like(v))


def _embedding_sq(gt: torch.Tensor, idx: torch.Tensor, vocab: int) -> torch.Tensor:
    """``Σ_n (Σ_t gt_{n,t} e_{idx_{n,t}}ᵀ)²`` as ``[d_out, V]`` without a ``[B, d_out, V]``
    tensor: per-example sums per distinct token, squared, then scattered."""
    b, t, d = gt.shape
    key = (torch.arange(b, device=idx.device)[:, None] * vocab + idx).reshape(-1)
    uniq, inv = torch.unique(key, return_inverse=True)
    per = torch.zeros(len(uniq), d, dtype=gt.dtype, device=gt.device)
    per.index_add_(0, inv, gt.reshape(-1, d))
    out = torch.zeros(vocab, d, dtype=gt.dtype, device=gt.device)
    out.index_add_(0, uniq % vocab, per * per)
    return out.T
