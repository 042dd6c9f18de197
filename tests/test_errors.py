"""Bad input gets a clear error that names the problem and the fix."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import influencekit as ik


@pytest.fixture
def small():
    torch.manual_seed(0)
    x = torch.randn(20, 3, dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    model = nn.Linear(3, 2).double()
    return model, x, y


def test_nan_input_is_reported(small):
    model, x, y = small
    x = x.clone()
    x[3, 1] = float("nan")
    with pytest.raises(ik.NumericalError, match="NaN/inf"):
        ik.GradDot(ik.ClassificationTask(model)).scores((x[:5], y[:5]), (x, y))


def test_nan_gradient_with_finite_loss_is_reported(small):
    _, x, y = small

    class Sqrt(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(3, 2, dtype=torch.float64))

        def forward(self, inp):  # d/dw sqrt(w²) at w = 0 is 0/0
            return torch.sqrt((inp @ self.w) ** 2)

    with pytest.raises(ik.NumericalError, match="gradients contains"):
        ik.GradDot(ik.ClassificationTask(Sqrt())).scores((x[:2], y[:2]), (x, y))


def test_empty_data(small):
    model, x, y = small
    with pytest.raises(ik.InputError, match="empty"):
        ik.ExactInfluence(ik.ClassificationTask(model)).fit((x[:0], y[:0]))


def test_scalar_loss_is_refused(small):
    model, x, y = small
    task = ik.Task(model, loss=lambda out, batch: F.cross_entropy(out, batch[1]))
    with pytest.raises(ik.InputError, match="one value per example.*reduction='none'"):
        ik.GradDot(task).scores((x[:2], y[:2]), (x, y))


def test_mismatched_query_shape(small):
    model, x, y = small
    est = ik.ExactInfluence(ik.ClassificationTask(model), damping=0.1).fit((x, y))
    with pytest.raises(ik.InputError, match="per-example shape"):
        est.scores((torch.randn(2, 4, dtype=torch.float64), y[:2]))
    with pytest.raises(ik.InputError, match="disagree on the number of examples"):
        est.scores((x[:3], y[:2]))


def test_no_trainable_parameters(small):
    model, _, _ = small
    frozen = nn.Linear(3, 2)
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ik.InputError, match="no trainable parameters"):
        ik.ClassificationTask(frozen)
    with pytest.raises(ik.InputError, match="no parameter is named 'encoder'"):
        ik.ClassificationTask(model, params="encoder")
    with pytest.raises(ik.InputError, match="not part of the model"):
        ik.ClassificationTask(model, params=[nn.Linear(1, 1)])


def test_not_a_task(small):
    model, _, _ = small
    with pytest.raises(ik.InputError, match="ClassificationTask"):
        ik.GradDot(model)


def test_cg_refuses_indefinite_curvature(small):
    _, x, y = small
    model = nn.Linear(3, 1).double()
    concave = ik.Task(model, loss=lambda out, batch: -0.5 * out.squeeze(-1) ** 2)
    est = ik.CGInfluence(concave).fit((x, y))
    with pytest.raises(ik.CurvatureError, match="not positive definite.*damping"):
        est.scores((x[:2], y[:2]))


def test_exact_refuses_singular_curvature(small):
    _, x, y = small
    # Two identical output columns: the Hessian has a null space.
    model = nn.Linear(3, 3).double()
    with torch.no_grad():
        model.weight[2] = model.weight[1]
        model.bias[2] = model.bias[1]
    task = ik.ClassificationTask(model)
    with pytest.raises(ik.CurvatureError, match="singular.*damping"):
        ik.ExactInfluence(task).fit((x, y))


def test_lissa_divergence_is_detected(small):
    model, x, y = small
    est = ik.LiSSAInfluence(ik.ClassificationTask(model), damping=0.01, scale=1e-3, depth=200)
    est.fit((x, y))
    with pytest.raises(ik.NumericalError, match="LiSSA diverged.*Increase scale"):
        est.scores((x[:2], y[:2]))


def test_shuffled_loader_is_refused(small):
    model, x, y = small
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)
    with pytest.raises(ik.InputError, match="shuffle=False"):
        ik.GradDot(ik.ClassificationTask(model)).scores((x[:2], y[:2]), loader)


def test_unfitted_estimator(small):
    model, x, y = small
    with pytest.raises(ik.InputError, match=r"fit\(train\)"):
        ik.ExactInfluence(ik.ClassificationTask(model)).scores((x[:2], y[:2]))


def test_bad_arguments(small):
    model, _, _ = small
    task = ik.ClassificationTask(model)
    with pytest.raises(ik.InputError, match="curvature"):
        ik.ExactInfluence(task, curvature="fisher")
    with pytest.raises(ik.InputError, match="damping"):
        ik.CGInfluence(task, damping=-1)
    with pytest.raises(ik.InputError, match="max_params"):
        ik.ExactInfluence(task, max_params=3)
    with pytest.raises(ik.InputError, match="measurement"):
        ik.ClassificationTask(model, measurement="accuracy")


# ----------------------------------------------------------------------------- reliability
def test_lissa_refuses_indefinite_curvature_at_fit(small):
    """scale=None used to hide slow geometric growth on an indefinite Hessian (silent garbage
    that grew with depth); fit now checks the bottom of the spectrum."""
    _, x, y = small
    concave = ik.Task(nn.Linear(3, 1).double(),
                      loss=lambda out, batch: -0.5 * out.squeeze(-1) ** 2)
    with pytest.raises(ik.CurvatureError, match="not positive definite.*damping"):
        ik.LiSSAInfluence(concave, damping=0.01).fit((x, y))
    ok = ik.LiSSAInfluence(concave, damping=0.01, check_definite=False).fit((x, y))
    assert ok.lambda_min is None


def test_lissa_bottom_of_spectrum_matches_dense(small):
    model, x, y = small
    task = ik.ClassificationTask(model)
    est = ik.LiSSAInfluence(task, damping=0.01).fit((x, y))
    lam = torch.linalg.eigvalsh(ik.CurvatureOperator(task, (x, y)).dense())
    assert est.lambda_min >= lam[0] - 1e-9  # a Rayleigh quotient: never below the truth
    assert abs(est.lambda_max - lam[-1]) < 1e-3 * lam[-1]


def test_nan_query_on_the_jvp_projection_path(small):
    model, x, y = small
    task = ik.ClassificationTask(model)
    est = ik.ArnoldiInfluence(task, rank=2, iterations=6, filter="topk", projection="jvp",
                              damping=0.01).fit((x, y))
    bad = x[:3].clone()
    bad[1, 0] = float("nan")
    with pytest.raises(ik.NumericalError, match="NaN/inf"):
        est.scores((bad, y[:3]))


@pytest.mark.parametrize("make, match", [
    (lambda t: ik.ExactInfluence(t, damping=float("nan")), "damping.*finite"),
    (lambda t: ik.GradDot(t, batch_size=2.5), "batch_size.*integer"),
    (lambda t: ik.GradDot(t, batch_size="8"), "batch_size.*integer"),
    (lambda t: ik.GradDot(t, query_chunk=-1), "query_chunk"),
    (lambda t: ik.GradDot(t, query_chunk=0), "query_chunk"),
    (lambda t: ik.LiSSAInfluence(t, repeats=0), "repeats"),
    (lambda t: ik.LiSSAInfluence(t, depth=0), "depth"),
    (lambda t: ik.LiSSAInfluence(t, scale=float("inf")), "scale.*finite"),
    (lambda t: ik.CGInfluence(t, max_iter=0), "max_iter"),
    (lambda t: ik.CGInfluence(t, tol=float("nan")), "tol"),
    (lambda t: ik.ArnoldiInfluence(t, rank=2.5), "rank.*integer"),
    (lambda t: ik.ArnoldiInfluence(t, rank=2, iterations=4, sketch=-3), "sketch"),
    (lambda t: ik.ArnoldiInfluence(t, solver=ik.Eigensolver(block=0)), "block"),
    (lambda t: ik.ArnoldiInfluence(t, solver="full"), "Eigensolver"),
    (lambda t: ik.ArnoldiInfluence(t, projection="fast"), "projection"),
    (lambda t: ik.ArnoldiInfluence(t, filter=ik.HorizonFilter(lr=-1.0)), "horizon lr"),
    (lambda t: ik.ExactInfluence(t, hessian_batch_size=3), "unknown option.*hessian_batch"),
])
def test_bad_estimator_arguments_name_the_argument(small, make, match):
    model, _, _ = small
    with pytest.raises(ik.InputError, match=match):
        make(ik.ClassificationTask(model))


def test_bad_top_k_and_params(small):
    model, x, y = small
    with pytest.raises(ik.InputError, match="k must be"):
        ik.GradDot(ik.ClassificationTask(model)).top_k((x[:2], y[:2]), (x, y), k=-1)
    with pytest.raises(ik.InputError, match="params must be"):
        ik.ClassificationTask(model, params=42)


@pytest.mark.parametrize("labels, match", [
    (lambda y: y[:, None], r"shape"),
    (lambda y: y.double(), "integer class indices"),
    (lambda y: y + 5, r"lie in \[0, 2\)"),
    (lambda y: y - 1, r"lie in \[0, 2\)"),
])
def test_bad_labels(small, labels, match):
    model, x, y = small
    task = ik.ClassificationTask(model)
    with pytest.raises(ik.InputError, match=match):
        ik.GradDot(task).scores((x[:3], y[:3]), (x, labels(y)))
    with pytest.raises(ik.InputError, match=match):  # also as queries, after a good fit
        ik.ExactInfluence(task, damping=0.1).fit((x, y)).scores((x[:3], labels(y)[:3]))


def test_wrong_input_width_and_dtype(small):
    model, x, y = small
    task = ik.ClassificationTask(model)
    with pytest.raises(ik.InputError, match="could not compute.*shape"):
        ik.ExactInfluence(task, damping=0.1).fit((torch.randn(20, 5, dtype=torch.float64), y))
    est = ik.ExactInfluence(task, damping=0.1).fit((x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no misleading "falling back" warning
        with pytest.raises(ik.InputError, match="float32.*float64"):
            est.scores((x[:3].float(), y[:3]))


def test_eval_mode_false_with_batch_norm_is_refused_and_model_untouched():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ik.InputError, match="batch norm"):
        ik.ClassificationTask(model, eval_mode=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
