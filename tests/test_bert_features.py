"""The BERT split: the trainable top on cached frozen features is the full model (outputs,
per-example gradients on the trainable parameters, training), and the features are stored,
reused and resumed through the store."""

from __future__ import annotations

import json
import socket
import warnings

import pytest
import torch

import influencekit as ik
from influencekit.autodiff import per_example_grads
from influencekit.errors import InputError
from influencekit.models import build
from influencekit.training import TrainConfig, train

TEXTS = ["great", "not great at all, sadly", "fine", "a dull, overlong mess",
         "one of the year's best", "meh"]
LABELS = torch.tensor([1, 0, 1, 0, 1, 0])


@pytest.fixture(scope="module")
def bert():
    mp = pytest.MonkeyPatch()

    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(socket, "create_connection", refuse)
    try:
        from influencekit.models.bert import dropout, load_tokenizer, tokenize

        model = dropout(build("bert", num_classes=2, train_last=1), 0.0)
        tokens = tokenize(TEXTS, load_tokenizer(), 12)
    finally:
        mp.undo()
    return model, tokens


def _features(model, tokens, **kw):
    from influencekit.models.bert import frozen_features

    features, top = model.split()
    return frozen_features(features, tokens, **kw), top


def test_split_shares_the_trainable_modules(bert):
    model, _ = bert
    features, top = model.split()
    assert model.n_frozen == 5 and len(features.layers) == 5 and len(top.layers) == 1
    full = [p for p in model.parameters() if p.requires_grad]
    assert [id(p) for p in top.parameters()] == [id(p) for p in full]  # same objects, same order
    assert not any(p.requires_grad for p in features.parameters())
    with pytest.raises(InputError, match="cut"):
        model.split(7)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_top_on_features_equals_the_full_model(bert, mode):
    model, tokens = bert
    x, top = _features(model, tokens, batch_size=4)  # two chunks
    assert x["hidden"].shape == (6, 12, 384) and torch.equal(x["attention_mask"],
                                                             tokens["attention_mask"])
    model.train(mode == "train")
    top.train(mode == "train")
    with torch.no_grad():
        assert torch.allclose(top(**x), model(**tokens), atol=1e-5)
    model.eval()


def test_top_per_example_grads_equal_the_full_models(bert):
    model, tokens = bert
    x, top = _features(model, tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to the loop would warn
        g_top = per_example_grads(ik.ClassificationTask(top), (x, LABELS))
    g_full = per_example_grads(ik.ClassificationTask(model), (tokens, LABELS))
    assert g_top.shape == g_full.shape == (6, sum(p.numel() for p in top.parameters()))
    assert torch.allclose(g_top, g_full, atol=1e-5, rtol=1e-4)


def test_training_the_top_trains_the_full_model(bert):
    model, tokens = bert
    x, top = _features(model, tokens)
    cfg = TrainConfig(epochs=2, batch_size=3, lr=0.05, weight_decay=1e-3)
    a = train(top, (x, LABELS), cfg, progress=False).model
    b = train(model, (tokens, LABELS), cfg, progress=False).model
    trained = [p for p in b.parameters() if p.requires_grad]
    for p, q in zip(a.parameters(), trained, strict=True):
        assert torch.allclose(p, q, atol=1e-5)
    assert not torch.equal(a.head.weight, top.head.weight)  # it did train (on a copy)


def test_features_are_stored_reused_and_resumed(bert, tmp_path):
    from influencekit.models.bert import frozen_features

    model, tokens = bert
    features, _ = model.split()

    def written() -> dict[str, int]:  # chunk file -> when it was last written
        (art,) = (p for p in tmp_path.iterdir() if p.name.startswith("bert-features"))
        return {f.name: f.stat().st_mtime_ns for f in art.glob("chunk-*")}

    first = frozen_features(features, tokens, batch_size=4, store=tmp_path)
    stamps = written()
    assert len(stamps) == 2
    again = frozen_features(features, tokens, batch_size=4, store=tmp_path)
    assert written() == stamps and torch.equal(again["hidden"], first["hidden"])  # read back
    # an interrupted run: the last chunk never finished; a rerun computes only it
    (art,) = tmp_path.iterdir()
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["complete"] = False
    del manifest["files"]["chunk-000001.safetensors"]
    (art / "manifest.json").write_text(json.dumps(manifest))
    resumed = frozen_features(features, tokens, batch_size=4, store=tmp_path)
    now = written()
    assert now["chunk-000000.safetensors"] == stamps["chunk-000000.safetensors"]
    assert now["chunk-000001.safetensors"] != stamps["chunk-000001.safetensors"]
    assert torch.equal(resumed["hidden"], first["hidden"])
    # other tokens: an artifact of their own
    frozen_features(features, {k: v[:2] for k, v in tokens.items()}, store=tmp_path)
    assert len(list(tmp_path.iterdir())) == 2


def test_features_refuse_bad_tokens(bert):
    from influencekit.models.bert import frozen_features

    model, tokens = bert
    with pytest.raises(InputError, match="tokenize"):
        frozen_features(model.split()[0], {"input_ids": tokens["input_ids"],
                                           "attention_mask": tokens["attention_mask"][:, :3]})


def test_features_refuse_trainable_layers():
    from influencekit.models.bert import frozen_features

    model = build("bert", num_classes=2, train_last=None)  # the embeddings train too
    features, _ = model.split()
    ids = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(InputError, match="train_last"):
        frozen_features(features, {"input_ids": ids, "attention_mask": ids})
