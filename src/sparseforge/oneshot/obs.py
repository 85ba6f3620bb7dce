"""The layer-wise Optimal Brain Surgeon solver shared by SparseGPT and GPTQ.

Both methods minimise the layer's reconstruction error ``||W X - W' X||^2``
on calibration inputs ``X`` by fixing the columns of ``W`` (input features)
one after another and spreading each column's error over the columns not
fixed yet, with the inverse Hessian ``H^-1`` of that error (``H = 2 X^T X /
n``). The update for column ``j`` with fixed value ``q`` is the OBS update
``W[:, j:] -= ((w_j - q) / [H^-1]_jj) [H^-1]_{j, j:}``, computed with the
upper Cholesky factor of ``H^-1`` so that removing a column needs no new
inverse ("Optimal Brain Compression", Frantar & Alistarh 2022; "GPTQ",
Frantar et al. 2023; "SparseGPT", Frantar & Alistarh 2023). Columns are
processed in blocks of ``block_size`` (128): updates inside a block are
applied at once per column, to the rest of the matrix once per block.

:func:`obs_compress` fixes each column to

- 0 where the weight is pruned: by a mask chosen per block from
  ``w^2 / [H^-1]_jj^2`` (SparseGPT, unstructured: the lowest ``sparsity``
  share of the block's weights), per group of ``M`` columns (N:M: the ``M -
  N`` lowest of each row), or given (``keep``: an existing sparsity pattern,
  which GPTQ keeps), and
- its value on a symmetric integer grid where it is kept (GPTQ), or its
  updated value (pruning only).

The grid is :mod:`sparseforge.quant.rtn`'s: symmetric, no zero point, zeros
stay zero (a kept weight below half a step may round to 0 too); one scale per output channel (from the weight before any
update, as GPTQ does) or per group of ``group_size`` inputs (from the
group's current values when its first column is reached, or from the
original weight with ``act_order``, whose column order would otherwise
scatter a group's columns).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from sparseforge.errors import SparseforgeError

__all__ = ["OBSResult", "inverse_hessian_factor", "obs_compress"]


@dataclass
class OBSResult:
    """What :func:`obs_compress` returns.

    Attributes:
        weight: the new ``[out, in]`` float32 weight (zeros where pruned).
        keep: boolean ``[out, in]``: True where the weight is kept.
        codes: int8 codes ``[out, in]`` when quantizing, else None.
        scale: float32 scales ``[out, n_groups]`` when quantizing, else None.
        error: the OBS estimate of the added reconstruction error,
            ``sum (w - q)^2 / [H^-1]_jj^2 / 2`` (comparable between runs on one layer).
        damp: the damping actually added to the Hessian's diagonal.
    """

    weight: torch.Tensor
    keep: torch.Tensor
    codes: torch.Tensor | None
    scale: torch.Tensor | None
    error: float
    damp: float


def inverse_hessian_factor(h: torch.Tensor, damp: float = 0.01, retries: int = 4) -> tuple[torch.Tensor, float]:
    """The upper Cholesky factor of ``(H + lambda I)^-1``, with ``lambda = damp * mean(diag H)``.

    A Hessian that is not positive definite even after damping (too few
    calibration rows for the layer's width, or collinear inputs) is retried
    with ten times the damping, up to ``retries`` times, with a warning;
    then a :class:`SparseforgeError` says to add calibration data.
    Returns the factor and the damping used.
    """
    h = h.to(torch.float32)
    mean_diag = float(torch.diagonal(h).mean())
    lam = damp * (mean_diag if mean_diag > 0 else 1.0)
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(retries + 1):
        factor, info = torch.linalg.cholesky_ex(h + lam * eye)
        if int(info) == 0:
            inv = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                if attempt:
                    warnings.warn(f"the calibration Hessian needed damping {lam:.3g} ({attempt} increase(s)) to be "
                                  "positive definite: more calibration data would make it better conditioned",
                                  stacklevel=3)
                return upper, lam
        lam *= 10.0
    raise SparseforgeError(
        f"the calibration Hessian is not positive definite even with damping {lam / 10:.3g}: "
        "use more (or more varied) calibration samples"
    )


def _check_args(cols: int, sparsity: float | None, n_m: tuple[int, int] | None, keep: torch.Tensor | None,
                bits: int | None, group_size: int | None, act_order: bool) -> None:
    chosen = sum(x is not None for x in (sparsity, n_m, keep))
    if chosen > 1:
        raise SparseforgeError("give at most one of sparsity, n_m and keep")
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise SparseforgeError(f"sparsity must be in [0, 1), got {sparsity}")
    if n_m is not None:
        n, m = n_m
        if not 0 < n < m or cols % m:
            raise SparseforgeError(f"an N:M pattern needs 0 < N < M and M dividing the {cols} inputs; got {n}:{m}")
        if act_order:
            raise SparseforgeError("act_order reorders columns, which breaks N:M groups: use act_order=False with N:M")
    if bits is not None and bits not in (2, 3, 4, 8):
        raise SparseforgeError(f"bits must be 8, 4, 3 or 2, got {bits}")
    if group_size is not None and (group_size < 1 or cols % group_size):
        raise SparseforgeError(f"group_size {group_size} must divide the layer's {cols} inputs")


def _grid(w: torch.Tensor, scale: torch.Tensor, qmax: int, kept: torch.Tensor) -> torch.Tensor:
    """Codes of ``w`` on the symmetric grid, 0 where not kept."""
    q = torch.clamp(torch.round(w / scale), -qmax, qmax)
    return torch.where(kept, q, torch.zeros_like(q))


def _scale(values: torch.Tensor, kept: torch.Tensor, qmax: int) -> torch.Tensor:
    amax = torch.where(kept, values.abs(), torch.zeros_like(values)).amax(dim=1)
    return amax.clamp_min(torch.finfo(torch.float32).tiny) / qmax


@torch.no_grad()
def obs_compress(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    sparsity: float | None = None,
    n_m: tuple[int, int] | None = None,
    keep: torch.Tensor | None = None,
    bits: int | None = None,
    group_size: int | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
) -> OBSResult:
    """Prune and/or quantize one layer's ``[out, in]`` weight by column-wise OBS updates.

    Args:
        weight: ``[out, in]`` (not changed; the result is a new tensor).
        hessian: ``[in, in]``, ``2 X^T X / n`` of the layer's inputs.
        sparsity: prune this share of every block's weights (SparseGPT, unstructured).
        n_m: ``(N, M)``: keep N of every M consecutive inputs per row (SparseGPT N:M).
        keep: a boolean ``[out, in]`` mask of weights that may stay nonzero;
            default: the weight's nonzeros when neither ``sparsity`` nor
            ``n_m`` is given, so that an already sparse weight keeps its
            pattern (GPTQ on a pruned model).
        bits: quantize kept weights to this many bits (GPTQ); None: no quantization.
        group_size: inputs per scale; None (default): one scale per output channel.
        block_size: columns per lazy-update block. Default 128.
        damp: Hessian damping relative to its mean diagonal. Default 0.01.
        act_order: process columns by decreasing ``diag H`` (GPTQ's
            "act-order"); group scales are then taken from the original weight.
            Default False.

    Inputs never seen (``diag H == 0``) get ``H_jj = 1`` so the inverse
    exists; their weights are fixed like any other (the reference code zeroes
    them; here the sparsity pattern stays what the caller asked for).
    """
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise SparseforgeError(f"the Hessian is {list(hessian.shape)} but the weight has {cols} inputs")
    _check_args(cols, sparsity, n_m, keep, bits, group_size, act_order)
    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(torch.float32).clone()
    if keep is None and sparsity is None and n_m is None:
        keep = w != 0
    fixed = keep.to(torch.bool).clone() if keep is not None else None
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    perm = inv = None
    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True)
        inv = torch.argsort(perm)
        w, h = w[:, perm], h[perm][:, perm]
        fixed = fixed[:, perm] if fixed is not None else None
    hinv, lam = inverse_hessian_factor(h, damp)

    qmax = 2 ** (bits - 1) - 1 if bits is not None else 0
    g = group_size or cols
    n_groups = cols // g
    scale = None
    if bits is not None:
        orig = w if perm is None else w[:, inv]
        orig_keep = (fixed if perm is None else fixed[:, inv]) if fixed is not None else torch.ones_like(w, dtype=torch.bool)
        if group_size is None or act_order:  # static scales from the weight before any update
            scale = torch.stack([_scale(orig[:, k * g:(k + 1) * g], orig_keep[:, k * g:(k + 1) * g], qmax)
                                 for k in range(n_groups)], dim=1)
        else:
            scale = torch.zeros(rows, n_groups, dtype=torch.float32, device=w.device)
    order = perm if perm is not None else torch.arange(cols, device=w.device)
    codes = torch.zeros(rows, cols, dtype=torch.int8, device=w.device) if bits is not None else None
    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)
    total_error = 0.0

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d1 = torch.diagonal(hinv1)
        if fixed is not None:
            mask1 = ~fixed[:, i1:i2]
        elif sparsity is not None:
            score = w1.square() / d1.square().unsqueeze(0)
            k = int(score.numel() * sparsity)
            # contiguous (row-major) whatever the weight's layout: a transposed weight (transformers'
            # Conv1D) gives a column-major w1, and flat indices must mean the same element in both
            mask1 = torch.zeros_like(w1, dtype=torch.bool, memory_format=torch.contiguous_format)
            if k:
                mask1.view(-1)[torch.topk(score.reshape(-1), k, largest=False).indices] = True
        else:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            col = w1[:, i]
            d = d1[i]
            if n_m is not None and i % n_m[1] == 0:
                n, m = n_m
                score = w1[:, i:i + m].square() / d1[i:i + m].square().unsqueeze(0)
                mask1.scatter_(1, i + torch.topk(score, m - n, dim=1, largest=False).indices, True)
            kept = ~mask1[:, i]
            if bits is not None:
                j = int(order[i1 + i])
                k = j // g
                if group_size is not None and not act_order and j % g == 0:
                    # the group's current values: this block's updated columns, later blocks as of now
                    end = i2 + max(0, g - (i2 - i1 - i))
                    span = torch.cat([w1[:, i:], w[:, i2:end]], dim=1)[:, :g]
                    later = ~fixed[:, i2:end] if fixed is not None else torch.zeros_like(w[:, i2:end], dtype=torch.bool)
                    span_keep = ~torch.cat([mask1[:, i:], later], dim=1)[:, :g]
                    scale[:, k] = _scale(span, span_keep, qmax)
                c = _grid(col, scale[:, k], qmax, kept)
                codes[:, j] = c.to(torch.int8)
                q = c * scale[:, k]
            else:
                q = torch.where(kept, col, torch.zeros_like(col))
            q1[:, i] = q
            e = (col - q) / d
            total_error += float((col - q).square().sum() / d.square()) / 2
            w1[:, i:] -= e.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i1:i2] = q1
        pruned[:, i1:i2] = mask1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    if perm is not None:
        w, pruned = w[:, inv], pruned[:, inv]
    return OBSResult(w, ~pruned, codes, scale, total_error, lam)

