"""Generalized task arithmetic: one merge rule with pluggable sparsification and sign consensus.

Every fine-tuned model ``theta_t`` of a common base ``theta_0`` is a task
vector ``tau_t = theta_t - theta_0``. The merge is

    theta = theta_0 + lam * combine(w_1 * sparsify(tau_1), ..., w_T * sparsify(tau_T))

with three swappable choices (the design of mergekit's generalized task
arithmetic): ``sparsify`` (none, magnitude trim, DARE drop-and-rescale),
per-task weights ``w_t``, and ``combine`` (plain sum, or TIES sign election
followed by a disjoint mean). Named methods are presets of :class:`TaskArithmetic`:

============== =========== ========= ============================================
preset         sparsify    consensus paper
============== =========== ========= ============================================
task_arithmetic none       none      Editing Models with Task Arithmetic (Ilharco et al., ICLR 2023)
ties           magnitude   ties      TIES-Merging (Yadav et al., NeurIPS 2023)
dare           dare        none      Language Models are Super Mario (Yu et al., ICML 2024)
dare_ties      dare        ties      DARE sparsification with TIES consensus
============== =========== ========= ============================================

The rule is applied tensor by tensor (:func:`merge_tensors`), so a streaming
merge that reads one tensor of each model at a time gives the same result as
an in-memory one, bit for bit.
"""

from __future__ import annotations

import hashlib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sparseforge.errors import SparseforgeError
from sparseforge.merge.core import (
    ACC_DTYPE, FILE_OPTIONS, MERGE_METHODS, MergeMethod, Rule, check_compatible, is_mergeable, map_tensors,
)

__all__ = [
    "CONSENSUS", "SPARSIFY", "TaskArithmetic", "TaskVectorMethod", "combine_tensors", "dare", "merge_task_arithmetic",
    "merge_tensors", "merged_task_vector", "preset", "task_arithmetic", "task_vector", "ties",
]

State = Mapping[str, Tensor]

SPARSIFY = ("none", "magnitude", "dare")
CONSENSUS = ("none", "ties")


def task_vector(base: State, finetuned: State) -> dict[str, Tensor]:
    """Task vector ``tau = theta_t - theta_0`` over the floating tensors.

    From "Editing Models with Task Arithmetic" (Ilharco et al., ICLR 2023).
    Non-floating tensors (counters, integer buffers) are left out. The
    difference is computed in float64 and stored as float32 (float64 for
    float64 tensors), so bf16/fp16 differences are not rounded to the
    models' own precision.

    >>> task_vector({"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([1.5, 1.0])})["w"]
    tensor([ 0.5000, -1.0000])
    """
    check_compatible([finetuned], names=["the fine-tuned model"], base=base)
    out = {}
    for name, b in base.items():
        if is_mergeable(b):
            dtype = torch.float64 if b.dtype == torch.float64 else torch.float32
            out[name] = (finetuned[name].to(ACC_DTYPE) - b.to(ACC_DTYPE)).to(dtype)
    return out


@dataclass(frozen=True)
class TaskArithmetic:
    """The generalized task-arithmetic merge: ``theta_0 + lam * combine(w_t * sparsify(tau_t))``.

    Args:
        sparsify: how each task vector is sparsified before combining, per tensor:

            - ``"none"`` (default): kept whole;
            - ``"magnitude"``: the TIES trim step, keep the ``density`` fraction
              of entries of largest ``|tau_t|`` (``round(density * numel)`` of
              them, ties broken by lower flat index) and zero the rest;
            - ``"dare"``: DARE from "Language Models are Super Mario: Absorbing
              Abilities from Homologous Models as a Free Lunch" (Yu et al.,
              ICML 2024): drop each entry with probability ``p = 1 - density``
              and rescale the kept ones by ``1 / density``, so the expected
              task vector is unchanged.

            TIES-Merging trims over the whole task vector; here trimming is per
            tensor (as mergekit does) so that the merge streams tensor by tensor.
        density: fraction of entries kept by ``"magnitude"``/``"dare"``, in (0, 1]. Default 1.0.
        consensus: how the task vectors are combined:

            - ``"none"`` (default): their sum, as in task arithmetic;
            - ``"ties"``: from "TIES-Merging: Resolving Interference When
              Merging Models" (Yadav et al., NeurIPS 2023): elect a sign per
              entry, the sign of the sum of the (weighted, sparsified) task
              vectors, then take the disjoint mean: the average of only the
              nonzero entries whose sign agrees with the elected one
              (weighted by ``weights``; 0 where none agree).
        lam: the scaling coefficient lambda applied to the combined vector. Default 1.0.
        weights: one weight per task multiplying its (sparsified) task vector
            before combining; default all 1. With ``"ties"`` they must be
            non-negative (the disjoint mean divides by their sum).
        seed: seed of DARE's random drops. Default 0.

    >>> TaskArithmetic(sparsify="magnitude", density=0.2, consensus="ties")
    TaskArithmetic(sparsify='magnitude', density=0.2, consensus='ties', lam=1.0, weights=None, seed=0)
    """

    sparsify: str = "none"
    density: float = 1.0
    consensus: str = "none"
    lam: float = 1.0
    weights: tuple[float, ...] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.weights is not None and not isinstance(self.weights, tuple):
            try:
                object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
            except (TypeError, ValueError):
                raise SparseforgeError(f"weights must be a sequence of numbers, got {self.weights!r}") from None
        self.validate()

    def validate(self) -> None:
        """Raise :class:`SparseforgeError` naming the bad field and the allowed values."""
        if self.sparsify not in SPARSIFY:
            raise SparseforgeError(f"unknown sparsify {self.sparsify!r}; choose one of {', '.join(SPARSIFY)}")
        if self.consensus not in CONSENSUS:
            raise SparseforgeError(f"unknown consensus {self.consensus!r}; choose one of {', '.join(CONSENSUS)}")
        if isinstance(self.density, bool) or not isinstance(self.density, (int, float)) or not 0 < self.density <= 1:
            raise SparseforgeError(f"density must be a number in (0, 1] (fraction of entries kept), got {self.density!r}")
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or not math.isfinite(self.lam):
            raise SparseforgeError(f"lam must be a finite number, got {self.lam!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise SparseforgeError(f"seed must be an integer, got {self.seed!r}")
        if self.weights is not None:
            if not self.weights or not all(math.isfinite(w) for w in self.weights):
                raise SparseforgeError(f"weights must be a non-empty sequence of finite numbers, got {self.weights!r}")
            if self.consensus == "ties" and any(w < 0 for w in self.weights):
                raise SparseforgeError(
                    f"weights must be non-negative with consensus='ties' (the disjoint mean divides by their sum), "
                    f"got {self.weights!r}"
                )

    def task_weights(self, count: int) -> tuple[float, ...]:
        """The weight of each of ``count`` tasks (all 1 by default); raises if the count does not match."""
        if self.weights is None:
            return (1.0,) * count
        if len(self.weights) != count:
            raise SparseforgeError(f"got {len(self.weights)} weights for {count} task models; give one per task")
        return self.weights


def _stable_seed(seed: int, name: str, index: int) -> int:
    # hashlib, not hash(): Python salts str hashes per process, and a streamed
    # merge in another process must draw the same drops.
    digest = hashlib.sha256(f"{seed}\0{name}\0{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _magnitude_trim(tau: Tensor, density: float) -> Tensor:
    n = tau.numel()
    keep = round(density * n)
    if keep >= n:
        return tau
    flat = tau.reshape(-1)
    # A stable sort breaks ties in |tau| by the lower flat index, so the kept set
    # (and its size, exactly `keep`) is deterministic; topk's tie order is not specified.
    order = torch.sort(flat.abs(), descending=True, stable=True).indices[:keep]
    out = torch.zeros_like(flat)
    out[order] = flat[order]
    return out.reshape(tau.shape)


def _dare(tau: Tensor, density: float, seed: int) -> Tensor:
    if density >= 1:
        return tau
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # Drawn on the CPU whatever the tensor's device, so the drops do not depend on it.
    keep = (torch.rand(tau.shape, generator=gen, dtype=torch.float64) < density).to(tau.device)
    return torch.where(keep, tau / density, torch.zeros_like(tau))


def combine_tensors(base: Tensor, tensors: Sequence[Tensor], spec: TaskArithmetic, name: str = "") -> Tensor:
    """The combined task vector of one tensor, ``combine(w_t * sparsify(tau_t))``, in float64 (``lam`` not applied).

    ``base`` must be floating; ``tensors`` are the fine-tuned models' versions
    of it. ``name`` seeds DARE's drops together with ``spec.seed`` and the task
    index, so the same tensor always gets the same drops.
    """
    if not tensors:
        raise SparseforgeError(f"no task tensors to merge for {name!r}; give at least one fine-tuned model")
    for i, t in enumerate(tensors):
        if t.shape != base.shape or t.dtype != base.dtype:
            raise SparseforgeError(
                f"task {i} tensor {name!r} is {list(t.shape)} {t.dtype} but the base is {list(base.shape)} "
                f"{base.dtype}; merge only models of the same architecture and dtype"
            )
    weights = spec.task_weights(len(tensors))
    b = base.to(ACC_DTYPE)
    taus = []
    for i, t in enumerate(tensors):
        tau = t.to(ACC_DTYPE) - b
        if spec.sparsify == "magnitude":
            tau = _magnitude_trim(tau, spec.density)
        elif spec.sparsify == "dare":
            tau = _dare(tau, spec.density, _stable_seed(spec.seed, name, i))
        taus.append(tau * weights[i] if weights[i] != 1 else tau)
    if spec.consensus == "none":
        total = taus[0].clone()
        for tau in taus[1:]:
            total.add_(tau)
        return total
    # TIES: elect the sign of the summed (signed) mass, then average only the
    # entries that are nonzero and agree with it.
    elected = torch.sign(sum(taus))
    num = torch.zeros_like(b)
    den = torch.zeros_like(b)
    for w, tau in zip(weights, taus):
        agree = (torch.sign(tau) == elected) & (tau != 0)
        num.add_(torch.where(agree, tau, 0.0))
        den.add_(agree.to(ACC_DTYPE), alpha=w)
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)


def merge_tensors(base: Tensor, tensors: Sequence[Tensor], spec: TaskArithmetic, name: str = "") -> Tensor:
    """Merge one tensor: ``base + lam * combine(w_t * sparsify(tensors[t] - base))`` (see :class:`TaskArithmetic`).

    The per-tensor rule used by :func:`merge_task_arithmetic` and by streaming
    merges: it needs only this tensor of each model. Computed in float64 and
    cast back to ``base.dtype``. Non-floating tensors return a copy of ``base``.

    >>> merge_tensors(torch.zeros(3), [torch.tensor([1.0, -2.0, 0.5])], TaskArithmetic(lam=0.5))
    tensor([ 0.5000, -1.0000,  0.2500])
    """
    if not is_mergeable(base):
        return base.clone()
    combined = combine_tensors(base, tensors, spec, name)
    b = base.to(ACC_DTYPE)
    out = b + combined * spec.lam if spec.lam != 1 else b + combined
    return out.to(base.dtype)


def _check_states(base: State, states: Sequence[State], spec: TaskArithmetic) -> None:
    if not isinstance(spec, TaskArithmetic):
        raise SparseforgeError(f"spec must be a TaskArithmetic, got {type(spec).__name__}")
    spec.validate()
    check_compatible(states, base=base)
    spec.task_weights(len(states))


def merge_task_arithmetic(base: State, states: Sequence[State], spec: TaskArithmetic) -> dict[str, Tensor]:
    """Merge fine-tuned models of ``base`` by the generalized task-arithmetic rule ``spec``, tensor by tensor.

    Checks that all models match the base (:func:`check_compatible`), then
    applies :func:`merge_tensors` to every floating tensor; non-floating ones
    are copied from the base.
    """
    _check_states(base, states, spec)
    return map_tensors([base, *states], lambda name, ts: merge_tensors(ts[0], ts[1:], spec, name))


def merged_task_vector(base: State, states: Sequence[State], spec: TaskArithmetic) -> dict[str, Tensor]:
    """The merged multi-task vector ``lam * combine(...)`` per floating tensor (float32; float64 for float64 tensors).

    ``merge_task_arithmetic(base, states, spec)`` is ``base`` plus this vector;
    TALL masks and consensus merging (:mod:`sparseforge.merge.tall`) start from it.
    """
    _check_states(base, states, spec)
    out = {}
    for name, b in base.items():
        if is_mergeable(b):
            dtype = torch.float64 if b.dtype == torch.float64 else torch.float32
            out[name] = (combine_tensors(b, [s[name] for s in states], spec, name) * spec.lam).to(dtype)
    return out


def _task_arithmetic_spec(lam: float = 1.0, weights: Sequence[float] | None = None) -> TaskArithmetic:
    return TaskArithmetic(lam=lam, weights=weights)


def _ties_spec(density: float = 0.2, lam: float = 1.0, weights: Sequence[float] | None = None) -> TaskArithmetic:
    return TaskArithmetic(sparsify="magnitude", density=density, consensus="ties", lam=lam, weights=weights)


def _dare_spec(
    density: float = 0.1, lam: float = 1.0, seed: int = 0, consensus: str = "none",
    weights: Sequence[float] | None = None,
) -> TaskArithmetic:
    return TaskArithmetic(sparsify="dare", density=density, consensus=consensus, lam=lam, seed=seed, weights=weights)


def _dare_ties_spec(
    density: float = 0.1, lam: float = 1.0, seed: int = 0, weights: Sequence[float] | None = None,
) -> TaskArithmetic:
    return _dare_spec(density=density, lam=lam, seed=seed, consensus="ties", weights=weights)


@dataclass(frozen=True)
class TaskVectorMethod(MergeMethod):
    """A merge method that is a preset of :class:`TaskArithmetic`: ``spec(**hyperparameters)`` builds it."""

    spec: Callable[..., TaskArithmetic] | None = None


def _register_preset(name: str, spec: Callable[..., TaskArithmetic], summary: str) -> None:
    """Register the preset ``spec`` as the merge method ``name`` (its options: the file options it takes)."""
    params = inspect.signature(spec).parameters

    def build(count: int, weights: Sequence[float] | None = None, **options: object) -> Rule:
        merge_spec = preset(name, weights=None if weights is None else tuple(weights), **options)
        scales = merge_spec.task_weights(count)  # one weight per task model
        if count == 1 and merge_spec.sparsify == "none" and merge_spec.lam * float(scales[0]) == 1.0:
            # base + 1 * (model - base) is the model: a merge that changes nothing is a mistake, not a result.
            raise SparseforgeError(f"{name} of one model with lambda 1 gives that model back unchanged: list "
                                   "two or more fine-tuned models, or scale the task vector with a lambda other than "
                                   "1 (ties and dare also sparsify a single task vector)")

        def task_vector_merge(key: str, base_tensor: Tensor | None, tensors: list[Tensor]) -> Tensor:
            return merge_tensors(base_tensor, tensors, merge_spec, name=key)

        return task_vector_merge

    MERGE_METHODS.register(name, TaskVectorMethod(
        build, needs_base=True, options=tuple(o for o in FILE_OPTIONS if o in params), summary=summary, spec=spec))


_register_preset("task_arithmetic", _task_arithmetic_spec, "task arithmetic: base + lambda * the sum of task vectors")
_register_preset("ties", _ties_spec, "TIES: task vectors trimmed to their top magnitudes, signs elected, disjoint mean")
_register_preset("dare", _dare_spec, "DARE: task-vector entries dropped at random and the rest rescaled, then summed")
_register_preset("dare_ties", _dare_ties_spec, "DARE drops with TIES sign consensus")


def presets() -> list[str]:
    """The merge methods of :data:`~sparseforge.merge.core.MERGE_METHODS` that are :class:`TaskArithmetic` presets."""
    return [name for name, m in MERGE_METHODS.items() if isinstance(m, TaskVectorMethod)]


def preset(name: str, **kwargs: object) -> TaskArithmetic:
    """The :class:`TaskArithmetic` spec of a named method, with its hyperparameters as keywords.

    Names: ``task_arithmetic`` (lam), ``ties`` (density=0.2, lam), ``dare``
    (density=0.1, lam, seed, consensus), ``dare_ties`` (density=0.1, lam, seed);
    all take ``weights``. (The presets among :data:`~sparseforge.merge.core.MERGE_METHODS`.)

    >>> preset("dare_ties", density=0.3).consensus
    'ties'
    """
    if name not in MERGE_METHODS:
        raise MERGE_METHODS.error(name, known=presets())
    method = MERGE_METHODS.get(name)
    if not isinstance(method, TaskVectorMethod):
        raise SparseforgeError(f"merge method {name!r} is not a task-arithmetic preset; the presets: "
                               f"{', '.join(presets())}")
    try:
        return method.spec(**kwargs)
    except TypeError as exc:
        raise SparseforgeError(f"bad options for merge method {name!r}: {exc}") from None


def task_arithmetic(
    base: State, states: Sequence[State], lam: float = 1.0, weights: Sequence[float] | None = None,
) -> dict[str, Tensor]:
    """Task arithmetic: ``theta_0 + lam * sum_t tau_t``.

    From "Editing Models with Task Arithmetic" (Ilharco et al., ICLR 2023);
    ``lam`` is the scaling coefficient (default 1.0; the paper picks it on
    held-out data, often around 0.3-0.5 for several tasks).
    """
    return merge_task_arithmetic(base, states, _task_arithmetic_spec(lam, weights))


def ties(
    base: State, states: Sequence[State], density: float = 0.2, lam: float = 1.0,
    weights: Sequence[float] | None = None,
) -> dict[str, Tensor]:
    """TIES-Merging: trim each task vector to its top ``density`` magnitudes, elect signs, disjoint mean.

    From "TIES-Merging: Resolving Interference When Merging Models" (Yadav et
    al., NeurIPS 2023); density 0.2 (the paper's top-20%) and lam 1.0 by
    default. Trimming is per tensor here (the paper trims over the whole task
    vector) so that the merge streams; see :class:`TaskArithmetic`.
    """
    return merge_task_arithmetic(base, states, _ties_spec(density, lam, weights))


def dare(
    base: State, states: Sequence[State], density: float = 0.1, lam: float = 1.0, seed: int = 0,
    consensus: str = "none", weights: Sequence[float] | None = None,
) -> dict[str, Tensor]:
    """DARE: drop each task-vector entry with probability ``1 - density``, rescale the rest by ``1 / density``, merge.

    From "Language Models are Super Mario: Absorbing Abilities from Homologous
    Models as a Free Lunch" (Yu et al., ICML 2024); density 0.1 (drop rate
    0.9) by default. ``consensus="ties"`` gives DARE-TIES. Drops are seeded
    per (seed, tensor name, task index).
    """
    return merge_task_arithmetic(base, states, _dare_spec(density, lam, seed, consensus, weights))
