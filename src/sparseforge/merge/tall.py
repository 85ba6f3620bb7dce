"""TALL masks and consensus merging: which entries of the merged vector each task actually needs.

From "Localizing Task Information for Improved Model Merging and
Compression" (Wang et al., ICML 2024). Given task vectors ``tau_t`` and a
merged multi-task vector ``tau_MTL`` (task arithmetic or TIES), the TALL mask
of task ``t`` keeps the entries where the task's own vector dominates what
the other tasks add:

    m_t = |tau_t| >= lambda_t * |tau_MTL - tau_t|

``theta_0 + m_t * tau_MTL`` then recovers most of the fine-tuned model (so
``base + tau_MTL + T`` binary masks replace ``T`` fine-tuned models), and
entries that fewer than ``k`` tasks need ("selfish" or "catastrophic"
weights) can be removed from the merged vector: Consensus Merging.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from sparseforge.errors import SparseforgeError
from sparseforge.merge.core import ACC_DTYPE, MERGE_METHODS, MergeMethod, check_compatible, is_mergeable
from sparseforge.merge.task_arithmetic import TaskArithmetic, merged_task_vector, task_vector

__all__ = ["consensus_masks", "consensus_merge", "reconstruct", "storage_report", "tall_masks"]

State = Mapping[str, Tensor]


def _lambdas(lambdas: float | Sequence[float], count: int) -> list[float]:
    values = [lambdas] * count if isinstance(lambdas, (int, float)) else list(lambdas)
    if len(values) != count:
        raise SparseforgeError(f"got {len(values)} lambdas for {count} tasks; give one number or one per task")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 for v in values):
        raise SparseforgeError(f"lambdas must be finite non-negative numbers, got {values!r}")
    return [float(v) for v in values]


def _check_vector(base: State, vector: Mapping[str, Tensor], what: str) -> None:
    floating = [k for k, v in base.items() if is_mergeable(v)]
    missing = [k for k in floating if k not in vector]
    if missing:
        raise SparseforgeError(f"{what} lacks floating tensors of the base: {missing[:5]}")
    bad = [k for k in floating if vector[k].shape != base[k].shape]
    if bad:
        raise SparseforgeError(f"{what} has shapes that differ from the base for {bad[:5]}")


def tall_masks(
    base: State,
    states: Sequence[State],
    *,
    lambdas: float | Sequence[float] = 0.4,
    merged_vector: Mapping[str, Tensor] | None = None,
) -> list[dict[str, Tensor]]:
    """TALL masks ``m_t = |tau_t| >= lambda_t * |tau_MTL - tau_t|`` per task, over the floating tensors.

    From "Localizing Task Information for Improved Model Merging and
    Compression" (Wang et al., ICML 2024).

    Args:
        base: the pre-trained state ``theta_0``.
        states: the fine-tuned states ``theta_t``.
        lambdas: the threshold ``lambda_t``, one for all tasks or one per task
            (default 0.4; the paper selects it per task in [0.2, 0.6] on validation data).
        merged_vector: the multi-task vector ``tau_MTL`` (e.g. from
            :func:`~sparseforge.merge.task_arithmetic.merged_task_vector` with a
            TIES spec); default the plain sum of the task vectors (task arithmetic, lam=1).

    Returns:
        One boolean mask dict per task, keyed like the base's floating tensors.
    """
    check_compatible(states, base=base)
    lams = _lambdas(lambdas, len(states))
    taus = [task_vector(base, s) for s in states]
    if merged_vector is None:
        merged_vector = merged_task_vector(base, states, TaskArithmetic())
    else:
        _check_vector(base, merged_vector, "merged_vector")
    masks = []
    for tau, lam in zip(taus, lams):
        mask = {}
        for k, t in tau.items():
            t64 = t.to(ACC_DTYPE)
            mtl = merged_vector[k].to(device=t.device, dtype=ACC_DTYPE)
            mask[k] = t64.abs() >= lam * (mtl - t64).abs()
        masks.append(mask)
    return masks


def reconstruct(base: State, merged_vector: Mapping[str, Tensor], mask: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Task-specific model ``theta_0 + m_t * tau_MTL`` from the base, the merged vector and one TALL mask.

    The reconstruction of "Localizing Task Information for Improved Model
    Merging and Compression" (Wang et al., ICML 2024). Floating tensors are
    computed in float64 and cast to the base's dtype; others are copied from the base.
    """
    _check_vector(base, merged_vector, "merged_vector")
    _check_vector(base, mask, "mask")
    out = {}
    for k, b in base.items():
        if not is_mergeable(b):
            out[k] = b.clone()
            continue
        m = mask[k]
        if m.dtype != torch.bool:
            raise SparseforgeError(f"mask for {k!r} must be boolean, got {m.dtype}")
        b64 = b.to(ACC_DTYPE)
        out[k] = torch.where(m.to(b.device), b64 + merged_vector[k].to(device=b.device, dtype=ACC_DTYPE), b64).to(b.dtype)
    return out


def consensus_masks(masks: Sequence[Mapping[str, Tensor]], k: int = 2) -> dict[str, Tensor]:
    """Entries kept by at least ``k`` of the task masks (``k=1``: their union; ``k=T``: their intersection).

    The consensus mask of "Localizing Task Information for Improved Model
    Merging and Compression" (Wang et al., ICML 2024); default ``k=2`` as in
    the paper: entries only one task uses ("selfish") or none uses are dropped.

    >>> m = [{"w": torch.tensor([True, True, False])}, {"w": torch.tensor([True, False, False])}]
    >>> consensus_masks(m, k=2)["w"]
    tensor([ True, False, False])
    """
    if not masks:
        raise SparseforgeError("need at least one task mask")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(masks):
        raise SparseforgeError(f"k must be an integer in [1, {len(masks)}] (the number of tasks), got {k!r}")
    keys = list(masks[0])
    for i, m in enumerate(masks):
        if set(m) != set(keys):
            raise SparseforgeError(f"mask {i} covers different tensors than mask 0")
    out = {}
    for key in keys:
        count = torch.zeros(masks[0][key].shape, dtype=torch.int32, device=masks[0][key].device)
        for m in masks:
            count += m[key].to(torch.int32)
        out[key] = count >= k
    return out


def _density(masks: Mapping[str, Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    return float(sum(int(m.sum()) for m in masks.values()) / total) if total else 0.0


def consensus_merge(
    base: State,
    states: Sequence[State],
    *,
    k: int = 2,
    lambdas: float | Sequence[float] = 0.4,
    lam: float = 1.0,
    inner: TaskArithmetic | None = None,
) -> tuple[dict[str, Tensor], dict]:
    """Consensus Merging: the multi-task vector restricted to entries at least ``k`` TALL masks keep.

    From "Localizing Task Information for Improved Model Merging and
    Compression" (Wang et al., ICML 2024): ``tau_MTL`` is the task-arithmetic
    (default) or TIES vector (``inner``, a :class:`TaskArithmetic` whose
    ``lam`` must be 1: the scaling is ``lam`` here); the TALL masks are built
    against it with ``lambdas``; the merged model is
    ``theta_0 + lam * (consensus_mask * tau_MTL)``; entries outside the
    consensus mask keep the base's value.

    Returns:
        ``(merged state, report)``; the report has ``num_tasks``, ``k``,
        ``lambdas``, ``task_mask_density`` (per task), ``consensus_density``.
    """
    inner = TaskArithmetic() if inner is None else inner
    if not isinstance(inner, TaskArithmetic):
        raise SparseforgeError(f"inner must be a TaskArithmetic spec, got {type(inner).__name__}")
    if inner.lam != 1:
        raise SparseforgeError(f"inner.lam must be 1 (got {inner.lam}); scale the consensus vector with lam instead")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam):
        raise SparseforgeError(f"lam must be a finite number, got {lam!r}")
    vector = merged_task_vector(base, states, inner)
    lams = _lambdas(lambdas, len(states))
    masks = tall_masks(base, states, lambdas=lams, merged_vector=vector)
    cons = consensus_masks(masks, k)
    merged = {}
    for name, b in base.items():
        if not is_mergeable(b):
            merged[name] = b.clone()
            continue
        b64 = b.to(ACC_DTYPE)
        merged[name] = torch.where(cons[name], b64 + lam * vector[name].to(ACC_DTYPE), b64).to(b.dtype)
    report = {
        "num_tasks": len(states),
        "k": k,
        "lambdas": lams,
        "task_mask_density": [_density(m) for m in masks],
        "consensus_density": _density(cons),
    }
    return merged, report


def storage_report(base: State, masks: Sequence[Mapping[str, Tensor]]) -> dict:
    """Storage of ``T`` fine-tuned models vs the base + one merged vector + ``T`` one-bit TALL masks.

    The compression claim of "Localizing Task Information for Improved Model
    Merging and Compression" (Wang et al., ICML 2024). With ``P`` floating
    parameters of ``b`` bits each (32 for float32): the fine-tuned models take
    ``T * P * b`` bits, TALL takes ``2 * P * b + T * P`` bits (masks as
    packed bits). Non-floating buffers are ignored (they are the same either way).

    Returns:
        ``num_tasks``, ``params``, ``finetuned_bytes``, ``tall_bytes``,
        ``saved_bytes`` and ``ratio`` (``tall_bytes / finetuned_bytes``).

    >>> r = storage_report({"w": torch.zeros(1000)}, [{"w": torch.ones(1000, dtype=torch.bool)}] * 8)
    >>> r["finetuned_bytes"], r["tall_bytes"], r["ratio"]
    (32000, 9000, 0.28125)
    """
    if not masks:
        raise SparseforgeError("need at least one task mask")
    for i, m in enumerate(masks):
        _check_vector(base, m, f"mask {i}")
    floating = [v for v in base.values() if is_mergeable(v)]
    params = sum(v.numel() for v in floating)
    value_bits = sum(v.numel() * v.element_size() * 8 for v in floating)
    t = len(masks)
    finetuned_bits = t * value_bits
    tall_bits = 2 * value_bits + t * params
    finetuned_bytes = math.ceil(finetuned_bits / 8)
    tall_bytes = math.ceil(tall_bits / 8)
    return {
        "num_tasks": t,
        "params": params,
        "finetuned_bytes": finetuned_bytes,
        "tall_bytes": tall_bytes,
        "saved_bytes": finetuned_bytes - tall_bytes,
        "ratio": tall_bytes / finetuned_bytes if finetuned_bytes else 0.0,
    }


MERGE_METHODS.register("tall", MergeMethod(
    python_only="TALL masks need the task vectors and per-task masks",
    summary="TALL masks and consensus merging (Python: tall_masks, consensus_merge)"))
