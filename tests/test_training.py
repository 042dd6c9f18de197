"""The deterministic, steppable trainer: bit-for-bit reproducibility however a run is split
(steps, checkpoints, state_dict round trips, with dropout), slot-keeping removal, a replayable
schedule, checkpoints on the store."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import influencekit as ik
from influencekit.errors import ArtifactError, InputError, NumericalError
from influencekit.models import MLP
from influencekit.store import ArtifactStore
from influencekit.training import StepInfo, TrainConfig, Trainer, batch_schedule, train


def _data(n: int = 50, d: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def _builder() -> MLP:
    return MLP(5, 3, hidden=(8,))


def _dropout_net() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 3))


def _mse(outputs, batch):
    return ((outputs - F.one_hot(batch[1], 3).to(outputs)) ** 2).sum(1)


CFG = TrainConfig(epochs=3, batch_size=8, lr=0.1, momentum=0.9, weight_decay=1e-3)
DROPOUT = TrainConfig(epochs=4, batch_size=8, lr=0.1, momentum=0.9, schedule="cosine",
                      weight_decay=1e-3, seed=2)  # 7 steps an epoch
CONFIGS = {
    "dropout+momentum+cosine": DROPOUT,
    "adam": dataclasses.replace(DROPOUT, optimizer="adam", lr=1e-2, schedule="constant"),
}


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _same_state(a: Trainer, b: Trainer) -> bool:
    """Parameters, buffers, optimizer moments, step, losses and RNG all bit-identical."""
    sa, sb = a.state_dict(), b.state_dict()
    model = all(torch.equal(x, y) for x, y in zip(sa["model"].values(), sb["model"].values()))
    moments = all(
        (x is None and y is None) or torch.equal(x, y)
        for u, v in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values())
        for x, y in zip(u.values(), v.values()))
    return (model and moments and sa["step"] == sb["step"]
            and sa["epoch_losses"] == sb["epoch_losses"] and sa["epoch_sum"] == sb["epoch_sum"]
            and torch.equal(sa["rng"]["cpu"], sb["rng"]["cpu"]))


# --------------------------------------------------------------------------- train()
def test_bit_for_bit_deterministic():
    a = train(_builder, _data(), CFG, progress=False)
    b = train(_builder, _data(), CFG, progress=False)
    assert torch.equal(_flat(a.model), _flat(b.model))
    assert a.epoch_losses == b.epoch_losses
    assert a.steps == 3 * 7  # ceil(50 / 8) batches an epoch


def test_seeds_matter():
    a = train(_builder, _data(), CFG, progress=False)
    other_order = train(_builder, _data(), TrainConfig(**{**CFG.__dict__, "seed": 1}),
                        progress=False)
    other_init = train(_builder, _data(), TrainConfig(**{**CFG.__dict__, "init_seed": 1}),
                       progress=False)
    assert not torch.equal(_flat(a.model), _flat(other_order.model))
    assert not torch.equal(_flat(a.model), _flat(other_init.model))


def test_global_rng_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train(_builder, _data(), CFG, progress=False)
    t = Trainer(_dropout_net, _data(), DROPOUT)
    t.run(steps=5)
    t.load_state_dict(t.state_dict())
    assert torch.equal(torch.rand(3), expected)


def test_callbacks_cannot_disturb_training():
    # a callback that draws random numbers uses the global RNG, not the trainer's
    noisy = train(_dropout_net, _data(), DROPOUT, callback=lambda info: torch.rand(100),
                  progress=False)
    ref = train(_dropout_net, _data(), DROPOUT, progress=False)
    assert torch.equal(_flat(noisy.model), _flat(ref.model))


def test_removal_keeps_every_other_slot():
    full: list[StepInfo] = []
    cut: list[StepInfo] = []
    train(_builder, _data(), CFG, callback=full.append, progress=False)
    train(_builder, _data(), CFG, remove=[7, 21], callback=cut.append, progress=False)
    assert len(full) == len(cut)
    for f, c in zip(full, cut, strict=True):
        assert f.step == c.step and f.epoch == c.epoch
        assert torch.equal(f.slots, c.slots)  # the schedule does not move
        keep = ~torch.isin(f.slots, torch.tensor([7, 21]))
        assert torch.equal(c.used, f.slots[keep])  # the removed slots are skipped, in place
    assert torch.equal(full[0].slots, batch_schedule(50, 8, CFG.seed, 0)[0])


def test_removal_equals_zero_weight_and_changes_the_result():
    w = torch.ones(50)
    w[7] = 0.0
    removed = train(_builder, _data(), CFG, remove=[7], progress=False)
    weighted = train(_builder, _data(), CFG, weights=w, progress=False)
    full = train(_builder, _data(), CFG, progress=False)
    assert torch.equal(_flat(removed.model), _flat(weighted.model))
    assert not torch.equal(_flat(removed.model), _flat(full.model))


def test_weights_scale_the_loss():
    # doubling every weight at lr/2 with plain SGD is the same trajectory up to rounding
    sgd = TrainConfig(epochs=2, batch_size=10, lr=0.2, momentum=0.0)
    half = TrainConfig(epochs=2, batch_size=10, lr=0.1, momentum=0.0)
    a = train(_builder, _data(), sgd, progress=False)
    b = train(_builder, _data(), half, weights=2 * torch.ones(50), progress=False)
    assert torch.allclose(_flat(a.model), _flat(b.model), atol=1e-6)


def test_warm_start_leaves_original_alone():
    base = train(_builder, _data(), CFG, progress=False).model
    before = _flat(base).clone()
    cont = train(base, _data(), CFG, progress=False).model
    assert torch.equal(_flat(base), before)
    assert not torch.equal(_flat(cont), before)


def test_the_users_model_is_never_modified():
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Dropout(0.2), nn.Linear(8, 3))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t = Trainer(model, _data(), CFG, task=ik.ClassificationTask(model))
    t.run(steps=3)
    t.run()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and all(p.grad is None for p in model.parameters())
    assert not t.model.training  # the live copy is in eval mode between runs


def test_removal_is_the_objective_minus_that_examples_term():
    # one full-batch SGD step: θ1 = θ0 − lr · (1/N) Σ_{i≠x} ∇ℓ_i (the slot still counts in N)
    x, y = _data()
    cfg = TrainConfig(epochs=1, batch_size=50, lr=0.5, momentum=0.0)
    model = _builder()
    stepped = train(model, (x, y), cfg, remove=[4], progress=False).model
    losses = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
    keep = torch.arange(50) != 4
    grads = torch.autograd.grad(losses[keep].sum() / 50, list(model.parameters()))
    expected = torch.cat([(p - 0.5 * g).detach().reshape(-1)
                          for p, g in zip(model.parameters(), grads, strict=True)])
    assert torch.allclose(_flat(stepped), expected, atol=1e-6)


def test_task_gives_the_loss_and_forward():
    model = _builder()

    def double(m, batch):
        return 2 * m(batch[0])

    via_task = train(model, _data(), CFG, task=ik.Task(model, loss=_mse, forward=double),
                     progress=False)
    direct = train(model, _data(), CFG, loss=_mse, forward=double, progress=False)
    default = train(model, _data(), CFG, progress=False)
    assert torch.equal(_flat(via_task.model), _flat(direct.model))
    assert not torch.equal(_flat(via_task.model), _flat(default.model))


# --------------------------------------------------------------------------- stepping
def test_dropout_really_draws_randomness():
    # otherwise the bit-identity tests below would not exercise the RNG handling
    a = train(_dropout_net, _data(), DROPOUT, progress=False).model
    b = train(_dropout_net, _data(), dataclasses.replace(DROPOUT, seed=3), progress=False).model
    a_no_dropout = _dropout_net()
    a_no_dropout[2].p = 0.0
    c = train(a_no_dropout, _data(), DROPOUT, progress=False).model
    with torch.random.fork_rng():
        torch.manual_seed(DROPOUT.init_seed)
        same_init = train(_dropout_net(), _data(), DROPOUT, progress=False).model
    assert torch.equal(_flat(a), _flat(same_init))
    assert not torch.equal(_flat(a), _flat(b)) and not torch.equal(_flat(a), _flat(c))


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("k", [3, 7, 12])  # inside the first epoch, at its end, across it
def test_k_then_m_steps_equal_k_plus_m_steps(name, k):
    cfg = CONFIGS[name]
    whole = Trainer(_dropout_net, _data(), cfg).run(steps=k + 9)
    split = Trainer(_dropout_net, _data(), cfg).run(steps=k)
    assert split.step == k and split.epoch == k // 7
    split.run(steps=9)
    assert whole.step == split.step == k + 9 and _same_state(whole, split)
    # and on to the end: the same as train()
    whole.run()
    split.run(steps=5).run()
    ref = train(_dropout_net, _data(), cfg, progress=False)
    assert split.done and split.step == ref.steps == 4 * 7
    assert torch.equal(_flat(split.model), _flat(ref.model)) and _same_state(whole, split)
    assert split.epoch_losses == ref.epoch_losses


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_dict_into_a_fresh_trainer_continues_identically(name, tmp_path):
    cfg = CONFIGS[name]
    ref = Trainer(_dropout_net, _data(), cfg).run()
    first = Trainer(_dropout_net, _data(), cfg).run(steps=10)
    state = first.state_dict()
    first.run(steps=3)  # the state is a copy: later steps leave it alone
    ArtifactStore(tmp_path).open("state", {"run": "x"}).save(state)  # safetensors, no pickle
    for loaded in (state, state, ArtifactStore(tmp_path).open("state", {"run": "x"}).load()):
        fresh = Trainer(_dropout_net, _data(), cfg)
        fresh.load_state_dict(loaded)
        assert fresh.step == 10
        fresh.run()
        assert _same_state(ref, fresh) and torch.equal(_flat(ref.model), _flat(fresh.model))


def test_checkpoints_resume_bit_for_bit(tmp_path):
    ref = train(_builder, _data(), CFG, progress=False)
    short = TrainConfig(**{**CFG.__dict__, "epochs": 2})
    # an interrupted run: its checkpoints are those of the first two epochs of the full run
    train(_builder, _data(), CFG, checkpoint_dir=tmp_path, progress=False)
    assert ArtifactStore(tmp_path).names() == ["epoch-0001", "epoch-0002", "epoch-0003"]
    manifest = tmp_path / "epoch-0003" / "manifest.json"  # killed while saving epoch 3
    manifest.write_text(manifest.read_text().replace('"complete": true', '"complete": false'))
    resumed = train(_builder, _data(), CFG, checkpoint_dir=tmp_path, progress=False)
    assert torch.equal(_flat(resumed.model), _flat(ref.model))
    assert resumed.epoch_losses == ref.epoch_losses and resumed.steps == ref.steps
    assert ArtifactStore(tmp_path).names() == ["epoch-0001", "epoch-0002", "epoch-0003"]
    with pytest.raises(ArtifactError, match="another run: their settings and weights"):
        train(_builder, _data(), short, remove=[1], checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ArtifactError, match="another run: their loss"):
        train(_builder, _data(), CFG, loss=_mse, checkpoint_dir=tmp_path, progress=False)


def test_resume_with_dropout_from_a_checkpoint_is_bit_identical(tmp_path):
    ref = train(_dropout_net, _data(), DROPOUT, progress=False)
    first = Trainer(_dropout_net, _data(), DROPOUT, checkpoint_dir=tmp_path, checkpoint_every=2)
    first.run(steps=20)  # killed in epoch 3: the checkpoint of epoch 2 is there
    assert ArtifactStore(tmp_path).names() == ["epoch-0002"]
    resumed = Trainer(_dropout_net, _data(), DROPOUT, checkpoint_dir=tmp_path,
                      checkpoint_every=2)
    assert resumed.step == 14 and resumed.epoch_losses == ref.epoch_losses[:2]
    resumed.run()
    assert torch.equal(_flat(resumed.model), _flat(ref.model))
    assert resumed.epoch_losses == ref.epoch_losses
    assert ArtifactStore(tmp_path).names() == ["epoch-0002", "epoch-0004"]


def test_schedule_replays_the_steps_with_their_learning_rates():
    seen: list[StepInfo] = []
    t = Trainer(_builder, _data(), DROPOUT, remove=[3, 9])
    plan = list(t.schedule())
    t.run(callback=seen.append)
    assert len(plan) == len(seen) == t.total_steps == 4 * 7
    for p, s in zip(plan, seen, strict=True):
        assert s.step == p.index + 1 and s.epoch == p.epoch and s.lr == p.lr
        assert torch.equal(s.slots, p.slots) and torch.equal(s.used, p.used)
        assert torch.equal(t.slots(p.index), p.slots) and t.lr_at_step(p.index) == p.lr
    lrs = [t.lr_at_step(i) for i in range(0, 28, 7)]
    assert lrs == [0.1 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)]
    assert not any(torch.isin(p.used, torch.tensor([3, 9])).any() for p in plan)
    assert [p.index for p in t.schedule(5, 8)] == [5, 6, 7]


def test_parameters_can_be_read_and_replaced_between_steps(tmp_path):
    a = Trainer(_builder, _data(), CFG).run(steps=4)
    b = Trainer(_builder, _data(), CFG, checkpoint_dir=tmp_path).run(steps=4)
    theta = a.parameters()
    theta["net.1.bias"].add_(1.0)  # a copy: the trainer is unchanged
    assert _same_state(a, b)
    b.set_parameters({"net.1.bias": theta["net.1.bias"]})
    assert torch.equal(b.parameters()["net.1.bias"], theta["net.1.bias"])
    b.set_parameters(a.parameters())
    b.optimizer.load_state_dict(copy.deepcopy(a.optimizer.state_dict()))  # torch shares tensors
    a.run()
    b.run()
    assert _same_state(a, b)
    assert ArtifactStore(tmp_path).names() == []  # replaced state: no checkpoints of "the run"


def test_bad_inputs():
    with pytest.raises(InputError, match="weights must have shape"):
        train(_builder, _data(), CFG, weights=torch.ones(3), progress=False)
    with pytest.raises(InputError, match="outside"):
        train(_builder, _data(), CFG, remove=[99], progress=False)
    with pytest.raises(InputError, match="optimizer"):
        TrainConfig(optimizer="lbfgs")
    with pytest.raises(InputError, match="TrainConfig.batch_size must be an integer"):
        TrainConfig(batch_size=2.5)
    with pytest.raises(InputError, match="TrainConfig.lr must be ≥ 0"):
        TrainConfig(lr=-1)
    with pytest.raises(InputError, match="remove takes example indices"):
        train(_builder, _data(), CFG, remove=torch.zeros(50, dtype=torch.bool), progress=False)
    with pytest.raises(InputError, match="one value per example"):
        train(_builder, _data(), CFG, loss=lambda out, b: F.cross_entropy(out, b[1]),
              progress=False)
    with pytest.raises(InputError, match="either as task= or as loss="):
        Trainer(_builder, _data(), CFG, task=ik.ClassificationTask(_builder()), loss=_mse)
    with pytest.raises(InputError, match="tensors in memory"):
        Trainer(_builder, torch.utils.data.TensorDataset(*_data()), CFG)
    trainer = Trainer(_builder, _data(), CFG)
    with pytest.raises(InputError, match="steps must be ≥ 0"):
        trainer.run(steps=-1)
    with pytest.raises(InputError, match="past the schedule"):
        trainer.plan(trainer.total_steps)
    with pytest.raises(InputError, match="no parameters named"):
        trainer.set_parameters({"nope": torch.zeros(1)})
    with pytest.raises(InputError, match="does not fit this trainer's schedule"):
        Trainer(_builder, _data(), TrainConfig(epochs=1)).load_state_dict(
            trainer.run().state_dict())
    with pytest.raises(NumericalError, match="training loss became nan"):
        train(_builder, (_data()[0] * float("nan"), _data()[1]), CFG, progress=False)
