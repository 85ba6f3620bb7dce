"""A small classification training/evaluation loop shared by the demo and benchmarks.

Deliberately minimal: cross-entropy, one optimizer, a hook after every step
(where a sparsifier updates its masks) and an optional progress callback.
Batches are moved to the model's device, so the same loop runs on CPU or GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from sparseforge.errors import SparseforgeError
from sparseforge.quality import evaluate

__all__ = ["evaluate", "train_epoch"]

ProgressFn = Callable[[int, int, float], None]
"""``progress(batch_index, num_batches, loss)``; see :func:`train_epoch`."""


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def train_epoch(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    on_step: Callable[[], None] | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, float]:
    """Train a classifier for one pass over ``loader`` with cross-entropy.

    Each batch: zero grads, forward, backward, ``optimizer.step()``, then
    ``on_step()``. The hook runs after the optimizer so that a sparsifier can
    re-apply or update its masks on the freshly updated weights.

    Args:
        model: maps a batch of inputs to logits ``[B, C]``; put in train mode.
        loader: iterable of ``(inputs, int64 targets)`` batches.
        optimizer: optimizer over the model's parameters.
        on_step: called with no arguments after every optimizer step.
            Default ``None``.
        progress: called as ``progress(batch_index, num_batches, loss)`` after
            every batch, with the 0-based index of the batch just finished,
            ``len(loader)`` (or 0 if the loader has no length) and that batch's
            loss. Default ``None``.

    Returns:
        ``{"loss": mean training cross-entropy per example, "accuracy": percent
        of training examples classified correctly (during the epoch, before
        each step), "examples": number of examples, "steps": optimizer steps}``.

    Raises:
        SparseforgeError: the loader yielded no examples.
    """
    device = _model_device(model)
    model.train()
    try:
        num_batches = len(loader)  # type: ignore[arg-type]
    except TypeError:
        num_batches = 0
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    steps = 0
    for i, (xb, yb) in enumerate(loader):
        xb = xb.to(device, non_blocking=True)
        yb = yb.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        logits = model(xb)
        loss = F.cross_entropy(logits, yb)
        loss.backward()
        optimizer.step()
        steps += 1
        if on_step is not None:
            on_step()
        n = int(yb.shape[0])
        total_loss += loss.detach().double() * n
        correct += (logits.detach().argmax(dim=1) == yb).sum()
        count += n
        if progress is not None:
            progress(i, num_batches, float(loss.item()))
    if count == 0:
        raise SparseforgeError("cannot train: the loader yielded no examples")
    return {
        "loss": total_loss.item() / count,
        "accuracy": 100.0 * correct.item() / count,
        "examples": count,
        "steps": steps,
    }
