"""One-shot pruning with calibration data: magnitude, Wanda and SparseGPT, for transformers and any model.

The methods, each on a layer's weight ``W`` ``[out, in]`` with the inputs
``X`` it sees on calibration data (collected block by block, each block
seeing the already pruned blocks before it:
:mod:`sparseforge.oneshot.calibration`):

- ``magnitude``: keep the largest ``|W_ij|`` of the layer (N:M: of each group
  of M inputs). The baseline of both papers below.
- ``wanda``: "A Simple and Effective Pruning Approach for Large Language
  Models" (Sun, Liu, Bair & Kolter, ICLR 2024). Score ``|W_ij| * ||X_j||_2``,
  compared *within each output row*: every row loses its lowest-scoring
  ``sparsity`` share of weights (N:M: the lowest ``M - N`` of each group of M
  inputs). No weight update.
- ``sparsegpt``: "SparseGPT: Massive Language Models Can Be Accurately
  Pruned in One-Shot" (Frantar & Alistarh, ICML 2023). Column-wise OBS with
  the damped Hessian ``2 X^T X / n``, masks chosen per block of 128 columns
  by ``w^2 / [H^-1]_jj^2``, the pruning error of each column propagated to
  the later ones (:func:`sparseforge.oneshot.obs.obs_compress`).

Per-layer sparsities come from an :class:`~sparseforge.allocation.Allocation`
(uniform by default). Allocations that read scores (``owl``, ``global``,
``lamp``) are given Wanda's scores on the dense model, from one calibration
pass before pruning (as OWL's reference code does).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sparseforge.allocation import OWL, Allocation, Uniform, as_allocation
from sparseforge.errors import SparseforgeError
from sparseforge.oneshot.calibration import (
    LayerStats, find_blocks, is_linear_like, sequential, set_weight_matrix, weight_matrix,
)
from sparseforge.oneshot.obs import obs_compress
from sparseforge.patterns import NM, Pattern, Unstructured, as_pattern, check_sparsity
from sparseforge.progress import Progress
from sparseforge.targets import Target, as_target

__all__ = ["METHODS", "CalibratedReport", "prune_calibrated", "select_layers", "wanda_mask", "wanda_score"]

METHODS = ("magnitude", "wanda", "sparsegpt")


def wanda_score(weight: torch.Tensor, feature_norms: torch.Tensor) -> torch.Tensor:
    """Wanda's score ``|W_ij| * ||X_j||_2`` for an ``[out, in]`` weight and the ``[in]`` input feature norms."""
    return weight.abs() * feature_norms.to(weight.dtype).reshape(1, -1)


def wanda_mask(score: torch.Tensor, sparsity: float, pattern: Pattern | str = "unstructured") -> torch.Tensor:
    """Keep-mask from ``[out, in]`` scores, compared within each output row (Wanda's rule).

    Unstructured: each row loses its ``int(in * sparsity)`` lowest scores
    (ties broken by position, as a stable sort does). N:M: each group of M
    consecutive inputs of a row keeps its N highest.
    """
    pattern = as_pattern(pattern)
    if isinstance(pattern, NM):
        return pattern.mask(score)
    if not isinstance(pattern, Unstructured):
        raise SparseforgeError(f"Wanda compares scores within rows: use unstructured or N:M, not {pattern}")
    k = int(score.shape[1] * check_sparsity(sparsity))
    keep = torch.ones_like(score, dtype=torch.bool)
    if k:
        idx = torch.sort(score, dim=1, stable=True).indices[:, :k]
        keep.scatter_(1, idx, False)
    return keep


def _magnitude_mask(weight: torch.Tensor, sparsity: float, pattern: Pattern) -> torch.Tensor:
    return pattern.mask(weight.abs()) if isinstance(pattern, NM) else pattern.mask(weight.abs(), sparsity)


@dataclass
class CalibratedReport:
    """What :func:`prune_calibrated` did: per layer its sparsity, and timings."""

    method: str
    pattern: str
    sparsity: float
    allocation: str
    layers: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0
    calibration_rows: int = 0

    @property
    def achieved(self) -> float:
        """Zeros over weights, across the pruned layers."""
        total = sum(v["numel"] for v in self.layers.values())
        return sum(v["zeros"] for v in self.layers.values()) / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "pattern": self.pattern, "sparsity": self.sparsity,
                "allocation": self.allocation, "achieved": self.achieved, "seconds": self.seconds,
                "calibration_rows": self.calibration_rows, "layers": self.layers}


def select_layers(model: nn.Module, target: Target | Sequence[str] | str | None = None) -> dict[str, nn.Module]:
    """The layers one-shot methods prune: with no target, every Linear (or transformers Conv1D)
    inside the model's list of repeated blocks, as the papers do (embeddings, a pooler and the
    LM head stay dense); the zoo's models, with no such list, get all Linear/Conv2d layers."""
    supported = {n: m for n, m in model.named_modules() if is_linear_like(m)}
    if target is None:
        found = find_blocks(model, supported)
        if found is None:
            return supported
        prefix = f"{found[0]}." if found[0] else ""
        return {n: m for n, m in supported.items() if n.startswith(prefix)}
    t = as_target(target)
    if not isinstance(target, Target):  # globs: consider every supported type, transformers' Conv1D included
        t = Target(include=t.include, exclude=t.exclude, types=tuple({type(m) for m in supported.values()}))
    layers = {layer.name: layer.module for layer in t.select(model)}
    unsupported = [n for n, m in layers.items() if not is_linear_like(m)]
    if unsupported or t.param_name != "weight":
        raise SparseforgeError(f"one-shot methods prune the weight of Linear/Conv2d layers; not {unsupported or t.param_name}")
    return layers


@torch.no_grad()
def prune_calibrated(
    model: nn.Module,
    calibration: Iterable[Any],
    method: str = "wanda",
    sparsity: float | None = 0.5,
    pattern: Pattern | str = "unstructured",
    allocation: Allocation | str | None = "uniform",
    target: Target | Sequence[str] | str | None = None,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    progress: bool | Progress = False,
) -> CalibratedReport:
    """Prune ``model`` once, in place, with calibration data; returns a :class:`CalibratedReport`.

    Args:
        model: the model (a ``transformers`` model or any ``nn.Module``); left plain, with exact zeros.
        calibration: batches the model is called on: keyword dicts (a
            tokenizer's output), tensors, or ``(inputs, targets)`` pairs. The
            papers use 128 sequences of 2048 tokens; 128 of 128 suit a small model.
        method: ``"magnitude"``, ``"wanda"`` (default) or ``"sparsegpt"``.
        sparsity: share of each layer's weights to prune (before allocation);
            ignored for N:M, which fixes it. Default 0.5.
        pattern: ``"unstructured"`` (default) or ``"N:M"`` (``"2:4"``, ``"4:8"``).
        allocation: how sparsity is split over layers: ``"uniform"`` (default),
            ``"owl"`` (:class:`~sparseforge.allocation.OWL`), or any Allocation.
            Unstructured only: N:M fixes every layer's sparsity.
        target: module globs or a Target; default: the Linear layers inside
            the model's repeated blocks (:func:`select_layers`).
        block_size: SparseGPT's columns per block. Default 128.
        damp: SparseGPT's Hessian damping, relative to its mean diagonal. Default 0.01.
        progress: show progress per block (see :mod:`sparseforge.progress`):
            True, or a :class:`~sparseforge.progress.Progress` to report to. Default False.

    Example:
        >>> import torch, sparseforge as sf
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        >>> rep = sf.oneshot.prune_calibrated(model, [torch.randn(32, 16)], "wanda", 0.5)
        >>> rep.achieved, int((model[0].weight == 0).sum(dim=1).min())
        (0.5, 8)
    """
    key = str(method).lower()
    if key not in METHODS:
        raise SparseforgeError(f"unknown one-shot method {method!r}; valid: {', '.join(METHODS)}")
    pat = as_pattern(pattern)
    if not isinstance(pat, (Unstructured, NM)):
        raise SparseforgeError(f"one-shot methods support unstructured and N:M patterns, not {pat}")
    alloc = as_allocation(allocation)
    layers = select_layers(model, target)
    names = list(layers)
    shapes = [weight_matrix(m).shape for m in layers.values()]
    if isinstance(pat, NM):
        if not isinstance(alloc, Uniform):
            raise SparseforgeError(f"an N:M pattern fixes every layer's sparsity: allocation {allocation!r} cannot apply")
        for n, s in zip(names, shapes):
            if s[1] % pat.m:
                raise SparseforgeError(f"{n} has {s[1]} inputs, not divisible by M={pat.m} of pattern {pat}: "
                                       "exclude it from the target or use another pattern")
        per_layer = dict.fromkeys(names, 1.0 - pat.n / pat.m)
        total = 1.0 - pat.n / pat.m
    else:
        total = check_sparsity(sparsity if sparsity is not None else 0.5)
        if isinstance(alloc, OWL):
            alloc.check_blocks(names)  # before the calibration pass, not after it
    batches = list(calibration)
    start = time.perf_counter()
    if not isinstance(pat, NM):
        if alloc.needs_scores:
            scores: dict[str, torch.Tensor] = {}

            def score_only(name: str, module: nn.Module, stats: LayerStats) -> None:
                scores[name] = wanda_score(weight_matrix(module), stats.feature_norms)

            sequential(model, batches, layers, score_only, gram=False, progress=progress,
                       description="OWL/allocation scores")
            values = alloc.allocate(names, shapes, total, [scores[n] for n in names], pat)
            del scores
        else:
            values = alloc.allocate(names, shapes, total, None, pat)
        per_layer = dict(zip(names, values))
    rep = CalibratedReport(key, str(pat), total, type(alloc).__name__.lower())

    def process(name: str, module: nn.Module, stats: LayerStats) -> None:
        w = weight_matrix(module)
        s = per_layer[name]
        if key == "sparsegpt":
            nm = (pat.n, pat.m) if isinstance(pat, NM) else None
            res = obs_compress(w, stats.hessian, sparsity=None if nm else s, n_m=nm, block_size=block_size,
                               damp=damp)
            new = res.weight
        else:
            score = wanda_score(w, stats.feature_norms) if key == "wanda" else w.abs()
            keep = wanda_mask(score, s, pat) if key == "wanda" else _magnitude_mask(w, s, pat)
            new = w * keep
        set_weight_matrix(module, new)
        rep.layers[name] = {"sparsity": s, "zeros": float((new == 0).sum()), "numel": float(new.numel())}
        rep.calibration_rows = max(rep.calibration_rows, stats.rows)

    if key == "magnitude":  # needs no data; run layer by layer without forwards
        for name, module in layers.items():
            process(name, module, LayerStats())
    else:
        sequential(model, batches, layers, process, gram=key == "sparsegpt", progress=progress,
                   description=f"{key} {pat}")
    rep.seconds = time.perf_counter() - start
    return rep
