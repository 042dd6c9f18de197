"""``influencekit reproduce``: the paper's study end to end, as a browsable report.

Stages (each cached under ``OUT/stages``, keyed by its settings and the influencekit version, and
skipped when rerun, so an interrupted run picks up at the stage -- or the run -- where it stopped
and a finished one only rebuilds the report; delete ``OUT/stages/NAME.json`` to recompute one):

  models       train the built-in image model on mnist; report its test accuracy
  estimators   ``influencekit evaluate`` on the digits MLP: every estimator against
               leave-one-out and LDS ground truth, with its cost
  spectrum     both ends of the curvature spectrum of the mnist model (Arnoldi Ritz values)
  gallery      test queries (correct and mis-predicted) with their top proponents/opponents
  dynamics-DATA-MODEL     one stage per dynamics run: ``influencekit dynamics``, twin runs
               from a trained start point, parameter divergence against a data-order control,
               influence fading and the horizon per estimator ("divergence" and "fading")
  correction-DATA-MODEL   one stage per correction run: ``influencekit correct`` on a briefly
               trained model: every mis-predicted query fine-tuned on its influential training
               examples, against random, class-random and target-only selection (fix rate,
               steps, collateral damage)
  diagnostics-DATA-MODEL  one stage per diagnosed model: ``influencekit diagnose``, which of the
               paper's five assumptions hold, each with its verdict, the number behind it and a
               recommendation (the model is the dynamics run's start point for the same flags)

Presets (the runs of the last three stages; CPU times measured on the shared 2-core machine,
one torch thread, are in benchmarks/RESULTS.md):

  quick   (under 10 minutes on 2 CPU cores) every study on the digits MLP; the mnist ResNet
          in models, spectrum and gallery
  paper   (26 min 45 s measured on 2 idle cores) the full estimator table, and dynamics,
          correction and diagnostics on each built-in default: the MLP on digits (full sizes),
          the ResNet on mnist and MiniLM-BERT (last layer + head) on rotten_tomatoes
          (``--quick`` sizes of ``dynamics`` and ``diagnose``, which share their start point;
          correction on a briefly trained model, fewer queries and budgets than
          benchmarks/RESULTS.md's tables)
  tiny    (seconds; for tests) the digits MLP and a CNN on mnist at minuscule sizes

Writes ``OUT/results.json`` and ``OUT/index.html`` (self-contained: figures inline), and each
run's own outputs under ``OUT/COMMAND/DATA-MODEL``.

results.json (``schema_version`` 2)::

  {"schema_version": 2, "title", "preset", "settings" (the preset), "total_seconds",
   "sections": {
     "environment": {"status", "influencekit", "torch", "numpy", "python", "platform",
                     "device", "threads", "seeds"},
     "models":      {"status", "seconds", "rows": [{"name", "dataset", "params", "n_train",
                     "test_accuracy", "accuracy_on", ...}]},
     "estimators":  {"status", "seconds", "rows": [{"method", "lds", ...}], "columns",
                     "command", "model", "setup"},
     "spectrum":    {"status", "seconds", "ritz_values", "largest", "most_negative",
                     "negative_fraction", "note"},
     "gallery":     {"status", "seconds", "queries": [...], "estimator", "note", ...},
     "divergence":  {"status", "seconds", "runs": [RUN + {"growth_rate", "n_removed"}]},
     "fading":      {"status", "seconds", "runs": [RUN + {"horizon", "curves"}]},
     "correction":  {"status", "seconds", "summary", "runs": [RUN + {"params", "rows",
                     "gallery"}]},
     "diagnostics": {"status", "seconds", "summary", "runs": [RUN + {"trust", "overall",
                     "verdicts", "sections"}]}}}

  RUN = {"status" ("done" | "failed" with a "reason"), "model", "dataset", "title",
         "test_accuracy" (of the model the run studies, on "n_test" test examples),
         "command", "summary", "figures" ({kind: figure name}), "seconds"}

A section's ``"status"`` is ``"done"`` (with ``"seconds"``: the sum over its runs), ``"failed"``
(every run failed) or ``"pending"`` (with a ``"reason"``). In "correction", a run's "gallery" lists
fixed targets with the training examples that fixed them (for text data with their "text").
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from .. import data as ik_data
from .. import models as ik_models
from ..curvature import Eigensolver, curvature_eigenpairs
from ..estimators import ArnoldiInfluence
from ..groundtruth import Cache
from ..progress import progress_bar
from ..report import figures as figs
from ..report.html import render
from ..store import atomic_write, atomic_write_text, hash_value
from ..task import ClassificationTask
from ..training import TrainConfig, train
from .arguments import count, folder

SCHEMA_VERSION = 2
SECTIONS = ("environment", "models", "estimators", "spectrum", "gallery", "divergence",
            "fading", "correction", "diagnostics")
PENDING: dict[str, str] = {}  # section -> why it is not computed yet


# the command each per-run stage runs, and the results file it writes
STUDIES = {"dynamics": ("dynamics", "results.json"), "correction": ("correct", "results.json"),
           "diagnostics": ("diagnose", "diagnosis.json")}


@dataclass(frozen=True)
class Run:
    """One run of an experiment command in the study: a built-in model on a built-in dataset,
    with the command's other arguments (sizes)."""

    dataset: str
    model: str
    args: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.dataset}-{self.model}"


# the digits MLP trained briefly (2 epochs), so that it mis-predicts enough test examples
WEAK_DIGITS = ("--epochs", "2", "--train-lr", "0.05", "--examples", "4,16", "--steps", "10",
               "--lr", "0.01", "--methods", "graddot,ekfac,arnoldi,random,class-random,target")


@dataclass(frozen=True)
class Preset:
    """Sizes of one study: the digits/mnist stages' sizes, and the list of runs of each of the
    dynamics, correction and diagnostics stages (one cached stage per run)."""

    digits_n_train: int | None  # None: the whole split (1,438)
    n_queries: int
    n_removed: int
    lds_subsets: int
    methods: str
    mnist_model: str
    mnist_n_train: int
    mnist_epochs: int
    gallery_queries: int
    gallery_top: int
    spectrum_iterations: int
    arnoldi_rank: int = 50  # the gallery's estimator
    arnoldi_iterations: int = 200
    gallery_steps: int = 20  # mis-predicted gallery queries: fine-tune on the shown top
    gallery_lr: float = 0.005  # proponents for up to this many steps (SGD at this lr)
    digits_hidden: str = "32"
    dynamics: tuple[Run, ...] = (Run("digits", "mlp", ("--quick",)),)  # `influencekit dynamics`
    correction: tuple[Run, ...] = (Run("digits", "mlp", WEAK_DIGITS),)  # `influencekit correct`
    diagnostics: tuple[Run, ...] = (Run("digits", "mlp", ("--quick",)),)  # `influencekit diagnose`

    def __post_init__(self) -> None:
        for stage in STUDIES:
            names = [run.name for run in getattr(self, stage)]
            if len(set(names)) != len(names):  # one stage, folder and figure set per run
                raise ValueError(f"{stage}: one run per dataset and model, got {names}")


# the tiny preset's second model: a CNN on 64 mnist examples, one epoch (seconds)
TINY_CNN = ("--n-train", "64", "--n-queries", "6", "--start-epochs", "1", "--batch-size", "32")
PRESETS = {
    "tiny": Preset(150, 6, 4, 4, "exact:curvature=ggn,arnoldi:rank=5:iterations=10,graddot",
                   "cnn", 150, 1, 2, 3, 8, arnoldi_rank=4, arnoldi_iterations=8,
                   digits_hidden="4",
                   dynamics=(
                       Run("digits", "mlp", (
                           "--hidden", "4", "--n-train", "100", "--n-queries", "6",
                           "--n-removed", "4", "--start-epochs", "3", "--epochs", "2",
                           "--record-every", "2", "--control-seeds", "1",
                           "--methods", "graddot,unrolled,same-time")),
                       Run("mnist", "cnn", (*TINY_CNN, "--n-removed", "2", "--epochs", "1",
                                            "--record-every", "1", "--control-seeds", "1",
                                            "--methods", "graddot,same-time"))),
                   correction=(
                       Run("digits", "mlp", (
                           "--hidden", "4", "--n-train", "150", "--n-queries", "30",
                           "--epochs", "2", "--train-lr", "0.05", "--examples", "4",
                           "--steps", "3", "--methods", "graddot,random")),
                       Run("mnist", "cnn", ("--n-train", "64", "--n-queries", "8",
                                            "--epochs", "1", "--examples", "2", "--steps", "2",
                                            "--methods", "graddot,target"))),
                   diagnostics=(
                       Run("digits", "mlp", (
                           "--hidden", "4", "--n-train", "100", "--n-queries", "6",
                           "--start-epochs", "3", "--rank", "4", "--iterations", "6",
                           "--curvature-batch", "50", "--pool", "50", "--n-removed", "3",
                           "--epochs", "1")),
                       Run("mnist", "cnn", (*TINY_CNN, "--rank", "4", "--iterations", "6",
                                            "--curvature-batch", "40", "--pool", "40",
                                            "--n-removed", "2", "--epochs", "1")))),
    "quick": Preset(None, 100, 40, 50,
                    "exact:curvature=ggn,cg:curvature=ggn:mislabel=False,arnoldi,arnoldi-topk,"
                    "arnoldi-complement,ekfac,trak,graddot,gradcos", "resnet", 4000, 15, 6, 4,
                    100),
    # wall minutes per run in the comments: one torch thread on the shared 2-core machine at
    # load 4-7 (benchmarks/RESULTS.md, or measured where said), so upper bounds; the models,
    # estimators, spectrum and gallery stages ≈ 8 min
    "paper": Preset(None, 100, 40, 50,
                    "exact:curvature=ggn,exact,cg:curvature=ggn:mislabel=False,lissa:curvature=ggn,arnoldi,"
                    "arnoldi-topk,arnoldi-complement,graddot,gradcos", "resnet", 4000, 20, 8, 5,
                    200,
                    dynamics=(
                        Run("digits", "mlp"),  # full sizes: < 1 min
                        # 12 start epochs, 1 continued epoch, 10 twins: ≈ 11 min (start 5.5)
                        Run("mnist", "resnet", ("--quick",)),
                        # 2,048 examples, 6 start epochs, 2 continued, 10 twins: ≈ 13 min, and
                        # ≈ 3 min the first time (frozen MiniLM features)
                        Run("rotten_tomatoes", "bert", ("--quick",))),
                    correction=(
                        Run("digits", "mlp", WEAK_DIGITS),  # < 1 min
                        # 3 epochs (test accuracy 0.948), 20 targets among 300 queries:
                        # measured 7.3 min (4.2 min CPU; ABIF fit and scoring 3.5 min)
                        Run("mnist", "resnet", (
                            "--epochs", "3", "--n-queries", "300", "--examples", "4,16",
                            "--steps", "10", "--methods",
                            "arnoldi,graddot,random,class-random,target")),
                        # 2,048 examples, 6 epochs (test accuracy 0.758), 17 targets among 60
                        # queries; one Hessian-Arnoldi pass instead of the GGN's two: measured
                        # 9.0 min (6.5 min CPU, 3.1 GB)
                        Run("rotten_tomatoes", "bert", (
                            "--n-train", "2048", "--epochs", "6", "--n-queries", "60",
                            "--examples", "4,16", "--steps", "10", "--methods",
                            "graddot:query_chunk=64,arnoldi:curvature=hessian:iterations=30:"
                            "rank=15:query_chunk=64,random,class-random,target"))),
                    diagnostics=(
                        Run("digits", "mlp"),  # full sizes, the full dynamics' start point: 6 s
                        # default probe on the --quick dynamics' start point: ≈ 10 min, 3 GB
                        Run("mnist", "resnet", ("--start-epochs", "12")),
                        # --quick probe on the --quick dynamics' start point: measured 8.8 min
                        # (7 min CPU, 4.4 GB; 3.5 min more if the start point is not cached)
                        Run("rotten_tomatoes", "bert", ("--quick",)))),
}
MODEL_NAMES = {"mlp": "MLP", "logreg": "logistic regression", "cnn": "CNN", "resnet": "ResNet",
               "bert": "MiniLM-BERT"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reproduce", help="run the paper's study on the built-in data and write an HTML report",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="quick", choices=sorted(PRESETS),
                   help="study size (default: quick)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="device of the models, spectrum and gallery stages (default: cpu; "
                        "the dynamics, correction and diagnostics runs use the CPU)")
    p.add_argument("--out", type=folder, default=Path("runs/reproduce"),
                   help="output folder (default: runs/reproduce)")
    p.add_argument("--threads", type=count(1), default=None,
                   help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(run=run)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Study:
    """The stages of one run, cached as JSON under ``out/stages`` and figures under
    ``out/figures``."""

    def __init__(self, out: Path, preset_name: str, device: str, progress: bool | None):
        self.out = out
        self.preset_name = preset_name
        self.preset = PRESETS[preset_name]
        self.device = torch.device(device)
        self.progress = progress
        self.cache = Cache(out / "cache")
        # the per-run stages are keyed by their run; the others by the rest of the preset
        self.key = hash_value({k: v for k, v in asdict(self.preset).items()
                               if k not in STUDIES}, __version__)[:16]
        self.failed: list[str] = []  # the runs that failed
        self._mnist: dict[str, Any] | None = None

    # ------------------------------------------------------------------ caching
    def stage(self, name: str, compute: Callable[[], dict[str, Any]], key: str | None = None
              ) -> dict[str, Any]:
        """``compute()``, or its cached result when ``key`` (default: the preset's) matches."""
        key = key or self.key
        path = self.out / "stages" / f"{name}.json"
        if path.is_file():
            cached = json.loads(path.read_text())
            if cached.get("key") == key:
                _log(f"[{name}] cached")
                return cached["result"]
        _log(f"[{name}] running")
        t0 = time.perf_counter()
        result = {"status": "done", **compute()}
        result["seconds"] = time.perf_counter() - t0
        atomic_write_text(json.dumps({"key": key, "result": result}, default=float), path)
        _log(f"[{name}] done in {result['seconds']:.0f} s")
        return result

    def runs(self, stage: str) -> list[dict[str, Any]]:
        """Each of the preset's runs of ``stage`` as its own cached stage ``STAGE-DATA-MODEL``
        (keyed by the run itself, so a changed run recomputes only that run): the command's
        results summarised by ``self.<stage>_run``. A run that fails is reported as failed (and
        not cached: a rerun retries it); the other runs go on."""
        command, results = STUDIES[stage]
        summarise = getattr(self, f"{stage}_run")
        entries = []
        for spec in getattr(self.preset, stage):
            head = {"model": spec.model, "dataset": spec.dataset}

            def compute(spec: Run = spec) -> dict[str, Any]:
                # a fresh output folder: no figure of an earlier run is taken for this one's
                # (what a rerun resumes from lives in the cache folder)
                shutil.rmtree(self.out / command / spec.name, ignore_errors=True)
                out, report = self.run_command(
                    command, ["--dataset", spec.dataset, "--model", spec.model, *spec.args],
                    f"{command}/{spec.name}", results)
                return {"model": spec.model, "dataset": spec.dataset,
                        **summarise(spec, out, report)}

            try:
                entries.append(self.stage(f"{stage}-{spec.name}", compute,
                                          hash_value(command, asdict(spec), __version__)[:16]))
            except Exception as e:  # noqa: BLE001 -- reported, the study goes on
                _log(f"[{stage}-{spec.name}] failed: {type(e).__name__}: {e}")
                self.failed.append(f"{stage}-{spec.name}")
                entries.append({"status": "failed", **head, "title": _title(spec),
                                "reason": f"{type(e).__name__}: {e}"})
        return entries

    def save_figure(self, name: str, png: bytes) -> str:
        atomic_write(self.out / "figures" / f"{name}.png", png)
        return name

    # ------------------------------------------------------------------ mnist model
    def mnist(self) -> dict[str, Any]:
        """The mnist split and the trained model (cached)."""
        if self._mnist is None:
            p = self.preset
            d = ik_data.load("mnist", n_train=p.mnist_n_train)
            cfg = TrainConfig(epochs=p.mnist_epochs, batch_size=64, lr=0.1, schedule="cosine",
                              weight_decay=5e-4, seed=0, init_seed=0)

            def builder() -> torch.nn.Module:
                return ik_models.build(p.mnist_model, num_classes=d.num_classes)

            key = hash_value(p.mnist_model, p.mnist_n_train, asdict(cfg))[:16]
            state = self.cache.get_or_compute("models", key, lambda: train(
                builder, d.train, cfg, progress=self.progress).model.state_dict())
            model = builder()
            model.load_state_dict(state)
            model = model.to(self.device).eval()
            self._mnist = {"data": d, "model": model, "config": cfg,
                           "task": ClassificationTask(model),
                           "train": tuple(t.to(self.device) for t in d.train),
                           "test": tuple(t.to(self.device) for t in d.test)}
        return self._mnist

    # ------------------------------------------------------------------ stages
    def models(self) -> dict[str, Any]:
        m = self.mnist()
        task, d = m["task"], m["data"]
        x, y = m["test"]
        acc = float((task.predict(x) == y).float().mean())
        return {"rows": [{"name": self.preset.mnist_model, "dataset": "mnist",
                          "params": task.num_params, "n_train": len(d.train[1]),
                          "test_accuracy": acc, "epochs": m["config"].epochs,
                          "accuracy_on": f"{len(y)} test examples"}]}

    def run_command(self, command: str, args: list[str], folder: str,
                    results: str = "results.json") -> tuple[Path, dict[str, Any]]:
        """``influencekit COMMAND ARGS --out OUT/FOLDER --cache-dir OUT/cache``: its folder and
        its ``results`` file."""
        from ..cli import main

        out = self.out / folder
        argv = [command, *args, "--out", str(out), "--cache-dir", str(self.out / "cache")]
        if self.progress is False:
            argv.append("--no-progress")
        status = main(argv)
        if status == 130:  # interrupted: stop the study (a rerun resumes here)
            raise KeyboardInterrupt
        if status != 0:
            raise RuntimeError(f"influencekit {command} failed; see the messages above.")
        return out, json.loads((out / results).read_text())

    def estimators(self) -> dict[str, Any]:
        p = self.preset
        args = ["--dataset", "digits", "--model", "mlp", "--methods", p.methods,
                "--n-queries", str(p.n_queries), "--n-removed", str(p.n_removed),
                "--lds-subsets", str(p.lds_subsets), "--ground-truth", "loo-warm,lds,mislabel",
                "--hidden", p.digits_hidden]
        if p.digits_n_train:
            args += ["--n-train", str(p.digits_n_train)]
        _, report = self.run_command("evaluate", args, "evaluate")
        from .evaluate import COLUMNS

        self.save_figure("quality_vs_cost", figs.quality_vs_cost(report["results"]))
        model = {**report["model"], "n_train": report["n_train"],
                 "accuracy_on": f"{report['n_queries']} test queries"}
        return {
            "rows": report["results"], "columns": COLUMNS, "command": report["command"],
            "model": model,
            "setup": (f"Digits MLP ({model['params']} parameters, test accuracy "
                      f"{model['test_accuracy']:.3f}), {report['n_train']} training examples, "
                      f"{report['n_queries']} queries; LOO warm = leave-one-out retrained from "
                      f"θ*, LDS over {p.lds_subsets} random half-subsets, mislabel AUC with 10% "
                      "flipped labels. Correlations are Spearman per query, averaged."),
        }

    def figures(self, spec: Run, out: Path, files: dict[str, str]) -> dict[str, str]:
        """Copy the run's figures (kind → file in ``out``, where present) into the report as
        ``KIND-DATA-MODEL``: kind → figure name."""
        return {kind: self.save_figure(f"{kind}-{spec.name}", (out / f).read_bytes())
                for kind, f in files.items() if (out / f).is_file()}

    def dynamics_run(self, spec: Run, out: Path, report: dict[str, Any]) -> dict[str, Any]:
        """One ``influencekit dynamics`` run: growth rate, fading curves, horizons."""
        acc = report["start_accuracy"]
        return {"title": _title(spec, acc["test"]), "test_accuracy": acc["test"],
                "train_accuracy": acc["train"], "n_test": acc["n_test"],
                "n_train": report["n_train"], "n_queries": report["n_queries"],
                "command": report["command"], "growth_rate": report["growth_rate"],
                "horizon": report["horizon"], "fading": report["fading"],
                "n_removed": len(report["removed"]),
                "figures": self.figures(spec, out, {"divergence": "divergence.png",
                                                    "fading": "correlation.png",
                                                    "fading_magnitude": "magnitude.png"})}

    def correction_run(self, spec: Run, out: Path, report: dict[str, Any]) -> dict[str, Any]:
        """One ``influencekit correct`` run: the fix-rate table, its figure and gallery."""
        rows = report["results"]
        n = rows[0]["targets"] if rows else 0
        gallery = report.get("gallery", [])
        if gallery and ik_data.INPUTS.get(spec.dataset) == "text":
            gallery = _with_texts(gallery, spec.dataset, report["settings"])
        acc = report["test_accuracy"]
        return {"title": _title(spec, acc), "test_accuracy": acc,
                "n_test": report.get("n_test"), "params": report["params"],
                "n_train": report["n_train"], "n_queries": report["n_queries"],
                "epochs": report["train_config"]["epochs"], "rows": rows,
                "command": report["command"], "gallery": gallery,
                "summary": (f"{MODEL_NAMES.get(spec.model, spec.model)} on {spec.dataset} "
                            f"({report['params']:,} trained parameters), trained "
                            f"{report['train_config']['epochs']} epoch(s) on "
                            f"{report['n_train']:,} examples to test accuracy {acc:.3f}: "
                            f"{n} of the first {report['n_queries']} test examples are "
                            "mis-predicted and each is fine-tuned on m selected training "
                            "examples."),
                "figures": self.figures(spec, out, {"correction": "fix_rate.png",
                                                    "correction_gallery": "gallery.png"})}

    def diagnostics_run(self, spec: Run, out: Path, report: dict[str, Any]) -> dict[str, Any]:
        """One ``influencekit diagnose`` run: the verdicts, trust summary and figures."""
        acc = report["setup"]["accuracy"]
        return {"title": _title(spec, acc["test"]), "test_accuracy": acc["test"],
                "n_test": acc.get("n_test"), "command": report["setup"]["command"],
                "summary": report["trust"].splitlines()[0], **_diagnosis(report),
                "figures": self.figures(spec, out, {
                    f"diagnostics_{key}": f"{key}-{figure}.png" for key, figure in (
                        ("convexity", "spectrum"), ("divergence", "fading"),
                        ("linearity", "linearity"))})}

    def _correct(self, est: Any, target: tuple[torch.Tensor, torch.Tensor], train_data: Any,
                 test: tuple[torch.Tensor, torch.Tensor], index: int) -> dict[str, Any]:
        """Fine-tune on the target's top proponents until it is predicted right."""
        from ..correction import correct

        p = self.preset
        keep = torch.arange(len(test[1]), device=test[1].device) != index
        r = correct(self.mnist()["model"], target, train_data, estimator=est,
                    examples=p.gallery_top, steps=p.gallery_steps, lr=p.gallery_lr,
                    holdout=(test[0][keep], test[1][keep]))
        c = r.collateral
        return {"fixed": r.fixed, "steps_to_fix": r.steps_to_fix, "examples": len(r.examples),
                "lr": r.lr, "predictions": r.predictions, "losses": r.losses,
                "accuracy_change": None if c is None else c.accuracy_change,
                "flips": None if c is None else c.flips}

    def spectrum(self) -> dict[str, Any]:
        m = self.mnist()
        it = self.preset.spectrum_iterations
        pairs = curvature_eigenpairs(m["task"], m["train"], it, it, curvature="hessian",
                                     solver=Eigensolver(which="magnitude"),
                                     progress=self.progress)
        ritz = [float(v) for v in pairs.info["ritz_values"]]
        self.save_figure("spectrum", figs.spectrum(
            ritz, f"Hessian Ritz values, {self.preset.mnist_model} on mnist ({it} Arnoldi "
                  "steps)"))
        neg = [v for v in ritz if v < 0]
        return {"ritz_values": ritz, "largest": max(ritz), "most_negative": min(ritz),
                "negative_fraction": len(neg) / len(ritz),
                "note": (f"Largest Ritz value {max(ritz):.3g}, most negative {min(ritz):.3g}; "
                         f"{len(neg)} of {len(ritz)} Ritz values are negative: the Hessian at "
                         "the trained parameters is indefinite, so damping (or the GGN, or a "
                         "filter that keeps positive eigenvalues) is needed to invert it.")}

    def gallery(self) -> dict[str, Any]:
        m = self.mnist()
        task, d, train_data = m["task"], m["data"], m["train"]
        xq, yq = m["test"]
        pred = task.predict(xq)
        p = self.preset
        half = max(1, p.gallery_queries // 2)
        wrong = (pred != yq).nonzero().squeeze(1)[:half].tolist()
        right = (pred == yq).nonzero().squeeze(1)[:p.gallery_queries - len(wrong)].tolist()
        chosen = right + wrong
        est = ArnoldiInfluence(task, p.arnoldi_rank, p.arnoldi_iterations,
                               damping=m["config"].weight_decay, progress=self.progress)
        est.fit(train_data)
        q = (xq[chosen], yq[chosen])
        top = est.top_k(q, k=p.gallery_top)
        queries = []
        for row, qi in enumerate(progress_bar(chosen, desc="gallery", progress=self.progress)):
            entry = {"index": qi, "label": int(yq[qi]), "predicted": int(pred[qi]),
                     "image": self.save_figure(f"query-{qi}", figs.thumbnail(xq[qi]))}
            for kind, idx, sc in (("proponents", top.proponents, top.proponent_scores),
                                  ("opponents", top.opponents, top.opponent_scores)):
                entry[kind] = [{"index": int(i), "label": int(d.train[1][i]),
                                "score": float(s),
                                "image": self.save_figure(f"train-{int(i)}",
                                                          figs.thumbnail(d.train[0][i]))}
                               for i, s in zip(idx[row], sc[row])]
            if qi in wrong:
                entry["correction"] = self._correct(est, (xq[qi], yq[qi]), train_data,
                                                    (xq, yq), qi)
            queries.append(entry)

        def share(qs: list[dict[str, Any]], key: str, kind: str) -> float:
            labels = [(q[key], ex["label"]) for q in qs for ex in q[kind]]
            return sum(a == b for a, b in labels) / max(len(labels), 1)

        ok = [q for q in queries if q["label"] == q["predicted"]]
        bad = [q for q in queries if q["label"] != q["predicted"]]
        fixed = sum(q["correction"]["fixed"] for q in bad)
        stats = {"proponents_with_label": share(queries, "label", "proponents"),
                 "opponents_with_label": share(queries, "label", "opponents"),
                 "opponents_with_prediction_mispredicted": share(bad, "predicted",
                                                                 "opponents")}
        return {"queries": queries, "estimator": repr(est), **stats,
                "note": (f"Default ArnoldiInfluence on the {p.mnist_model} "
                         f"({len(ok)} correct and {len(bad)} mis-predicted test queries; the "
                         "measurement is the loss at the true label). "
                         f"{stats['proponents_with_label']:.0%} of the top proponents and "
                         f"{stats['opponents_with_label']:.0%} of the top opponents share the "
                         "query's true label; of the opponents of mis-predicted queries, "
                         f"{stats['opponents_with_prediction_mispredicted']:.0%} carry the "
                         "(wrong) predicted label. Each mis-predicted query was then fine-tuned "
                         f"on the {p.gallery_top} top proponents shown (SGD, lr "
                         f"{p.gallery_lr:g}, up to {p.gallery_steps} steps): {fixed} of "
                         f"{len(bad)} fixed.")}


def _title(spec: Run, accuracy: float | None = None) -> str:
    """"ResNet on mnist (test accuracy 0.984)": the run's sub-heading in the report."""
    name = f"{MODEL_NAMES.get(spec.model, spec.model)} on {spec.dataset}"
    return name if accuracy is None else f"{name} (test accuracy {accuracy:.3f})"


def _diagnosis(report: dict[str, Any]) -> dict[str, Any]:
    """One diagnosed model: verdicts, summaries, recommendations."""
    return {"trust": report["trust"], "overall": report["overall"],
            "verdicts": report["verdicts"],
            "sections": {k: {"verdict": v["verdict"], "summary": v["summary"],
                             "recommendation": v["recommendation"]}
                         for k, v in report["sections"].items()},
            "diagnosis_seconds": report["setup"].get("seconds_diagnose")}


def _with_texts(gallery: list[dict[str, Any]], dataset: str, settings: dict[str, Any]
                ) -> list[dict[str, Any]]:
    """The correction gallery of a text dataset with the texts of its targets and training
    examples (the split ``correct`` used: its ``--seed`` and ``--n-train``) and class names."""
    kw: dict[str, Any] = {"seed": settings.get("seed", 0)}
    if settings.get("n_train"):
        kw["n_train"] = settings["n_train"]
    d = ik_data.load(dataset, **kw)
    return [{**g, "text": d.test[0][g["target"]], "classes": list(d.classes),
             "examples": [{**e, "text": d.train[0][e["index"]]} for e in g["examples"]]}
            for g in gallery]


def _section(runs: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """A section of one entry per run: done when a run is (seconds: the sum over runs)."""
    if not runs:
        return {"status": "pending", "reason": "no run of this study in the preset"}
    done = [r for r in runs if r["status"] == "done"]
    section: dict[str, Any] = {"status": "done" if done else "failed",
                               "seconds": sum(r["seconds"] for r in done), **extra,
                               "runs": runs}
    if not done:
        section["reason"] = "; ".join(f"{r['title']}: {r['reason']}" for r in runs)
    return section


def _dynamics_sections(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The dynamics runs as the report's "divergence" and "fading" sections."""
    divergence, fading = [], []
    for dyn in runs:
        if dyn["status"] != "done":
            divergence.append(dyn)
            fading.append(dyn)
            continue
        g = dyn["growth_rate"]
        twins, control = g["twins"], g.get("control")
        summary = (f"{dyn['n_removed']} twin runs (one training example removed each) from a "
                   f"trained start point: log‖Δθ‖ grows at {twins['rate']:.2e} per step "
                   f"[{twins['low']:.2e}, {twins['high']:.2e}]")
        if control:
            summary += f"; the data-order control pair at {control['rate']:.2e} per step"
        horizons = ", ".join(f"{k}: {'never falls' if v == float('inf') else f'step {v:g}'}"
                             for k, v in dyn["horizon"].items())
        base = {k: dyn[k] for k in ("status", "model", "dataset", "title", "test_accuracy",
                                    "train_accuracy", "n_test", "n_train", "n_queries",
                                    "command", "seconds")}
        figures = dyn["figures"]
        divergence.append({**base, "growth_rate": g, "n_removed": dyn["n_removed"],
                           "summary": summary + ".",
                           "figures": {k: v for k, v in figures.items() if k == "divergence"}})
        fading.append({**base, "horizon": dyn["horizon"], "curves": dyn["fading"],
                       "summary": ("Correlation between predicted and actual change of the "
                                   "queries' loss along continued training, per estimator; the "
                                   "influence horizon (first step below the threshold): "
                                   f"{horizons}."),
                       "figures": {k: v for k, v in figures.items() if k != "divergence"}})
    return {"divergence": _section(divergence), "fading": _section(fading)}


CORRECTION_SUMMARY = (
    "Each mis-predicted test example (a target) is fine-tuned on m selected training examples "
    "(SGD, full batch) until it is predicted right: selection by influence against random, "
    "class-random (m random examples of the target's true class) and the target itself (an "
    "upper bound that uses its label). Fix rate with a 95% Wilson interval, median steps to "
    "fix, and the change of accuracy on the rest of the queries (collateral damage). Each "
    "model is trained briefly, so that it mis-predicts enough examples.")
DIAGNOSTICS_SUMMARY = (
    "Each of the paper's five assumptions checked on the model: convexity and numeric "
    "stability from Lanczos on the Hessian and GGN at the trained parameters; training "
    "trajectory, parameter divergence and the first-order expansion from short continued runs "
    "with examples removed, up-weighted and removed in groups. Verdicts: holds / weak / fails, "
    "each with the number behind it.")


def environment(device: str, threads: int) -> dict[str, Any]:
    import numpy

    return {"status": "done", "influencekit": __version__, "torch": torch.__version__,
            "numpy": numpy.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "device": device, "threads": threads,
            "seeds": {"split": 0, "init": 0, "order": 0}}


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("influencekit reproduce: --device cuda, but no CUDA device is available; use "
              "--device cpu.", file=sys.stderr)
        return 2
    out = Path(args.out)
    study = Study(out, args.preset, args.device, False if args.no_progress else None)
    sections: dict[str, Any] = {"environment": environment(args.device,
                                                           torch.get_num_threads())}
    for name in ("models", "estimators", "spectrum", "gallery"):
        sections[name] = study.stage(name, getattr(study, name))
    runs = {stage: study.runs(stage) for stage in STUDIES}
    sections.update(_dynamics_sections(runs["dynamics"]))
    sections["correction"] = _section(runs["correction"], summary=CORRECTION_SUMMARY)
    sections["diagnostics"] = _section(runs["diagnostics"], summary=DIAGNOSTICS_SUMMARY)
    digits = sections["estimators"]["model"]
    sections["models"]["rows"].insert(0, {
        "name": "mlp", "dataset": "digits", "params": digits["params"],
        "n_train": digits["n_train"], "test_accuracy": digits["test_accuracy"],
        "accuracy_on": digits["accuracy_on"]})
    for name, reason in PENDING.items():
        sections[name] = {"status": "pending", "reason": reason}
    sections = {name: sections[name] for name in SECTIONS}
    results = {"schema_version": SCHEMA_VERSION,
               "title": "what influence functions do on these models",
               "preset": args.preset, "settings": asdict(study.preset),
               "total_seconds": time.perf_counter() - t0, "sections": sections}
    atomic_write_text(json.dumps(results, indent=1, default=float), out / "results.json")
    figures = {f.stem: f.read_bytes() for f in sorted((out / "figures").glob("*.png"))}
    page = render(results, figures, out)
    _log(f"report: {page} (results: {out / 'results.json'}; "
         f"{results['total_seconds']:.0f} s)")
    if study.failed:
        _log(f"failed: {', '.join(study.failed)} (see the messages above; a rerun retries "
             "them and reuses the rest)")
        return 1
    return 0
