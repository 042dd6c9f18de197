"""Trajectory-aware (unrolled) influence: differentiate the end of the actual run by each
training example's weight, through every optimizer step.

The trainer's SGD step ``t`` (slots ``S_t``, forwarded examples ``U_t``, learning rate ``η_t``,
momentum ``μ``, weight decay ``λ``, example weights ``w``) is::

    g_t     = ∇θ [Σ_{i∈U_t} w_i ℓ_i(θ_t) / |S_t|] + λ θ_t
    b_{t+1} = μ b_t + g_t                      (b_0 = 0: torch's first step sets b = g)
    θ_{t+1} = θ_t − η_t b_{t+1}

Its derivative by ``w_x`` is propagated exactly, in one of two equivalent ways:

- **forward** (one tangent per example, online while the real trainer steps, no storage):
  ``J_b ← μ J_b + (H_t + λ) J_θ + ∇ℓ_x(θ_t)/|S_t|·[x ∈ U_t]``, ``J_θ ← J_θ − η_t J_b``;
- **reverse** (one adjoint per query over the recorded trajectory, ``T × P`` values kept):
  ``c = a_b − η_t a_θ``; ``dm/dw_i += ⟨∇ℓ_i(θ_t), c⟩/|S_t|``; ``a_θ += (H_t + λ) c``; ``a_b = μ c``.

``H_t`` is the Hessian of the step's batch objective. The ``auto`` mode picks forward when
there are fewer examples than queries. Both give ``dm(q, θ_T)/dw_x``; the library's score is
``score = −N · dm/dw_x`` (removing ``x``, ``w_x: 1 → 0``, changes ``m(q)`` by about
``+score/N``, as for every estimator).

The **same-time (TracIn) sum** over the same run drops the propagation factors ``(I − η_s H_s)``
(and, unless ``carry_momentum``, the momentum carry-over)::

    same_time(q, x) = N · Σ_t (η̃_t / |S_t|) · ⟨∇m(q, θ_t), ∇ℓ(x, θ_t)⟩ · [x ∈ U_t]

with ``η̃_t = η_t`` (TracIn), or ``η̃_t = Σ_{s≥t} μ^{s−t} η_s`` with ``carry_momentum=True``
(what a step's gradient eventually moves θ_T by when curvature is ignored).

Limits: SGD only (Adam is refused: its update is not smooth where the second moment is 0);
models without dropout or batch norm (their training-mode forward would not be the function
differentiated here). The trainer could offer a public differentiable step function
``(θ, b, w, t) -> (θ', b')`` and its dropout RNG state per step; this module rebuilds the step
from ``Trainer.plan`` and ``TrainConfig`` instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import grad, jvp, vmap

from .. import validate
from ..autodiff import _try_vmap, per_example_grads
from ..batching import Batch, batch_size_of, slice_batch, to_device
from ..errors import InputError, check_finite
from ..progress import progress_bar
from ..task import ClassificationTask, Task
from ..training import ModelSpec, TrainConfig, Trainer

MODES = ("auto", "forward", "reverse")


@dataclass
class TrajectoryInfluence:
    """Scores over one training run, ``[n_queries, n_examples]`` each, in the library's sign
    and scale (removing ``examples[k]`` changes ``m(q)`` at the end by about
    ``+unrolled[q, k] / n_train``)."""

    unrolled: torch.Tensor | None
    same_time: torch.Tensor | None
    examples: torch.Tensor  # [K] training indices of the columns
    n_train: int
    steps: int


def bind_task(task: Task | None, model: nn.Module) -> Task:
    """A task with ``task``'s loss, forward and measurement (default: classification) on
    ``model``, over all its trainable parameters."""
    if task is None:
        return ClassificationTask(model)
    if not isinstance(task, Task):
        raise InputError(f"task must be an influencekit Task, got {type(task).__name__}.")
    return Task(model, loss=task.loss_fn, forward=task.forward_fn,
                measurement=task.measurement_fn, eval_mode=task.eval_mode)


def _check_unrollable(config: TrainConfig, model: nn.Module) -> None:
    if config.optimizer != "sgd":
        raise InputError(
            f"unrolled influence supports optimizer='sgd' (with momentum), got "
            f"{config.optimizer!r}: Adam's update divides by √v, which is not differentiable "
            "where v = 0. Use SGD, or an estimator at the end point.")
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            raise InputError(
                f"unrolled influence cannot replay dropout ({name or 'model'}: p={m.p}): the "
                "differentiated step must equal the trainer's. Set p=0 for this analysis.")
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise InputError(
                f"unrolled influence does not support batch norm ({name or 'model'}): a batch's "
                "statistics couple its examples and removal is not a smooth weight change. "
                "Use group or layer norm (ik.models.build('resnet', norm='group')).")


def _step_jvp(task: Task, theta: dict[str, torch.Tensor], batch: Batch, n_slots: int,
              v: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row ``(v_k, u_k)`` the directional derivative of the step's batch gradient
    ``G(θ, w) = ∇θ Σ_i w_i ℓ_i(θ) / |S|`` (at ``w = 1``) and of ``ℓ_i(θ) / |S|``:
    returns ``(H v_k + Σ_i u_ki ∇ℓ_i / |S|, ⟨∇ℓ_i, v_k⟩ / |S|)`` as ``[k, P]`` and ``[k, B]``."""
    layout = task.layout
    w0 = torch.ones(batch_size_of(batch), dtype=v.dtype, device=v.device)

    def gradient(th: dict[str, torch.Tensor], w: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        def objective(th_: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            losses = task.losses(th_, batch)
            return (w * losses).sum() / n_slots, losses / n_slots

        g, scaled = grad(objective, has_aux=True)(th)
        return layout.flatten(g), scaled

    def one(vk: torch.Tensor, uk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return jvp(gradient, (theta, w0), (layout.unflatten(vk), uk))[1]

    def fast() -> tuple[torch.Tensor, torch.Tensor]:
        return vmap(one)(v, u)

    def slow() -> tuple[torch.Tensor, torch.Tensor]:
        rows = [one(vk, uk) for vk, uk in zip(v, u)]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

    with task.evaluating():  # no dropout / batch norm (checked): the mode does not matter
        dg, dl = _try_vmap(task, "unrolled step JVPs", fast, slow)
    check_finite(dg, "the step's Hessian-vector product",
                 "The loss is not twice differentiable here or overflowed.")
    return dg, dl


def _effective_lrs(trainer: Trainer, carry_momentum: bool) -> list[float]:
    lrs = [trainer.lr_at_step(t) for t in range(trainer.total_steps)]
    if not carry_momentum:
        return lrs
    mu, acc, out = trainer.config.momentum, 0.0, [0.0] * len(lrs)
    for t in range(len(lrs) - 1, -1, -1):
        acc = lrs[t] + mu * acc
        out[t] = acc
    return out


def trajectory_influence(
    model: ModelSpec,
    train: Batch,
    config: TrainConfig,
    queries: Batch,
    *,
    examples: Sequence[int] | torch.Tensor | None = None,
    task: Task | None = None,
    unrolled: bool = True,
    same_time: bool = True,
    mode: str = "auto",
    carry_momentum: bool = False,
    chunk: int = 64,
    progress: bool | None = None,
) -> TrajectoryInfluence:
    """Unrolled influence and the same-time (TracIn) sum over the run
    ``train(model, train, config, task=task)`` (replayed step by step with the real trainer).

    Args:
        model: the start point (a module: warm start; a builder: ``config.init_seed``).
        train: the training data; config: the run (SGD; any momentum, weight decay, schedule,
            batch size). queries: the query batch ``(inputs, labels)``.
        examples: training indices to score (default all). task: loss / forward /
            measurement (default classification with the query's loss as measurement).
        mode: ``"forward"`` (cost ∝ examples), ``"reverse"`` (cost ∝ queries, keeps the
            trajectory in memory) or ``"auto"`` (the cheaper).
        carry_momentum: see the module docstring (same-time sum only). chunk: tangents per
            vectorised product.
    """
    validate.choice("mode", mode, MODES)
    chunk = validate.positive_int("chunk", chunk)
    trainer = Trainer(model, train, config, task=task, progress=False)
    _check_unrollable(config, trainer.model)
    ft = bind_task(task, trainer.model)
    device, dtype, layout = ft.device, ft.dtype, ft.layout
    n = trainer.n
    idx = torch.arange(n) if examples is None else torch.as_tensor(examples).long().reshape(-1)
    if len(idx) == 0 or idx.min() < 0 or idx.max() >= n:
        raise InputError(f"examples must be a non-empty list of indices in [0, {n}).")
    queries = to_device(tuple(queries), device)
    n_q = batch_size_of(queries)
    ft.check_batch(queries)
    if mode == "auto":
        mode = "forward" if len(idx) <= n_q else "reverse"
    mu, wd = config.momentum, config.weight_decay
    eff = _effective_lrs(trainer, carry_momentum)
    column = torch.full((n,), -1, dtype=torch.long)
    column[idx] = torch.arange(len(idx))

    st = torch.zeros(n_q, len(idx), dtype=torch.float64) if same_time else None
    j_theta = j_b = None
    if unrolled and mode == "forward":
        j_theta = torch.zeros(len(idx), layout.size, dtype=dtype, device=device)
        j_b = torch.zeros_like(j_theta)
    states: list[torch.Tensor] = []
    bar = progress_bar(total=trainer.total_steps, desc="unrolled influence", unit="step",
                       progress=progress)
    with bar:
        while not trainer.done:
            t = trainer.step
            plan = trainer.plan(t)
            theta = ft.theta()  # θ_t (the live model, before the step)
            if unrolled and mode == "reverse":
                states.append(layout.flatten(theta).clone())
            cols = column[plan.used]
            inside = cols >= 0
            if len(plan.used) and (inside.any() or (j_theta is not None and j_theta.any())):
                batch = to_device(slice_batch(trainer.data, plan.used), device)
                if st is not None and inside.any():
                    gq = per_example_grads(ft, queries, "measurement")
                    gb = per_example_grads(ft, slice_batch(batch, inside.nonzero().squeeze(1)))
                    st[:, cols[inside]] += (eff[t] / len(plan.slots)) * (gq @ gb.T).double().cpu()
                if j_theta is not None and j_b is not None:
                    u = (cols[None, :] == torch.arange(len(idx))[:, None]).to(dtype)
                    for s in range(0, len(idx), chunk):
                        sl = slice(s, s + chunk)
                        dg, _ = _step_jvp(ft, theta, batch, len(plan.slots), j_theta[sl],
                                          u[sl].to(device))
                        j_b[sl] = mu * j_b[sl] + dg + wd * j_theta[sl]
                        j_theta[sl] -= plan.lr * j_b[sl]
            elif j_theta is not None and j_b is not None:  # no data term: decay and momentum
                j_b = mu * j_b + wd * j_theta
                j_theta = j_theta - plan.lr * j_b
            trainer.run(steps=1)
            bar.update(1)

    scores = None
    if unrolled:
        gq_end = per_example_grads(ft, queries, "measurement")  # ∇m(q, θ_T)
        if mode == "forward":
            assert j_theta is not None
            dmdw = (gq_end @ j_theta.T).double().cpu()
        else:
            dmdw = _reverse(trainer, ft, states, gq_end, chunk, progress)[:, idx]
        scores = -n * dmdw
    return TrajectoryInfluence(scores, None if st is None else n * st, idx, n,
                               trainer.total_steps)


def _reverse(trainer: Trainer, ft: Task, states: list[torch.Tensor], gq_end: torch.Tensor,
             chunk: int, progress: bool | None) -> torch.Tensor:
    """``dm(q, θ_T)/dw`` for every query and training example by the adjoint recursion."""
    mu, wd = trainer.config.momentum, trainer.config.weight_decay
    layout, device = ft.layout, ft.device
    out = torch.zeros(gq_end.shape[0], trainer.n, dtype=torch.float64)
    bar = progress_bar(total=trainer.total_steps, desc="unrolled (reverse)", unit="step",
                       progress=progress)
    with bar:
        for s in range(0, gq_end.shape[0], chunk):
            a_theta = gq_end[s:s + chunk].clone()
            a_b = torch.zeros_like(a_theta)
            for t in range(trainer.total_steps - 1, -1, -1):
                plan = trainer.plan(t)
                c = a_b - plan.lr * a_theta
                if len(plan.used):
                    batch = to_device(slice_batch(trainer.data, plan.used), device)
                    zeros = torch.zeros(len(c), len(plan.used), dtype=c.dtype, device=device)
                    hc, dl = _step_jvp(ft, layout.unflatten(states[t]), batch, len(plan.slots),
                                       c, zeros)
                    out[s:s + chunk, plan.used] += dl.double().cpu()
                    a_theta = a_theta + hc + wd * c
                else:
                    a_theta = a_theta + wd * c
                a_b = mu * c
                if s == 0:
                    bar.update(1)
    return out


def unrolled_influence(model: ModelSpec, train: Batch, config: TrainConfig, queries: Batch, *,
                       examples: Sequence[int] | torch.Tensor | None = None,
                       task: Task | None = None, mode: str = "auto",
                       progress: bool | None = None) -> torch.Tensor:
    """The exact first-order effect of each training example's weight on each query's
    measurement at the end of ``train(model, train, config)``, ``[n_queries, n_examples]``:
    ``score = −N · dm(q, θ_T)/dw_x`` (see :func:`trajectory_influence`)."""
    out = trajectory_influence(model, train, config, queries, examples=examples, task=task,
                               same_time=False, mode=mode, progress=progress)
    assert out.unrolled is not None
    return out.unrolled


def same_time_influence(model: ModelSpec, train: Batch, config: TrainConfig, queries: Batch, *,
                        examples: Sequence[int] | torch.Tensor | None = None,
                        task: Task | None = None, carry_momentum: bool = False,
                        progress: bool | None = None) -> torch.Tensor:
    """TracIn's same-time sum over the run, in the library's scale, ``[n_queries,
    n_examples]`` (see the module docstring)."""
    out = trajectory_influence(model, train, config, queries, examples=examples, task=task,
                               unrolled=False, carry_momentum=carry_momentum,
                               progress=progress)
    assert out.same_time is not None
    return out.same_time
