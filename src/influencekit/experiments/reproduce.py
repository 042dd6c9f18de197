"""``influencekit reproduce``: the paper's study end to end, as a browsable report.

Stages (each cached under ``OUT/stages``, keyed by the preset's settings and the influencekit
version, and skipped when rerun, so an interrupted run picks up where it stopped and a finished one
only rebuilds the report; delete ``OUT/stages/NAME.json`` to recompute one stage):

  models       train the built-in image model on mnist; report its test accuracy
  estimators   ``influencekit evaluate`` on the digits MLP: every estimator against
               leave-one-out and LDS ground truth, with its cost
  spectrum     both ends of the curvature spectrum of the mnist model (Arnoldi Ritz values)
  gallery      test queries (correct and mis-predicted) with their top proponents/opponents
  dynamics     ``influencekit dynamics`` on the digits MLP: twin runs from a trained start
               point, parameter divergence against a data-order control, influence fading
               and the horizon per estimator (the "divergence" and "fading" sections)
  correction   ``influencekit correct`` on a weakly trained digits MLP: every mis-predicted test
               example fine-tuned on its influential training examples, against random,
               class-random and target-only selection (fix rate, steps, collateral damage)
  diagnostics  ``influencekit diagnose`` on the digits MLP (and, in the paper preset,
               ``ik.diagnose`` on the mnist model): which of the paper's five assumptions
               hold, each with its verdict, the number behind it and a recommendation

Writes ``OUT/results.json`` (schema below, ``schema_version`` 1) and ``OUT/index.html``
(self-contained: figures inline). Presets: ``quick`` (a few minutes on 2 CPU cores), ``paper``
(the full sizes), ``tiny`` (seconds; for tests).

results.json: ``{"schema_version", "title", "preset", "settings", "total_seconds",
"sections": {"environment", "models", "estimators", "spectrum", "gallery", "divergence",
"fading", "correction", "diagnostics"}}``; each section has ``"status"`` (``"done"`` or
``"pending"`` with a ``"reason"``) and, when done, ``"seconds"`` and its numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
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

SCHEMA_VERSION = 1
SECTIONS = ("environment", "models", "estimators", "spectrum", "gallery", "divergence",
            "fading", "correction", "diagnostics")
PENDING: dict[str, str] = {}  # section -> why it is not computed yet


@dataclass(frozen=True)
class Preset:
    """Sizes of one study."""

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
    dynamics: tuple[str, ...] = ("--quick",)  # arguments of `influencekit dynamics`
    correct: tuple[str, ...] = (  # arguments of `influencekit correct` (a weak digits MLP)
        "--epochs", "2", "--train-lr", "0.05", "--examples", "4,16", "--steps", "10",
        "--lr", "0.01", "--methods", "graddot,ekfac,arnoldi,random,class-random,target")
    diagnose: tuple[str, ...] = ("--quick",)  # arguments of `influencekit diagnose` (digits)
    diagnose_mnist: bool = False  # also diagnose the mnist model (ik.diagnose)
    diagnose_mnist_sizes: tuple[tuple[str, int], ...] = ()  # ik.diagnose keywords (default sizes)


PRESETS = {
    "tiny": Preset(150, 6, 4, 4, "exact:curvature=ggn,arnoldi:rank=5:iterations=10,graddot",
                   "cnn", 150, 1, 2, 3, 8, arnoldi_rank=4, arnoldi_iterations=8,
                   digits_hidden="4",
                   dynamics=("--hidden", "4", "--n-train", "100", "--n-queries", "6",
                             "--n-removed", "4", "--start-epochs", "3", "--epochs", "2",
                             "--record-every", "2", "--control-seeds", "1",
                             "--methods", "graddot,unrolled,same-time"),
                   correct=("--hidden", "4", "--n-train", "150", "--n-queries", "30",
                            "--epochs", "2", "--train-lr", "0.05", "--examples", "4",
                            "--steps", "3", "--methods", "graddot,random"),
                   diagnose=("--hidden", "4", "--n-train", "100", "--n-queries", "6",
                             "--start-epochs", "3", "--rank", "4", "--iterations", "6",
                             "--curvature-batch", "50", "--pool", "50", "--n-removed", "3",
                             "--epochs", "1"),
                   diagnose_mnist=True,
                   diagnose_mnist_sizes=(("rank", 4), ("iterations", 6), ("curvature_batch", 40),
                                         ("pool", 40), ("n_removed", 2))),
    "quick": Preset(None, 100, 40, 50,
                    "exact:curvature=ggn,cg:curvature=ggn:mislabel=False,arnoldi,arnoldi-topk,"
                    "arnoldi-complement,ekfac,trak,graddot,gradcos", "resnet", 4000, 15, 6, 4,
                    100),
    "paper": Preset(None, 100, 40, 50,
                    "exact:curvature=ggn,exact,cg:curvature=ggn:mislabel=False,lissa:curvature=ggn,arnoldi,"
                    "arnoldi-topk,arnoldi-complement,graddot,gradcos", "resnet", 4000, 20, 8, 5,
                    200, dynamics=(), diagnose=(), diagnose_mnist=True),
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reproduce", help="run the paper's study on the built-in data and write an HTML report",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="quick", choices=sorted(PRESETS),
                   help="study size (default: quick)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="device for the mnist stages (default: cpu)")
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
        self.key = hash_value(asdict(self.preset), __version__)[:16]
        self._mnist: dict[str, Any] | None = None

    # ------------------------------------------------------------------ caching
    def stage(self, name: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        path = self.out / "stages" / f"{name}.json"
        if path.is_file():
            cached = json.loads(path.read_text())
            if cached.get("key") == self.key:
                _log(f"[{name}] cached")
                return cached["result"]
        _log(f"[{name}] running")
        t0 = time.perf_counter()
        result = {"status": "done", **compute()}
        result["seconds"] = time.perf_counter() - t0
        atomic_write_text(json.dumps({"key": self.key, "result": result}, default=float),
                          path)
        _log(f"[{name}] done in {result['seconds']:.0f} s")
        return result

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

    def run_command(self, name: str, *args: str, results: str = "results.json"
                    ) -> tuple[Path, dict[str, Any]]:
        """``influencekit NAME ARGS --out OUT/NAME --cache-dir OUT/cache``: its folder and its
        ``results`` file."""
        from ..cli import main

        out = self.out / name
        argv = [name, *args, "--out", str(out), "--cache-dir", str(self.out / "cache")]
        if self.progress is False:
            argv.append("--no-progress")
        if main(argv) != 0:
            raise RuntimeError(f"influencekit {name} failed; see the messages above.")
        return out, json.loads((out / results).read_text())

    def estimators(self) -> dict[str, Any]:
        p = self.preset
        args = ["--dataset", "digits", "--model", "mlp", "--methods", p.methods,
                "--n-queries", str(p.n_queries), "--n-removed", str(p.n_removed),
                "--lds-subsets", str(p.lds_subsets), "--ground-truth", "loo-warm,lds,mislabel",
                "--hidden", p.digits_hidden]
        if p.digits_n_train:
            args += ["--n-train", str(p.digits_n_train)]
        _, report = self.run_command("evaluate", *args)
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

    def dynamics(self) -> dict[str, Any]:
        out, report = self.run_command("dynamics", "--dataset", "digits", "--model", "mlp",
                                       *self.preset.dynamics)
        for name, png in (("divergence", "divergence.png"), ("fading", "correlation.png"),
                          ("fading_magnitude", "magnitude.png")):
            if (out / png).is_file():
                self.save_figure(name, (out / png).read_bytes())
        g = report["growth_rate"]
        return {"growth_rate": g, "horizon": report["horizon"], "command": report["command"],
                "fading": report["fading"], "n_removed": len(report["removed"])}

    def correction(self) -> dict[str, Any]:
        out, report = self.run_command("correct", "--dataset", "digits", "--model", "mlp",
                                       *self.preset.correct)
        self.save_figure("correction", (out / "fix_rate.png").read_bytes())
        rows = report["results"]
        n = rows[0]["targets"] if rows else 0
        return {"rows": rows, "command": report["command"],
                "test_accuracy": report["test_accuracy"], "params": report["params"],
                "summary": (f"Digits MLP ({report['params']} parameters) trained briefly to test "
                            f"accuracy {report['test_accuracy']:.3f}: each of its {n} "
                            "mis-predicted test examples is fine-tuned on m selected training "
                            "examples (SGD, full batch) until it is predicted right. Fix rate "
                            "with a 95% Wilson interval, median steps to fix, and the change "
                            "of accuracy on the rest of the test set (collateral damage).")}

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

    def diagnostics(self) -> dict[str, Any]:
        out, report = self.run_command("diagnose", "--dataset", "digits", "--model", "mlp",
                                       *self.preset.diagnose, results="diagnosis.json")
        acc = report["setup"]["accuracy"]["test"]
        rows = [_diagnosis_row(f"MLP on digits (test accuracy {acc:.3f})", report)]
        for key, figure in (("convexity", "spectrum"), ("divergence", "fading"),
                            ("linearity", "linearity")):
            if (out / f"{key}-{figure}.png").is_file():
                self.save_figure(f"diagnostics_{key}",
                                 (out / f"{key}-{figure}.png").read_bytes())
        if self.preset.diagnose_mnist:
            from ..diagnostics import diagnose

            m = self.mnist()
            cfg = TrainConfig(epochs=1, batch_size=64, lr=0.02, momentum=0.9,
                              weight_decay=m["config"].weight_decay)
            q = tuple(t[:50] for t in m["test"])
            rep = diagnose(m["task"], m["train"], q, config=cfg, store=self.out / "cache" /
                           "diagnose-mnist", progress=self.progress,
                           **dict(self.preset.diagnose_mnist_sizes))
            rep.save(self.out / "diagnose-mnist")
            x, y = m["test"]
            acc = float((m["task"].predict(x) == y).float().mean())
            rows.append(_diagnosis_row(f"{self.preset.mnist_model} on mnist (test accuracy "
                                       f"{acc:.3f})", rep.to_dict()))
        return {"rows": rows, "command": report["setup"]["command"],
                "summary": ("Each of the paper's five assumptions checked on the model: "
                            "convexity and numeric stability from Lanczos on the Hessian and "
                            "GGN at the trained parameters; training trajectory, parameter "
                            "divergence and the first-order expansion from short continued "
                            "runs with examples removed, up-weighted and removed in groups. "
                            "Verdicts: holds / weak / fails, each with the number behind it.")}

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


def _diagnosis_row(name: str, report: dict[str, Any]) -> dict[str, Any]:
    """One diagnosed model as a row of the report: verdicts, summaries, recommendations."""
    return {"model": name, "trust": report["trust"], "overall": report["overall"],
            "verdicts": report["verdicts"],
            "sections": {k: {"verdict": v["verdict"], "summary": v["summary"],
                             "recommendation": v["recommendation"]}
                         for k, v in report["sections"].items()},
            "seconds": report["setup"].get("seconds")}


def _dynamics_sections(dyn: dict[str, Any]) -> dict[str, Any]:
    """The dynamics stage as the report's "divergence" and "fading" sections."""
    g = dyn["growth_rate"]
    twins, control = g["twins"], g.get("control")
    summary = (f"{dyn['n_removed']} twin runs (one training example removed each) from a "
               f"trained start point: log‖Δθ‖ grows at {twins['rate']:.2e} per step "
               f"[{twins['low']:.2e}, {twins['high']:.2e}]")
    if control:
        summary += f"; the data-order control pair at {control['rate']:.2e} per step"
    horizons = ", ".join(f"{k}: {'never falls' if v == float('inf') else f'step {v:g}'}"
                         for k, v in dyn["horizon"].items())
    base = {"status": "done", "seconds": dyn["seconds"], "command": dyn["command"]}
    return {
        "divergence": {**base, "growth_rate": g, "summary": summary + "."},
        "fading": {**base, "horizon": dyn["horizon"], "curves": dyn["fading"],
                   "summary": ("Correlation between predicted and actual change of the "
                               "queries' loss along continued training, per estimator; the "
                               f"influence horizon (first step below the threshold): {horizons}."
                               )},
    }


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
    for name in ("models", "estimators", "spectrum", "gallery", "dynamics", "correction",
                 "diagnostics"):
        sections[name] = study.stage(name, getattr(study, name))
    sections.update(_dynamics_sections(sections.pop("dynamics")))
    digits = sections["estimators"]["model"]
    sections["models"]["rows"].insert(0, {
        "name": "mlp", "dataset": "digits", "params": digits["params"],
        "n_train": digits["n_train"], "test_accuracy": digits["test_accuracy"],
        "accuracy_on": digits["accuracy_on"]})
    for name, reason in PENDING.items():
        sections[name] = {"status": "pending", "reason": reason}
    results = {"schema_version": SCHEMA_VERSION,
               "title": "what influence functions do on these models",
               "preset": args.preset, "settings": asdict(study.preset),
               "total_seconds": time.perf_counter() - t0, "sections": sections}
    atomic_write_text(json.dumps(results, indent=1, default=float), out / "results.json")
    figures = {f.stem: f.read_bytes() for f in sorted((out / "figures").glob("*.png"))}
    page = render(results, figures, out)
    _log(f"report: {page} (results: {out / 'results.json'}; "
         f"{results['total_seconds']:.0f} s)")
    return 0
