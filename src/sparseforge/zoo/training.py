"""Classification evaluation, and one epoch of cross-entropy training through :func:`sparseforge.fit`.

:func:`train_epoch` is a short form of ``fit(..., epochs=1)``: one optimizer,
a hook after every step (where a sparsifier updates its masks) and an optional
progress callback. Batches are moved to the model's device, so the same loop
runs on CPU or GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from sparseforge.errors import SparseforgeError
from sparseforge.quality import evaluate
from sparseforge.training import History, LambdaCallback, fit

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
    """Train a classifier for one pass over ``loader`` with cross-entropy: one epoch of :func:`sparseforge.fit`.

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
    try:
        num_batches = len(loader)  # type: ignore[arg-type]
    except TypeError:
        num_batches = 0
    if num_batches == 0 and hasattr(loader, "__len__"):
        raise SparseforgeError("cannot train: the loader yielded no examples")
    callbacks = [History()]
    if on_step is not None:
        callbacks.append(LambdaCallback(on_step_end=lambda state: on_step()))
    if progress is not None:
        callbacks.append(LambdaCallback(on_step_end=lambda state: progress(state.batch - 1, num_batches,
                                                                           float(state.loss.item()))))
    state = fit(model, loader, optimizer, F.cross_entropy, epochs=1, callbacks=callbacks)
    history = callbacks[0]
    row = history.rows[-1]
    return {"loss": row["train_loss"], "accuracy": row["train_accuracy"], "examples": int(history.last_sums[2]),
            "steps": state.step}
