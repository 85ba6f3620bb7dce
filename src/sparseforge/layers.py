"""Layer and model classes of other libraries that sparseforge recognises without importing them.

``transformers`` is an optional dependency, so its classes are recognised by
name and attributes (:func:`is_conv1d`) or through ``sys.modules``
(:func:`is_hf_model`: a model cannot be a ``PreTrainedModel`` unless
``transformers`` was imported to build it). This is the one place that knows
how; calibration, compaction, quantization and the file formats ask here.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

__all__ = ["hf_submodule", "is_conv1d", "is_hf_model", "weight_out_in"]


def is_conv1d(module: Any) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2): a Linear whose weight is stored ``[in, out]``.

    It has ``nx`` (input features) and ``nf`` (output features) and computes
    ``x @ weight + bias``.
    """
    return (type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")
            and isinstance(getattr(module, "weight", None), torch.Tensor))


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The module's weight (detached) with output features first: a view ``[in, out] -> [out, in]`` for a Conv1D."""
    w = module.weight.detach()
    return w.t() if is_conv1d(module) else w


def is_hf_model(model: Any) -> bool:
    """Whether ``model`` is a ``transformers.PreTrainedModel`` (without importing transformers)."""
    mod = sys.modules.get("transformers")
    if mod is None:
        return False
    try:
        return isinstance(model, mod.PreTrainedModel)
    except Exception:  # noqa: BLE001 - a broken transformers install: not an HF model for us
        return False


def hf_submodule(model: nn.Module) -> str | None:
    """The name of the first ``PreTrainedModel`` nested inside ``model`` (None if there is none)."""
    if sys.modules.get("transformers") is None:
        return None
    return next((name for name, m in model.named_modules() if name and is_hf_model(m)), None)
