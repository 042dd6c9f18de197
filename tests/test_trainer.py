"""The deterministic trainer: bit-for-bit reproducibility, slot-keeping removal, checkpoints."""

from __future__ import annotations

import pytest
import torch

from influencekit.errors import ArtifactError, InputError
from influencekit.groundtruth import StepInfo, TrainConfig, batch_schedule, train
from influencekit.models import MLP


def _data(n: int = 50, d: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def _builder() -> MLP:
    return MLP(5, 3, hidden=(8,))


CFG = TrainConfig(epochs=3, batch_size=8, lr=0.1, momentum=0.9, weight_decay=1e-3)


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


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
    assert torch.equal(torch.rand(3), expected)


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


def test_checkpoints_resume_bit_for_bit(tmp_path):
    ref = train(_builder, _data(), CFG, progress=False)
    short = TrainConfig(**{**CFG.__dict__, "epochs": 2})
    # an interrupted run: its checkpoints are those of the first two epochs of the full run
    train(_builder, _data(), CFG, checkpoint_dir=tmp_path, progress=False)
    (tmp_path / "epoch-0003.pt").unlink()
    resumed = train(_builder, _data(), CFG, checkpoint_dir=tmp_path, progress=False)
    assert torch.equal(_flat(resumed.model), _flat(ref.model))
    assert resumed.epoch_losses == ref.epoch_losses
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "epoch-0001.pt", "epoch-0002.pt", "epoch-0003.pt"]
    with pytest.raises(ArtifactError, match="another run"):
        train(_builder, _data(), short, remove=[1], checkpoint_dir=tmp_path, progress=False)


def test_bad_inputs():
    with pytest.raises(InputError, match="weights must have shape"):
        train(_builder, _data(), CFG, weights=torch.ones(3), progress=False)
    with pytest.raises(InputError, match="outside"):
        train(_builder, _data(), CFG, remove=[99], progress=False)
    with pytest.raises(InputError, match="optimizer"):
        TrainConfig(optimizer="lbfgs")


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
