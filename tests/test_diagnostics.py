"""ik.diagnose: verdicts on constructed problems, numbers against closed forms."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import influencekit as ik
from influencekit.curvature import dense_curvature
from influencekit.diagnostics import lanczos_spectrum, lissa_convergence
from influencekit.training import TrainConfig


def bce(out: torch.Tensor, batch: tuple) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(out.squeeze(-1), batch[1], reduction="none")


def half_square(out: torch.Tensor, batch: tuple) -> torch.Tensor:
    return 0.5 * (out.squeeze(-1) - batch[1]) ** 2


def fit_exactly(model: nn.Module, loss, x, y, wd: float) -> nn.Module:
    """Full-batch L-BFGS to the minimum of mean loss + wd/2 ‖θ‖² (float64)."""
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=500, tolerance_grad=1e-13,
                            tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        obj = loss(model(x), (x, y)).mean() + wd / 2 * sum((p ** 2).sum()
                                                            for p in model.parameters())
        obj.backward()
        return obj

    opt.step(closure)
    return model


def logistic_problem(n: int = 120, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    scales = torch.tensor([2.0, 1.0, 0.7, 0.5, 0.3], dtype=torch.float64)
    w = torch.tensor([1.5, -2.0, 1.0, 0.5, -1.0], dtype=torch.float64)

    def draw(k: int):
        x = torch.randn(k, 5, generator=g, dtype=torch.float64) * scales
        y = (torch.rand(k, generator=g, dtype=torch.float64) < torch.sigmoid(x @ w)).double()
        return x, y

    return draw(n), draw(30)


@pytest.fixture(scope="module")
def convex_report():
    """L2 logistic regression at its exact optimum; continued full-batch GD to convergence."""
    (x, y), queries = logistic_problem()
    wd = 1e-2
    model = fit_exactly(nn.Linear(5, 1).double(), bce, x, y, wd)
    task = ik.Task(model, loss=bce)
    cfg = TrainConfig(epochs=80, batch_size=len(y), lr=3.0, momentum=0.0, weight_decay=wd)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = ik.diagnose(task, (x, y), queries, config=cfg, rank=6, iterations=6, pool=120,
                         progress=False)
    return report, task, (x, y), queries, before


def test_convex_problem_every_verdict_holds(convex_report):
    report, *_ = convex_report
    assert report.verdicts == {k: "holds" for k in ik.diagnostics.SECTIONS}, report.trust
    assert report.trust.startswith("trust: HOLDS")


def test_convex_numbers_match_closed_forms(convex_report):
    report, task, train, _, _ = convex_report
    c = report.sections["convexity"].numbers
    h = dense_curvature(task, train)
    eig = torch.linalg.eigvalsh(h)
    assert c["exact_spectrum"]
    assert c["lambda_max"] == pytest.approx(float(eig.max()), rel=1e-8)
    assert c["lambda_min"] == pytest.approx(float(eig.min()), rel=1e-6)
    assert c["damping_for_positive_definite"] == 0.0
    assert c["stationarity"] < 1e-5  # the optimum of the regularised objective
    assert c["hessian_ggn_spearman"] == pytest.approx(1.0)  # H = GGN for logistic regression
    s = report.sections["stability"].numbers
    d = report.setup["damping"]
    assert d == 1e-2  # the config's weight decay
    assert s["condition_number"] == pytest.approx(float((eig.max() + d) / (eig.min() + d)),
                                                  rel=1e-6)
    # LiSSA closed form: slowest contraction 1 − (λ_min + δ) / (1.5 (λ_max + δ))
    rate = 1 - (float(eig.min()) + d) / (1.5 * (float(eig.max()) + d))
    assert s["lissa"]["steps_needed"] == math.ceil(math.log(1e-2) / math.log(rate))


def test_trajectory_at_the_optimum_end_point_equals_unrolled(convex_report):
    report, *_ = convex_report
    t = report.sections["trajectory"].numbers
    assert t["unrolled"]
    corr = t["correlations"]
    assert corr["unrolled (exact first order)"]["spearman"] > 0.99
    assert corr["influence"]["spearman"] > 0.99


def test_model_untouched_and_report_saved(convex_report, tmp_path):
    report, task, _, _, before = convex_report
    for k, v in task.model.state_dict().items():
        assert torch.equal(v, before[k])
    report.save(tmp_path)
    data = json.loads((tmp_path / "diagnosis.json").read_text())
    assert data["schema_version"] == 1
    assert set(data["sections"]) == set(ik.diagnostics.SECTIONS)
    assert data["verdicts"]["linearity"] == "holds"
    assert (tmp_path / "convexity-spectrum.png").stat().st_size > 1000
    assert "trust: HOLDS" in (tmp_path / "diagnosis.md").read_text()


def test_upweight_effects_match_ridge_closed_form():
    """Linear regression, continued full-batch GD to convergence: the per-unit effect ratio the
    linearity section reports equals the one from re-solved ridge normal equations."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 3, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64) + 0.3 * torch.randn(
        60, generator=g, dtype=torch.float64)
    xq = torch.randn(10, 3, generator=g, dtype=torch.float64)
    yq = torch.randn(10, generator=g, dtype=torch.float64)
    wd = 0.05
    model = fit_exactly(nn.Linear(3, 1, bias=False).double(), half_square, x, y, wd)
    task = ik.Task(model, loss=half_square)
    cfg = TrainConfig(epochs=400, batch_size=60, lr=0.5, momentum=0.0, weight_decay=wd)
    rep = ik.diagnose(task, (x, y), (xq, yq), config=cfg, rank=3, iterations=3, pool=60,
                      n_removed=2, n_upweighted=2, upweights=(6.0,), random_groups=(2,),
                      top_groups=(2,), sections=("linearity",), progress=False)
    lin = rep.sections["linearity"].numbers["upweights"][0]
    gen = torch.Generator().manual_seed(0)
    removed = torch.randperm(60, generator=gen)[:2].tolist()  # the pool's first examples

    def query_loss(w: torch.Tensor) -> torch.Tensor:
        a = (x * w[:, None]).T @ x / 60 + wd * torch.eye(3, dtype=torch.float64)
        theta = torch.linalg.solve(a, (x * w[:, None]).T @ y / 60)
        return 0.5 * (xq @ theta - yq) ** 2

    base = query_loss(torch.ones(60))
    per_unit, up = [], []
    for i in removed:
        w = torch.ones(60)
        w[i] = 0.0
        per_unit.append(-(query_loss(w.double()) - base))
        w[i] = 7.0
        up.append((query_loss(w.double()) - base) / 6.0)
    a, b = torch.stack(up).ravel(), torch.stack(per_unit).ravel()
    assert lin["ratio"] == pytest.approx(float((a * b).sum() / (b * b).sum()), rel=1e-4)


def test_indefinite_hessian_fails_convexity():
    """A quadratic saddle: ℓ_i = ½ s_i (x_iᵀθ)² − t_i x_iᵀθ at its stationary point."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(80, 4, generator=g, dtype=torch.float64)
    s = torch.where(torch.arange(80) < 40, -1.0, 1.0).double()
    x[:40, :2] *= 2.0  # negative curvature along the first two coordinates
    t = torch.randn(80, generator=g, dtype=torch.float64)

    def saddle(out: torch.Tensor, batch: tuple) -> torch.Tensor:
        sign, target = batch[1][:, 0], batch[1][:, 1]
        z = out.squeeze(-1)
        return 0.5 * sign * z ** 2 - target * z

    h = (x * s[:, None]).T @ x / 80
    theta = torch.linalg.solve(h, (x * t[:, None]).sum(0) / 80)
    model = nn.Linear(4, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(theta[None])
    labels = torch.stack([s, t], dim=1)
    task = ik.Task(model, loss=saddle)
    rep = ik.diagnose(task, (x, labels), (x[:10], labels[:10]), rank=4, iterations=4, pool=80,
                      probes=16, sections=("convexity",), progress=False)
    c = rep.sections["convexity"]
    eig = torch.linalg.eigvalsh(h)
    assert float(eig.min()) < 0 < float(eig.max())
    assert c.verdict == "fails"
    assert c.numbers["lambda_min"] == pytest.approx(float(eig.min()), rel=1e-8)
    assert c.numbers["damping_for_positive_definite"] == pytest.approx(-float(eig.min()),
                                                                       rel=1e-8)
    assert c.numbers["stationarity"] < 1e-10
    # the negative share of the spectral mass, by stochastic Lanczos quadrature over 16 probes
    exact = float(eig[eig < 0].abs().sum() / eig.abs().sum())
    assert c.numbers["negative_mass"] == pytest.approx(exact, abs=0.12)
    assert "damping ≥" in c.recommendation


def test_far_from_stationary_fails_convexity():
    (x, y), queries = logistic_problem()
    model = nn.Linear(5, 1).double()
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    task = ik.Task(model, loss=bce)
    rep = ik.diagnose(task, (x, y), queries, rank=6, iterations=6, pool=120,
                      sections=("convexity",), progress=False)
    c = rep.sections["convexity"]
    grads = torch.cat([(torch.sigmoid(torch.zeros(())) - y)[:, None] * x,
                       (torch.sigmoid(torch.zeros(())) - y)[:, None]], dim=1)
    expected = float(grads.mean(0).norm() / grads.norm(dim=1).mean())
    assert c.numbers["stationarity"] == pytest.approx(expected, rel=1e-8)
    assert expected > 0.3
    assert c.verdict == "fails"
    assert "not at a minimum" in c.recommendation


def test_ill_conditioned_fails_stability():
    g = torch.Generator().manual_seed(3)
    scales = torch.logspace(0, -5, 6, dtype=torch.float64)
    x = torch.randn(200, 6, generator=g, dtype=torch.float64) * scales
    y = x.sum(1) + 0.1 * torch.randn(200, generator=g, dtype=torch.float64)
    model = nn.Linear(6, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x, y[:, None]).solution.T)
    task = ik.Task(model, loss=half_square)
    d = 1e-13
    rep = ik.diagnose(task, (x, y), (x[:20], y[:20]), damping=d, rank=6, iterations=6,
                      pool=200, sections=("stability",), progress=False)
    st = rep.sections["stability"]
    eig = torch.linalg.eigvalsh(x.T @ x / 200)
    assert st.numbers["condition_number"] == pytest.approx(
        float((eig.max() + d) / (eig.min() + d)), rel=1e-3)
    assert st.numbers["condition_number"] > 1e8
    assert st.verdict == "fails"
    assert st.numbers["lissa"]["status"] == "too slow"


def test_non_linear_group_effect_fails_linearity():
    """A feature present only in a cluster of 8 identical examples: its weight, and the loss of
    queries in the cluster, depend non-linearly on how many of the cluster remain."""
    g = torch.Generator().manual_seed(4)
    n, wd = 40, 1e-2
    x = torch.zeros(n, 2, dtype=torch.float64)
    x[:, 0] = torch.randn(n, generator=g, dtype=torch.float64)
    y = (x[:, 0] + torch.randn(n, generator=g, dtype=torch.float64) > 0).double()
    x[:8, 1], y[:8] = 1.0, 1.0  # the cluster
    model = fit_exactly(nn.Linear(2, 1, bias=False).double(), bce, x, y, wd)
    task = ik.Task(model, loss=bce)
    xq = torch.tensor([[0.0, 1.0], [0.3, 1.0], [-0.3, 1.0]], dtype=torch.float64)
    yq = torch.ones(3, dtype=torch.float64)
    cfg = TrainConfig(epochs=300, batch_size=n, lr=3.0, momentum=0.0, weight_decay=wd)
    rep = ik.diagnose(task, (x, y), (xq, yq), config=cfg, rank=2, iterations=2, pool=n,
                      n_removed=4, upweights=(1.0,), random_groups=(2,), top_groups=(4, 8),
                      sections=("linearity",), progress=False)
    lin = rep.sections["linearity"]
    top = [r for r in lin.numbers["groups"] if r["kind"] == "top influence"]
    assert top[0]["size"] == 4 and top[0]["ratio"] > 1.25  # removing half the cluster
    assert top[1]["ratio"] > 1.25  # removing all of it
    random = [r for r in lin.numbers["groups"] if r["kind"] == "random"]
    assert random[0]["ratio"] == pytest.approx(1.0, abs=0.05)  # other examples add up
    assert lin.verdict == "fails"
    assert "retraining" in lin.recommendation


def test_lanczos_spectrum_on_a_known_operator():
    """Both ends of a diagonal spectrum, and SLQ weights that sum to one."""
    values = torch.tensor([5.0, 3.0, 1.0, 0.5, -0.2, -2.0], dtype=torch.float64)
    model = nn.Linear(6, 1, bias=False).double()
    x = torch.diag(values.abs().sqrt()) * 6 ** 0.5
    signs = values.sign()

    def signed(out: torch.Tensor, batch: tuple) -> torch.Tensor:
        return 0.5 * batch[1] * out.squeeze(-1) ** 2

    task = ik.Task(model, loss=signed)
    spec = lanczos_spectrum(task, (x, signs), iterations=6, probes=4)
    assert spec.complete
    assert spec.values.tolist() == pytest.approx(sorted(values.tolist(), reverse=True))
    assert float(spec.weights.sum()) == pytest.approx(1.0)
    assert spec.lambda_min == pytest.approx(-2.0)
    lis = lissa_convergence(spec, damping=1.0)
    assert lis["status"] == "diverges"  # λ_min + δ < 0
    assert lissa_convergence(spec, damping=3.0)["status"] == "converges"


def test_bad_arguments_are_refused():
    (x, y), queries = logistic_problem(n=20)
    task = ik.Task(nn.Linear(5, 1).double(), loss=bce)
    with pytest.raises(ik.InputError, match="sections"):
        ik.diagnose(task, (x, y), queries, sections=("convexity", "nope"))
    with pytest.raises(ik.InputError, match="config must be a TrainConfig"):
        ik.diagnose(task, (x, y), queries, config={"lr": 0.1})
    with pytest.raises(ik.InputError, match="n_removed"):
        ik.diagnose(task, (x, y), queries, n_removed=2, random_groups=(3,))
    with pytest.raises(ik.InputError, match="rank"):
        ik.diagnose(task, (x, y), queries, rank=0)


def test_cli_writes_the_report_and_refuses_bad_sections(tmp_path, capsys):
    from influencekit.cli import main

    args = ["diagnose", "--hidden", "4", "--n-train", "80", "--n-queries", "5",
            "--start-epochs", "2", "--rank", "3", "--iterations", "5", "--curvature-batch", "40",
            "--pool", "40", "--n-removed", "2", "--epochs", "1", "--sections",
            "convexity,divergence", "--out", str(tmp_path / "out"), "--cache-dir",
            str(tmp_path / "cache"), "--no-progress"]
    assert main(args) == 0
    assert capsys.readouterr().out.startswith("trust: ")
    data = json.loads((tmp_path / "out" / "diagnosis.json").read_text())
    assert data["verdicts"]["stability"] == "skipped"
    assert data["verdicts"]["convexity"] in ("holds", "weak", "fails")
    assert data["setup"]["accuracy"]["n_test"] > 0
    assert (tmp_path / "out" / "divergence-fading.png").is_file()
    # every twin run (removals, up-weights) shares one stored reference run
    refs = list((tmp_path / "cache" / "dynamics" / "diagnose").glob("twins-*/reference"))
    assert len(refs) == 1
    # a rerun reads the stored curvature measurements and runs back: the same numbers
    assert main(args) == 0
    again = json.loads((tmp_path / "out" / "diagnosis.json").read_text())
    assert again["sections"] == data["sections"] | {
        k: {**v, "seconds": again["sections"][k]["seconds"]} for k, v in data["sections"].items()}
    assert len(list((tmp_path / "cache" / "dynamics" / "diagnose" / "curvature-probe"
                     ).glob("*/manifest.json"))) == 1
    assert main(["diagnose", "--sections", "convexity,bogus"]) == 2
    assert "bogus" in capsys.readouterr().err


def test_adam_runs_skip_the_trajectory_section_and_say_why():
    (x, y), queries = logistic_problem(n=60)
    model = fit_exactly(nn.Linear(5, 1).double(), bce, x, y, 1e-2)
    cfg = TrainConfig(epochs=2, batch_size=20, lr=1e-3, optimizer="adam", weight_decay=1e-2)
    rep = ik.diagnose(ik.Task(model, loss=bce), (x, y), queries, config=cfg, rank=6,
                      iterations=6, pool=60, n_removed=2, sections=("trajectory", "divergence"),
                      progress=False)
    assert rep.verdicts["trajectory"] == "skipped"
    assert "adam" in rep.sections["trajectory"].summary.lower()
    assert rep.verdicts["divergence"] in ("holds", "weak", "fails")


def test_lissa_verdict_agrees_with_running_lissa(convex_report):
    """Where the closed form says LiSSA converges at depth 1000, the real recursion (full
    batch) reaches the exact damped inverse."""
    report, task, train, queries, _ = convex_report
    d = report.setup["damping"]
    assert report.sections["stability"].numbers["lissa"]["status"] == "converges"
    exact = ik.ExactInfluence(task, damping=d).fit(train).scores(queries)
    lissa = ik.LiSSAInfluence(task, damping=d, depth=1000, curvature_batch=None
                              ).fit(train).scores(queries)
    assert torch.allclose(lissa, exact, rtol=1e-2, atol=1e-2 * float(exact.abs().max()))
