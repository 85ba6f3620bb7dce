"""Data for :func:`~sparseforge.training.fit`: batches addressed by (epoch, position), for exact resume.

``fit`` asks its data for the batches of epoch ``e`` from position ``p`` on
(:class:`Batches`). Two plug-ins:

- :class:`IterableBatches` wraps any iterable of ``(inputs, targets)`` (a
  ``DataLoader``, a :class:`~sparseforge.zoo.data.TensorLoader`, a list, an
  endless generator): each epoch is one ``iter()`` of it, and a start inside an
  epoch skips that many batches of it. Exact resume then needs the iterable to
  give the same batches each time it is asked for that epoch's pass.
- :class:`ShardedPermutation` holds the examples in memory and draws epoch
  ``e``'s order from ``(seed, e)``: global batch ``b`` is positions
  ``[b * B, (b + 1) * B)`` of the permutation, and rank ``r`` of ``W`` takes
  the ``r``-th of ``W`` equal contiguous pieces of it (:func:`rank_slice`). The
  batches are the same for any world size, so a run resumes exactly at any
  step and on any number of ranks that divides ``B``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from sparseforge.errors import SparseforgeError

__all__ = ["Batches", "IterableBatches", "ShardedPermutation", "as_batches", "epoch_permutation", "rank_slice"]


@runtime_checkable
class Batches(Protocol):
    """What :func:`~sparseforge.training.fit` trains on.

    ``batches(epoch, start)`` yields the ``(inputs, targets)`` batches of epoch
    ``epoch`` (0-based) from position ``start`` on; ``len()``, where the data
    has one, is the number of batches per epoch (needed to start or resume in
    the middle of a run, and for progress totals).
    """

    def batches(self, epoch: int, start: int = 0) -> Iterator[Any]:
        ...


class IterableBatches:
    """Any iterable as :class:`Batches`: one ``iter()`` per epoch, ``start`` batches skipped.

    >>> data = IterableBatches([(1, 1), (2, 2), (3, 3)])
    >>> len(data), list(data.batches(0, start=1))
    (3, [(2, 2), (3, 3)])
    """

    def __init__(self, iterable: Iterable[Any]) -> None:
        self.iterable = iterable

    def __len__(self) -> int:
        """Batches per epoch: the iterable's length (a TypeError when it has none, as ``len()`` gives)."""
        return len(self.iterable)  # type: ignore[arg-type]

    def has_length(self) -> bool:
        """Whether the wrapped iterable knows its number of batches."""
        try:
            len(self.iterable)  # type: ignore[arg-type]
        except TypeError:
            return False
        return True

    def batches(self, epoch: int, start: int = 0) -> Iterator[Any]:
        """A new pass over the iterable (``epoch`` is not used: the iterable orders its own epochs), from ``start``."""
        it = iter(self.iterable)
        return itertools.islice(it, start, None) if start else it


def as_batches(data: Any) -> Any:
    """``data`` itself when it has a ``batches(epoch, start)`` method, else an :class:`IterableBatches` of it."""
    if callable(getattr(data, "batches", None)):
        return data
    if not isinstance(data, Iterable):
        raise SparseforgeError(f"fit needs an iterable of (inputs, targets) batches or an object with "
                               f"batches(epoch, start), got {type(data).__name__}")
    return IterableBatches(data)


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of epoch ``epoch``: a permutation of ``range(num_examples)`` drawn from ``(seed, epoch)``.

    The same on every rank and for every world size (numpy's SeedSequence mixes the
    pair, so nearby seeds and epochs give unrelated orders).

    >>> epoch_permutation(5, 0, 0).tolist() == epoch_permutation(5, 0, 0).tolist()
    True
    >>> sorted(epoch_permutation(5, 0, 1).tolist())
    [0, 1, 2, 3, 4]
    """
    state = np.random.SeedSequence([seed % 2**64, epoch]).generate_state(1, np.uint64)
    gen = torch.Generator().manual_seed(int(state[0]) & (2**63 - 1))
    return torch.randperm(num_examples, generator=gen)


def rank_slice(batch: int, batch_size: int, rank: int, world_size: int) -> slice:
    """Positions in the epoch's permutation that rank ``rank`` trains on at global batch ``batch``.

    Global batch ``b`` covers ``[b * B, (b + 1) * B)``; rank ``r`` of ``W`` takes the
    ``r``-th of ``W`` equal contiguous pieces (``B`` must be a multiple of ``W``).

    >>> [rank_slice(1, 8, r, 2) for r in range(2)]
    [slice(8, 12, None), slice(12, 16, None)]
    """
    local = batch_size // world_size
    start = batch * batch_size + rank * local
    return slice(start, start + local)


class ShardedPermutation:
    """In-memory examples in a ``(seed, epoch)`` order, each global batch split over the ranks.

    Args:
        inputs, targets: the whole training set (first dimension: examples), on the
            device the model trains on.
        batch_size: the GLOBAL batch ``B``; the incomplete last batch of an epoch is dropped.
        seed: seed of the epochs' permutations (:func:`epoch_permutation`).
        rank, world_size: this process's piece of every global batch (``B`` must be a
            multiple of ``world_size``).

    >>> data = ShardedPermutation(torch.arange(10), torch.arange(10), batch_size=4, rank=1, world_size=2)
    >>> len(data), [x.tolist() for x, _ in data.batches(0)] == [[i.item() for i in epoch_permutation(10, 0, 0)[b * 4 + 2:b * 4 + 4]] for b in range(2)]
    (2, True)
    """

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        if inputs.shape[0] != targets.shape[0]:
            raise SparseforgeError(f"ShardedPermutation needs as many targets as inputs, got {inputs.shape[0]} "
                                   f"inputs and {targets.shape[0]} targets")
        if batch_size < 1 or batch_size % world_size:
            raise SparseforgeError(f"the global batch {batch_size} must be a positive multiple of the "
                                   f"world size {world_size}")
        if not 0 <= rank < world_size:
            raise SparseforgeError(f"rank {rank} is not in [0, {world_size})")
        self.inputs, self.targets = inputs, targets
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size

    @property
    def num_examples(self) -> int:
        """Examples held (the whole training set, on every rank)."""
        return int(self.inputs.shape[0])

    def __len__(self) -> int:
        """Global batches per epoch (the incomplete last one dropped): the same for any world size."""
        return self.num_examples // self.batch_size

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's pieces of global batches ``start, start + 1, ...`` of epoch ``epoch``."""
        order = epoch_permutation(self.num_examples, self.seed, epoch).to(self.inputs.device)
        for b in range(start, len(self)):
            idx = order[rank_slice(b, self.batch_size, self.rank, self.world_size)]
            yield self.inputs[idx], self.targets[idx]
