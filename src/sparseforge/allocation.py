"""How the total budget is split over layers: the ``Allocation`` part.

An allocation turns one model-level sparsity (the fraction of all targeted
weights to prune) into one sparsity per layer. Some allocations look only at
shapes (uniform, ERK), others at the scores (global, LAMP). Every allocation
keeps at least ``min_keep`` weights in every layer so that no layer collapses
(a layer with no weights disconnects the network); when that floor binds, the
global allocations give the budget it frees to the other layers.
"""

from __future__ import annotations

import fnmatch
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from sparseforge.errors import SparseforgeError
from sparseforge.patterns import Pattern, Unstructured, check_sparsity
from sparseforge.registry import Registry

ALLOCATIONS: Registry[Callable[[], Allocation]] = Registry("allocation")
"""Allocation names -> factories building it with its defaults; ``as_allocation`` looks them up."""


def _max_sparsity(numel: int, min_keep: int) -> float:
    return max(0.0, 1.0 - min(min_keep, numel) / numel)


@dataclass(frozen=True)
class Allocation(ABC):
    """Base class. ``min_keep``: weights kept in every layer at least (default 1), keyword only."""

    # Keyword only, so that a subclass's own fields come first positionally:
    # ``Explicit({"fc*": 0.5})`` and ``ERK(False)`` must not land in min_keep.
    min_keep: int = field(default=1, kw_only=True)

    def __post_init__(self) -> None:
        if int(self.min_keep) < 0:
            raise SparseforgeError(f"min_keep must be >= 0, got {self.min_keep}")

    #: whether :meth:`allocate` reads the scores (global, LAMP) or only the shapes.
    needs_scores: bool = field(default=False, init=False, repr=False)

    @abstractmethod
    def allocate(
        self,
        names: Sequence[str],
        shapes: Sequence[torch.Size],
        sparsity: float,
        scores: Sequence[torch.Tensor] | None = None,
        pattern: Pattern | None = None,
    ) -> list[float]:
        """Per-layer sparsities for a model-level ``sparsity``.

        Args:
            names: the layers' qualified names.
            shapes: their weight shapes.
            sparsity: the fraction of all their weights to prune, in [0, 1).
            scores: per-layer score tensors (needed when ``needs_scores``).
            pattern: the pattern whose groups the scores are compared by
                (default unstructured).
        """


@ALLOCATIONS.register("uniform")
@dataclass(frozen=True)
class Uniform(Allocation):
    """Every layer gets the same sparsity (clamped so each keeps ``min_keep`` weights)."""

    def allocate(self, names, shapes, sparsity, scores=None, pattern=None) -> list[float]:
        sparsity = check_sparsity(sparsity)
        return [min(sparsity, _max_sparsity(math.prod(s), self.min_keep)) for s in shapes]


def _erk_raw(shape: torch.Size, kernel: bool) -> float:
    if len(shape) < 2:
        return 1.0
    if kernel:
        return sum(shape) / math.prod(shape)
    return (shape[0] + shape[1]) / (shape[0] * shape[1])


@ALLOCATIONS.register("erk")
@dataclass(frozen=True)
class ERK(Allocation):
    """Erdos-Renyi(-Kernel) densities, as defined in RigL ("Rigging the Lottery:
    Making All Tickets Winners", Evci et al. 2020).

    Rule: the density of layer l is ``eps * raw_l`` where ``raw_l`` is
    ``sum(shape) / prod(shape)`` (ERK: output, input and kernel dimensions) or
    ``(n_in + n_out) / (n_in * n_out)`` (ER, ``kernel=False``), raised to
    ``power``, and ``eps`` is chosen so that the kept weights add up to the
    budget. When a layer's density would exceed 1 it is made dense and eps is
    solved again over the other layers (RigL's redistribution), until no
    density exceeds 1.

    Args:
        kernel: include the kernel dimensions (ERK). Default True; False is ER.
        power: the ``erk_power_scale`` of RigL's code. Default 1.0.
    """

    kernel: bool = True
    power: float = 1.0

    def allocate(self, names, shapes, sparsity, scores=None, pattern=None) -> list[float]:
        sparsity = check_sparsity(sparsity)
        numels = [math.prod(s) for s in shapes]
        raw = [_erk_raw(s, self.kernel) ** self.power for s in shapes]
        dense: set[int] = set()
        while True:
            rhs = 0.0
            divisor = 0.0
            for i, n in enumerate(numels):
                if i in dense:
                    rhs -= n * sparsity
                else:
                    rhs += n * (1.0 - sparsity)
                    divisor += raw[i] * n
            if divisor == 0.0:
                eps = 0.0
                break
            eps = rhs / divisor
            free = [i for i in range(len(numels)) if i not in dense]
            top = max(raw[i] for i in free)
            if top * eps > 1.0:
                dense.update(i for i in free if raw[i] == top)
            else:
                break
        out = []
        for i, n in enumerate(numels):
            s = 0.0 if i in dense else 1.0 - eps * raw[i]
            out.append(min(max(s, 0.0), _max_sparsity(n, self.min_keep)))
        return out


def _lowest_k_counts(scores: list[torch.Tensor], k: int) -> list[int]:
    """How many of each layer's scores are among the k lowest of all layers (ties split in order).

    Exact, without sorting or concatenating everything: a random sample
    brackets the k-th value, one pass per layer counts what lies below the
    bracket and collects what lies inside it, and the exact k-th value is
    selected among the few candidates (falling back to a full selection when
    the sample misses).
    """
    flats = [s.reshape(-1) for s in scores]
    n = sum(f.numel() for f in flats)
    if k <= 0:
        return [0] * len(flats)
    if k >= n:
        return [f.numel() for f in flats]
    gen = torch.Generator().manual_seed(n + k)
    sample_size = min(n, 1 << 16)
    picks = torch.randint(0, n, (sample_size,), generator=gen)
    offsets = torch.tensor([0] + [f.numel() for f in flats]).cumsum(0)
    layer_idx = torch.searchsorted(offsets, picks, right=True) - 1
    sample = torch.cat([f[(picks[layer_idx == i] - offsets[i])] for i, f in enumerate(flats)]).sort().values
    q = k / n
    margin = 4.0 / math.sqrt(sample_size) + 1.0 / sample_size
    lo = sample[max(0, int((q - margin) * sample_size))]
    hi = sample[min(sample_size - 1, int(math.ceil((q + margin) * sample_size)))]
    below = [int((f < lo).sum()) for f in flats]
    inside = [f[(f >= lo) & (f <= hi)] for f in flats]
    need = k - sum(below)
    candidates = torch.cat(inside)
    if not (0 < need <= candidates.numel()):
        # Select in the scores' own dtype: rounding float64 scores (LAMP's) to
        # float32 here would make the ``< thr`` / ``== thr`` counts below miss
        # the k-th value, and the total would no longer be exact.
        thr = torch.kthvalue(torch.cat(flats), k).values
        below = [int((f < thr).sum()) for f in flats]
        inside = [f[f == thr] for f in flats]
        need = k - sum(below)
    else:
        thr = torch.kthvalue(candidates, need).values
        below = [b + int((c < thr).sum()) for b, c in zip(below, inside)]
        need = k - sum(below)
    counts = []
    for b, c in zip(below, inside):
        take = min(int((c == thr).sum()), need)
        counts.append(b + take)
        need -= take
    return counts


def _global_counts(
    group_scores: list[torch.Tensor],
    group_sizes: list[torch.Tensor],
    budget: int,
    max_prune: list[int],
) -> list[int]:
    """Elements pruned per layer when the lowest group scores across all layers are pruned.

    Exact for unit groups: ``sum(counts) == budget`` unless the per-layer
    maxima make it impossible. Layers whose count exceeds their maximum are
    clamped and the rest re-solved without them.
    """
    active = list(range(len(group_scores)))
    counts = [0] * len(group_scores)
    remaining = budget
    while active and remaining > 0:
        if all(bool((group_sizes[i] == 1).all()) for i in active):
            trial = _lowest_k_counts([group_scores[i] for i in active], remaining)
        else:
            flat = torch.cat([group_scores[i].reshape(-1) for i in active])
            sizes = torch.cat([group_sizes[i].reshape(-1) for i in active])
            layer_of = torch.cat([torch.full((group_scores[i].numel(),), j) for j, i in enumerate(active)])
            order = torch.argsort(flat, stable=True)
            cums = torch.cumsum(sizes[order], 0)
            n = int(torch.searchsorted(cums, torch.tensor(remaining, dtype=cums.dtype), right=True))
            chosen = order[:n]
            per = torch.zeros(len(active), dtype=torch.long).index_add_(0, layer_of[chosen], sizes[chosen])
            trial = per.tolist()
        over = {j for j, i in enumerate(active) if trial[j] > max_prune[i]}
        if not over:
            for j, i in enumerate(active):
                counts[i] = trial[j]
            break
        for j in over:
            counts[active[j]] = max_prune[active[j]]
            remaining -= max_prune[active[j]]
        active = [i for j, i in enumerate(active) if j not in over]
    return counts


@ALLOCATIONS.register("global")
@dataclass(frozen=True)
class Global(Allocation):
    """One threshold across all layers: the lowest scores of the whole model are pruned.

    Rule: concatenate every layer's (group) scores, prune the ``sparsity``
    fraction of elements with the lowest scores; a layer that would keep fewer
    than ``min_keep`` weights keeps ``min_keep`` and its share of the budget
    goes to the others ("Is Complexity Required for Neural Network Pruning?",
    Gupta et al. 2022: global magnitude pruning with a minimum threshold).
    A layer of at most ``min_keep`` weights is not pruned at all, as in the
    paper. The freed budget is pruned from the other layers by the same global
    threshold, re-solved without the clamped layers; the authors' code instead
    scales the other layers' sparsities proportionally, which is no longer a
    single magnitude threshold. Exact to the element for unstructured scores;
    uses a k-th value selection, not a sort, so 25M weights take well under a
    second.
    """

    needs_scores: bool = field(default=True, init=False, repr=False)

    def transform(self, group_scores: torch.Tensor) -> torch.Tensor:
        """Hook for score normalisations applied per layer before the global threshold."""
        return group_scores

    def allocate(self, names, shapes, sparsity, scores=None, pattern=None) -> list[float]:
        sparsity = check_sparsity(sparsity)
        if scores is None:
            raise SparseforgeError(f"allocation {type(self).__name__.lower()} needs the layers' scores")
        pattern = pattern or Unstructured()
        numels = [math.prod(s) for s in shapes]
        gscores = [self.transform(pattern.group_scores(s.detach()).float()) for s in scores]
        gsizes = [pattern.group_sizes(s.shape) for s in scores]
        max_prune = [n - min(max(self.min_keep, 1), n) for n in numels]
        counts = _global_counts(gscores, gsizes, int(round(sparsity * sum(numels))), max_prune)
        return [c / n for c, n in zip(counts, numels)]


@ALLOCATIONS.register("lamp")
@dataclass(frozen=True)
class LAMP(Global):
    """Layer-Adaptive Magnitude-based Pruning ("Layer-adaptive Sparsity for the
    Magnitude-based Pruning", Lee et al. 2021).

    Rule: within each layer sort the scores ascending (u = 1..n); the LAMP score
    of u is ``s_u^2 / sum_{v >= u} s_v^2``; then prune globally by LAMP score.
    The largest weight of every layer has LAMP score 1, so no layer empties.
    """

    def transform(self, group_scores: torch.Tensor) -> torch.Tensor:
        flat = group_scores.reshape(-1).double()
        # An already-pruned weight (-inf) is a zero weight: it must add nothing to
        # the suffix sums (its square, inf, would make every other score 0/inf = 0
        # and let the global threshold empty the layer).
        pruned = torch.isneginf(flat)
        sq, order = torch.sort(flat.pow(2).masked_fill(pruned, 0.0))
        suffix = torch.flip(torch.cumsum(torch.flip(sq, [0]), 0), [0])
        lamp = torch.empty_like(flat)
        lamp[order] = torch.where(suffix > 0, sq / suffix, torch.zeros_like(sq))
        # -inf scores mark weights already pruned: keep them lowest.
        lamp[pruned] = -math.inf
        return lamp.reshape(group_scores.shape)


@dataclass(frozen=True)
class Explicit(Allocation):
    """An explicit sparsity per layer, given as ``{name glob: sparsity}``.

    The first glob (in dict order) matching a layer's name sets its sparsity;
    layers no glob matches get ``default`` or, when it is None, the model-level
    sparsity. A glob matching no layer is an error (probably a typo).
    """

    per_layer: Mapping[str, float] = field(default_factory=dict)
    default: float | None = None

    def allocate(self, names, shapes, sparsity, scores=None, pattern=None) -> list[float]:
        for glob, value in self.per_layer.items():
            check_sparsity(value, f"sparsity of {glob!r}")
            if not any(fnmatch.fnmatchcase(n, glob) for n in names):
                raise SparseforgeError(
                    f"explicit allocation key {glob!r} matches no targeted layer; layers: {', '.join(names)}"
                )
        fallback = check_sparsity(sparsity if self.default is None else self.default)
        out = []
        for name, shape in zip(names, shapes):
            value = next((v for g, v in self.per_layer.items() if fnmatch.fnmatchcase(name, g)), fallback)
            out.append(min(float(value), _max_sparsity(math.prod(shape), self.min_keep)))
        return out


def block_of(name: str) -> str:
    """The repeated block a layer belongs to: its name up to the first numeric component
    (``encoder.layer.3.attention.self.query`` -> ``encoder.layer.3``); the name itself when none."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[:i + 1])
    return name


@ALLOCATIONS.register("owl")
@dataclass(frozen=True)
class OWL(Allocation):
    """Outlier-weighted layerwise sparsity: blocks with more outlier scores are pruned less.

    "Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce for
    Pruning LLMs to High Sparsity" (Yin et al., ICML 2024). Rule: for every
    block ``l`` (the layers sharing a :func:`block_of` prefix), the outlier
    ratio ``D_l`` is the share of its scores larger than ``m`` times their
    mean over the block. The ratios are rescaled to span ``[0, 2 * lam]``,
    shifted so that their mean is the model's density ``1 - sparsity``, and
    each block's layers are pruned to ``1 - density_l``. So block sparsities
    span ``2 * lam`` and average to ``sparsity`` over blocks (over weights
    too when blocks are equal in size, as in a transformer); the paper's
    ``[sparsity - lam, sparsity + lam]`` holds when the ratios are spread
    evenly, and any block stays within ``sparsity +- 2 * lam``, as in the
    reference code.

    The scores are Wanda's ``|W_ij| * ||X_j||`` in the paper:
    :func:`sparseforge.prune` with calibration data computes them on the dense
    model when given this allocation, whichever method then prunes.

    Args:
        m: outlier threshold as a multiple of the block's mean score. Default 5 (the paper's M).
        lam: largest deviation from the model sparsity. Default 0.08 (the paper's lambda).
    """

    m: float = 5.0
    lam: float = 0.08
    needs_scores: bool = field(default=True, init=False, repr=False)

    @staticmethod
    def check_blocks(names: Sequence[str]) -> None:
        """Refuse layers OWL cannot weigh: ones outside any repeated block, or a single block.

        OWL compares the outlier ratios of a model's repeated blocks (a
        transformer's layers). A layer whose name has no block index (LeNet's
        ``fc1``) would be a "block" of its own, of any size, which moves the
        model's sparsity off the target; one block alone has nothing to be
        compared with, so OWL would silently equal ``uniform``.
        """
        outside = [n for n in names if block_of(n) == n]
        if outside:
            shown = ", ".join(outside[:5]) + (", ..." if len(outside) > 5 else "")
            raise SparseforgeError(
                f"OWL weighs a model's repeated blocks (layers named like 'layers.3.mlp.fc1') against each other, "
                f"but these targeted layers are in no repeated block: {shown}; use another allocation (uniform, "
                "global, erk, lamp), or target only the layers inside the blocks")
        blocks = sorted({block_of(n) for n in names})
        if len(blocks) < 2:
            raise SparseforgeError(
                f"OWL weighs a model's repeated blocks against each other, but the targeted layers form "
                f"{'one block (' + blocks[0] + ')' if blocks else 'no block'}: OWL would equal uniform; target "
                "two or more blocks, or use --allocation uniform")

    def outlier_ratios(self, names: Sequence[str], scores: Sequence[torch.Tensor]) -> dict[str, float]:
        """``D_l`` per block, in first-appearance order."""
        blocks: dict[str, list[torch.Tensor]] = {}
        for name, sc in zip(names, scores):
            blocks.setdefault(block_of(name), []).append(sc.detach().reshape(-1).to(torch.float64))
        out = {}
        for b, parts in blocks.items():
            allv = torch.cat(parts)
            out[b] = float((allv > self.m * allv.mean()).double().mean())
        return out

    def allocate(self, names, shapes, sparsity, scores=None, pattern=None) -> list[float]:
        sparsity = check_sparsity(sparsity)
        if scores is None:
            raise SparseforgeError("OWL needs per-layer scores (Wanda's |W| * ||X||): use it through "
                                   "sparseforge.prune(model, ..., calibration=batches), or pass scores")
        if not 0.0 <= self.lam < 1.0 or self.m <= 0:
            raise SparseforgeError(f"OWL needs m > 0 and 0 <= lam < 1, got m={self.m}, lam={self.lam}")
        self.check_blocks(names)
        ratios = self.outlier_ratios(names, scores)
        d = torch.tensor(list(ratios.values()), dtype=torch.float64)
        spread = float(d.max() - d.min())
        d = (d - d.min()) * (2 * self.lam / spread) if spread > 0 else torch.zeros_like(d)
        density = d - d.mean() + (1.0 - sparsity)
        per_block = dict(zip(ratios, (1.0 - density).clamp(0.0, 1.0).tolist()))
        return [min(per_block[block_of(n)], _max_sparsity(math.prod(s), self.min_keep)) for n, s in zip(names, shapes)]


@ALLOCATIONS.register("er")
def ErdosRenyi() -> ERK:
    """Erdos-Renyi densities: ERK without the kernel term (SET's allocation for Linear layers)."""
    return ERK(kernel=False)


def as_allocation(spec: Allocation | str | Mapping[str, float] | None) -> Allocation:
    """An Allocation: one built with its defaults from a name of :data:`ALLOCATIONS` (``uniform``,
    ``global``, ``erk``, ``er``, ...), an :class:`Explicit` one from a ``{glob: sparsity}`` dict, or
    ``spec`` itself (None: uniform)."""
    if spec is None:
        return Uniform()
    if isinstance(spec, Allocation):
        return spec
    if isinstance(spec, Mapping):
        return Explicit(per_layer=dict(spec))
    if str(spec) not in ALLOCATIONS:
        raise ALLOCATIONS.error(spec, note=", or a {glob: sparsity} dict")
    return ALLOCATIONS.get(str(spec))()
