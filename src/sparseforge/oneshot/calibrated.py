"""The calibrated one-shot methods by name: magnitude, Wanda and SparseGPT, through :func:`sparseforge.prune`.

- ``magnitude``: keep the largest ``|W_ij|`` of the layer (N:M: of each group
  of M inputs). The baseline of both papers below.
- ``wanda``: :class:`~sparseforge.scores.Wanda`, ``|W_ij| * ||X_j||_2``
  compared within each output row (Sun et al., ICLR 2024). No weight update.
- ``sparsegpt``: :func:`~sparseforge.oneshot.sparsegpt.SparseGPT`, OBS pruning
  that reconstructs the kept weights (Frantar & Alistarh, ICML 2023).

:func:`prune_calibrated` is shorthand for ``sparseforge.prune(model, method,
sparsity, pattern, allocation, target, calibration=batches)`` with this
module's defaults (Wanda, 50%, the Linear layers of the model's repeated
blocks, layer by layer even for magnitude); it returns the same
:class:`~sparseforge.report.PruneReport`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from sparseforge.allocation import Allocation
from sparseforge.errors import SparseforgeError
from sparseforge.oneshot.calibration import select_layers
from sparseforge.oneshot.prune import prune
from sparseforge.oneshot.sparsegpt import SparseGPT
from sparseforge.patterns import Pattern
from sparseforge.progress import Progress
from sparseforge.report import PruneReport
from sparseforge.targets import Target

__all__ = ["METHODS", "prune_calibrated", "select_layers"]

METHODS = ("magnitude", "wanda", "sparsegpt")
"""The one-shot methods the ``prune --method`` command offers besides MaskLLM."""


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
) -> PruneReport:
    """Prune ``model`` once, in place, with calibration data: ``sparseforge.prune`` layer by layer.

    Args:
        model: the model (a ``transformers`` model or any ``nn.Module``); left plain, with exact zeros.
        calibration: batches the model is called on (keyword dicts, tensors, or ``(inputs, targets)``).
        method: ``"magnitude"``, ``"wanda"`` (default) or ``"sparsegpt"``.
        sparsity: share of each layer's weights to prune (before allocation); ignored for N:M. Default 0.5.
        pattern: ``"unstructured"`` (default) or ``"N:M"``.
        allocation: ``"uniform"`` (default), ``"owl"``, or any Allocation (unstructured only).
        target: module globs or a Target; default the Linear layers inside the model's repeated blocks.
        block_size, damp: SparseGPT's columns per block (128) and Hessian damping (0.01).
        progress: progress per block (see :mod:`sparseforge.progress`).

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
    chosen = SparseGPT(block_size=block_size, damp=damp) if key == "sparsegpt" else key
    return prune(model, chosen, 0.5 if sparsity is None else sparsity, pattern, allocation or "uniform", target,
                 calibration=calibration, progress=progress)
