"""Uniform access to data: a tuple of tensors, a ``Dataset`` or a ``DataLoader``.

A *batch* is a tuple ``(inputs, targets, ...)`` whose leaves are tensors with the example
dimension first; ``inputs`` may itself be a tensor, a tuple or a dict of tensors (e.g. BERT's
``input_ids`` and ``attention_mask``). Everything here keeps the data's order, so that score
column ``j`` always belongs to training example ``j``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
)

from . import validate
from .errors import InputError

Batch = tuple[Any, ...]
Data = Batch | Dataset | DataLoader


def tree_map(fn: Callable[[torch.Tensor], Any], tree: Any) -> Any:
    """Apply ``fn`` to every tensor leaf of nested tuples / lists / dicts (other leaves kept)."""
    return pytree.tree_map_only(torch.Tensor, fn, tree)


def tree_leaves(tree: Any) -> list[torch.Tensor]:
    """All tensor leaves of ``tree`` in a fixed order (dicts in insertion order)."""
    return [leaf for leaf in pytree.tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


def batch_size_of(batch: Batch) -> int:
    """Number of examples in a batch (the leading size of its tensors, which must agree)."""
    sizes = {leaf.shape[0] if leaf.dim() else None for leaf in tree_leaves(batch)}
    if not sizes:
        raise InputError("a batch holds no tensors; give (inputs, targets) tensors.")
    if None in sizes or len(sizes) != 1:
        raise InputError(
            f"the tensors of a batch disagree on the number of examples (leading sizes {sizes}); "
            "every input and target tensor must have the example dimension first."
        )
    return sizes.pop()


def slice_batch(batch: Batch, index: slice | torch.Tensor) -> Batch:
    """Examples ``index`` of a batch."""
    return tree_map(lambda t: t[index], batch)


def to_device(batch: Batch, device: torch.device) -> Batch:
    return tree_map(lambda t: t.to(device), batch)


def _as_tuple(batch: Any) -> Batch:
    if isinstance(batch, (tuple, list)):
        return tuple(batch)
    if isinstance(batch, dict):
        raise InputError(
            "got a dict as a batch; influencekit expects (inputs, targets) tuples. Wrap it: "
            "((dict_of_inputs), labels), or write a Task whose forward reads your batch."
        )
    return (batch,)


def check_in_order(loader: DataLoader) -> None:
    """Refuse a DataLoader that does not yield every example once, in the dataset's order.

    Score column ``j`` must be training example ``j``: a random sampler (``shuffle=True``,
    ``SubsetRandomSampler``, ``WeightedRandomSampler``, ``BatchSampler(RandomSampler(...))``, any
    custom sampler or batch sampler) would permute the columns, and ``drop_last=True`` would drop
    the examples of the last, incomplete batch. An ``IterableDataset`` keeps its own order.
    """
    fix = ("build the DataLoader with shuffle=False and no sampler (or "
           "sampler=SequentialSampler(dataset)); to use part of a dataset, wrap it in "
           "torch.utils.data.Subset")
    batcher = loader.batch_sampler
    if loader.drop_last or getattr(batcher, "drop_last", False):
        raise InputError(
            "the DataLoader has drop_last=True, so the examples of the last, incomplete batch "
            "would be missing from the scores; build it with drop_last=False.")
    if isinstance(loader.dataset, IterableDataset):  # no sampler: the dataset's own order
        return
    sampler = batcher.sampler if isinstance(batcher, BatchSampler) else loader.sampler
    if batcher is not None and not isinstance(batcher, BatchSampler):
        raise InputError(
            f"the DataLoader's batch_sampler {type(batcher).__name__} may not read the examples "
            f"in order, so score column j would not be example j; {fix}.")
    if not isinstance(sampler, SequentialSampler):
        shuffles = " (shuffle=True)" if isinstance(sampler, RandomSampler) else ""
        raise InputError(
            f"the DataLoader's sampler {type(sampler).__name__}{shuffles} does not read the "
            f"examples in order, so score column j would not be example j; {fix}.")


def num_examples(data: Data) -> int:
    """Number of examples in ``data`` (iterates a DataLoader without a sized dataset)."""
    if isinstance(data, DataLoader):
        check_in_order(data)
        try:
            return len(data.dataset)  # type: ignore[arg-type]
        except TypeError:
            return sum(batch_size_of(_as_tuple(b)) for b in data)
    if isinstance(data, Dataset):
        return len(data)  # type: ignore[arg-type]
    return batch_size_of(_as_tuple(data))


def iter_batches(data: Data, batch_size: int) -> Iterator[Batch]:
    """Batches of ``data`` in order. DataLoaders keep their own batching. Arguments are checked
    here, before the first batch is asked for."""
    batch_size = validate.positive_int("batch_size", batch_size)
    if isinstance(data, DataLoader):
        check_in_order(data)
    return _batches(data, batch_size)


def _batches(data: Data, batch_size: int) -> Iterator[Batch]:
    if isinstance(data, DataLoader):
        n = 0
        for b in data:
            b = _as_tuple(b)
            n += batch_size_of(b)
            yield b
        if n == 0:
            raise InputError("the data is empty; give at least one example.")
        return
    if isinstance(data, Dataset):
        loader = DataLoader(data, batch_size=batch_size, shuffle=False)
        yield from _batches(loader, batch_size)
        return
    batch = _as_tuple(data)
    n = batch_size_of(batch)
    if n == 0:
        raise InputError("the data is empty; give at least one example.")
    for start in range(0, n, batch_size):
        yield slice_batch(batch, slice(start, start + batch_size))


def take(data: Data, index: torch.Tensor) -> Batch:
    """Examples ``index`` of ``data`` as one batch (random access; for sampling)."""
    index = torch.as_tensor(index, dtype=torch.long)
    if isinstance(data, DataLoader):
        check_in_order(data)
        data = data.dataset
    if isinstance(data, Dataset):
        from torch.utils.data import default_collate

        return _as_tuple(default_collate([data[int(i)] for i in index]))
    return slice_batch(_as_tuple(data), index)


def check_compatible(queries: Data, train: Data) -> None:
    """Raise a clear error when queries and training examples are shaped differently."""
    q = next(iter_batches(queries, 1))
    t = next(iter_batches(train, 1))
    q_leaves, t_leaves = tree_leaves(q), tree_leaves(t)
    if len(q_leaves) != len(t_leaves):
        raise InputError(
            f"queries have {len(q_leaves)} tensors per batch but training data has "
            f"{len(t_leaves)}; give both as (inputs, targets)."
        )
    for i, (a, b) in enumerate(zip(q_leaves, t_leaves)):
        fixed_size = not isinstance(q[0], dict)  # token sequences may differ in length
        if a.dim() != b.dim() or (fixed_size and a.shape[1:] != b.shape[1:]):
            raise InputError(
                f"query tensor {i} has per-example shape {tuple(a.shape[1:])} but the training "
                f"data's has {tuple(b.shape[1:])}; queries must be shaped like training examples."
            )
