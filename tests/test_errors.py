"""Bad input gets a clear error that names the problem and the fix."""

from __future__ import annotations

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
