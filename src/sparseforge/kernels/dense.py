"""The dense paths a user could pick instead of a sparse one: bf16 (AMX) and int8 weight-only Linear layers.

They are the baselines :func:`sparseforge.to_sparse` must beat ("faster"
means faster than the best dense path the precision allows, not than
float32) and candidates it may choose for a layer where no sparse format
wins. Both are inference-only and return the input's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparseforge.errors import SparseforgeError

__all__ = ["BF16Linear", "Int8Linear", "int8_weight_only_available"]


class BF16Linear(nn.Module):
    """``nn.Linear`` with a bfloat16 weight: inputs are rounded to bfloat16, products use the CPU's bf16 units (AMX).

    Rule: ``y = F.linear(x.bfloat16(), W.bfloat16(), b.bfloat16())`` cast
    back to ``x``'s dtype: what ``model.bfloat16()`` gives for this layer.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", linear.weight.detach().to(torch.bfloat16).contiguous())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.bfloat16), self.weight, self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def int8_weight_only_available(layer: nn.Linear | None = None) -> bool:
    """Whether this PyTorch has ``aten._weight_int8pack_mm`` (int8 weights, bf16 activations) on CPU,
    and, given a ``layer``, whether the kernel takes its shape: ``in_features`` a multiple of 16 (torch
    2.13's CPU kernel crashes the process on other widths, e.g. 100 or 300)."""
    if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        return False
    return layer is None or layer.in_features % 16 == 0


class Int8Linear(nn.Module):
    """``nn.Linear`` with int8 weights and per-output-channel scales, run by PyTorch's ``_weight_int8pack_mm``.

    Rule: codes and scales by :func:`sparseforge.quant.rtn.quantize_weight`
    (symmetric, per output channel, zeros stay zero); ``y = (x.bfloat16() @
    codes.T) * scales + b`` computed by PyTorch's own int8 weight-only
    kernel, cast back to ``x``'s dtype.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if not int8_weight_only_available():
            raise SparseforgeError("this PyTorch has no aten._weight_int8pack_mm (int8 weight-only matmul)")
        if not int8_weight_only_available(linear):
            raise SparseforgeError(f"PyTorch's int8 weight-only kernel needs in_features to be a multiple of 16, "
                                   f"got {linear.in_features}: keep this layer in bf16 or fp32")
        from sparseforge.quant.rtn import quantize_weight  # the one int8 rounding rule

        qt = quantize_weight(linear.weight.detach().to(torch.float32), bits=8, group_size=None)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("codes", qt.q.contiguous())
        self.register_buffer("scales", qt.scale.reshape(-1).to(torch.bfloat16).contiguous())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch.ops.aten._weight_int8pack_mm(flat, self.codes, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
