"""Datasets by name: :data:`DATASETS`, what training, calibration and the demo read.

A dataset is registered once, as a function that loads it, and is then named
in a training recipe (``data: {name: ...}``), a prune or quantize recipe
(``dataset: ...``), the command line (``sparseforge prune ... --dataset
NAME``, ``sparseforge demo --dataset NAME``) and from Python
(:func:`load`). The built-in ones live in the zoo and are registered here by
``module:attribute``, so that naming them imports nothing:

- ``fashion-mnist``: labelled 28x28 images (:class:`Classification`);
- ``fortunes``: English texts (:class:`Texts`), for calibrating language models.

An entry is a callable returning a :class:`Classification` or a
:class:`Texts`. It may take any of the keyword arguments ``data_dir`` (where
its files are: the ``--data-dir`` flag, ``data.dir`` of a recipe),
``limit_train`` and ``limit_test`` (only the first examples are needed, so a
large file need not be decoded whole); it is given those it takes, and
:func:`load` applies the limits again, so an entry may ignore them. An entry
whose size is known without loading it says so in an attribute
``num_train`` (the training examples), which lets a training recipe be
checked before anything is read. A user's dataset registers the same way::

    @DATASETS.register("blobs")
    def blobs(data_dir=None):
        '''Two Gaussian blobs.'''
        ...
        return Classification(x_train, y_train, x_test, y_test)

This module also holds :class:`TensorLoader`, the in-memory batch iterator
every classification dataset is read through, and :func:`split_texts`, the
hash split of texts into calibration and held-out evaluation.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from sparseforge.errors import DataError, SparseforgeError
from sparseforge.registry import Registry

__all__ = [
    "DATASETS", "IMAGES", "TEXT", "Classification", "TensorLoader", "TextSplit", "Texts", "load", "num_train",
    "split_texts", "text_hash",
]


@dataclass(frozen=True)
class Classification:
    """Labelled examples: inputs and integer class targets of a training and a test split.

    ``train_inputs[i]`` is labelled ``train_targets[i]`` (int64); the test split likewise.
    Inputs have any shape after the first (example) dimension; the model decides what it reads.
    """

    train_inputs: torch.Tensor
    train_targets: torch.Tensor
    test_inputs: torch.Tensor
    test_targets: torch.Tensor
    kind: ClassVar[str] = "classification"

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_inputs"), getattr(self, f"{split}_targets")
            if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
                raise DataError(f"Classification {split} inputs and targets must be tensors, got "
                                f"{type(x).__name__} and {type(y).__name__}")
            if x.shape[0] != y.shape[0]:
                raise DataError(f"Classification {split} split: {x.shape[0]} inputs but {y.shape[0]} targets")

    @property
    def num_train(self) -> int:
        """Training examples held."""
        return int(self.train_inputs.shape[0])

    def limited(self, limit_train: int | None = None, limit_test: int | None = None) -> Classification:
        """The first ``limit_train`` training and ``limit_test`` test examples (None: all of a split)."""
        for name, value in (("limit_train", limit_train), ("limit_test", limit_test)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise SparseforgeError(f"{name} must be a positive integer or None, got {value!r}")
        return Classification(self.train_inputs[:limit_train], self.train_targets[:limit_train],
                              self.test_inputs[:limit_test], self.test_targets[:limit_test])

    def loaders(self, batch_size: int = 128, seed: int = 0) -> tuple[TensorLoader, TensorLoader]:
        """``(train, test)`` :class:`TensorLoader` s: the training one shuffled every epoch (seeded), the test
        one in order."""
        return (TensorLoader(self.train_inputs, self.train_targets, batch_size, shuffle=True, seed=seed),
                TensorLoader(self.test_inputs, self.test_targets, batch_size))

    def calibration(self, batches: int, batch_size: int = 128,
                    seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``batches`` shuffled batches of ``batch_size`` training examples with their targets: the first
        ``batches * batch_size`` examples in the first epoch's order of a loader seeded with ``seed``."""
        if int(batches) < 1:
            raise SparseforgeError(f"calibration batches must be >= 1, got {batches}")
        train, _ = self.limited(batch_size * int(batches), None).loaders(batch_size, seed)
        return list(train)


@dataclass(frozen=True)
class Texts:
    """Texts (paragraphs, fortune entries): calibration data for language models."""

    texts: list[str]
    kind: ClassVar[str] = "text"

    def __post_init__(self) -> None:
        if not self.texts or not all(isinstance(t, str) for t in self.texts):
            raise DataError("Texts needs a non-empty list of strings")


Examples = Classification | Texts
"""What a dataset entry returns."""

DATASETS: Registry[Callable[..., Examples]] = Registry("dataset")
"""Dataset names -> functions that load them (see the module docstring)."""

IMAGES = "fashion-mnist"
"""The dataset a zoo image classifier trains and calibrates on unless told another."""
TEXT = "fortunes"
"""The text a transformers model calibrates on unless told another."""

# The zoo's datasets live in a higher layer: named here, imported on first use.
DATASETS.register_lazy(IMAGES, "sparseforge.zoo.data:fashion_mnist_dataset")
DATASETS.register_lazy(TEXT, "sparseforge.zoo.text:fortunes_dataset")

def load(name: str, data_dir: str | os.PathLike[str] | None = None, *, limit_train: int | None = None,
         limit_test: int | None = None, kind: type[Examples] | None = None, what: str = "") -> Examples:
    """Load the registered dataset ``name``, limited to the first ``limit_train`` / ``limit_test`` examples.

    Args:
        name: a name of :data:`DATASETS` (case, ``-`` and ``_`` do not matter).
        data_dir: where its files are (default: the dataset's own default).
        limit_train, limit_test: keep only the first examples of each split (classification only).
        kind: :class:`Classification` or :class:`Texts` when the caller needs one of them: another kind
            is an error that says so (``what`` names the caller, e.g. ``"sparseforge train"``).

    Raises:
        SparseforgeError: unknown name (the closest suggested), an entry that returns something else,
            or the wrong kind. The entry's own errors (missing files: :class:`DataError`) pass through.
    """
    entry = DATASETS.get(name)
    given = {"data_dir": data_dir, "limit_train": limit_train, "limit_test": limit_test}
    try:
        params = inspect.signature(entry).parameters
    except (TypeError, ValueError):  # a builtin without a signature: give it nothing
        params = {}
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in given.items() if v is not None and (takes_all or k in params)}
    data = entry(**kwargs)
    canonical = DATASETS.canonical(name)
    if not isinstance(data, (Classification, Texts)):
        raise SparseforgeError(f"dataset {canonical!r} returned {type(data).__name__}; a dataset returns a "
                               "sparseforge.datasets.Classification or Texts")
    if kind is not None and not isinstance(data, kind):
        raise SparseforgeError(f"dataset {canonical!r} holds {data.kind} data; {what or 'this'} needs {kind.kind} "
                               f"data: name another dataset (known: {', '.join(DATASETS.names())})")
    if isinstance(data, Classification) and (limit_train is not None or limit_test is not None):
        data = data.limited(limit_train, limit_test)
    return data


def num_train(name: str, data_dir: str | os.PathLike[str] | None = None, *, what: str = "training") -> int:
    """Training examples of the classification dataset ``name``: its declared ``num_train`` when it has one,
    else counted by loading it (``what``: who asks, for the error a text dataset gets)."""
    declared = getattr(DATASETS.get(name), "num_train", None)
    if isinstance(declared, int) and not isinstance(declared, bool):
        return declared
    return load(name, data_dir, kind=Classification, what=what).num_train  # type: ignore[union-attr]


# -- texts ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextSplit:
    """Texts for calibration (``calibration``) and for measuring quality (``evaluation``), disjoint."""

    calibration: list[str]
    evaluation: list[str]


def text_hash(entry: str) -> int:
    """The first four bytes of the SHA-256 of ``entry``, big-endian: where it falls in a hash split."""
    return int.from_bytes(hashlib.sha256(entry.encode("utf-8")).digest()[:4], "big")


def split_texts(texts: Sequence[str], eval_fraction: float = 0.1) -> TextSplit:
    """Split ``texts`` into calibration and evaluation by a hash of each text (duplicates dropped).

    A text goes to the evaluation side when its :func:`text_hash` falls in the last ``eval_fraction``
    (default 0.1) of the hash range, so the split does not depend on order or on which other texts
    are present. Too few texts for both sides is a :class:`DataError`.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise DataError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    threshold = int((1.0 - eval_fraction) * 2**32)
    calibration: list[str] = []
    evaluation: list[str] = []
    for text in dict.fromkeys(texts):
        (evaluation if text_hash(text) >= threshold else calibration).append(text)
    if not calibration or not evaluation:
        raise DataError(f"{len(texts)} texts are too few to hold out an evaluation split; pass more text")
    return TextSplit(calibration, evaluation)


# -- the batch loader -------------------------------------------------------------------------


class TensorLoader:
    """A small, fast batch iterator over in-memory tensors.

    ``torch.utils.data.DataLoader`` spends most of its time on per-example
    Python work for a dataset this small; slicing whole batches out of one
    tensor is many times faster.

    Shuffling is reproducible: epoch ``e`` uses a permutation drawn from a
    generator seeded from ``(seed, e)``, so two loaders with the same seed yield
    identical batches, and a loader restored with :meth:`load_state_dict`
    continues with the same epochs as the original would have.

    Args:
        x: inputs, first dimension indexes examples.
        y: targets, same first dimension as ``x``.
        batch_size: examples per batch. Default 128.
        shuffle: draw a new permutation every epoch. Default ``False``.
        seed: seed of the shuffling. Default 0.
        drop_last: skip the last batch if it is smaller than ``batch_size``.
            Default ``False``.

    >>> loader = TensorLoader(torch.arange(5), torch.arange(5), batch_size=2)
    >>> [xb.tolist() for xb, _ in loader], len(loader)
    ([[0, 1], [2, 3], [4]], 3)
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int = 128,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if x.shape[0] != y.shape[0]:
            raise DataError(
                f"TensorLoader needs as many targets as inputs, got {x.shape[0]} inputs "
                f"and {y.shape[0]} targets"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise SparseforgeError(f"batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise SparseforgeError(f"seed must be an integer, got {seed!r}")
        self.x = x
        self.y = y
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.drop_last = bool(drop_last)
        self._epoch = 0

    @property
    def epoch(self) -> int:
        """Number of epochs started so far (the next ``iter()`` starts this one)."""
        return self._epoch

    @property
    def num_examples(self) -> int:
        """Number of examples held."""
        return int(self.x.shape[0])

    def __len__(self) -> int:
        """Number of batches per epoch."""
        n = self.num_examples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _permutation(self, epoch: int) -> torch.Tensor:
        # SeedSequence mixes (seed, epoch) so that nearby seeds and epochs do
        # not give correlated generator states.
        state = np.random.SeedSequence([self.seed % 2**64, epoch]).generate_state(1, np.uint64)
        gen = torch.Generator()
        gen.manual_seed(int(state[0]) & (2**63 - 1))
        return torch.randperm(self.num_examples, generator=gen).to(self.x.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Start an epoch: the permutation is fixed and the counter advanced now."""
        order = self._permutation(self._epoch) if self.shuffle else None
        self._epoch += 1
        return self._batches(order)

    def _batches(self, order: torch.Tensor | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        bs = self.batch_size
        for i in range(len(self)):
            if order is None:
                yield self.x[i * bs : (i + 1) * bs], self.y[i * bs : (i + 1) * bs]
            else:
                idx = order[i * bs : (i + 1) * bs]
                yield self.x[idx], self.y[idx]

    def state_dict(self) -> dict[str, Any]:
        """Return ``{"epoch": ..., "seed": ...}``, enough to resume the same batch order."""
        return {"epoch": self._epoch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the next epoch is the one the saved loader would run.

        Args:
            state: a dict from :meth:`state_dict`; ``"seed"`` is optional.
        """
        try:
            epoch = state["epoch"]
        except (KeyError, TypeError) as exc:
            raise SparseforgeError(
                f"TensorLoader state must be a dict with an 'epoch' entry, got {state!r}"
            ) from exc
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise SparseforgeError(f"TensorLoader epoch must be an integer >= 0, got {epoch!r}")
        seed = state.get("seed", self.seed)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise SparseforgeError(f"TensorLoader seed must be an integer, got {seed!r}")
        self._epoch = epoch
        self.seed = seed
