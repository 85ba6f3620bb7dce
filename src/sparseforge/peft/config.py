"""The adapter configurations: :class:`PaCA` and :class:`LoRA`, validated dataclasses that serialize.

A configuration says which Linear layers to adapt (``targets``, ``exclude``),
how many trained columns or how large a rank (``rank``), its seed, and
whether a pruned base keeps its zeros (``keep_mask``). ``make_layer`` builds
one adapter layer; :func:`sparseforge.peft.apply` calls it for every target.

Targets. A string with a glob character (``*?[``) is an :mod:`fnmatch` glob
over the full module name (``"encoder.layer.*.attention.self.query"``); a
plain name matches the module of that name or any module whose name ends
with ``"." + name``, as in HF PEFT (``"query"`` matches every BERT layer's
``...attention.self.query``; ``"dense"`` matches every ``...dense``). Only
``nn.Linear`` modules are adapted (MultiheadAttention's ``out_proj`` is
skipped: the attention reads its weight directly).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch
from torch import nn

from sparseforge.errors import SparseforgeError
from sparseforge.peft.layer import AdapterLayer, layer_generator
from sparseforge.peft.lora import LoRALinear
from sparseforge.peft.paca import SELECTIONS, PaCALinear, select_columns
from sparseforge.registry import Registry


def _names(value: Sequence[str] | str | None, what: str, default: tuple[str, ...]) -> tuple[str, ...]:
    if value is None:
        return default
    items = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(v, str) and v for v in items):
        raise SparseforgeError(f"{what} must be module names or globs (non-empty strings), got {value!r}")
    return items


ADAPTERS: Registry[type[AdapterConfig]] = Registry("adapter method", name_of=lambda cls: cls.method)
"""Adapter methods by their ``method`` name (``paca``, ``lora``): the configurations saved adapters
name, rebuilt by :func:`config_from_dict`. ``@ADAPTERS.register`` above a config class adds one."""


@dataclass(frozen=True)
class AdapterConfig:
    """What PaCA and LoRA configurations share (see the module docstring for ``targets``)."""

    rank: int = 8
    targets: Sequence[str] | str | None = None
    exclude: Sequence[str] | str = ()
    seed: int = 0
    keep_mask: bool = True

    method: ClassVar[str] = ""

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise SparseforgeError(f"{type(self).__name__}.rank must be a positive integer, got {self.rank!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise SparseforgeError(f"{type(self).__name__}.seed must be an integer, got {self.seed!r}")
        if not isinstance(self.keep_mask, bool):
            raise SparseforgeError(f"{type(self).__name__}.keep_mask must be True or False, got {self.keep_mask!r}")
        object.__setattr__(self, "targets", _names(self.targets, "targets", ("*",)))
        if not self.targets:
            raise SparseforgeError("targets is empty: name the Linear layers to adapt, or None for every Linear")
        object.__setattr__(self, "exclude", _names(self.exclude, "exclude", ()))

    def to_dict(self) -> dict[str, Any]:
        """The configuration as JSON-able values, with its ``method``."""
        return {"method": self.method, **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}}

    def _check_rank(self, name: str, linear: nn.Linear) -> None:
        if self.rank > linear.in_features:
            raise SparseforgeError(
                f"{name}: {type(self).__name__} rank {self.rank} exceeds the layer's input dimension "
                f"{linear.in_features} (weight {list(linear.weight.shape)}); use rank <= {linear.in_features} "
                f"or exclude the layer")

    def make_layer(self, name: str, linear: nn.Linear, info: Mapping[str, Any] | None = None) -> AdapterLayer:
        """The adapter layer for ``linear`` (named ``name``); ``info`` is a saved layer's record."""
        raise NotImplementedError


@ADAPTERS.register
@dataclass(frozen=True)
class PaCA(AdapterConfig):
    """Partial connection adaptation: train ``rank`` input columns of each targeted Linear in place.

    Rule ("PaCA: Partial Connection Adaptation for Efficient Fine-Tuning",
    Woo et al., ICLR 2025; :mod:`sparseforge.peft.paca`): the columns
    ``W[:, idx]`` train, the rest of ``W`` and the bias stay frozen; the
    forward is one matmul with the full weight and the backward saves only
    ``x[..., idx]``.

    Args:
        rank: trained columns per layer, ``r`` (default 8); at most the
            layer's input dimension.
        targets: module names or globs (default None: every Linear).
        exclude: module names or globs left alone (default none).
        selection: ``"random"`` (default, the paper's) or ``"norm"`` (the
            columns of largest L2 norm).
        seed: seed of the random selection (default 0).
        keep_mask: a pruned layer's zeros stay zero (default True). Zeros are
            detected at apply time, so on a quantized base the weights that
            rounded to 0 stay 0 too; pass False to let them train.

    Example:
        >>> import torch, sparseforge as sf
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> sf.peft.apply(model, sf.peft.PaCA(rank=2)).trainable  # 8 x 2 + 2 x 2
        20
    """

    selection: str = "random"

    method: ClassVar[str] = "paca"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.selection not in SELECTIONS:
            raise SparseforgeError(f"unknown PaCA selection {self.selection!r}; valid: {', '.join(SELECTIONS)}")

    def make_layer(self, name: str, linear: nn.Linear, info: Mapping[str, Any] | None = None) -> PaCALinear:
        self._check_rank(name, linear)
        if info is not None:
            index = torch.tensor(info["indices"], dtype=torch.int64)
            if index.numel() != self.rank:
                raise SparseforgeError(f"{name}: the adapter records {index.numel()} columns for rank {self.rank}")
        else:
            index = select_columns(linear.weight, self.rank, self.selection, self.seed, name)
        return PaCALinear(linear, index, self.keep_mask)


@ADAPTERS.register
@dataclass(frozen=True)
class LoRA(AdapterConfig):
    """Low-rank adaptation, the baseline: ``y = W x + b + (alpha / rank) B A x``, ``W`` and ``b`` frozen.

    Rule ("LoRA: Low-Rank Adaptation of Large Language Models", Hu et al.,
    2021; :mod:`sparseforge.peft.lora`): ``A`` Kaiming-uniform, ``B`` zero.

    Args:
        rank: ``r`` (default 8); at most the layer's input dimension.
        alpha: scale numerator (default None: ``alpha = rank``, scale 1).
        targets, exclude, seed, keep_mask: as for :class:`PaCA`; ``seed``
            seeds ``A``'s initialisation; with ``keep_mask`` a pruned layer's
            update is masked.

    Example:
        >>> import torch, sparseforge as sf
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> sf.peft.apply(model, sf.peft.LoRA(rank=2, targets=["0"])).trainable  # A 2 x 8, B 8 x 2
        32
    """

    alpha: float | None = None

    method: ClassVar[str] = "lora"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.alpha is not None and (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))
                                       or not self.alpha > 0):
            raise SparseforgeError(f"LoRA.alpha must be a positive number or None (= rank), got {self.alpha!r}")

    def make_layer(self, name: str, linear: nn.Linear, info: Mapping[str, Any] | None = None) -> LoRALinear:
        self._check_rank(name, linear)
        return LoRALinear(linear, self.rank, self.alpha, self.keep_mask, layer_generator(self.seed, name))


def config_from_dict(data: Mapping[str, Any]) -> AdapterConfig:
    """Rebuild a configuration from :meth:`AdapterConfig.to_dict` (validated; unknown keys are an error)."""
    method = data.get("method") if isinstance(data, Mapping) else data
    if not isinstance(method, str) or method not in ADAPTERS:
        raise ADAPTERS.error(method)
    cls = ADAPTERS.get(method)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known - {"method"})
    if unknown:
        raise SparseforgeError(f"unknown {cls.__name__} settings {unknown}; valid: {sorted(known)}")
    return cls(**{k: v for k, v in data.items() if k != "method"})
