"""Twin runs: how far a run with one example removed (or up-weighted) drifts from the original.

From one start point, the deterministic reference run A of ``config`` on the full data is
trained once; each perturbation's twin B is the same run with that example's weight changed
(removal: its slot skipped, every other example in place); each control is the full-data run
with another data-order seed. At the recorded steps: ``‖θ_B − θ_A‖`` (whole and per module),
``‖θ_A − θ_start‖`` and the measurement of every query for both runs.

Every run's records are one artifact of the store (the reference's parameters at the recorded
steps included), so an interrupted call recomputes only the runs that are missing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .. import validate
from ..batching import Batch, batch_size_of, to_device
from ..errors import InputError
from ..groundtruth.retrain import measure
from ..progress import progress_bar
from ..store import ArtifactStore, atomic_write_text, fingerprint, hash_value
from ..task import Task
from ..training import ModelSpec, StepInfo, TrainConfig, Trainer, init_model
from .unrolled import bind_task


@dataclass
class TwinRuns:
    """Records of twin runs: ``R`` recorded steps, ``P`` perturbations, ``Q`` queries,
    ``C`` control seeds, ``L`` modules (``layers``)."""

    steps: torch.Tensor  # [R] steps done at each record
    examples: torch.Tensor  # [P] the perturbed training example
    delta_w: torch.Tensor  # [P] its weight change (−1: removed; ε: up-weighted by ε)
    n_train: int
    layers: list[str]
    start_distance: torch.Tensor  # [R] ‖θ_A − θ_start‖
    divergence: torch.Tensor  # [R, P] ‖θ_B − θ_A‖
    layer_divergence: torch.Tensor  # [R, P, L]
    measure_ref: torch.Tensor  # [R, Q] m(q) along A
    measure_twin: torch.Tensor  # [R, P, Q] m(q) along each B
    control_seeds: list[int] = field(default_factory=list)
    control_divergence: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))
    control_layer_divergence: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, 0))
    control_measure: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, 0))

    @property
    def relative(self) -> torch.Tensor:
        """``‖θ_B − θ_A‖ / ‖θ_A − θ_start‖``, ``[R, P]``."""
        return self.divergence / self.start_distance[:, None]

    @property
    def control_relative(self) -> torch.Tensor:
        return self.control_divergence / self.start_distance[:, None]

    @property
    def effect(self) -> torch.Tensor:
        """The actual change ``m_B(q) − m_A(q)``, ``[R, P, Q]``."""
        return self.measure_twin - self.measure_ref[:, None, :]

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and numbers (JSON)."""
        return {k: v.tolist() if isinstance(v, torch.Tensor) else v
                for k, v in asdict(self).items()}

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the records as JSON (atomically)."""
        return atomic_write_text(json.dumps(self.to_dict()), path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TwinRuns:
        raw = json.loads(Path(path).read_text())
        tensors = {k: torch.tensor(v, dtype=torch.float64) for k, v in raw.items()
                   if k not in ("n_train", "layers", "control_seeds")}
        tensors["steps"] = tensors["steps"].long()
        tensors["examples"] = tensors["examples"].long()
        for k in ("control_divergence", "control_layer_divergence", "control_measure"):
            if tensors[k].numel() == 0:  # empty lists lose their shape in JSON
                r = len(tensors["steps"])
                tensors[k] = tensors[k].reshape(r, 0, *([0] if k != "control_divergence"
                                                        else []))
        return cls(n_train=raw["n_train"], layers=raw["layers"],
                   control_seeds=raw["control_seeds"], **tensors)


def record_steps(total: int, every: int | Sequence[int]) -> list[int]:
    """Steps (counted as steps done, 1…total) at which to record: every ``every`` steps and the
    last, or the given steps."""
    if total < 1:
        raise InputError("the run has no steps (config.epochs = 0): nothing to compare.")
    if isinstance(every, int):
        every = validate.positive_int("record_every", every)
        steps = list(range(every, total + 1, every))
        return steps if steps and steps[-1] == total else [*steps, total]
    steps = sorted({validate.integer("record step", s, minimum=1) for s in every})
    if not steps or steps[-1] > total:
        raise InputError(f"record steps must lie in [1, {total}] (the run's steps), got "
                         f"{list(every)[:8]}.")
    return steps


def _module_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


class _Setup:
    """What every run of one twin-run study shares."""

    def __init__(self, model: ModelSpec, train: Batch, config: TrainConfig, queries: Batch,
                 task: Task | None, steps: list[int]):
        self.model, self.train, self.config, self.task = model, tuple(train), config, task
        self.start = init_model(model, config.init_seed)
        self.names = [n for n, p in self.start.named_parameters() if p.requires_grad]
        self.layers = list(dict.fromkeys(_module_of(n) for n in self.names))
        self.group = torch.tensor([self.layers.index(_module_of(n)) for n in self.names])
        self.theta0 = self.flat(dict(self.start.named_parameters()))
        self.queries = tuple(queries)
        self.steps = steps

    def fingerprint(self) -> dict[str, str]:
        """What the stored records depend on (the start point, data, run, queries, task)."""
        task = self.task
        funcs = None if task is None else (task.loss_fn, task.forward_fn, task.measurement_fn,
                                           task.eval_mode)
        return fingerprint(model=self.start, data=self.train,
                           settings={"config": asdict(self.config), "steps": self.steps},
                           queries=hash_value(self.queries), functions=hash_value(funcs))

    def flat(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([params[n].detach().reshape(-1).double().cpu() for n in self.names])

    def layer_norms(self, diff: torch.Tensor) -> torch.Tensor:
        sizes = [p.numel() for n, p in self.start.named_parameters() if n in set(self.names)]
        sq = torch.stack([d.pow(2).sum() for d in diff.split(sizes)])
        return torch.zeros(len(self.layers), dtype=torch.float64).index_add_(
            0, self.group, sq).sqrt()

    def run(self, config: TrainConfig, weights: torch.Tensor | None,
            on_record: Callable[[int, torch.Tensor, torch.Tensor], None]) -> None:
        """Train and call ``on_record(k, θ, m(queries))`` at the ``k``-th recorded step."""
        trainer = Trainer(self.model, self.train, config, weights=weights, task=self.task,
                          progress=False)
        task = bind_task(self.task, trainer.model)
        queries = to_device(self.queries, task.device)
        where = {s: k for k, s in enumerate(self.steps)}

        def callback(info: StepInfo) -> None:
            if info.step in where:
                on_record(where[info.step], self.flat(dict(info.model.named_parameters())),
                          measure(task, queries))

        trainer.run(steps=self.steps[-1], callback=callback)


def twin_runs(
    model: ModelSpec,
    train: Batch,
    config: TrainConfig,
    queries: Batch,
    *,
    remove: Sequence[int] = (),
    upweight: Sequence[int] | None = None,
    epsilon: float = 0.5,
    record_every: int | Sequence[int] = 1,
    control_seeds: Sequence[int] = (1,),
    task: Task | None = None,
    store: str | os.PathLike[str] | None = None,
    progress: bool | None = None,
) -> TwinRuns:
    """Twin runs from the start point ``model`` (a module: a checkpoint / warm start; or a
    builder, initialised with ``config.init_seed``).

    Args:
        train, config: the reference run (deterministic; trained once and shared).
        queries: ``(inputs, labels)`` whose measurement is recorded along every run.
        remove: one twin per example, with that example removed (weight 0).
        upweight: one twin per example, with its weight raised to ``1 + epsilon``.
        record_every: record every so many steps (and at the end), or the steps themselves.
        control_seeds: data-order seeds of the control runs (full data, ``config.seed``
            replaced): the divergence that reordering alone causes.
        task: loss, forward and measurement (default: classification, the query's loss).
        store: a folder: every run's records are stored there and reused (resume).
    """
    n = batch_size_of(tuple(train))
    perturbations = [(int(i), -1.0) for i in remove]
    perturbations += [(int(i), float(epsilon)) for i in (upweight or ())]
    if any(not 0 <= i < n for i, _ in perturbations):
        raise InputError(f"perturbed examples must be indices in [0, {n}).")
    if upweight and not float(epsilon) > -1:
        raise InputError(f"epsilon must be > −1 (the weight becomes 1 + epsilon), got {epsilon}.")
    control_seeds = [validate.integer("control seed", s, minimum=0) for s in control_seeds]
    if config.seed in control_seeds:
        raise InputError(f"control seed {config.seed} is the reference's own seed: use others.")
    steps = record_steps(config.epochs * -(-n // config.batch_size), record_every)
    setup = _Setup(model, train, config, queries, task, steps)
    fp = None if store is None else setup.fingerprint()
    arts = None if fp is None else ArtifactStore(Path(store) / f"twins-{hash_value(fp)[:16]}")
    n_q, r = batch_size_of(setup.queries), len(steps)

    def cached(name: str, compute: Callable[[], dict[str, torch.Tensor]]
               ) -> dict[str, torch.Tensor]:
        if arts is None or fp is None:
            return compute()
        art = arts.open(name, fp, {"run": name})
        if art.complete:
            return art.load()
        value = compute()
        art.save(value)
        return value

    def reference() -> dict[str, torch.Tensor]:
        thetas = torch.zeros(r, len(setup.theta0), dtype=torch.float64)
        meas = torch.zeros(r, n_q, dtype=torch.float64)

        def on_record(k: int, theta: torch.Tensor, m: torch.Tensor) -> None:
            thetas[k], meas[k] = theta, m

        setup.run(config, None, on_record)
        return {"theta": thetas, "measure": meas}

    ref = cached("reference", reference)

    def twin(cfg: TrainConfig, weights: torch.Tensor | None) -> dict[str, torch.Tensor]:
        div = torch.zeros(r, dtype=torch.float64)
        layer = torch.zeros(r, len(setup.layers), dtype=torch.float64)
        meas = torch.zeros(r, n_q, dtype=torch.float64)

        def on_record(k: int, theta: torch.Tensor, m: torch.Tensor) -> None:
            diff = theta - ref["theta"][k]
            div[k], layer[k], meas[k] = diff.norm(), setup.layer_norms(diff), m

        setup.run(cfg, weights, on_record)
        return {"divergence": div, "layers": layer, "measure": meas}

    twins, controls = [], []
    runs = [("twin", i, dw) for i, dw in perturbations] + [("control", s, 0.0)
                                                           for s in control_seeds]
    for kind, i, dw in progress_bar(runs, desc="twin runs", unit="run", progress=progress):
        if kind == "twin":
            w = torch.ones(n)
            w[i] = 1.0 + dw
            name = f"remove-{i}" if dw == -1.0 else f"upweight-{i}-{float(dw).hex()}"
            twins.append(cached(name, lambda w=w: twin(config, w)))
        else:
            controls.append(cached(f"control-seed-{i}", lambda i=i: twin(replace(config, seed=i),
                                                                          None)))

    def stack(items: list[dict[str, torch.Tensor]], key: str, *tail: int) -> torch.Tensor:
        if not items:
            return torch.zeros(r, 0, *tail, dtype=torch.float64)
        return torch.stack([it[key] for it in items], dim=1)

    start = (ref["theta"] - setup.theta0).norm(dim=1)
    return TwinRuns(
        steps=torch.tensor(steps), examples=torch.tensor([i for i, _ in perturbations],
                                                         dtype=torch.long),
        delta_w=torch.tensor([dw for _, dw in perturbations], dtype=torch.float64), n_train=n,
        layers=setup.layers, start_distance=start,
        divergence=stack(twins, "divergence"), layer_divergence=stack(twins, "layers",
                                                                      len(setup.layers)),
        measure_ref=ref["measure"], measure_twin=stack(twins, "measure", n_q),
        control_seeds=control_seeds, control_divergence=stack(controls, "divergence"),
        control_layer_divergence=stack(controls, "layers", len(setup.layers)),
        control_measure=stack(controls, "measure", n_q))
