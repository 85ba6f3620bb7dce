"""LoRA, the baseline: a frozen Linear plus a trained low-rank update.

The rule ("LoRA: Low-Rank Adaptation of Large Language Models", Hu et al.,
2021): ``y = W x + b + (alpha / r) B A x`` with ``A`` ``[r, in]`` and ``B``
``[out, r]`` trained and ``W``, ``b`` frozen. ``A`` starts Kaiming-uniform
(``a = sqrt(5)``, as Microsoft's loralib and HF PEFT do) and ``B`` at zero,
so training starts from the base model. ``alpha`` defaults to ``r`` (scale
1), the paper's practice of setting alpha to the first r tried and not
tuning it (also HF PEFT's default pairing r=8, alpha=8).

A pruned base keeps its zeros: with a mask (``W != 0`` at apply time) the
update is masked, ``W + (alpha / r) (B A) * mask``, already in training
(one matmul with that weight instead of the low-rank path), so the trained
function is exactly the one a merge produces.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sparseforge.peft.layer import AdapterLayer, keep_mask_of


class LoRALinear(AdapterLayer):
    """A frozen Linear plus ``(alpha / rank) B A`` (LoRA); see the module docstring.

    Args:
        base: the Linear; it is frozen and kept as ``self.base``.
        rank: ``r``, the inner dimension of the update.
        alpha: the update's scale numerator (default ``rank``: scale 1).
        keep_mask: keep the zeros of a pruned ``base`` (default True).
        generator: the random generator for ``A``'s initialisation.
    """

    method = "lora"

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None, keep_mask: bool = True,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(base)
        w = base.weight
        self.rank = int(rank)
        self.alpha = float(rank if alpha is None else alpha)
        self.scaling = self.alpha / self.rank
        a = torch.empty(self.rank, base.in_features, dtype=w.dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(a.to(w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, self.rank, dtype=w.dtype, device=w.device))
        self.register_buffer("mask", keep_mask_of(w, keep_mask))

    def delta_weight(self) -> torch.Tensor:
        """``(alpha / r) B A``, masked when the base is sparse."""
        delta = (self.lora_B @ self.lora_A) * self.scaling
        return delta if self.mask is None else delta * self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mask is not None:
            return nn.functional.linear(x, self.base.weight + self.delta_weight(), self.base.bias)
        return self.base(x) + nn.functional.linear(nn.functional.linear(x, self.lora_A), self.lora_B) * self.scaling

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        return self.base.weight.detach() + self.delta_weight().to(self.base.weight.dtype)

    def layer_info(self) -> dict[str, object]:
        return {**super().layer_info(), "alpha": self.alpha}

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, masked={self.mask is not None}"
