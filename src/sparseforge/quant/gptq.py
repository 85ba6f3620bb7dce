"""GPTQ: weight quantization that corrects each column's rounding error with the inputs' Hessian.

"GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers" (Frantar, Ashkboos, Hoefler & Alistarh, ICLR 2023). For every
Linear/Conv layer, with ``H = 2 X^T X / n`` of its inputs on calibration data
(collected block by block, :mod:`sparseforge.oneshot.calibration`), the
columns of ``W`` are rounded one at a time to the symmetric grid of
:mod:`sparseforge.quant.rtn` and each column's rounding error is spread over
the columns not rounded yet by the OBS update (damped Hessian, Cholesky
factor of its inverse, lazy updates in blocks of 128 columns; the solver is
:func:`sparseforge.oneshot.obs.obs_compress`, shared with SparseGPT).

Composable with sparsity: a pruned weight stays exactly zero (its column
update is the OBS update to the value 0, so the error of keeping it pruned is
compensated as well), so quantization never revives a pruned weight; scales
are computed over the kept weights. The codes are recorded on each module (``module.sparseforge_quant``,
method ``"gptq"``), so :func:`sparseforge.save` with ``values="int4"`` stores
them exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sparseforge.errors import SparseforgeError
from sparseforge.oneshot.calibration import LayerStats, sequential, set_weight_matrix, weight_matrix
from sparseforge.oneshot.obs import obs_compress
from sparseforge.progress import Progress
from sparseforge.quant.rtn import QUANT_ATTR, SCHEMES, QuantizedTensor, QuantScheme
from sparseforge.targets import Target, as_target

__all__ = ["GPTQReport", "gptq_"]

# GPTQ at every bit width round to nearest has (the widths the compressed format stores): gptq-int8, gptq-int4.
for _name, _rtn in SCHEMES.items():
    SCHEMES.register(f"gptq-{_name}", QuantScheme(
        _rtn.bits, calibrated=True, summary=f"GPTQ to {_name}: rounding errors corrected on calibration data"))


@dataclass
class GPTQReport:
    """Per layer: the OBS estimate of the added reconstruction error, the damping used, and how many
    kept weights became exact zeros (``rounded_to_zero``)."""

    scheme: str
    group_size: int | None
    layers: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "group_size": self.group_size, "layers": self.layers}


def gptq_(
    model: nn.Module,
    calibration: Iterable[Any],
    scheme: str = "gptq-int4",
    group_size: int | None = None,
    *,
    act_order: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    target: Target | Sequence[str] | str | None = None,
    progress: bool | Progress = False,
) -> GPTQReport:
    """Quantize the targeted Linear/Conv2d weights of ``model`` in place with GPTQ.

    Args:
        model: the model (plain weights; finalize a Sparsifier first). Zeros stay zero.
        calibration: batches run through the model: tensors, ``(inputs,
            targets)`` pairs or keyword dicts (tokenizer output). The GPTQ
            paper uses 128 sequences of 2048 tokens; a few hundred images or
            128 sequences of 128 tokens serve a small model.
        scheme: ``"gptq-int4"`` (default) or ``"gptq-int8"``.
        group_size: inputs per scale; None (default): one scale per output channel.
        act_order: quantize columns by decreasing Hessian diagonal (GPTQ's
            "act-order", better at int4; group scales then come from the
            original weight). Default False.
        damp: damping added to the Hessian diagonal, relative to its mean. Default 0.01.
        block_size: columns per lazy-update block. Default 128.
        target: module name globs or a Target; default every Linear/Conv weight.
        progress: show progress over blocks (see :mod:`sparseforge.progress`): True, or a
            :class:`~sparseforge.progress.Progress` to report to. Default False.

    Returns a :class:`GPTQReport`. Each weight becomes its dequantized value
    and its codes are recorded for :func:`sparseforge.save`.

    Example:
        >>> import torch, sparseforge as sf
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        >>> batches = [torch.randn(64, 16) for _ in range(4)]
        >>> rep = sf.quant.gptq_(model, batches, "gptq-int4")
        >>> sorted(rep.layers), int(model[0].sparseforge_quant.q.abs().max()) <= 7
        (['0', '2'], True)
    """
    gptq = [name for name, s in SCHEMES.items() if s.calibrated]
    if not isinstance(scheme, str) or scheme not in SCHEMES or not SCHEMES.get(scheme).calibrated:
        raise SCHEMES.error(scheme, known=gptq)
    key = SCHEMES.canonical(scheme)
    bits = SCHEMES.get(key).bits
    layers = {layer.name: layer.module for layer in as_target(target).select(model)
              if isinstance(layer.module, (nn.Linear, nn.Conv2d)) and layer.param_name == "weight"}
    if not layers:
        raise SparseforgeError("GPTQ found no Linear or Conv2d layer to quantize in the target")
    for name, m in layers.items():  # fail before changing anything
        fan_in = weight_matrix(m).shape[1]
        if group_size is not None and (group_size < 1 or fan_in % group_size):
            raise SparseforgeError(f"{name}.weight has {fan_in} inputs per output channel, not divisible by "
                                   f"group_size {group_size}: pick a group size that divides it, or None (per channel)")
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            raise SparseforgeError(f"{name} is a grouped convolution (groups={m.groups}): exclude it from the target")
    rep = GPTQReport(key, group_size)

    def process(name: str, module: nn.Module, stats: LayerStats) -> None:
        w = weight_matrix(module)
        kept = w != 0
        res = obs_compress(w, stats.hessian, keep=kept, bits=bits, group_size=group_size,
                           block_size=block_size, damp=damp, act_order=act_order)
        zeroed = int((kept & (res.codes.reshape(kept.shape) == 0)).sum())  # kept weights now exactly 0
        set_weight_matrix(module, res.weight)
        shape = tuple(module.weight.shape)
        setattr(module, QUANT_ATTR, QuantizedTensor(res.codes.reshape(shape), res.scale, bits, group_size, shape,
                                                     "gptq", rounded_to_zero=zeroed))
        rep.layers[name] = {"error": res.error, "damp": res.damp, "rows": float(stats.rows),
                            "rounded_to_zero": float(zeroed)}

    sequential(model, calibration, layers, process, gram=True, progress=progress, description=f"GPTQ {key}")
    return rep
