"""What influence is computed *of*: a model, its per-example loss, a query measurement and
the parameters that count.

Everything downstream sees the model through two pure functions of a parameter dict ``theta``
(only the selected parameters; the rest and the buffers are held fixed)::

    task.losses(theta, batch)        -> per-example training losses  [B]
    task.measurements(theta, batch)  -> per-example query measurements [B]

The model is evaluated in ``eval()`` mode (dropout off, batch norm on its running statistics), so
that each example's loss depends on that example alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .batching import Batch, batch_size_of, tree_leaves
from .errors import InputError, NumericalError

ForwardFn = Callable[[Callable[..., Any], Batch], Any]
LossFn = Callable[[Any, Batch], torch.Tensor]
ParamSpec = (
    None
    | str
    | nn.Module
    | Callable[[str, nn.Parameter], bool]
    | Sequence[str | nn.Module]
)


def default_forward(model: Callable[..., Any], batch: Batch) -> Any:
    """``model(inputs)``; a dict of inputs is passed as keyword arguments."""
    inputs = batch[0]
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(inputs)


class ParamLayout:
    """How a dict of parameters maps onto one flat vector (and back)."""

    def __init__(self, params: dict[str, torch.Tensor]):
        self.names = list(params)
        self.shapes = [params[n].shape for n in self.names]
        self.numels = [params[n].numel() for n in self.names]
        self.size = sum(self.numels)

    def flatten(self, tensors: dict[str, torch.Tensor], batch_dims: int = 0) -> torch.Tensor:
        """Concatenate ``tensors`` (each with ``batch_dims`` leading dims) into ``[..., P]``."""
        parts = []
        for n in self.names:
            t = tensors[n]
            parts.append(t.reshape(*t.shape[:batch_dims], -1))
        return torch.cat(parts, dim=-1)

    def unflatten(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split ``[..., P]`` into a dict of parameter-shaped tensors."""
        lead = vec.shape[:-1]
        pieces = torch.split(vec, self.numels, dim=-1)
        return {n: p.reshape(*lead, *s) for n, p, s in zip(self.names, pieces, self.shapes)}


class Task:
    """A model with a per-example loss, a measurement and a parameter selection.

    Args:
        model: any ``nn.Module``.
        loss: ``loss(outputs, batch) -> Tensor[B]``: the per-example training loss (no reduction).
        forward: ``forward(model, batch) -> outputs``; default ``model(batch[0])``.
        measurement: ``measurement(outputs, batch) -> Tensor[B]`` on queries; default: the loss.
            Scores follow ``Δm ≈ −ε·score`` when a training example is up-weighted by ε.
        params: which parameters count: ``None`` (all trainable ones), names or name prefixes,
            modules, or a predicate ``(name, param) -> bool``.
        eval_mode: evaluate the model in ``eval()`` mode (default; needed with batch norm).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        loss: LossFn,
        forward: ForwardFn | None = None,
        measurement: LossFn | None = None,
        params: ParamSpec = None,
        eval_mode: bool = True,
    ):
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        for name, fn in (("loss", loss), ("forward", forward), ("measurement", measurement)):
            if fn is not None and not callable(fn):
                raise InputError(f"{name} must be a function, got {type(fn).__name__}.")
        if not eval_mode and any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                 and m.track_running_stats for m in model.modules()):
            raise InputError(
                "eval_mode=False with batch norm: in training mode each example's loss depends "
                "on the rest of its batch and every forward overwrites the model's running "
                "statistics. Keep eval_mode=True (batch norm then uses its running statistics).")
        self.model = model
        self.loss_fn = loss
        self.forward_fn = forward or default_forward
        self.measurement_fn = measurement or loss
        self.eval_mode = eval_mode
        self.param_names = select_params(model, params)
        self.layout = ParamLayout({n: p for n, p in model.named_parameters()
                                   if n in set(self.param_names)})
        self._checked = False

    # ------------------------------------------------------------------ parameters
    @property
    def num_params(self) -> int:
        return self.layout.size

    @property
    def device(self) -> torch.device:
        return next(iter(self.model.parameters())).device

    @property
    def dtype(self) -> torch.dtype:
        return dict(self.model.named_parameters())[self.param_names[0]].dtype

    def theta(self) -> dict[str, torch.Tensor]:
        """The selected parameters, detached (the point where influence is computed)."""
        named = dict(self.model.named_parameters())
        return {n: named[n].detach() for n in self.layout.names}

    def flat_theta(self) -> torch.Tensor:
        return self.layout.flatten(self.theta())

    def _state(self, theta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        state = {n: p.detach() for n, p in self.model.named_parameters()}
        state.update({n: b for n, b in self.model.named_buffers()})
        state.update(theta)
        return state

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Put the model in eval mode for the duration (restored afterwards)."""
        was_training = self.model.training
        if self.eval_mode:
            self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    # ------------------------------------------------------------------ functions of theta
    def outputs(self, theta: dict[str, torch.Tensor], batch: Batch) -> Any:
        state = self._state(theta)

        def call(*args: Any, **kwargs: Any) -> Any:
            return functional_call(self.model, state, args, kwargs, strict=False)

        return self.forward_fn(call, batch)

    def losses(self, theta: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        """Per-example training losses ``[B]``."""
        return self.loss_fn(self.outputs(theta, batch), batch)

    def measurements(self, theta: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        """Per-example query measurements ``[B]``."""
        return self.measurement_fn(self.outputs(theta, batch), batch)

    def values(self, theta: dict[str, torch.Tensor], batch: Batch, kind: str) -> torch.Tensor:
        if kind == "loss":
            return self.losses(theta, batch)
        if kind == "measurement":
            return self.measurements(theta, batch)
        raise InputError(f"kind must be 'loss' or 'measurement', got {kind!r}.")

    def check_batch(self, batch: Batch) -> None:
        """Validate a batch: its floating-point inputs have the model's dtype (every batch,
        cheap); once, that the loss and measurement are per-example and finite."""
        self._check_dtypes(batch)
        if self._checked:
            return
        n = batch_size_of(batch)
        with torch.no_grad(), self.evaluating():
            theta = self.theta()
            for kind in ("loss", "measurement"):
                v = self._probe(lambda kind=kind: self.values(theta, batch, kind), kind)
                name = "loss" if kind == "loss" else "measurement"
                if not isinstance(v, torch.Tensor) or v.dim() != 1 or v.shape[0] != n:
                    shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                    raise InputError(
                        f"the {name} must return one value per example (shape [{n}]), got "
                        f"{shape}. Return unreduced per-example values, e.g. "
                        "F.cross_entropy(logits, y, reduction='none')."
                    )
                if not torch.isfinite(v).all():
                    raise NumericalError(
                        f"the {name} is NaN/inf on {int((~torch.isfinite(v)).sum())} of {n} "
                        "examples at the current parameters. Check the inputs for NaN/inf "
                        "and that the model was trained without diverging."
                    )
        self._checked = True

    def _probe(self, run: Callable[[], Any], what: str) -> Any:
        """Run a first evaluation on user data; shape errors become an :class:`InputError`."""
        try:
            return run()
        except (RuntimeError, IndexError, ValueError, TypeError) as e:
            if isinstance(e, InputError):
                raise
            raise InputError(
                f"the model could not compute the {what} on this batch ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200]}). Check that the inputs have the shape the "
                "model expects (the same per-example shape as the training data) and that the "
                "forward/loss functions accept (inputs, targets) batches.") from e

    def _check_dtypes(self, batch: Batch) -> None:
        inputs = batch[0] if isinstance(batch, tuple) and batch else batch
        for leaf in tree_leaves(inputs):
            if leaf.is_floating_point() and leaf.dtype != self.dtype:
                raise InputError(
                    f"the inputs are {leaf.dtype} but the model's parameters are {self.dtype}: "
                    f"convert the data (x.to({self.dtype})) or the model "
                    f"(model.to({leaf.dtype})).")


def select_params(model: nn.Module, spec: ParamSpec) -> list[str]:
    """Resolve a parameter selection to a list of parameter names (in module order)."""
    named = list(model.named_parameters())
    if spec is None:
        chosen = [n for n, p in named if p.requires_grad]
    elif callable(spec) and not isinstance(spec, nn.Module):
        chosen = [n for n, p in named if spec(n, p)]
    else:
        if not isinstance(spec, (str, nn.Module, Sequence, set, frozenset)):
            raise InputError(
                f"params must be None, a name or name prefix, a module, a list of those, or a "
                f"predicate (name, param) -> bool; got {type(spec).__name__} {spec!r}.")
        items: Iterable[str | nn.Module] = (
            [spec] if isinstance(spec, (str, nn.Module)) else list(spec)  # type: ignore[arg-type]
        )
        module_names = {id(m): name for name, m in model.named_modules()}
        prefixes = []
        for item in items:
            if isinstance(item, nn.Module):
                if id(item) not in module_names:
                    raise InputError(
                        f"params: the module {type(item).__name__} is not part of the model; "
                        "pass submodules of the model itself."
                    )
                prefixes.append(module_names[id(item)])
            elif isinstance(item, str):
                if not any(n == item or n.startswith(item + ".") for n, _ in named):
                    raise InputError(
                        f"params: no parameter is named {item!r} or lies under it. Known: "
                        f"{[n for n, _ in named][:12]}..."
                    )
                prefixes.append(item)
            else:
                raise InputError(
                    f"params entries must be names or modules, got {type(item).__name__}."
                )
        chosen = [
            n for n, _ in named
            if any(p == "" or n == p or n.startswith(p + ".") for p in prefixes)
        ]
    if not chosen:
        raise InputError(
            "no trainable parameters selected: the model has none with requires_grad=True, "
            "or params= matched nothing. Select parameters with params=[names or modules]."
        )
    return chosen


def cross_entropy(outputs: Any, batch: Batch) -> torch.Tensor:
    """Per-example cross-entropy of logits (or ``.logits``) against ``batch[1]``."""
    return F.cross_entropy(output_tensor(outputs), batch[1], reduction="none")


def output_tensor(outputs: Any) -> torch.Tensor:
    """The model's output as a tensor: itself, or its ``.logits`` (a Hugging Face output)."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)  # Hugging Face ModelOutput
    if logits is None:
        raise InputError(
            f"the model's output ({type(outputs).__name__}) is not a tensor and has no .logits; "
            "give the task a forward= that returns a tensor (e.g. the logits).")
    return logits


def margin_loss(outputs: Any, batch: Batch) -> torch.Tensor:
    """Negative margin ``−(z_y − logsumexp_{c≠y} z_c)``: lower is better, like a loss."""
    logits = output_tensor(outputs)
    y = batch[1]
    correct = logits.gather(1, y[:, None]).squeeze(1)
    is_label = torch.arange(logits.shape[1], device=logits.device) == y[:, None]
    others = logits.masked_fill(is_label, float("-inf"))
    return torch.logsumexp(others, dim=1) - correct


class ClassificationTask(Task):
    """Cross-entropy classification on ``(inputs, labels)`` batches.

    Args:
        model: maps inputs to logits ``[B, C]`` (or an object with ``.logits``).
        measurement: ``"loss"`` (default), ``"margin"`` (the negative margin, see
            :func:`margin_loss`), ``("logit", c)`` (the negative logit of class ``c``), or any
            ``(outputs, batch) -> Tensor[B]``. Built-in measurements are "lower is better", so a
            positive score always marks a proponent.
        params, forward, eval_mode: as for :class:`Task`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        measurement: str | tuple[str, int] | LossFn = "loss",
        params: ParamSpec = None,
        forward: ForwardFn | None = None,
        eval_mode: bool = True,
    ):
        super().__init__(
            model,
            loss=cross_entropy,
            forward=forward,
            measurement=_classification_measurement(measurement),
            params=params,
            eval_mode=eval_mode,
        )

    def check_batch(self, batch: Batch) -> None:
        """As :meth:`Task.check_batch`, plus: labels are integer class indices ``[B]`` within
        the model's classes."""
        labels = batch[1] if isinstance(batch, tuple) and len(batch) > 1 else None
        if not isinstance(labels, torch.Tensor):
            raise InputError("ClassificationTask needs (inputs, labels) batches with a label "
                             "tensor; got no labels.")
        if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
            raise InputError(
                f"labels must be integer class indices, got {labels.dtype}: convert them with "
                "labels.long() (one-hot or probability targets need a Task with your loss).")
        if labels.dim() != 1:
            raise InputError(
                f"labels must have shape [B] (one class index per example), got "
                f"{tuple(labels.shape)}: use labels.reshape(-1) (or labels.squeeze(1)).")
        if getattr(self, "_num_classes", None) is None:
            self._check_dtypes(batch)
            with torch.no_grad(), self.evaluating():
                out = self._probe(lambda: self.outputs(self.theta(), batch), "outputs")
                self._num_classes = output_tensor(out).shape[-1]
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= self._num_classes):
            raise InputError(
                f"labels must lie in [0, {self._num_classes}) (the model has "
                f"{self._num_classes} outputs); got values from {int(labels.min())} to "
                f"{int(labels.max())}.")
        super().check_batch(batch)

    def predict(self, inputs: Any) -> torch.Tensor:
        """Predicted classes for a batch of inputs."""
        with torch.no_grad(), self.evaluating():
            return output_tensor(self.outputs(self.theta(), (inputs,))).argmax(-1)


def _classification_measurement(m: str | tuple[str, int] | LossFn) -> LossFn:
    if callable(m):
        return m
    if m == "loss":
        return cross_entropy
    if m == "margin":
        return margin_loss
    if isinstance(m, tuple) and len(m) == 2 and m[0] == "logit":
        c = int(m[1])
        return lambda outputs, batch: -output_tensor(outputs)[:, c]
    raise InputError(
        f"unknown measurement {m!r}: use 'loss', 'margin', ('logit', class) or a function "
        "(outputs, batch) -> Tensor[B]."
    )
