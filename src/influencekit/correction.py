"""Correct mis-predictions with a few fine-tuning steps on influential training examples.

    import influencekit as ik
    fix = ik.correct(model, (x_test[i], y_test[i]), (x_train, y_train),
                     estimator="exact", examples=16, steps=10, holdout=(x_test, y_test))
    fix.fixed, fix.steps_to_fix, fix.collateral.flips
    fix.save("runs/fix-7");  again = ik.correction.load("runs/fix-7", model)
    batch = ik.correct_all(model, (x_test, y_test), (x_train, y_train), store="runs/fixes")

Protocol (paper digest, "Correcting mis-predictions"): score every training example by
``s(x) = ∇m(z, y)ᵀ (H + λI)⁻¹ ∇ℓ(x)`` for the target ``z`` at its TRUE label ``y`` (positive:
training more on ``x`` lowers the target's loss); take the top ``m`` and fine-tune a copy of the
model for up to ``K`` steps. Strategies: ``"proponents"`` (gradient descent on the top proponents
with their own labels), ``"opponents"`` (gradient ascent on the top opponents), ``"both"``.
Selections: ``"influence"`` (any estimator of :data:`~influencekit.METHODS` or an estimator
object), and the baselines ``"random"`` (``m`` random training examples), ``"class-random"``
(``m`` random examples of class ``y``) and ``"target"`` (the target itself: an upper bound that
uses the test label).

Fine-tuning runs on the project's deterministic trainer: the selected set is the training data,
one step is one full batch (``batch_size = len(set)``, one epoch per step), ascent is the weight
``−1``; the objective of a step is ``Σ_i w_i ℓ_i / |set|``. Plain SGD (``momentum=0``) and no
weight decay by default. The trainer trains in ``train()`` mode (dropout on, batch norm updating
its statistics from the set) and deep-copies the model: the user's model is never modified.
A target is *fixed after k steps* when its prediction is the true label after step ``k``; by
default fine-tuning stops there (``stop_when_fixed``), and collateral damage is measured on the
model returned.
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import validate
from .batching import Batch, batch_size_of, slice_batch, to_device, tree_map
from .errors import ArtifactError, InputError
from .estimators import METHODS, Estimator
from .progress import progress_bar
from .store import (
    ArtifactStore,
    atomic_write,
    atomic_write_text,
    digest,
    fingerprint,
    hash_value,
    model_fingerprint,
    pack_tree,
    unpack_tree,
)
from .task import ClassificationTask, Task, output_tensor
from .training import TrainConfig, Trainer

SELECTIONS = ("influence", "random", "class-random", "target")
STRATEGIES = ("proponents", "opponents", "both")
DEFAULT_ESTIMATOR = "arnoldi"  # ABIF
RECORD = "correction.json"
WEIGHTS = "model.safetensors"


# --------------------------------------------------------------------------- results
@dataclass
class Collateral:
    """What the correction did to a held-out set (the target excluded)."""

    n: int
    accuracy_before: float
    accuracy_after: float
    flips: int  # predictions correct before and wrong after
    gains: int  # predictions wrong before and correct after

    @property
    def accuracy_change(self) -> float:
        return self.accuracy_after - self.accuracy_before


@dataclass
class CorrectionResult:
    """One target corrected (or not). ``losses[k]`` / ``predictions[k]``: the target's
    measurement (default: its loss at the true label) and prediction after ``k`` steps
    (``k = 0``: the start). ``examples`` index the training data (``[]`` for selection
    ``"target"``); ``weights``: +1 descent, −1 ascent. ``model``: the corrected copy."""

    target_label: int
    selection: str
    method: str | None  # the estimator of an "influence" selection
    strategy: str
    examples: list[int]
    scores: list[float | None]
    weights: list[float]
    lr: float
    steps: int  # the budget K
    losses: list[float]
    predictions: list[int]
    steps_to_fix: int | None
    collateral: Collateral | None
    seconds: dict[str, float]
    start_fingerprint: str
    target_fingerprint: str
    seed: int = 0
    target_index: int | None = None  # the target's row in correct_all's set
    model: nn.Module | None = field(default=None, repr=False, compare=False)

    @property
    def fixed(self) -> bool:
        return self.steps_to_fix is not None

    @property
    def steps_taken(self) -> int:
        return len(self.losses) - 1

    def fixed_within(self, k: int) -> bool:
        return self.steps_to_fix is not None and self.steps_to_fix <= k

    def to_dict(self) -> dict[str, Any]:
        """The record as plain JSON values (without the model)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}
        d["collateral"] = None if self.collateral is None else asdict(self.collateral)
        d["fixed"] = self.fixed
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], model: nn.Module | None = None) -> CorrectionResult:
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d and f.name != "model"}
        if kw.get("collateral") is not None:
            kw["collateral"] = Collateral(**kw["collateral"])
        return cls(**kw, model=model)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the corrected weights (``model.safetensors``, with the target) and the JSON
        record (``correction.json``) into the folder ``path``, atomically."""
        if self.model is None:
            raise InputError("this result holds no model (a correct_all record); rerun "
                             "ik.correct on its target to get the corrected model.")
        path = Path(path)
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        atomic_write(path / WEIGHTS, pack_tree({"state_dict": state}))
        atomic_write_text(json.dumps(self.to_dict(), indent=2), path / RECORD)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], model: nn.Module) -> CorrectionResult:
        """A saved correction; ``model`` gives the architecture (e.g. the start model, which
        is not modified): the result's ``model`` is a copy with the corrected weights."""
        return load(path, model)


def load(path: str | os.PathLike[str], model: nn.Module) -> CorrectionResult:
    """Reload :meth:`CorrectionResult.save`'s folder onto a copy of ``model``."""
    path = Path(path)
    try:
        record = json.loads((path / RECORD).read_text())
        tree = unpack_tree((path / WEIGHTS).read_bytes())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"cannot read a saved correction from {path}: {e}.") from e
    corrected = copy.deepcopy(model)
    try:
        corrected.load_state_dict(tree["state_dict"])
    except RuntimeError as e:
        raise InputError(f"the saved correction in {path} does not fit this model's "
                         f"architecture: {str(e).splitlines()[0]}") from e
    corrected.eval()
    return CorrectionResult.from_dict(record, corrected)


@dataclass
class CorrectionSet:
    """Every mis-predicted target of a set corrected from the same start (:func:`correct_all`)."""

    label: str
    results: list[CorrectionResult]
    n_set: int  # examples in the evaluated set
    start_accuracy: float  # of the start model on it
    examples: int
    steps: int
    fit_seconds: float = 0.0  # fitting the estimator and scoring the targets (once)

    @property
    def n_targets(self) -> int:
        return len(self.results)

    def fixed_within(self, k: int) -> int:
        return sum(r.fixed_within(k) for r in self.results)

    @property
    def n_fixed(self) -> int:
        return sum(r.fixed for r in self.results)

    @property
    def fix_rate(self) -> float:
        return self.n_fixed / self.n_targets if self.results else math.nan

    def summary(self) -> dict[str, Any]:
        """Fix rate (with a 95% Wilson interval) and fixed-within-k for k = 0..K, median steps
        to fix, mean collateral accuracy change and flips, time per target."""
        n, fixed = self.n_targets, self.n_fixed
        steps = sorted(r.steps_to_fix for r in self.results if r.steps_to_fix is not None)
        coll = [r.collateral for r in self.results if r.collateral is not None]
        per = [sum(r.seconds.values()) for r in self.results]
        return {
            "method": self.label, "examples": self.examples, "steps": self.steps,
            "targets": n, "fixed": fixed, "fix_rate": fixed / n if n else math.nan,
            "fix_rate_ci": list(wilson(fixed, n)),
            "fixed_within": [self.fixed_within(k) for k in range(self.steps + 1)],
            "median_steps_to_fix": _median(steps),
            "accuracy_change": _mean([c.accuracy_change for c in coll]),
            "accuracy_change_fixed": _mean([r.collateral.accuracy_change for r in self.results
                                            if r.fixed and r.collateral is not None]),
            "flips": _mean([c.flips for c in coll]),
            "gains": _mean([c.gains for c in coll]),
            "seconds_per_target": _mean(per), "fit_seconds": self.fit_seconds,
            "start_accuracy": self.start_accuracy, "n_set": self.n_set,
        }


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``k / n`` (95% for ``z = 1.96``)."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))


def _mean(v: Sequence[float]) -> float | None:
    return statistics.fmean(v) if v else None


def _median(v: Sequence[int]) -> float | None:
    return float(statistics.median(v)) if v else None


# --------------------------------------------------------------------------- checks
def _as_tensors(name: str, data: Any) -> Batch:
    if not isinstance(data, (tuple, list)) or len(data) < 2:
        raise InputError(f"{name} must be (inputs, labels) tensors in memory, got "
                         f"{type(data).__name__}.")
    data = tuple(data)
    if not isinstance(data[1], torch.Tensor) or data[1].dim() != 1 or data[1].is_floating_point():
        raise InputError(f"{name}: labels must be a 1-D integer tensor of class indices.")
    if batch_size_of(data) == 0:
        raise InputError(f"{name} is empty; give at least one example.")
    return data


def _as_target(target: Any) -> Batch:
    """``(input, label)`` of one example (unbatched, or a batch of one) as a batch of one."""
    if not isinstance(target, (tuple, list)) or len(target) != 2:
        raise InputError("target must be one example (input, true_label); got "
                         f"{type(target).__name__}.")
    x, y = target
    y = torch.as_tensor(y)
    if y.is_floating_point() or y.dtype == torch.bool:
        raise InputError(f"target: the true label must be an integer class index, got {y!r}.")
    if y.dim() == 0:
        return (tree_map(lambda t: t.unsqueeze(0), x), y.reshape(1).long())
    if y.shape != (1,):
        raise InputError(f"target must be ONE example; its label has shape {tuple(y.shape)}. "
                         "Use ik.correct_all for a set.")
    return (x, y.long())


def _check(examples: Any, steps: Any, lr: Any, strategy: Any, selection: Any, seed: Any,
           momentum: Any, weight_decay: Any) -> tuple[int, int, float]:
    m = validate.positive_int("examples", examples)
    k = validate.integer("steps", steps, minimum=1)
    lr = validate.positive("lr", lr)
    validate.choice("strategy", strategy, STRATEGIES)
    validate.choice("selection", selection, SELECTIONS)
    validate.integer("seed", seed, minimum=0)
    validate.non_negative("momentum", momentum)
    validate.non_negative("weight_decay", weight_decay)
    if selection != "influence" and strategy != "proponents":
        raise InputError(f"strategy={strategy!r} needs influence scores (opponents are the most "
                         f"negative ones); selection={selection!r} only takes "
                         "strategy='proponents'.")
    return m, k, lr


def _task(model: nn.Module, task: Task | None) -> Task:
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if task is None:
        return ClassificationTask(model)
    if not isinstance(task, Task):
        raise InputError(f"task must be an influencekit Task, got {type(task).__name__}.")
    if task.model is not model:
        raise InputError("task: its model is not the model being corrected; build the task on "
                         "it (ik.ClassificationTask(model)).")
    return task


def _estimator(estimator: Any, task: Task, train: Batch, damping: float) -> Estimator:
    """A fitted estimator of ``task`` from a METHODS name, an estimator or ``None``."""
    if estimator is None:
        estimator = DEFAULT_ESTIMATOR
    if isinstance(estimator, str):
        if estimator not in METHODS:
            raise InputError(f"estimator {estimator!r} is unknown; known: "
                             f"{', '.join(METHODS)} (or give an estimator object).")
        estimator = METHODS[estimator](task, damping=damping, progress=False)
    if not isinstance(estimator, Estimator):
        raise InputError(f"estimator must be a name from ik.METHODS or an estimator, got "
                         f"{type(estimator).__name__}.")
    if estimator.task.model is not task.model and \
            model_fingerprint(estimator.task.model) != model_fingerprint(task.model):
        raise InputError("estimator: it was built on another model (other parameters); build it "
                         "on the model being corrected.")
    if estimator.needs_fit and estimator.train is None:
        estimator.fit(train)
    return estimator


def _method_name(estimator: Any) -> str:
    if estimator is None:
        return DEFAULT_ESTIMATOR
    return estimator if isinstance(estimator, str) else type(estimator).__name__


# --------------------------------------------------------------------------- core
@torch.no_grad()
def _evaluate(task: Task, model: nn.Module, batch: Batch, batch_size: int = 512
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(measurements, predictions) of ``model`` (eval mode) on ``batch``."""
    was = model.training
    model.eval()
    vals, preds = [], []
    n = batch_size_of(batch)
    device = next(model.parameters()).device
    try:
        for i in range(0, n, batch_size):
            b = to_device(slice_batch(batch, slice(i, i + batch_size)), device)
            out = task.forward_fn(model, b)
            vals.append(task.measurement_fn(out, b).double().cpu())
            preds.append(output_tensor(out).argmax(-1).cpu())
    finally:
        model.train(was)
    return torch.cat(vals), torch.cat(preds)


def _select(selection: str, strategy: str, scores: torch.Tensor | None,
            train_labels: torch.Tensor, label: int, m: int, gen: torch.Generator
            ) -> tuple[list[int], list[float | None], list[float]]:
    """(examples, their scores, weights ±1) for one target."""
    n = len(train_labels)
    if selection == "target":
        return [], [], [1.0]
    if selection == "random":
        idx = torch.randperm(n, generator=gen)[:m]
    elif selection == "class-random":
        pool = (train_labels == label).nonzero().squeeze(1)
        if len(pool) == 0:
            raise InputError(f"selection='class-random': no training example has the target's "
                             f"label {label}.")
        idx = pool[torch.randperm(len(pool), generator=gen)[:m]]
    else:
        assert scores is not None
        need = 2 * m if strategy == "both" else m
        if need > n:
            raise InputError(f"examples={m} with strategy={strategy!r} needs {need} training "
                             f"examples; the training data has {n}.")
        pro = torch.topk(scores, m).indices.tolist() if strategy != "opponents" else []
        opp = torch.topk(-scores, m).indices.tolist() if strategy != "proponents" else []
        chosen = pro + opp
        return (chosen, [float(scores[i]) for i in chosen],
                [1.0] * len(pro) + [-1.0] * len(opp))
    chosen = idx.tolist()
    sc = [None if scores is None else float(scores[i]) for i in chosen]
    return chosen, sc, [1.0] * len(chosen)


def _finetune(model: nn.Module, task: Task, data: Batch, weights: list[float], target: Batch,
              lr: float, steps: int, momentum: float, weight_decay: float, seed: int,
              stop_when_fixed: bool) -> tuple[nn.Module, list[float], list[int], int | None]:
    """Full-batch steps on ``data`` with the trainer; the target's loss and prediction after
    each. Returns (model, losses, predictions, steps_to_fix)."""
    label = int(target[1][0])
    cfg = TrainConfig(epochs=steps, batch_size=batch_size_of(data), lr=lr, momentum=momentum,
                      weight_decay=weight_decay, seed=seed)
    trainer = Trainer(model, data, cfg, weights=torch.tensor(weights), task=task,
                      progress=False)
    loss, pred = _evaluate(task, trainer.model, target)
    losses, preds = [float(loss[0])], [int(pred[0])]
    fixed_at = 0 if preds[0] == label else None
    for k in range(1, steps + 1):
        if fixed_at is not None and stop_when_fixed:
            break
        trainer.run(steps=1)
        loss, pred = _evaluate(task, trainer.model, target)
        losses.append(float(loss[0]))
        preds.append(int(pred[0]))
        if fixed_at is None and preds[-1] == label:
            fixed_at = k
    trainer.model.eval()
    return trainer.model, losses, preds, fixed_at


def _collateral(before: torch.Tensor, after: torch.Tensor, labels: torch.Tensor) -> Collateral:
    ok0, ok1 = before == labels, after == labels
    n = len(labels)
    return Collateral(n, float(ok0.float().mean()) if n else math.nan,
                      float(ok1.float().mean()) if n else math.nan,
                      int((ok0 & ~ok1).sum()), int((~ok0 & ok1).sum()))


def _correct_one(model: nn.Module, task: Task, target: Batch, train: Batch,
                 scores: torch.Tensor | None, *, selection: str, method: str | None,
                 strategy: str, m: int, steps: int, lr: float, momentum: float,
                 weight_decay: float, seed: int, stop_when_fixed: bool, start_fp: str,
                 select_s: float) -> CorrectionResult:
    t0 = time.perf_counter()
    label = int(target[1][0])
    gen = torch.Generator().manual_seed(seed)
    chosen, sc, weights = _select(selection, strategy, scores, train[1], label, m, gen)
    data = target if selection == "target" else slice_batch(train, torch.tensor(chosen))
    t1 = time.perf_counter()
    corrected, losses, preds, fixed_at = _finetune(
        model, task, data, weights, target, lr, steps, momentum, weight_decay, seed,
        stop_when_fixed)
    return CorrectionResult(
        target_label=label, selection=selection, method=method, strategy=strategy,
        examples=chosen, scores=sc, weights=weights, lr=lr, steps=steps, losses=losses,
        predictions=preds, steps_to_fix=fixed_at, collateral=None,
        seconds={"select": select_s + (t1 - t0), "finetune": time.perf_counter() - t1},
        start_fingerprint=start_fp, target_fingerprint=hash_value(target), seed=seed,
        model=corrected)


def correct(model: nn.Module, target: Any, train: Batch, *, estimator: Any = None,
            task: Task | None = None, examples: int = 16, steps: int = 10, lr: float = 0.05,
            strategy: str = "proponents", selection: str = "influence",
            holdout: Batch | None = None, seed: int = 0, momentum: float = 0.0,
            weight_decay: float = 0.0, damping: float = 0.0, stop_when_fixed: bool = True
            ) -> CorrectionResult:
    """Fix the prediction of one ``target = (input, true_label)`` by fine-tuning a copy of
    ``model`` for up to ``steps`` full-batch SGD steps on ``examples`` training examples.

    Args:
        model: the trained classifier (never modified). train: ``(inputs, labels)`` tensors.
        estimator: for ``selection="influence"``: a name from ``ik.METHODS`` (default
            ``"arnoldi"``, ABIF) or an estimator of ``task`` (fitted on ``train`` if it is not).
        task: default ``ik.ClassificationTask(model)`` (measurement: the loss at the label).
        examples: ``m`` (per side with ``strategy="both"``). steps: the budget ``K``.
        lr, momentum, weight_decay: the fine-tuning optimizer (SGD).
        strategy: ``"proponents"`` (descent), ``"opponents"`` (ascent) or ``"both"``.
        selection: ``"influence"``, ``"random"``, ``"class-random"`` or ``"target"``.
        holdout: ``(inputs, labels)`` for collateral damage (accuracy change, flips).
        seed: random selections and the trainer. damping: for an estimator given by name.
        stop_when_fixed: stop at the first step where the prediction is right.
    """
    m, k, lr = _check(examples, steps, lr, strategy, selection, seed, momentum, weight_decay)
    validate.boolean("stop_when_fixed", stop_when_fixed)
    train = _as_tensors("train", train)
    target = _as_target(target)
    if holdout is not None:
        holdout = _as_tensors("holdout", holdout)
    task = _task(model, task)
    task.check_batch(to_device(target, task.device))
    t0 = time.perf_counter()
    scores = None
    method = None
    if selection == "influence":
        est = _estimator(estimator, task, train, validate.non_negative("damping", damping))
        method = _method_name(estimator)
        scores = est.scores(target, train)[0].double().cpu()
    result = _correct_one(model, task, target, train, scores, selection=selection,
                          method=method, strategy=strategy, m=m, steps=k, lr=lr,
                          momentum=momentum, weight_decay=weight_decay, seed=seed,
                          stop_when_fixed=stop_when_fixed, start_fp=model_fingerprint(model),
                          select_s=time.perf_counter() - t0)
    if holdout is not None:
        _, before = _evaluate(task, model, holdout)
        _, after = _evaluate(task, result.model, holdout)
        result.collateral = _collateral(before, after, holdout[1])
    return result


def correct_all(model: nn.Module, targets: Batch, train: Batch, *, estimator: Any = None,
                task: Task | None = None, examples: int = 16, steps: int = 10,
                lr: float = 0.05, strategy: str = "proponents", selection: str = "influence",
                holdout: Batch | str | None = "rest", seed: int = 0, momentum: float = 0.0,
                weight_decay: float = 0.0, damping: float = 0.0, stop_when_fixed: bool = True,
                scores: torch.Tensor | None = None, label: str | None = None,
                store: str | os.PathLike[str] | ArtifactStore | None = None,
                progress: bool | None = None) -> CorrectionSet:
    """:func:`correct` for every mis-predicted example of ``targets = (inputs, labels)``,
    each from the same start (``model``, never modified).

    The estimator is fitted once and scores all targets in one call (measurement: each
    target's loss at its true label); or pass ``scores [len(targets), N]`` (e.g. a previous
    call's, to compare budgets). ``holdout="rest"`` (default) measures collateral damage on the
    other examples of ``targets``; a batch: on it; ``None``: not at all. ``store``: a folder
    where each target's record is written as it finishes; a rerun with the same model, data
    and settings resumes; a changed model, data or settings gets records of its own (the name
    holds the whole fingerprint, so nothing stale is read or refused). Target ``i`` uses the seed
    ``seed + i``. ``label`` names the selection in the result (default: the method's name).
    Other arguments: as for :func:`correct`. Corrected models are not kept (only records).
    """
    m, k, lr = _check(examples, steps, lr, strategy, selection, seed, momentum, weight_decay)
    validate.boolean("stop_when_fixed", stop_when_fixed)
    train = _as_tensors("train", train)
    targets = _as_tensors("targets", targets)
    if isinstance(holdout, str) and holdout != "rest":
        raise InputError(f"holdout must be 'rest', a batch (inputs, labels) or None; got "
                         f"{holdout!r}.")
    if holdout is not None and not isinstance(holdout, str):
        holdout = _as_tensors("holdout", holdout)
    task = _task(model, task)
    n_set = batch_size_of(targets)
    task.check_batch(to_device(slice_batch(targets, slice(0, 1)), task.device))
    if scores is not None:
        scores = torch.as_tensor(scores)
        if scores.shape != (n_set, batch_size_of(train)):
            raise InputError(f"scores must have shape [{n_set}, {batch_size_of(train)}] (one row "
                             f"per example of targets), got {tuple(scores.shape)}.")
    method = None
    if selection == "influence":
        method = (label or "scores") if scores is not None and estimator is None \
            else _method_name(estimator)
    label = label or (method if selection == "influence" else selection)
    _, start_pred = _evaluate(task, model, targets)
    wrong = (start_pred != targets[1]).nonzero().squeeze(1).tolist()
    start_fp = model_fingerprint(model)
    settings = {"selection": selection, "method": method, "strategy": strategy, "examples": m,
                "steps": k, "lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                "seed": seed, "stop_when_fixed": stop_when_fixed, "damping": damping,
                "holdout": holdout if holdout is None or isinstance(holdout, str)
                else hash_value(holdout),
                "estimator": (estimator.settings() if isinstance(estimator, Estimator)
                              else estimator),
                "scores": None if scores is None else hash_value(scores)}
    art = None
    if store is not None:
        st = store if isinstance(store, ArtifactStore) else ArtifactStore(store)
        fp = fingerprint(model=model, data=targets, settings=settings,
                         train=hash_value(train))
        name = f"correct-{_slug(label)}-{digest(fp)[:12]}"
        art = st.open(name, fp, {**settings, "label": label})
    done = set(art.done_chunks()) if art is not None else set()
    fit_s = 0.0
    if selection == "influence" and scores is None and len(done) < len(wrong):
        t0 = time.perf_counter()
        est = _estimator(estimator, task, train, validate.non_negative("damping", damping))
        rows = torch.zeros(n_set, batch_size_of(train), dtype=torch.float64)
        if wrong:
            rows[wrong] = est.scores(slice_batch(targets, torch.tensor(wrong)),
                                     train).double().cpu()
        scores, fit_s = rows, time.perf_counter() - t0
    base = holdout if holdout is not None and not isinstance(holdout, str) else None
    base_pred = _evaluate(task, model, base)[1] if base is not None else None
    results: list[CorrectionResult] = []
    for j, i in enumerate(progress_bar(wrong, progress=progress, desc=f"correct {label}",
                                       unit="target")):
        if j in done:
            results.append(CorrectionResult.from_dict(_plain(art.read_chunk(j))))  # type: ignore[union-attr]
            continue
        target = slice_batch(targets, slice(i, i + 1))
        res = _correct_one(model, task, target, train,
                           None if scores is None else scores[i].double(),
                           selection=selection, method=method, strategy=strategy, m=m,
                           steps=k, lr=lr, momentum=momentum, weight_decay=weight_decay,
                           seed=seed + i, stop_when_fixed=stop_when_fixed, start_fp=start_fp,
                           select_s=0.0)
        res.target_index = i
        if holdout == "rest":
            keep = torch.ones(n_set, dtype=torch.bool)
            keep[i] = False
            after = _evaluate(task, res.model, targets)[1]  # type: ignore[arg-type]
            res.collateral = _collateral(start_pred[keep], after[keep], targets[1][keep])
        elif base is not None:
            after = _evaluate(task, res.model, base)[1]  # type: ignore[arg-type]
            res.collateral = _collateral(base_pred, after, base[1])  # type: ignore[arg-type]
        res.model = None
        if art is not None:
            art.write_chunk(j, res.to_dict())
        results.append(res)
    if art is not None and not art.complete:
        art.finish(chunks=len(wrong), label=label)
    acc = 1.0 - len(wrong) / n_set
    return CorrectionSet(label, results, n_set, acc, m, k, fit_s)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:40]


def _plain(tree: Any) -> Any:
    """A stored record as plain Python values (tuples from the store become lists)."""
    if isinstance(tree, dict):
        return {k: _plain(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_plain(v) for v in tree]
    return tree
