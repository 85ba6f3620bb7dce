"""What shape the zeros take: the ``Pattern`` part.

A pattern partitions a weight tensor into *groups* that are kept or pruned as
a whole (single weights, b x b blocks, whole output channels) and turns a
score tensor plus a sparsity into a boolean keep-mask. N:M is the exception:
its constraint is local (N kept in every group of M consecutive inputs), so
its sparsity is fixed at ``1 - N/M`` and it chooses inside each group.

Scores are "higher is more important"; a pattern keeps the highest scores.
Group scores are the mean of the element scores in the group, so that groups
of different sizes (ragged blocks at a matrix edge, channels of layers with
different fan-in) can be compared.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from sparseforge.errors import SparseforgeError
from sparseforge.registry import Registry

PATTERNS: Registry[type[Pattern]] = Registry("pattern")
"""Pattern families by name: ``as_pattern("block:8")`` finds ``block`` here and builds it from ``"8"``
(:meth:`Pattern.from_spec`); ``"2:4"`` is the ``nm`` family."""


def check_sparsity(sparsity: float, what: str = "sparsity") -> float:
    """Return ``sparsity`` as a float after checking it lies in [0, 1)."""
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        raise SparseforgeError(f"{what} must be a number in [0, 1), got {sparsity!r}") from None
    if not (0.0 <= value < 1.0) or math.isnan(value):
        raise SparseforgeError(
            f"{what} must be in [0, 1) (the fraction of weights set to zero), got {sparsity!r}"
        )
    return value


def _as_matrix(t: torch.Tensor) -> torch.Tensor:
    """View a weight as (output units, everything else)."""
    return t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)


def keep_lowest_pruned(group_scores: torch.Tensor, group_sizes: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Boolean keep-vector that prunes the lowest-scoring groups.

    Prunes groups in increasing score order until the number of pruned
    *elements* is as close as possible to ``n_prune``, and always keeps at
    least one group so that no layer collapses. With equal group sizes the
    count is exact up to rounding of one group.
    """
    n_groups = group_scores.numel()
    keep = torch.ones(n_groups, dtype=torch.bool, device=group_scores.device)
    if n_prune <= 0 or n_groups == 0:
        return keep
    size0 = int(group_sizes[0])
    if bool((group_sizes == size0).all()):
        k = min(int(round(n_prune / size0)), n_groups - 1)
        if k <= 0:
            return keep
        # topk over the smaller side: finding the k lowest of 25M values is
        # much faster than sorting them.
        if k <= n_groups // 2:
            idx = torch.topk(group_scores, k, largest=False, sorted=False).indices
            keep[idx] = False
        else:
            keep.zero_()
            idx = torch.topk(group_scores, n_groups - k, largest=True, sorted=False).indices
            keep[idx] = True
        return keep
    order = torch.argsort(group_scores, stable=True)
    cums = torch.cumsum(group_sizes[order], 0)
    k = int(torch.searchsorted(cums, torch.tensor(n_prune, dtype=cums.dtype)))
    # Pruning k groups removes cums[k-1] elements (none for k == 0), one more
    # removes cums[k]: take whichever is nearer. Pruning nothing is a candidate
    # too, or a 1-element target would prune a whole (large) lowest group.
    pruned_k = int(cums[k - 1]) if k > 0 else 0
    if k < n_groups and abs(int(cums[k]) - n_prune) < abs(pruned_k - n_prune):
        k += 1
    k = min(k, n_groups - 1)
    keep[order[:k]] = False
    return keep


class Pattern(ABC):
    """Base class: a partition of a weight into groups that are kept or pruned whole."""

    #: whether a layer's sparsity may be chosen freely (False for N:M).
    free_sparsity: bool = True
    #: whether the pattern is pruned over a whole model at once (dependency groups), not tensor by tensor.
    model_level: bool = False

    #: how the family is written in a string (``as_pattern``), for help and error messages.
    spelling: ClassVar[str] = ""

    @classmethod
    def from_spec(cls, args: str | None) -> Pattern:
        """The pattern written ``family:args`` (``args`` None when only the family is written).

        Default: a family without arguments; a family that takes some overrides this.
        """
        if args:
            raise SparseforgeError(f"pattern {cls.spelling or cls.__name__} takes no arguments, got {args!r}")
        return cls()

    def check(self, shape: torch.Size, name: str = "tensor") -> None:
        """Raise a :class:`SparseforgeError` if the pattern cannot apply to ``shape``."""

    @abstractmethod
    def group_scores(self, score: torch.Tensor) -> torch.Tensor:
        """One score per group, flattened (mean of the group's element scores)."""

    @abstractmethod
    def group_sizes(self, shape: torch.Size) -> torch.Tensor:
        """Number of elements in each group, aligned with :meth:`group_scores`."""

    @abstractmethod
    def expand(self, group_keep: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Turn a per-group keep-vector into an element keep-mask of ``shape``."""

    def within_rows(self) -> Pattern:
        """This pattern with scores compared only within each output row (for a score whose
        ``compare`` is ``"row"``, such as Wanda's). Patterns whose groups span rows cannot."""
        raise SparseforgeError(
            f"scores compared within rows (such as Wanda's) apply to unstructured and N:M patterns, not {self}"
        )

    def mask(self, score: torch.Tensor, sparsity: float) -> torch.Tensor:
        """Boolean keep-mask of ``score.shape`` with ``sparsity`` of its elements pruned.

        The lowest-scoring groups are pruned, and at least one group is kept.
        With equal-sized groups exactly ``round(sparsity * n_groups)`` groups
        are pruned (for unstructured, ``round(sparsity * numel)`` weights);
        with ragged groups the pruned element count is the one nearest to
        ``round(sparsity * numel)`` that whole groups allow.
        """
        sparsity = check_sparsity(sparsity)
        sizes = self.group_sizes(score.shape).to(score.device)
        if sizes.numel() > 0 and bool((sizes == sizes[0]).all()):
            # Round once, in whole groups: rounding to elements first and then to
            # groups can land a group off (6 rows of 2 at 0.42 is 2.52 rows, but
            # 5.04 -> 5 elements -> 2.5 rows -> 2).
            n_prune = int(round(sparsity * sizes.numel())) * int(sizes[0])
        else:
            n_prune = int(round(sparsity * score.numel()))
        keep = keep_lowest_pruned(self.group_scores(score), sizes, n_prune)
        return self.expand(keep, score.shape)


@PATTERNS.register("unstructured", aliases=("dense", "element"))
@dataclass(frozen=True)
class Unstructured(Pattern):
    """Any single weight may be pruned: the keep-mask is the top-k of the scores."""

    spelling = "unstructured"

    def group_scores(self, score: torch.Tensor) -> torch.Tensor:
        return score.reshape(-1)

    def group_sizes(self, shape: torch.Size) -> torch.Tensor:
        return torch.ones(math.prod(shape), dtype=torch.long)

    def expand(self, group_keep: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return group_keep.reshape(shape)

    def within_rows(self) -> Pattern:
        return RowWise()

    def __str__(self) -> str:
        return "unstructured"


@dataclass(frozen=True)
class RowWise(Unstructured):
    """Unstructured, with the scores compared only within each output row: every row is pruned alike.

    Rule: each row of the weight seen as (outputs, everything else) loses its
    ``int(row_length * sparsity)`` lowest scores (rounded down, ties broken by
    position, as a stable sort does): Wanda's per-output comparison group. It is
    what :meth:`Unstructured.within_rows` gives for a score whose ``compare`` is
    ``"row"``; across layers (allocations) it behaves as unstructured.

    Example:
        >>> RowWise().mask(torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.0, 1.0, 2.0, 3.0]]), 0.5).int().tolist()
        [[1, 0, 1, 0], [0, 0, 1, 1]]
    """

    def within_rows(self) -> Pattern:
        return self

    def mask(self, score: torch.Tensor, sparsity: float) -> torch.Tensor:
        rows = _as_matrix(score)
        k = int(rows.shape[1] * check_sparsity(sparsity))
        keep = torch.ones_like(rows, dtype=torch.bool)
        if k:
            idx = torch.sort(rows, dim=1, stable=True).indices[:, :k]
            keep.scatter_(1, idx, False)
        return keep.reshape(score.shape)

    def __str__(self) -> str:
        return "unstructured within rows"


@PATTERNS.register("channel", aliases=("channels", "filter", "row"))
@dataclass(frozen=True)
class Channel(Pattern):
    """Whole output units are pruned: rows of a Linear weight, filters of a convolution.

    This is the pattern that :func:`compact`-style export turns into a smaller
    dense layer ("Pruning Filters for Efficient ConvNets", Li et al. 2017).
    """

    spelling = "channel"

    def group_scores(self, score: torch.Tensor) -> torch.Tensor:
        return _as_matrix(score).mean(dim=1)

    def group_sizes(self, shape: torch.Size) -> torch.Tensor:
        rows = shape[0] if len(shape) > 1 else 1
        return torch.full((rows,), math.prod(shape) // rows, dtype=torch.long)

    def expand(self, group_keep: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        rows = shape[0] if len(shape) > 1 else 1
        return group_keep.reshape(rows, 1).expand(rows, math.prod(shape) // rows).reshape(shape).clone()

    def __str__(self) -> str:
        return "channel"


@PATTERNS.register("channel-groups", aliases=("groups",))
@dataclass(frozen=True)
class ChannelGroups(Channel):
    """Whole channels of dependency groups: every slice tied to a channel is pruned with it.

    :class:`Channel` prunes each layer's rows on its own; this pattern prunes
    the channels of a model's dependency groups (a filter with its bias, the
    BatchNorm after it, the next layers' input columns and the residual
    partners it is added to; attention heads too when ``heads``), scored over
    all their slices, so that :func:`sparseforge.compact` removes all of them.
    It applies to a whole model at once, through :func:`sparseforge.prune`
    (see :mod:`sparseforge.oneshot.channels`); within one tensor it is
    :class:`Channel`.

    Args:
        heads: also prune attention heads (the same fraction). Default True.
    """

    heads: bool = True
    #: pruned over the model's dependency groups, not tensor by tensor.
    model_level = True
    spelling = "channel-groups"

    def __str__(self) -> str:
        return "channel-groups" if self.heads else "channel-groups(heads=False)"


@PATTERNS.register("block")
@dataclass(frozen=True)
class Block(Pattern):
    """b x b blocks of the weight seen as (outputs, inputs x kernel) are pruned whole.

    Blocks at the right and bottom edges may be smaller when a dimension is not
    a multiple of ``size``; their score is the mean over their real elements.

    Args:
        size: the block side b. Default 4.
    """

    size: int = 4
    spelling = "block:B"

    def __post_init__(self) -> None:
        if int(self.size) < 1:
            raise SparseforgeError(f"block size must be a positive integer, got {self.size!r}")

    @classmethod
    def from_spec(cls, args: str | None) -> Block:
        """``block:B``: b x b blocks (the size must be written)."""
        if args is None or not args.strip().isdigit():
            raise SparseforgeError(f"a block pattern is written block:B with an integer size B (e.g. block:4), got "
                                   f"{'block' if args is None else f'block:{args}'!r}")
        return cls(int(args))

    def _grid(self, shape: torch.Size) -> tuple[int, int, int, int]:
        rows = shape[0] if len(shape) > 1 else 1
        cols = math.prod(shape) // rows
        return rows, cols, math.ceil(rows / self.size), math.ceil(cols / self.size)

    def group_scores(self, score: torch.Tensor) -> torch.Tensor:
        rows, cols, gr, gc = self._grid(score.shape)
        m = _as_matrix(score).to(torch.float64)
        padded = F.pad(m, (0, gc * self.size - cols, 0, gr * self.size - rows))
        sums = padded.reshape(gr, self.size, gc, self.size).sum(dim=(1, 3)).reshape(-1)
        return (sums / self.group_sizes(score.shape).to(sums.device)).to(score.dtype)

    def group_sizes(self, shape: torch.Size) -> torch.Tensor:
        rows, cols, gr, gc = self._grid(shape)
        r = torch.full((gr,), self.size, dtype=torch.long)
        r[-1] = rows - (gr - 1) * self.size
        c = torch.full((gc,), self.size, dtype=torch.long)
        c[-1] = cols - (gc - 1) * self.size
        return (r[:, None] * c[None, :]).reshape(-1)

    def expand(self, group_keep: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        rows, cols, gr, gc = self._grid(shape)
        grid = group_keep.reshape(gr, gc)
        full = grid.repeat_interleave(self.size, 0).repeat_interleave(self.size, 1)
        return full[:rows, :cols].reshape(shape).clone()

    def __str__(self) -> str:
        return f"block:{self.size}"


@PATTERNS.register("nm", aliases=("n:m",))
@dataclass(frozen=True)
class NM(Pattern):
    """N:M semi-structured sparsity: N weights kept in every M consecutive inputs.

    Groups run along the input dimension: the columns of a Linear weight
    (out, in), and the input channels of a convolution weight (out, in, k...)
    at each kernel position, as NVIDIA's sparse tensor cores require
    ("Accelerating Sparse Deep Neural Networks", Mishra et al. 2021). Inside
    each group the N highest scores are kept. The sparsity is fixed at
    ``1 - N/M``.

    Args:
        n: weights kept per group (2 for 2:4).
        m: group length (4 for 2:4).
    """

    n: int = 2
    m: int = 4
    free_sparsity = False
    spelling = "N:M"

    @classmethod
    def from_spec(cls, args: str | None) -> NM:
        """``N:M`` (or ``nm:N:M``): N kept in every M consecutive inputs."""
        m = _NM_RE.match(args or "")
        if m is None:
            raise SparseforgeError(f"an N:M pattern is written N:M with integers (e.g. 2:4), got {args!r}")
        return cls(int(m.group(1)), int(m.group(2)))

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and isinstance(self.m, int) and 0 < self.n < self.m):
            raise SparseforgeError(f"N:M needs integers 0 < N < M, got {self.n}:{self.m}")

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def check(self, shape: torch.Size, name: str = "tensor") -> None:
        if len(shape) < 2:
            raise SparseforgeError(f"{self} needs a 2-D or larger weight; {name} has shape {tuple(shape)}")
        if shape[1] % self.m != 0:
            raise SparseforgeError(
                f"{self} needs the input dimension divisible by {self.m}, but {name} has shape "
                f"{tuple(shape)} (input dimension {shape[1]}); exclude this layer from the target "
                f"or choose M dividing {shape[1]}"
            )

    def _grouped(self, t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Move the input dim last and split it into groups of M: (..., in/M, M)."""
        moved = t.movedim(1, -1)
        return moved.reshape(*moved.shape[:-1], moved.shape[-1] // self.m, self.m), tuple(moved.shape)

    def group_scores(self, score: torch.Tensor) -> torch.Tensor:
        return score.reshape(-1)

    def group_sizes(self, shape: torch.Size) -> torch.Tensor:
        return torch.ones(math.prod(shape), dtype=torch.long)

    def expand(self, group_keep: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return group_keep.reshape(shape)

    def within_rows(self) -> Pattern:
        return self  # groups of M inputs lie within a row already

    def mask(self, score: torch.Tensor, sparsity: float | None = None) -> torch.Tensor:
        """Keep the N highest scores of every group of M inputs.

        ``sparsity`` may be 0 (everything kept, e.g. before a schedule starts)
        or ``1 - N/M``; anything else is an error since N:M fixes it.
        """
        if sparsity is not None and sparsity == 0.0:
            return torch.ones_like(score, dtype=torch.bool)
        if sparsity is not None and abs(sparsity - self.sparsity) > 1e-6:
            raise SparseforgeError(
                f"pattern {self} fixes the sparsity at {self.sparsity:g}; got sparsity={sparsity:g}. "
                f"Pass sparsity={self.sparsity:g} or another N:M"
            )
        self.check(score.shape)
        grouped, moved_shape = self._grouped(score)
        idx = torch.topk(grouped, self.n, dim=-1, sorted=False).indices
        keep = torch.zeros_like(grouped, dtype=torch.bool).scatter_(-1, idx, True)
        return keep.reshape(moved_shape).movedim(-1, 1).contiguous()

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
# "block:4", "block=4", "block 4", "block4": a family name, then its arguments.
_FAMILY_RE = re.compile(r"^\s*([a-z][a-z_\- ]*?)\s*(?:[:=]\s*(.*?)|(\d.*?))?\s*$")


def as_pattern(spec: Pattern | str | None) -> Pattern:
    """Parse a pattern: ``"unstructured"``, ``"channel"``, ``"channel-groups"``, ``"block:4"``, ``"2:4"`` (any
    family of :data:`PATTERNS`, written ``family`` or ``family:args``), or pass a Pattern.

    >>> as_pattern("2:4")
    NM(n=2, m=4)
    >>> as_pattern("block:8")
    Block(size=8)
    """
    if spec is None:
        return Unstructured()
    if isinstance(spec, Pattern):
        return spec
    text = str(spec).strip().lower()
    if text in PATTERNS:
        return PATTERNS.get(text).from_spec(None)
    if _NM_RE.match(text):
        return NM.from_spec(text)
    m = _FAMILY_RE.match(text)
    if m is None or m.group(1) not in PATTERNS:
        forms = [f"'{cls.spelling or name}'" for name, cls in PATTERNS.items()]
        written = ", ".join(forms[:-1]) + f" or {forms[-1]}" if len(forms) > 1 else forms[0]
        raise PATTERNS.error(spec, closest_to=m.group(1) if m else text, note=f"; write {written}")
    return PATTERNS.get(m.group(1)).from_spec(m.group(2) if m.group(2) is not None else m.group(3))
