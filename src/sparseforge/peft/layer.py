"""What every adapter layer shares: the frozen Linear it wraps and the mask of its zeros.

An adapter layer replaces one ``nn.Linear`` of the model and holds that very
module as ``base`` (frozen), so that :func:`sparseforge.peft.merge` can
write the trained update into ``base.weight`` and put the original module
object back: after a merge nothing of the adapter is left.
"""

from __future__ import annotations

import zlib
from typing import ClassVar

import torch
from torch import nn


def layer_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded by ``seed`` and the layer's name: a layer's random choices do not
    depend on which other layers are targeted."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


def keep_mask_of(weight: torch.Tensor, keep: bool) -> torch.Tensor | None:
    """``weight != 0`` when ``keep`` and the weight has exact zeros (a pruned layer), else None."""
    if not keep:
        return None
    mask = weight.detach() != 0
    return None if bool(mask.all()) else mask


class AdapterLayer(nn.Module):
    """Base of :class:`~sparseforge.peft.paca.PaCALinear` and :class:`~sparseforge.peft.lora.LoRALinear`.

    Subclasses define ``method``, :meth:`merged_weight` (the weight a merge
    writes into ``base``), :meth:`adapter_tensors` (what ``save_adapter``
    stores) and :meth:`layer_info` (what the adapter's JSON records).
    """

    method: ClassVar[str] = ""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def merged_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The trained tensors by short name (``partial``, ``lora_A``, ...): the adapter's parameters."""
        return {name: p for name, p in self.named_parameters(recurse=False)}

    def layer_info(self) -> dict[str, object]:
        return {"in_features": self.in_features, "out_features": self.out_features}
