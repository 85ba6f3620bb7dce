"""Applying adapters to a model, listing what trains, and merging them back.

:func:`apply` replaces each targeted ``nn.Linear`` by an adapter layer that
holds it (frozen); :func:`merge` writes each layer's trained update into
that Linear's weight and puts the Linear back, leaving a plain model.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sparseforge.errors import SparseforgeError
from sparseforge.peft.config import AdapterConfig
from sparseforge.peft.layer import AdapterLayer
from sparseforge.quant.rtn import QUANT_ATTR, quantization_of, quantize_weight
from sparseforge.targets import Target, set_submodule

_GLOB_CHARS = "*?["


@dataclass
class PeftReport:
    """What :func:`apply` did: the adapted layers and the parameter counts.

    ``trainable`` counts the adapter's parameters; ``base_params`` the
    model's own parameters (the frozen Linears included). ``masked`` lists
    the layers whose zeros are kept, ``quantized`` those whose base carries a
    quantization record (:func:`sparseforge.quant.quantize_`).
    """

    method: str
    layers: list[str]
    trainable: int
    base_params: int
    masked: list[str] = field(default_factory=list)
    quantized: list[str] = field(default_factory=list)

    @property
    def trainable_fraction(self) -> float:
        return self.trainable / self.base_params if self.base_params else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "layers": list(self.layers), "trainable": self.trainable,
                "base_params": self.base_params, "trainable_fraction": self.trainable_fraction,
                "masked": list(self.masked), "quantized": list(self.quantized)}

    def __str__(self) -> str:
        return (f"{self.method}: {len(self.layers)} layers, {self.trainable:,} trainable parameters "
                f"({self.trainable_fraction:.3%} of {self.base_params:,}); masked {len(self.masked)}, "
                f"quantized base {len(self.quantized)}")


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """The model's adapter layers by module name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLayer)}


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters (PaCA's ``partial``, LoRA's ``lora_A``/``lora_B``), for the optimizer.

    Example:
        >>> import torch, sparseforge as sf
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3))
        >>> _ = sf.peft.apply(model, sf.peft.PaCA(rank=2))
        >>> [tuple(p.shape) for p in sf.peft.trainable_parameters(model)]
        [(3, 2)]
    """
    return [p for layer in adapter_layers(model).values() for p in layer.adapter_tensors().values()]


def _is_dynamic_quantized(module: nn.Module) -> bool:
    kind = type(module)
    return "quantized" in kind.__module__ and "Linear" in kind.__name__


def _select(model: nn.Module, config: AdapterConfig) -> list[tuple[str, nn.Linear]]:
    """The targeted Linears (see :mod:`sparseforge.peft.config` for the name rule)."""
    if isinstance(model, AdapterLayer) or adapter_layers(model):
        raise SparseforgeError("the model already has adapters: merge them (sf.peft.merge) before applying new ones")
    if isinstance(model, nn.Linear):
        raise SparseforgeError("the model is a bare nn.Linear, which cannot be replaced in place: "
                               "wrap it (nn.Sequential(linear)) first")
    names = {name for name, _ in model.named_modules()}
    globs = tuple(spec if any(c in spec for c in _GLOB_CHARS) or spec in names else f"*.{spec}"
                  for spec in config.targets)
    dynamic = [name for name, m in model.named_modules()
               if _is_dynamic_quantized(m) and any(fnmatch.fnmatchcase(name, g) for g in globs)]
    if dynamic:
        raise SparseforgeError(
            f"{dynamic[0]} is a dynamically quantized Linear (sparseforge.quant.quantize_dynamic_int8), which has no "
            f"trainable weight: apply {config.method} to the float model before quantize_dynamic_int8, or use fake "
            f"quantization (sparseforge.quant.quantize_(model, 'int8'/'int4')) for a quantized base")
    skipped = tuple(name for name, m in model.named_modules()
                    if isinstance(m, nn.modules.linear.NonDynamicallyQuantizableLinear))
    target = Target(include=globs, exclude=tuple(config.exclude) + skipped, types=(nn.Linear,))
    try:
        layers = target.select(model)
    except SparseforgeError as e:
        raise SparseforgeError(f"{config.method} targets {list(config.targets)}: {e}") from None
    return [(layer.name, layer.module) for layer in layers]


def apply(model: nn.Module, config: AdapterConfig, *, freeze: bool = True,
          _saved: Mapping[str, Mapping[str, Any]] | None = None) -> PeftReport:
    """Put adapters of ``config`` (:class:`PaCA` or :class:`LoRA`) on the targeted Linears of ``model``, in place.

    Each targeted ``nn.Linear`` is replaced by an adapter layer holding it;
    its weight and bias are frozen. With ``freeze`` (default True) every
    other parameter of ``model`` is frozen too, so only
    :func:`trainable_parameters` train (unfreeze a task head yourself, or
    keep it outside ``model``). A pruned layer (exact zeros) keeps its
    zeros when ``config.keep_mask`` (default); a fake-quantized base
    (:func:`sparseforge.quant.quantize_`) stays at its quantized values
    while the adapter trains in full precision. Raises
    :class:`~sparseforge.errors.SparseforgeError` when a target matches no
    Linear, a rank exceeds a layer's input dimension, the model already has
    adapters, or a target is a dynamically quantized Linear.

    Example:
        >>> import torch, sparseforge as sf
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> report = sf.peft.apply(model, sf.peft.LoRA(rank=2, targets=["2"]))
        >>> report.layers, report.trainable, type(model[2]).__name__
        (['2'], 20, 'LoRALinear')
    """
    if not isinstance(config, AdapterConfig):
        raise SparseforgeError(f"config must be sf.peft.PaCA(...) or sf.peft.LoRA(...), got {config!r}")
    selected = _select(model, config)
    layers = [(name, config.make_layer(name, linear, _saved[name] if _saved else None)) for name, linear in selected]
    for _, layer in layers:
        layer.config = config  # what save_adapter records
    if freeze:
        model.requires_grad_(False)
    for name, layer in layers:  # all layers built (and checked) before the model changes
        set_submodule(model, name, layer)
    adapter_ids = {id(p) for _, layer in layers for p in layer.adapter_tensors().values()}
    return PeftReport(
        method=config.method,
        layers=[name for name, _ in layers],
        trainable=sum(p.numel() for _, layer in layers for p in layer.adapter_tensors().values()),
        base_params=sum(p.numel() for p in model.parameters() if id(p) not in adapter_ids),
        masked=[name for name, layer in layers if layer.mask is not None],
        quantized=[name for name, layer in layers if quantization_of(layer.base) is not None],
    )


@torch.no_grad()
def merge(model: nn.Module, *, requantize: bool = False) -> nn.Module:
    """Write every adapter's update into its Linear and put the plain Linear back; returns ``model``.

    PaCA writes its trained columns into ``W[:, idx]``; LoRA adds
    ``(alpha / r) B A`` (masked on a pruned base) to ``W``. Afterwards the
    model holds only its original modules (plain ``nn.Linear``, no extra
    parameters, buffers or hooks); their parameters stay frozen as
    :func:`apply` left them. Zeros kept by a mask stay exactly zero.

    A quantized base (:func:`sparseforge.quant.quantize_`): the merged weight
    is no longer on the recorded quantization grid (PaCA's columns are in full
    precision), so the record (``module.sparseforge_quant``) is dropped by
    default; with ``requantize=True`` the merged weight is quantized again by
    round-to-nearest with the recorded bits and group size, and the new
    codes are recorded.
    """
    layers = adapter_layers(model)
    if not layers:
        raise SparseforgeError("the model has no adapters to merge (apply them with sf.peft.apply)")
    for name, layer in layers.items():
        base = layer.base
        base.weight.copy_(layer.merged_weight())
        record = getattr(base, QUANT_ATTR, None)
        if record is not None:
            if requantize:
                qt = quantize_weight(base.weight, record.bits, record.group_size, f"{name}.weight")
                base.weight.copy_(qt.dequantize().to(base.weight.dtype))
                setattr(base, QUANT_ATTR, qt)
            else:
                delattr(base, QUANT_ATTR)
        set_submodule(model, name, base)
    return model
