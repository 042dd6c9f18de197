"""Per-example gradients by layer captures (influencekit.layerwise) against vmap(grad)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import influencekit as ik
from influencekit import layerwise
from influencekit.autodiff import per_example_grads


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def both(task: ik.Task, batch, kind="loss", **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer path, vmap path) on the same batch; asserts the layer path was taken."""
    fast = per_example_grads(task, batch, kind, **kw).clone()
    the_plan = layerwise.plan(task)
    assert the_plan is not None, task.__dict__.get("_layerwise_why")
    assert all(the_plan.ok.values()) and the_plan.ok
    task._layerwise_off = True
    try:
        ref = per_example_grads(task, batch, kind, **kw)
    finally:
        del task._layerwise_off
    return fast, ref


class ConvNet(nn.Module):
    def __init__(self, conv: nn.Module, channels: int, classes: int = 3):
        super().__init__()
        self.conv = conv
        self.head = nn.LazyLinear(classes)
        self.channels = channels

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


CONVS = {
    "plain": lambda: nn.Conv2d(2, 4, 3),
    "stride-pad": lambda: nn.Conv2d(2, 4, 3, stride=2, padding=1),
    "groups-nobias": lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=False),
    "depthwise": lambda: nn.Conv2d(4, 4, 3, groups=4),
    "dilation-rect": lambda: nn.Conv2d(2, 3, (2, 3), dilation=(2, 1), stride=(1, 2)),
    "same-even": lambda: nn.Conv2d(2, 3, 4, padding="same"),
    "reflect": lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"),
    "circular": lambda: nn.Conv2d(2, 3, 3, padding=2, padding_mode="circular"),
}


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("name", list(CONVS))
def test_conv2d_variants(name, dtype, tol):
    torch.manual_seed(0)
    conv = CONVS[name]()
    c_in = conv.in_channels
    model = ConvNet(conv, c_in)
    x = torch.randn(5, c_in, 9, 8)
    model(x)  # materialise the lazy head
    model = model.to(dtype)
    y = torch.tensor([0, 1, 2, 1, 0])
    task = ik.ClassificationTask(model, measurement="margin")
    for kind in ("loss", "measurement"):
        fast, ref = both(task, (x.to(dtype), y), kind)
        assert rel(fast, ref) < tol, (name, kind)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_conv1d_linear_over_positions_and_norms(dtype, tol):
    """Conv1d, a Linear on [B, T, d] (positions), LayerNorm, GroupNorm, eval BatchNorm,
    a module called twice, an in-place ReLU after a Linear."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(3, 4, 3, padding=1)
            self.gn = nn.GroupNorm(2, 4)
            self.bn = nn.BatchNorm1d(4)
            self.lin = nn.Linear(4, 5)
            self.ln = nn.LayerNorm(5)
            self.shared_use = nn.Linear(5, 5)  # called twice
            self.out = nn.Linear(5, 3)

        def forward(self, x):
            h = self.bn(self.gn(self.conv(x)))  # [B, 4, T]
            h = self.lin(h.transpose(1, 2))  # [B, T, 5]
            h = F.relu(h, inplace=True)
            h = self.ln(h)
            h = self.shared_use(torch.tanh(self.shared_use(h)))
            return self.out(h.mean(1))

    torch.manual_seed(1)
    model = Net().to(dtype)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        for m in (model.gn, model.bn, model.ln):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
    x = torch.randn(6, 3, 7, dtype=dtype)
    y = torch.randint(0, 3, (6,))
    task = ik.ClassificationTask(model, measurement=("logit", 1))
    for kind in ("loss", "measurement"):
        fast, ref = both(task, (x, y), kind)
        assert rel(fast, ref) < tol, kind
    v = torch.randn(6, 3, dtype=dtype)
    fast, ref = both(task, (x, y), vectors=v)
    assert rel(fast, ref) < tol


def test_embedding_with_padding_and_partial_selection():
    class Text(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 4, padding_idx=0)
            self.ln = nn.LayerNorm(4, bias=False)
            self.head = nn.Linear(4, 2)

        def forward(self, tokens):
            return self.head(self.ln(self.emb(tokens)).mean(1))

    torch.manual_seed(2)
    model = Text().double()
    tokens = torch.tensor([[1, 2, 2, 0], [3, 0, 0, 0], [5, 6, 7, 1], [10, 10, 10, 10]])
    y = torch.tensor([0, 1, 1, 0])
    fast, ref = both(ik.ClassificationTask(model), (tokens, y))
    assert rel(fast, ref) < 1e-10
    # a selection that takes the head's weight but not its bias, and the embedding
    task = ik.ClassificationTask(model, params=["emb", "head.weight"])
    fast, ref = both(task, (tokens, y))
    assert fast.shape == (4, 11 * 4 + 2 * 4) and rel(fast, ref) < 1e-10


def test_task_loss_with_mean_and_custom_forward():
    """A Task with its own per-example loss (a mean over outputs inside each example) and a
    forward function: the layer path differentiates the summed per-example values."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 4)).double()
    task = ik.Task(model, loss=lambda out, b: ((out - b[1]) ** 2).mean(1),
                   forward=lambda call, b: call(b[0] * 2.0))
    x, t = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    fast, ref = both(task, (x, t))
    assert rel(fast, ref) < 1e-10


def test_batch_independent_and_out_buffer():
    torch.manual_seed(4)
    model = ConvNet(nn.Conv2d(1, 3, 3), 1).double()
    x = torch.randn(7, 1, 6, 6, dtype=torch.float64)
    model(x)
    y = torch.randint(0, 3, (7,))
    task = ik.ClassificationTask(model)
    whole = per_example_grads(task, (x, y))
    buf = torch.full((10, task.num_params), float("nan"), dtype=torch.float64)
    part = per_example_grads(task, (x[3:], y[3:]), out=buf)
    assert part.data_ptr() == buf.data_ptr() and part.shape == (4, task.num_params)
    assert rel(part, whole[3:]) < 1e-12


# ----------------------------------------------------------------------------- fallbacks
class Scaled(nn.Module):
    """A module with a parameter of its own used by a plain op: no per-example rule."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.lin(x) * self.scale


def test_unsupported_layers_fall_back_to_vmap():
    torch.manual_seed(5)
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    cases = {
        "own parameter": Scaled(),
        "max_norm embedding": nn.Sequential(nn.Embedding(5, 3, max_norm=1.0), nn.Flatten(),
                                            nn.Linear(6, 3)),
        "transposed conv": nn.Sequential(nn.Unflatten(1, (3, 1)), nn.ConvTranspose1d(3, 2, 2),
                                         nn.Flatten(), nn.Linear(4, 3)),
        "shared weight": None,
    }
    shared = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3))
    shared[2].weight = shared[0].weight
    cases["shared weight"] = shared
    for name, model in cases.items():
        model = model.double()
        inputs = torch.randint(0, 5, (4, 2)) if "embedding" in name else x
        task = ik.ClassificationTask(model)
        g = per_example_grads(task, (inputs, y))
        assert layerwise.plan(task) is None, name
        assert task._vmap_ok  # vmap took it
        one = per_example_grads(task, (inputs[1:2], y[1:2]))
        assert torch.allclose(g[1], one[0], atol=1e-12), name


def test_weight_used_outside_its_module_is_caught():
    """A Linear whose weight is also used directly (weight tying by hand): the hooks miss that
    use; the first-batch check against autograd notices and switches to vmap."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return F.linear(torch.tanh(self.lin(x)), self.lin.weight)

    torch.manual_seed(6)
    task = ik.ClassificationTask(Tied().double())
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    with pytest.warns(UserWarning, match="disagree with autograd"):
        g = per_example_grads(task, (x, y))
    assert list(layerwise.plan(task).ok.values()) == [False]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g2 = per_example_grads(task, (x, y))  # vmap from now on, silently
    one = per_example_grads(task, (x[3:4], y[3:4]))
    assert torch.allclose(g[3], one[0], atol=1e-12) and torch.equal(g, g2)


def test_loss_mixing_examples_is_caught():
    """A 'per-example' loss that is not (scaled by the batch mean): the check catches it."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(3, 3)).double()
    task = ik.Task(model, loss=lambda out, b: F.cross_entropy(out, b[1], reduction="none")
                   * out.shape[0] / 4.0)
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
    with pytest.warns(UserWarning, match="disagree with autograd"):
        per_example_grads(task, (x, y))
    # each value function is checked: a copy with a mixing measurement, after a good loss
    good = ik.ClassificationTask(nn.Sequential(nn.Linear(3, 3)).double())
    per_example_grads(good, (x, y))
    mixing = copy.copy(good)
    mixing.measurement_fn = lambda out, b: out.logsumexp(1) * out.shape[0] / 4.0
    with pytest.warns(UserWarning, match="disagree with autograd"):
        per_example_grads(mixing, (x, y), "measurement")


def test_copied_task_with_another_model_gets_its_own_plan():
    """A shallow copy of a task with another model (TracIn's checkpoints) must not reuse the
    first model's hooks."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    task = ik.ClassificationTask(model)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 3, (5,))
    per_example_grads(task, (x, y))
    other = copy.copy(task)
    other.model = copy.deepcopy(model)
    with torch.no_grad():
        other.model[0].weight.mul_(2.0)
    fast = per_example_grads(other, (x, y))
    other._layerwise_off = True
    assert rel(fast, per_example_grads(other, (x, y))) < 1e-12


def test_nan_gradients_still_raise_where_the_check_is_on_reductions():
    """GradDot's stream and Arnoldi's features check norms/products instead of every entry:
    NaN gradients must still raise."""
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(3, 2, bias=False)).double()
    with torch.no_grad():
        model[0].weight.zero_()
    task = ik.Task(model, loss=lambda out, b: torch.sqrt(out ** 2).sum(1))  # 0/0 at w = 0
    x = torch.randn(6, 3, dtype=torch.float64)
    data = (x, torch.zeros(6, dtype=torch.float64))
    with pytest.raises(ik.NumericalError, match="gradients contains"):
        ik.GradDot(task).scores((x[:2], data[1][:2]), data)
    est = ik.ArnoldiInfluence(task, rank=2, filter="topk")
    with pytest.raises(ik.NumericalError):
        est.fit(data)
    est.eigen = ik.curvature.Eigenpairs(torch.ones(2), torch.eye(2, 6, dtype=torch.float64))
    est._weights = (torch.ones(2, dtype=torch.float64), 0.0)
    with pytest.raises(ik.NumericalError, match="gradients contains"):
        est.features(data, "loss")


def test_a_nan_first_batch_does_not_switch_the_layer_path_off():
    """Non-finite gradients on the checked batch leave the check undecided (the caller's
    finiteness check reports them); the next clean batch is checked and uses the layer path."""
    torch.manual_seed(11)
    task = ik.ClassificationTask(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    bad = x.clone()
    bad[0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "disagree with autograd" warning
        with pytest.raises(ik.NumericalError):
            per_example_grads(task, (bad, y))
        fast, ref = both(task, (x, y))
    assert rel(fast, ref) < 1e-5


# ----------------------------------------------------------------------------- projections
def _projection_models():
    torch.manual_seed(10)
    conv = ConvNet(nn.Conv2d(2, 3, 3, padding=1), 2).double()
    xc = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    conv(xc)

    class Twice(nn.Module):  # a Linear called twice and one over positions
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.pos = nn.Linear(3, 4, bias=False)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            h = torch.tanh(self.a(torch.tanh(self.a(x))))  # [B, T, 3]
            return self.head(torch.tanh(self.pos(h)).mean(1))

    xt = torch.randn(5, 4, 3, dtype=torch.float64)
    emb = nn.Sequential(nn.Embedding(7, 3, padding_idx=0), nn.Flatten(), nn.Linear(6, 3))
    xe = torch.tensor([[1, 2], [0, 3], [6, 6], [4, 0], [5, 1]])
    y = torch.tensor([0, 1, 2, 1, 0])
    return {"conv": (ik.ClassificationTask(conv), (xc, y)),
            "twice+positions": (ik.ClassificationTask(Twice().double()), (xt, y)),
            "embedding": (ik.ClassificationTask(emb.double(), params=["0", "2.weight"]),
                          (xe, y))}


@pytest.mark.parametrize("name", ["conv", "twice+positions", "embedding"])
def test_projections_without_the_gradient_matrix(name):
    from influencekit.autodiff import project_grads

    task, (x, y) = _projection_models()[name]
    basis = torch.randn(4, task.num_params, dtype=torch.float64)
    cache: dict = {}
    for kind in ("loss", "measurement"):
        g = per_example_grads(task, (x, y), kind)  # checks the layer path once
        coords, sq = project_grads(task, (x, y), kind, basis, cache)
        assert "projection" in cache  # the layer projections, not g @ basis
        assert rel(coords, g @ basis.T) < 1e-10
        assert rel(sq, (g * g).sum(1)) < 1e-10


@pytest.mark.parametrize("name", ["conv", "twice+positions", "embedding"])
def test_factored_gradients_give_exact_inner_products(name):
    """The parts kept by the projections (Linear factors, blocks, the rest) give ⟨g_q, g_x⟩
    exactly, between two different batches too; without the layer path, the rest is G."""
    from influencekit.autodiff import project_grads

    task, (x, y) = _projection_models()[name]
    basis = torch.randn(4, task.num_params, dtype=torch.float64)
    g = per_example_grads(task, (x, y))
    for off in (False, True):
        task._layerwise_off = off
        q, t = {}, {}
        project_grads(task, (x[:2], y[:2]), "loss", basis, {}, parts=q)
        project_grads(task, (x, y), "loss", basis, {}, parts=t)
        assert (set(q) == {"rest"}) == off
        width = sum(v[0].numel() for v in t.values())
        assert width <= task.num_params if not off else width == task.num_params
        assert rel(layerwise.gradient_dots(q, t), g[:2] @ g.T) < 1e-10
    del task._layerwise_off
    with pytest.raises(ValueError, match="differ"):
        layerwise.gradient_dots({"rest": g}, {"in0": g, "out0": g, "rest": g})
