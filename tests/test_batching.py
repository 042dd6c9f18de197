"""Data access keeps the order: score column j is training example j, or an error says why not."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
)

from influencekit.batching import iter_batches, num_examples, take, tree_leaves, tree_map
from influencekit.errors import InputError

N = 10


@pytest.fixture
def ds() -> TensorDataset:
    return TensorDataset(torch.arange(N * 2.0).reshape(N, 2), torch.arange(N) % 3)


RANDOM_LOADERS = {  # id -> (DataLoader builder, the name the error must give)
    "shuffle": (lambda ds: DataLoader(ds, batch_size=4, shuffle=True), "RandomSampler"),
    "subset": (lambda ds: DataLoader(ds, batch_size=4, sampler=SubsetRandomSampler(range(N))),
               "SubsetRandomSampler"),
    "weighted": (lambda ds: DataLoader(ds, batch_size=4,
                                       sampler=WeightedRandomSampler(torch.ones(N), N)),
                 "WeightedRandomSampler"),
    "batch_sampler": (lambda ds: DataLoader(ds, batch_sampler=BatchSampler(
        RandomSampler(ds), batch_size=4, drop_last=False)), "RandomSampler"),
    "plain list": (lambda ds: DataLoader(ds, batch_size=4, sampler=list(range(N))), "list"),
    "list of batches": (lambda ds: DataLoader(ds, batch_sampler=[[0, 1], list(range(2, N))]),
                        "batch_sampler list"),
}


@pytest.mark.parametrize("kind", list(RANDOM_LOADERS))
def test_random_or_unknown_samplers_are_refused(ds, kind):
    make, name = RANDOM_LOADERS[kind]
    loader = make(ds)
    for access in (lambda: iter_batches(loader, 4), lambda: num_examples(loader),
                   lambda: take(loader, torch.arange(3))):
        with pytest.raises(InputError, match="shuffle=False") as info:
            access()  # refused at once, before any batch is drawn
        assert f"{name} " in str(info.value) and "SequentialSampler" in str(info.value)


@pytest.mark.parametrize("make", [
    lambda ds: DataLoader(ds, batch_size=4, drop_last=True),
    lambda ds: DataLoader(ds, batch_sampler=BatchSampler(SequentialSampler(ds), 4, True)),
])
def test_drop_last_is_refused(ds, make):
    with pytest.raises(InputError, match="drop_last"):
        iter_batches(make(ds), 4)


def test_sequential_loader_dataset_and_tuple_give_the_same_batches(ds):
    x, y = ds.tensors
    sources = [
        DataLoader(ds, batch_size=4),
        DataLoader(ds, batch_size=4, shuffle=False, sampler=SequentialSampler(ds)),
        DataLoader(ds, batch_sampler=BatchSampler(SequentialSampler(ds), 4, False)),
        ds,
        (x, y),
    ]
    for data in sources:
        batches = list(iter_batches(data, 4))
        assert [len(b[1]) for b in batches] == [4, 4, 2]
        assert torch.equal(torch.cat([b[0] for b in batches]), x)
        assert torch.equal(torch.cat([b[1] for b in batches]), y)
        assert num_examples(data) == N
        assert torch.equal(take(data, torch.tensor([7, 2]))[0], x[[7, 2]])


@pytest.mark.parametrize("bad", [2.5, "8", 0, -1, None, True])
def test_batch_size_must_be_a_positive_integer(ds, bad):
    with pytest.raises(InputError, match="batch_size"):
        iter_batches(ds, bad)


def test_empty_data_is_refused():
    with pytest.raises(InputError, match="empty"):
        list(iter_batches((torch.zeros(0, 2), torch.zeros(0)), 4))


def test_pytree_helpers_on_nested_dict_inputs():
    ids, mask, y = torch.arange(6).reshape(3, 2), torch.ones(3, 2), torch.arange(3)
    batch = ({"input_ids": ids, "extra": ("tag", None, [mask])}, y)
    assert [t is s for t, s in zip(tree_leaves(batch), (ids, mask, y))] == [True] * 3
    doubled = tree_map(lambda t: t * 2, batch)
    assert isinstance(doubled, tuple) and isinstance(doubled[0], dict)
    assert list(doubled[0]) == ["input_ids", "extra"]
    assert doubled[0]["extra"][:2] == ("tag", None)  # non-tensor leaves kept as they are
    assert torch.equal(doubled[0]["extra"][2][0], mask * 2)
    assert torch.equal(doubled[1], y * 2)
    first = list(iter_batches(batch, 2))
    assert torch.equal(first[1][0]["input_ids"], ids[2:]) and first[1][0]["extra"][0] == "tag"
    assert tree_leaves("no tensors") == []
